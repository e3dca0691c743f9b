"""The task service with the folder source, in process: scripted OpenCode servers on loopback ports, a real journal."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from opencoderouter.forwarding import BackendCredentials
from opencoderouter.registry import Sighting
from opencoderouter.task_file import DispatchError
from opencoderouter.tasks.folder import FolderSource
from opencoderouter.tasks.journal import PROMPTED, STARTING, Journal, TaskRecord
from opencoderouter.tasks.service import Incoming

from .tasks_support import Backends, Harness, later, until


@pytest.fixture
def world(tmp_path):
    backends = Backends(tmp_path / "projects")
    harness = Harness(tmp_path, backends)
    yield harness
    pytest_twisted.blockon(Deferred.fromCoroutine(harness.stop()))
    pytest_twisted.blockon(Deferred.fromCoroutine(backends.close()))


def folder(world: Harness) -> FolderSource:
    return FolderSource(str(world.tmp_path / "tasks"), interval=0.05)


def drop(world: Harness, name: str, text: str | bytes) -> Path:
    path = world.tmp_path / "tasks" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def outcome_of(world: Harness, kind: str, name: str) -> Any:
    path = world.tmp_path / "tasks" / kind / name
    return path.read_text() if path.exists() else None


# -- the folder, end to end ---------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_task_file_ends_in_done_with_the_answer_appended(world):
    archer = world.backends.start("Archer")
    world.start([folder(world)])
    drop(world, "fix.md", "---\nproject: Archer\n---\nFix the login timeout\n")
    done = await until(lambda: outcome_of(world, "done", "fix.md"), what="done/fix.md")
    assert done.startswith("---\nproject: Archer\n---\nFix the login timeout\n")
    assert "OpenCodeRouter outcome (task t" in done and "): done" in done
    assert "### Answer\n\nHello from the fake model." in done and "NOT MINE" not in done
    session = next(iter(archer.sessions))
    assert f"- session: {session}" in done
    assert f"- open: http://archer-alice.localhost:1/x/session/{session}" in done
    assert "- duration: " in done and "- status: done" in done
    assert os.listdir(world.tmp_path / "tasks" / "running") == []
    assert len(archer.prompts) == 1 and archer.sessions[session]["title"] == "Fix the login timeout"
    [task] = world.tasks()
    assert task["state"] == "done" and task["reported"] and task["text"] == "Hello from the fake model."
    assert [e["task"]["state"] for e in world.events if e["event"] == "task"][-1] == "done"


@pytest_twisted.ensureDeferred
async def test_a_failing_session_ends_in_failed_with_the_error(world):
    world.backends.start("Archer", behaviour="error")
    world.start([folder(world)])
    drop(world, "broken.md", "---\nproject: archer\n---\nRefactor everything\n")
    failed = await until(lambda: outcome_of(world, "failed", "broken.md"), what="failed/broken.md")
    assert "): failed" in failed and "### Error\n\nAPIError: Bad Request: fake model refuses" in failed
    assert world.tasks()[0]["status"] == "error"


@pytest.mark.parametrize("name, text, words", [
    ("yaml.md", "---\nproject: [unclosed\n---\nFix it\n", "malformed front matter"),
    ("list.md", "---\n- a\n- b\n---\nFix it\n", "expected 'key: value' lines"),
    ("plain.md", "Just fix it\n", "no project"),
    ("model.md", "---\nproject: Archer\nmodel: sonnet\n---\nFix it\n", "is not provider/model"),
    ("perm.md", "---\nproject: Archer\npermissions: sure\n---\nFix it\n", "is not one of reject, once, always"),
    ("binary.md", b"---\nproject: Archer\n---\n\xff\xfe\n", "is not UTF-8"),
    ("huge.md", "---\nproject: Archer\n---\n" + "x" * 5_000_000, "a task may be at most 1 MiB"),
])
@pytest_twisted.ensureDeferred
async def test_bad_task_files_fail_with_a_sentence_and_are_never_sent(world, name, text, words):
    archer = world.backends.start("Archer")
    world.start([folder(world)])
    drop(world, name, text)
    failed = await until(lambda: outcome_of(world, "failed", name) if isinstance(text, str) else
                         (world.tmp_path / "tasks" / "failed" / name).exists(), what=f"failed/{name}")
    [task] = world.tasks()
    assert task["state"] == "failed" and task["status"] == "bad_input" and words in task["error"]
    assert "\n" not in task["error"]
    if isinstance(failed, str):
        assert words in failed
        if name == "huge.md":
            assert failed.startswith("---\nproject: Archer\n---\nxxx") and len(failed) > 5_000_000
    assert archer.sessions == {} and archer.prompts == []
    await later(0.2)
    assert len(world.tasks()) == 1, "a failed task is not taken again"


@pytest_twisted.ensureDeferred
async def test_a_task_file_that_disappears_mid_run_still_gets_its_outcome(world):
    archer = world.backends.start("Archer", behaviour="hang")
    world.start([folder(world)])
    drop(world, "gone.md", "---\nproject: Archer\n---\nWork on it\n")
    await until(lambda: archer.busy, what="the turn to start")
    (world.tmp_path / "tasks" / "running" / "gone.md").unlink()
    archer._finish_turn(next(iter(archer.busy)))
    done = await until(lambda: outcome_of(world, "done", "gone.md"), what="done/gone.md")
    assert done.startswith("---\nproject: Archer\n---\nWork on it")
    assert "disappeared from running/ while the task ran" in done and "Hello from the fake model." in done


def test_a_file_still_being_written_is_taken_only_once_it_stops_changing(tmp_path):
    source = FolderSource(str(tmp_path / "tasks"))
    task = tmp_path / "tasks" / "slow.md"
    task.write_text("---\nproject: A\n")
    assert source.poll(set()) == []
    with task.open("a") as handle:
        handle.write("---\nmore prompt\n")
    os.utime(task, ns=(0, 1))  # a new modification time, even within the clock's resolution
    assert source.poll(set()) == []
    [incoming] = source.poll(set())
    assert incoming.ref == "slow.md" and incoming.text.endswith("more prompt\n")
    assert (tmp_path / "tasks" / "running" / "slow.md").exists() and not task.exists()
    assert source.poll({"slow.md"}) == []
    # Hidden and non-Markdown files are not tasks.
    (tmp_path / "tasks" / ".draft.md").write_text("x")
    (tmp_path / "tasks" / "notes.txt").write_text("x")
    assert source.poll({"slow.md"}) == [] and source.poll({"slow.md"}) == []


def test_a_second_file_of_the_same_name_gets_its_own_name(tmp_path):
    source = FolderSource(str(tmp_path / "tasks"))
    (tmp_path / "tasks" / "running" / "fix.md").write_text("first")
    (tmp_path / "tasks" / "fix.md").write_text("second")
    source.poll({"fix.md"})
    [incoming] = source.poll({"fix.md"})
    assert incoming.ref == "fix-2.md" and incoming.text == "second"


# -- projects that are not (yet) there ------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_task_for_a_project_that_starts_later_is_picked_up_once_it_appears(world):
    world.start([folder(world)])
    drop(world, "later.md", "---\nproject: Later\n---\nWhen you are up\n")
    await until(lambda: world.tasks() and world.tasks()[0]["waiting"], what="the task to wait")
    [task] = world.tasks()
    assert task["state"] == "queued" and task["waiting"] == "project 'Later' is not running yet"
    await later(0.2)
    later_server = world.backends.start("Later")
    done = await until(lambda: outcome_of(world, "done", "later.md"), what="done/later.md")
    assert "Hello from the fake model." in done and len(later_server.prompts) == 1


@pytest_twisted.ensureDeferred
async def test_a_project_that_never_appears_fails_after_the_wait_naming_the_running_ones(world):
    world.backends.start("Archer")
    world.start([folder(world)], wait=0.3)
    drop(world, "nope.md", "---\nproject: Nope\n---\nHello?\n")
    failed = await until(lambda: outcome_of(world, "failed", "nope.md"), what="failed/nope.md")
    assert "no project 'Nope' appeared within 0.3s (running: Archer)" in failed


@pytest_twisted.ensureDeferred
async def test_a_project_path_that_does_not_exist_fails_at_once(world, tmp_path):
    world.start([folder(world)])
    drop(world, "path.md", f"---\nproject: {tmp_path}/no/such/dir\n---\nHello?\n")
    failed = await until(lambda: outcome_of(world, "failed", "path.md"), what="failed/path.md")
    assert f"project directory {tmp_path}/no/such/dir does not exist" in failed


@pytest_twisted.ensureDeferred
async def test_a_locked_project_without_the_routers_password_fails_with_a_sentence(world):
    directory = str(world.tmp_path / "Locked")
    world.backends.registry.record(Sighting(port=1, project_path=directory, version="fake", locked=True))
    service = world.start([])
    record = service.submit("---\nproject: Locked\n---\nHi\n")
    await until(lambda: record.state == "failed", what="the task to fail")
    assert "is password-protected and the router has no --opencode-password-file" in record.error


@pytest_twisted.ensureDeferred
async def test_a_locked_project_the_routers_password_opens_gets_its_task_with_the_password(world):
    vault = world.backends.start("Vault", password="s3cret")
    world.backends.start("Other", password="not-ours", opened=False)
    service = world.start([], credentials=BackendCredentials("opencode", "s3cret", may_inject=False))
    opened = service.submit("---\nproject: Vault\n---\nHi\n")
    refused = service.submit("---\nproject: Other\n---\nHi\n")
    await until(lambda: opened.state in ("done", "failed") and refused.state == "failed", what="both tasks to end")
    assert (opened.state, opened.error) == ("done", None) and len(vault.prompts) == 1
    assert "is password-protected and the router has no --opencode-password-file" in refused.error


# -- concurrency -------------------------------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_one_task_per_project_at_a_time_the_others_wait_in_order(world):
    archer = world.backends.start("Archer", behaviour="hang")
    zeus = world.backends.start("Zeus", behaviour="hang")
    service = world.start([])
    first = service.submit("---\nproject: Archer\n---\nfirst\n")
    second = service.submit("---\nproject: Archer\n---\nsecond\n")
    other = service.submit("---\nproject: Zeus\n---\nother\n")
    await until(lambda: len(archer.busy) == 1 and len(zeus.busy) == 1, what="two turns")
    await later(0.2)
    assert [p["parts"][0]["text"] for p in archer.prompts] == ["first"]
    assert service.task_json(second)["waiting"] == "waiting for 1 task(s) of archer to finish"
    archer._finish_turn(next(iter(archer.busy)))
    await until(lambda: len(archer.prompts) == 2, what="the second task to start")
    assert first.state == "done" and [p["parts"][0]["text"] for p in archer.prompts] == ["first", "second"]
    assert other.state == "prompted"


@pytest_twisted.ensureDeferred
async def test_the_global_cap_bounds_tasks_across_projects(world):
    archer = world.backends.start("Archer", behaviour="hang")
    zeus = world.backends.start("Zeus", behaviour="hang")
    service = world.start([], max_running=1)
    service.submit("---\nproject: Archer\n---\nfirst\n")
    waiting = service.submit("---\nproject: Zeus\n---\nsecond\n")
    await until(lambda: archer.busy, what="the first turn")
    await later(0.2)
    assert zeus.prompts == [] and "the most at once" in service.task_json(waiting)["waiting"]
    archer._finish_turn(next(iter(archer.busy)))
    await until(lambda: zeus.prompts, what="the second task to start")


# -- front matter the service honours -----------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_the_tasks_permissions_and_timeout_win_over_the_services(world):
    archer = world.backends.start("Archer", behaviour="permission")
    hanging = world.backends.start("Zeus", behaviour="hang")
    service = world.start([], permissions="reject")
    allowed = service.submit("---\nproject: Archer\npermissions: once\n---\nrm it\n")
    bounded = service.submit("---\nproject: Zeus\ntimeout: 300ms\n---\nforever\n")
    await until(lambda: allowed.state == "done" and bounded.state == "failed", what="both tasks to end")
    assert archer.permission_replies == [("per_fake1", "once")]
    assert bounded.status == "timeout" and "no result after 0.3s" in bounded.error
    assert hanging.aborted == [bounded.session_id]


# -- exactly once across restarts ----------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_a_task_running_when_the_router_stops_is_followed_again_never_sent_twice(world):
    archer = world.backends.start("Archer", behaviour="hang")
    world.start([folder(world)])
    drop(world, "long.md", "---\nproject: Archer\n---\nA long one\n")
    await until(lambda: archer.busy, what="the turn to start")
    session = next(iter(archer.busy))
    await world.stop()  # fires although the task still runs
    assert archer.aborted == [] and archer.busy == {session}, "stopping leaves the session running"
    journal = Journal(world.state_dir)
    [record] = journal.open_tasks()
    journal.close()
    assert record.state == PROMPTED and record.session_id == session
    world.start([folder(world)])
    await until(lambda: _followed_again(archer), what="the session to be followed again")
    archer._finish_turn(session)
    done = await until(lambda: outcome_of(world, "done", "long.md"), what="done/long.md")
    assert "Hello from the fake model." in done
    assert len(archer.prompts) == 1 and list(archer.sessions) == [session]


def _followed_again(server: Any) -> bool:
    """A second event stream was opened and the session's status asked for after it (it is being followed)."""
    paths = [uri.split(b"?")[0] for _, uri, _ in server.requests_seen]
    events = [i for i, path in enumerate(paths) if path == b"/event"]
    return len(events) >= 2 and b"/session/status" in paths[events[1]:]


