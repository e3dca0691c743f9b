"""``/api/tasks`` through the Klein app, the autodispatch flags, and the journal on its own."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from opencoderouter.api import RouterAPI
from opencoderouter.config import Options
from opencoderouter.registry import Naming, Registry
from opencoderouter.tasks.journal import DONE, MAX_STORED_TEXT, Journal, JournalError, TaskRecord
from opencoderouter.tasks.service import TaskService

from .support import REPO, subprocess_env
from .test_launcher_api import FromAddress, call


@pytest.fixture
def api(tmp_path):
    clock = Clock()
    registry = Registry(clock, stale_after=30, naming=Naming("alice", "alice"))
    service = TaskService(Journal(str(tmp_path / "state")), registry, clock, http=None)
    service.startService()
    yield RouterAPI(registry, tasks=service), service
    service.stopService()


TASK = "---\nproject: Archer\n---\nFix the login timeout\n"


def test_a_posted_task_is_queued_and_listed(api):
    router_api, service = api
    client = StubTreq(router_api.resource())
    assert call(client, "GET", "/tasks") == (200, [])
    status, body = call(client, "POST", "/tasks", {"task": TASK, "title": "login"})
    assert status == 201
    assert (body["state"], body["project"], body["title"], body["source"]) == ("queued", "Archer", "login", "api")
    service.clock.advance(0)
    status, listed = call(client, "GET", "/tasks")
    assert status == 200 and [t["id"] for t in listed] == [body["id"]]
    assert listed[0]["waiting"] == "project 'Archer' is not running yet"
    status, one = call(client, "GET", f"/tasks/{body['id']}")
    assert status == 200 and one["id"] == body["id"]
    assert call(client, "GET", "/tasks/tnope")[0] == 404


@pytest.mark.parametrize("body, status, words", [
    ({"task": "---\n- a list\n---\nx"}, 400, "expected 'key: value' lines"),
    ({"task": "---\nproject: [x\n---\nx"}, 400, "malformed front matter"),
    ({"task": "no front matter"}, 400, "no project"),
    ({"prompt": TASK}, 400, 'send a JSON object {"task"'),
    (["not", "an", "object"], 400, 'send a JSON object {"task"'),
])
def test_a_bad_posted_task_is_refused_with_a_sentence(api, body, status, words):
    router_api, service = api
    code, answer = call(StubTreq(router_api.resource()), "POST", "/tasks", body)
    assert code == status and words in answer["message"]
    assert service.tasks_json() == []


def test_posting_needs_json_and_the_loopback_or_credentials(api):
    router_api, service = api
    client = StubTreq(router_api.resource())
    code, answer = call(client, "POST", "/tasks", {"task": TASK}, content_type="text/plain")
    assert code == 415 and answer["error"] == "unsupported_media_type"
    remote = StubTreq(FromAddress(router_api.resource(), IPv4Address("TCP", "192.0.2.7", 5000)))
    code, answer = call(remote, "POST", "/tasks", {"task": TASK})
    assert code == 403 and "needs the loopback or the router's credentials" in answer["message"]
    assert service.tasks_json() == []


def test_without_a_task_source_the_endpoints_say_how_to_turn_it_on():
    registry = Registry(Clock(), stale_after=30, naming=Naming("alice", "alice"))
    client = StubTreq(RouterAPI(registry).resource())
    for method, body in (("GET", None), ("POST", {"task": TASK})):
        code, answer = call(client, method, "/tasks", body)
        assert code == 503 and "--tasks-dir DIR or --ticktick-token-file FILE" in answer["message"]


# -- the flags --------------------------------------------------------------------------------------
def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def error_of(*argv: str) -> str:
    with pytest.raises(SystemExit) as raised:
        parse(*argv)
    return str(raised.value.code)


def test_task_flags_have_their_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    options = parse("--tasks-dir", str(tmp_path / "new" / "tasks"))
    assert options["tasks-dir"] == str(tmp_path / "new" / "tasks") and os.path.isdir(options["tasks-dir"])
    assert options["state-dir"] == str(tmp_path / "xdg" / "opencoderouter")
    assert (options["tasks-interval"], options["tasks-tag"], options["tasks-per-project"], options["tasks-max"]) == (
        300.0, "autocode", 1, 4)
    assert (options["tasks-permissions"], options["tasks-timeout"], options["tasks-wait"]) == ("reject", 3600.0, 1800.0)
    assert options["ticktick-token"] is None and options["ticktick-api"] == "https://api.ticktick.com/open/v1"
    assert parse("--tasks-timeout", "0")["tasks-timeout"] is None
    assert parse("--tasks-interval", "1m")["tasks-interval"] == 60.0


@pytest.mark.parametrize("argv, words", [
    (("--tasks-permissions", "yes"), "--tasks-permissions: 'yes' is not reject, once or always"),
    (("--tasks-per-project", "0"), "--tasks-per-project: 0 must be at least 1"),
    (("--tasks-interval", "soon"), "--tasks-interval: 'soon' is not a duration"),
    (("--ticktick-api", "api.ticktick.com"), "is not a URL like https://api.ticktick.com/open/v1"),
])
def test_bad_task_flags_are_one_sentence(argv, words):
    message = error_of(*argv)
    assert words in message and "\n" not in message


def test_the_ticktick_token_file_is_read_like_the_other_credential_files(tmp_path):
    token = tmp_path / "ticktick-token"
    token.write_text("\n  tt-0123456789abcdef  \n")
    token.chmod(0o644)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        options = parse("--ticktick-token-file", str(token))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert options["ticktick-token"] == "tt-0123456789abcdef"
    warnings = [formatEvent(e) for e in seen if "ticktick-token-file" in formatEvent(e)]
    assert warnings == [f"--ticktick-token-file: {token} is readable by other users; chmod 600 it"]
    assert not any("tt-0123456789abcdef" in formatEvent(e) for e in seen)
    token.chmod(0o600)
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    empty = tmp_path / "empty"
    empty.write_text("\n\n")
    assert "must hold the access token on its first line" in error_of("--ticktick-token-file", str(empty))
    assert f"--ticktick-token-file: cannot read {tmp_path}/missing" in error_of(
        "--ticktick-token-file", str(tmp_path / "missing"))


# -- the journal -----------------------------------------------------------------------------------
def test_the_journal_keeps_tasks_and_takes_a_source_key_once(tmp_path):
    journal = Journal(str(tmp_path / "state"))
    first = TaskRecord(id="t1", source="ticktick", created=1.0, source_key="ticktick:abc", body="x")
    assert journal.insert(first) and first.seq == 1
    assert not journal.insert(TaskRecord(id="t2", source="ticktick", created=2.0, source_key="ticktick:abc"))
    assert journal.knows("ticktick:abc") and not journal.knows("ticktick:other")
    first.state, first.text = DONE, "y" * (MAX_STORED_TEXT + 10)
    journal.save(first)
    [again] = journal.open_tasks()
    assert again.state == DONE and again.text.endswith("[… cut: the text was longer than 1 MiB]")
    first.reported = True
    journal.save(first)
    assert journal.open_tasks() == [] and [r.id for r in journal.recent(10)] == ["t1"]
    assert journal.get("t1").reported and journal.get("t9") is None
    journal.close()
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700


def test_a_second_router_cannot_use_the_same_journal(tmp_path):
    journal = Journal(str(tmp_path / "state"))
    try:
        with pytest.raises(JournalError) as caught:
            Journal(str(tmp_path / "state"))
        assert "another router already uses the task journal" in str(caught.value)
    finally:
        journal.close()
    Journal(str(tmp_path / "state")).close()  # free again once the first closed


def test_what_the_journal_wrote_survives_a_kill_9(tmp_path):
    state = tmp_path / "state"
    script = (
        "import os, signal\n"
        "from opencoderouter.tasks.journal import Journal, TaskRecord, PROMPTED\n"
        f"j = Journal({str(state)!r})\n"
        "r = TaskRecord(id='t1', source='api', created=1.0, body='b')\n"
        "j.insert(r)\n"
        "r.state, r.session_id = PROMPTED, 'ses_x'\n"
        "j.save(r)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), cwd=REPO, timeout=30)
    assert done.returncode == -9
    journal = Journal(str(state))
    [record] = journal.open_tasks()
    journal.close()
    assert (record.state, record.session_id) == ("prompted", "ses_x")


def test_an_unusable_state_dir_is_a_sentence(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalError) as caught:
        Journal(str(blocker / "state"))
    assert str(caught.value).startswith(f"--state-dir: cannot use {blocker}/state")


def test_a_router_whose_state_dir_is_taken_stops_with_a_sentence(tmp_path):
    journal = Journal(str(tmp_path / "state"))
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "opencoderouter", "--port", "0", "--hostname", "127.0.0.1", "--mdns=false", "--tasks-dir",
             str(tmp_path / "tasks"), "--state-dir", str(tmp_path / "state")],
            env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=60)
    finally:
        journal.close()
    assert done.returncode != 0
    assert "another router already uses the task journal" in done.stdout + done.stderr