@pytest_twisted.ensureDeferred
async def test_a_turn_that_ended_while_the_router_was_down_is_recorded_from_the_session(world):
    archer = world.backends.start("Archer", behaviour="hang")
    world.start([folder(world)])
    drop(world, "quiet.md", "---\nproject: Archer\n---\nFinish alone\n")
    await until(lambda: archer.busy, what="the turn to start")
    await world.stop()
    session = next(iter(archer.busy))
    archer._finish_quietly(session)
    world.start([folder(world)])
    done = await until(lambda: outcome_of(world, "done", "quiet.md"), what="done/quiet.md")
    assert "Finished while you were away." in done and len(archer.prompts) == 1


@pytest_twisted.ensureDeferred
async def test_a_prompt_that_never_reached_its_session_is_not_sent_again(world):
    archer = world.backends.start("Archer")
    archer.sessions["ses_orphan"] = {"id": "ses_orphan", "directory": archer.directory, "title": "x"}
    journal = Journal(world.state_dir)
    journal.insert(TaskRecord(id="t0000000001", source="api", created=1.0, state=PROMPTED, project="Archer",
                              body="---\nproject: Archer\n---\nHi\n", directory=archer.directory,
                              session_id="ses_orphan", started=time.time()))
    journal.close()
    world.start([])
    await until(lambda: world.tasks()[0]["state"] == "failed", what="the task to fail")
    [task] = world.tasks()
    assert task["error"].startswith("PromptLost: the session is idle with no answer") and archer.prompts == []


@pytest_twisted.ensureDeferred
async def test_a_task_that_was_starting_when_the_router_stopped_simply_starts_again(world):
    archer = world.backends.start("Archer")
    journal = Journal(world.state_dir)
    journal.insert(TaskRecord(id="t0000000002", source="api", created=1.0, state=STARTING, project="Archer",
                              body="---\nproject: Archer\n---\nAgain\n", attempts=1))
    journal.close()
    world.start([])
    await until(lambda: world.tasks()[0]["state"] == "done", what="the task to run")
    assert len(archer.prompts) == 1


@pytest_twisted.ensureDeferred
async def test_a_file_taken_just_before_a_crash_is_taken_again(world):
    archer = world.backends.start("Archer")
    drop(world, "running/crashed.md", "---\nproject: Archer\n---\nTaken, never journaled\n")
    world.start([folder(world)])
    done = await until(lambda: outcome_of(world, "done", "crashed.md"), what="done/crashed.md")
    assert "Taken, never journaled" in done and len(archer.prompts) == 1


# -- write-back and the API -----------------------------------------------------------------
class FlakySource:
    """A source with one task whose write-back fails ``failures`` times before it lands."""

    name = "flaky"
    interval = 0.05

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = 0
        self.given = False

    def poll(self, known_refs: set[str]) -> list[Incoming]:
        if self.given:
            return []
        self.given = True
        return [Incoming(ref="one", key="flaky:one", text="---\nproject: Archer\n---\nHi\n")]

    def report(self, record: TaskRecord, save: Any) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise OSError(f"disk on fire ({self.attempts})")

    def close(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_write_back_that_fails_is_retried_until_it_lands(world):
    world.backends.start("Archer")
    source = FlakySource(failures=2)
    world.start([source], tick=0.01)
    await until(lambda: world.tasks() and world.tasks()[0]["reported"], what="the write-back to land")
    assert source.attempts == 3 and world.tasks()[0]["report_error"] is None
    assert any(e["task"]["report_error"] == "disk on fire (1)" for e in world.events)


@pytest_twisted.ensureDeferred
async def test_an_outcome_not_written_back_before_a_restart_is_written_after_it(world):
    world.backends.start("Archer")
    source = FlakySource(failures=1000)
    world.start([source], tick=0.01)
    await until(lambda: source.attempts >= 2, what="failed write-backs")
    await world.stop()
    source.failures = 0
    world.start([source])
    await until(lambda: world.tasks()[0]["reported"], what="the write-back after the restart")
    assert len(world.backends.servers["Archer"].prompts) == 1


@pytest_twisted.ensureDeferred
async def test_submitted_tasks_run_and_bad_ones_are_refused_at_once(world):
    world.backends.start("Archer")
    service = world.start([])
    with pytest.raises(DispatchError) as caught:
        service.submit("---\n- not a mapping\n---\nx")
    assert "key: value" in caught.value.message
    with pytest.raises(DispatchError) as caught:
        service.submit("---\nproject: Archer\n---\n" + "y" * (2 << 20))
    assert "a task may be at most 1 MiB" in caught.value.message
    record = service.submit("---\nproject: Archer\n---\nFrom the API\n", title="api task")
    await until(lambda: service.task_json(record)["reported"], what="the task to finish")
    body = service.task_json(record)
    assert body["state"] == "done" and body["title"] == "api task" and body["source"] == "api"
    assert json.loads(json.dumps(service.tasks_json())) == service.tasks_json()
    assert service.find(record.id) is record and service.find("tnothere") is None
