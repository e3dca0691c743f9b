"""opencoderouter-dispatch: task parsing, and the whole client against scripted fakes on loopback sockets."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.task import Clock
from twisted.web.server import Site

from opencoderouter.dispatcher import DEFAULT_ROUTER, Dispatcher, Options
from opencoderouter.task_file import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_SESSION_ERROR,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    DispatchError,
    Task,
    parse_task,
)

from .dispatch_fakes import ScriptedOpenCode, StubRouter
from .support import REPO, free_port, subprocess_env


# -- parsing -------------------------------------------------------------------------------------
def test_front_matter_fields_and_prompt_are_read():
    task = parse_task(
        "---\nproject: Archer\nmodel: anthropic/claude-sonnet-4-5\nagent: coder\n---\n\nFix the bug.\nNow.\n")
    assert task == Task(project="Archer", prompt="Fix the bug.\nNow.", model="anthropic/claude-sonnet-4-5",
                        agent="coder")
    assert task.model_ref() == {"providerID": "anthropic", "modelID": "claude-sonnet-4-5"}


def test_flags_override_front_matter():
    task = parse_task("---\nproject: Archer\nmodel: a/b\n---\nGo", project="Other", model="openrouter/x/y",
                      agent="plan")
    assert (task.project, task.model, task.agent) == ("Other", "openrouter/x/y", "plan")
    assert task.model_ref() == {"providerID": "openrouter", "modelID": "x/y"}


def test_task_without_front_matter_needs_the_project_flag():
    assert parse_task("just do it", project="p").prompt == "just do it"
    with pytest.raises(DispatchError) as caught:
        parse_task("just do it")
    assert caught.value.exit_code == EXIT_BAD_INPUT and "project" in caught.value.message


def test_crlf_front_matter_from_a_task_app_is_read():
    assert parse_task("---\r\nproject: Archer\r\n---\r\nFix it\r\n").project == "Archer"


@pytest.mark.parametrize("text, words", [
    ("---\nproject: a\nFix it", "no closing"),
    ("---\nproject: [unclosed\n---\nFix it", "malformed front matter"),
    ("---\n- a\n- b\n---\nFix it", "key: value"),
    ("---\nproject: {a: 1}\n---\nFix it", "must be text"),
    ("---\nproject: a\nmodel: claude-sonnet\n---\nFix it", "provider/model"),
    ("---\nproject: a\n---\n\n  \n", "no prompt"),
    ("---\nmodel: a/b\n---\nFix it", "no project"),
])
def test_bad_tasks_are_refused_with_one_sentence(text, words):
    with pytest.raises(DispatchError) as caught:
        parse_task(text)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert words in caught.value.message and "\n" not in caught.value.message


# -- the client against fakes -------------------------------------------------------------------
class Harness:
    """A ScriptedOpenCode and a StubRouter on loopback ports, torn down after the test."""

    def __init__(self, tmp_path: Path, behaviour: str) -> None:
        self.directory = str(tmp_path / "Archer")
        self.opencode = ScriptedOpenCode(self.directory, behaviour=behaviour, heartbeat=0.2)
        self.backend_port = self.opencode.listen(reactor, 0)
        backend_url = f"http://127.0.0.1:{self.backend_port.getHost().port}/"
        self.stub = StubRouter("Archer", self.directory, backend_url)
        site = Site(self.stub)
        site.noisy = False
        self.router_port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.router = f"http://127.0.0.1:{self.router_port.getHost().port}"
        self.out, self.err = io.StringIO(), io.StringIO()

    def options(self, **kwargs: Any) -> Options:
        return Options(router=self.router, out=self.out, err=self.err, **kwargs)

    async def dispatch(self, task: Task | None = None, **kwargs: Any) -> Any:
        task = task or Task(project="archer", prompt="Fix the login timeout")
        return await Dispatcher(reactor, task, self.options(**kwargs)).run()

    async def close(self) -> None:
        self.opencode.close_streams()
        await maybeDeferred(self.backend_port.stopListening)
        await maybeDeferred(self.router_port.stopListening)


@pytest.fixture
def harness(tmp_path, request):
    made: list[Harness] = []

    def make(behaviour: str = "reply") -> Harness:
        made.append(Harness(tmp_path, behaviour))
        return made[-1]

    yield make
    for h in made:
        pytest_twisted.blockon(Deferred.fromCoroutine(h.close()))


@pytest_twisted.ensureDeferred
async def test_success_prints_only_this_sessions_text_and_exits_0(harness):
    h = harness("reply")
    result = await h.dispatch()
    assert result.exit_code == EXIT_DONE and result.status == "done"
    assert h.out.getvalue() == "Hello from the fake model.\n"
    assert "NOT MINE" not in h.out.getvalue()
    assert result.session_id in h.opencode.sessions
    assert h.opencode.sessions[result.session_id]["directory"] == h.directory
    assert h.opencode.sessions[result.session_id]["title"] == "Fix the login timeout"
    assert h.opencode.prompts == [{"parts": [{"type": "text", "text": "Fix the login timeout"}], "agent": "build"}]


@pytest_twisted.ensureDeferred
async def test_event_stream_is_open_before_the_prompt_is_sent(harness):
    h = harness("reply")
    seen: list[int] = []
    original = h.opencode._prompt_async
    h.opencode._prompt_async = lambda request, session: (
        seen.append(len(h.opencode.streams)), original(request, session))[1]
    await h.dispatch()
    assert seen == [1]


@pytest_twisted.ensureDeferred
async def test_model_and_agent_go_into_the_prompt(harness):
    h = harness("reply")
    await h.dispatch(Task(project="Archer", prompt="x", model="fake/fake-model", agent="plan"))
    assert h.opencode.prompts[0]["model"] == {"providerID": "fake", "modelID": "fake-model"}
    assert h.opencode.prompts[0]["agent"] == "plan"


@pytest_twisted.ensureDeferred
async def test_unknown_agent_is_bad_input_naming_the_agents(harness):
    h = harness("reply")
    result = await h.dispatch(Task(project="Archer", prompt="x", agent="coder"))
    assert result.exit_code == EXIT_BAD_INPUT
    assert "'coder'" in h.err.getvalue() and "build, plan" in h.err.getvalue()


@pytest_twisted.ensureDeferred
async def test_quiet_prints_no_text_but_the_result_has_it(harness):
    h = harness("reply")
    result = await h.dispatch(quiet=True)
    assert h.out.getvalue() == "" and result.text == "Hello from the fake model."


@pytest_twisted.ensureDeferred
async def test_reasoning_stays_off_stdout_and_tools_go_to_stderr(harness):
    h = harness("reasoning")
    result = await h.dispatch()
    assert result.exit_code == EXIT_DONE
    assert "SECRET" not in h.out.getvalue() and "Hello from the fake model." in h.out.getvalue()
    assert "tool bash running" in h.err.getvalue()


@pytest_twisted.ensureDeferred
async def test_session_error_exits_1_with_error_name_and_message(harness):
    h = harness("error")
    result = await h.dispatch()
    assert result.exit_code == EXIT_SESSION_ERROR and result.status == "error"
    assert result.error["name"] == "APIError"
    assert "APIError: Bad Request: fake model refuses" in h.err.getvalue()


@pytest_twisted.ensureDeferred
async def test_unknown_project_exits_3_listing_known_projects(harness):
    h = harness("reply")
    result = await h.dispatch(Task(project="nope", prompt="x"))
    assert result.exit_code == EXIT_NOT_FOUND and result.session_id is None
    assert "no such project 'nope'" in h.err.getvalue() and "known: Archer" in h.err.getvalue()


@pytest_twisted.ensureDeferred
async def test_project_given_as_a_path_resolves_by_path(harness):
    h = harness("reply")
    result = await h.dispatch(Task(project=h.directory, prompt="x"))
    assert result.exit_code == EXIT_DONE
    assert any(b"/api/resolve?path=" in q for q in h.stub.queries)


@pytest_twisted.ensureDeferred
async def test_a_note_says_when_the_projects_other_sessions_wait_for_a_person(harness):
    h = harness("reply")
    plain = h.stub._backend
    h.stub._backend = lambda: {**plain(), "agents": {"state": "needs_you", "label": "needs you (1)"}}
    result = await h.dispatch()
    assert result.exit_code == EXIT_DONE
    assert "note: this project's other sessions: needs you (1) (opencoderouter-status shows them)" in h.err.getvalue()
    h.stub._backend = lambda: {**plain(), "agents": {"state": "idle", "label": "idle"}}
    h.err.truncate(0)
    await h.dispatch()
    assert "note:" not in h.err.getvalue()


@pytest_twisted.ensureDeferred
async def test_router_that_is_not_listening_exits_4():
    err = io.StringIO()
    router = f"http://127.0.0.1:{free_port()}"
    options = Options(router=router, err=err, out=io.StringIO())
    result = await Dispatcher(reactor, Task(project="a", prompt="x"), options).run()
    assert result.exit_code == EXIT_UNREACHABLE
    assert f"cannot reach the router at {router}/api/resolve" in err.getvalue()


@pytest_twisted.ensureDeferred
async def test_permission_request_is_answered_as_configured(harness):
    h = harness("permission")
    result = await h.dispatch(permissions="once")
    assert result.exit_code == EXIT_DONE
    assert h.opencode.permission_replies == [("per_fake1", "once")]
    assert result.permissions == [{"permission": "bash", "patterns": ["rm -rf build"], "reply": "once"}]
    assert "permission asked: bash rm -rf build → once" in h.err.getvalue()


@pytest_twisted.ensureDeferred
async def test_permission_is_rejected_by_default(harness):
    h = harness("permission")
    await h.dispatch()
    assert h.opencode.permission_replies == [("per_fake1", "reject")]


@pytest_twisted.ensureDeferred
async def test_turn_that_ends_while_the_stream_is_down_is_reported_after_reconnect(harness):
    h = harness("drop")
    result = await h.dispatch(quiet=True)
    assert result.exit_code == EXIT_DONE, h.err.getvalue()
    assert result.text == "Finished while you were away."
    assert "event stream lost" in h.err.getvalue()
    assert "ended while the event stream was down" in h.err.getvalue()


@pytest_twisted.ensureDeferred
async def test_turn_lost_by_a_restarted_server_is_an_error_not_a_hang(harness):
    h = harness("lost")
    result = await h.dispatch(timeout=20)
    assert result.exit_code == EXIT_SESSION_ERROR, h.err.getvalue()
    assert result.error["name"] == "TurnLost"
    assert "never finished" in h.err.getvalue()


class _ClockedReactor:
    """The real reactor for sockets, a Clock for the dispatcher's timers: a timeout fires when the test says."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def callLater(self, delay: float, call: Any, *args: Any, **kwargs: Any) -> Any:
        return self.clock.callLater(delay, call, *args, **kwargs)

    def seconds(self) -> float:
        return self.clock.seconds()

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


@pytest_twisted.ensureDeferred
async def test_timeout_aborts_the_session_and_exits_124(harness):
    h = harness("hang")
    clock = Clock()
    task = Task(project="archer", prompt="Fix the login timeout")
    running = Dispatcher(_ClockedReactor(clock), task, h.options(timeout=0.5)).run()
    while not h.opencode.busy:  # the turn runs (on a real socket, however slowly): now the timeout
        await _later(0.02)
    clock.advance(0.5)
    result = await running
    assert result.exit_code == EXIT_TIMEOUT and result.status == "timeout"
    assert h.opencode.aborted == [result.session_id]


@pytest_twisted.ensureDeferred
async def test_interrupt_before_the_session_exists_prompts_nothing(harness):
    h = harness("reply")
    dispatcher = Dispatcher(reactor, Task(project="archer", prompt="x"), h.options())
    running = dispatcher.run()
    dispatcher.interrupt()
    result = await running
    assert result.exit_code == EXIT_INTERRUPTED and result.session_id is None
    assert h.opencode.sessions == {} and h.opencode.prompts == []


@pytest_twisted.ensureDeferred
async def test_backend_gone_mid_turn_exits_4_after_the_reconnect_budget(harness):
    h = harness("hang")
    dispatcher = Dispatcher(reactor, Task(project="archer", prompt="x"), h.options(reconnect_timeout=1.0))
    running = dispatcher.run()
    while not h.opencode.busy:
        await _later(0.05)
    await h.backend_port.stopListening()
    h.opencode.close_streams()
    # How long it keeps trying (the budget, not longer) is shown on a Clock below.
    result = await running
    assert result.exit_code == EXIT_UNREACHABLE
    assert "lost the backend of project 'archer'" in h.err.getvalue()
    assert result.session_id in h.err.getvalue()


class _Unreachable(HTTPClient):
    """An HTTP client for which every GET fails at once; records when each was made."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: list[float] = []

    def get(self, url: Any, **kwargs: Any) -> Deferred[Any]:
        self.attempts.append(self.clock.seconds())
        return fail(ConnectionRefusedError("connection refused"))


def test_reconnects_back_off_from_a_quarter_second_and_give_up_within_the_budget():
    clock = Clock()
    client = _Unreachable(clock)
    err = io.StringIO()
    dispatcher = Dispatcher(clock, Task(project="archer", prompt="x"),
                            Options(router="http://127.0.0.1:1", reconnect_timeout=10.0, err=err, out=io.StringIO()),
                            client=client)
    dispatcher.base_url, dispatcher.directory, dispatcher.session_id = "http://127.0.0.1:1/archer/", "/p", "ses_1"
    ended: list[Any] = []
    dispatcher._finished.addErrback(ended.append)
    dispatcher._reconnect()
    for delay in (0.25, 0.5, 1, 2, 4):
        assert ended == []
        clock.advance(delay)
    assert client.attempts == [0, 0.25, 0.75, 1.75, 3.75, 7.75]
    # The next delay (5 s, the cap) would end after the 10 s budget: it gives up now, not later.
    assert ended and ended[0].value.exit_code == EXIT_UNREACHABLE
    assert "for 10s" in ended[0].value.message and clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_silent_stream_is_reopened(harness):
    h = harness("hang")
    h.opencode.heartbeat = 0  # no heartbeats: the watchdog must notice
    dispatcher = Dispatcher(reactor, Task(project="archer", prompt="x"), h.options(stream_idle_timeout=0.3))
    running = dispatcher.run()
    while "no event" not in h.err.getvalue():
        await _later(0.05)
    sid = next(iter(h.opencode.busy))
    while len(h.opencode.streams) != 1 or "still running" not in h.err.getvalue():
        await _later(0.05)
    h.opencode._finish_turn(sid)
    result = await running
    assert result.exit_code == EXIT_DONE


def _later(seconds: float) -> Any:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


# -- the command line ---------------------------------------------------------------------------
def _cli(*args: str, stdin: str = "", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "opencoderouter.dispatch", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env(), cwd=REPO)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    done = _cli("--router", "http://127.0.0.1:1", stdin="---\nproject: a\nmodel: nomodel\n---\nhi")
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip().count("\n") == 0 and "'nomodel' is not provider/model" in done.stderr
    missing = _cli(str(tmp_path / "nope.md"))
    assert missing.returncode == EXIT_BAD_INPUT and "cannot read the task file" in missing.stderr
    assert _cli("--router", "ftp://x", "--project", "a", stdin="x").returncode == EXIT_BAD_INPUT
    assert _cli("--timeout", "soon", "--project", "a", stdin="x").returncode == EXIT_BAD_INPUT


def test_cli_unreachable_router_exits_4_with_json(tmp_path):
    done = _cli("--router", f"http://127.0.0.1:{free_port()}", "--json", "--project", "a", stdin="hi")
    assert done.returncode == EXIT_UNREACHABLE
    body = json.loads(done.stdout)
    assert body["status"] == "unreachable" and body["exit_code"] == EXIT_UNREACHABLE and body["session_id"] is None
    assert set(body) >= {"session_id", "status", "error", "text", "duration_s"}


class _StubProcess:
    """``python -m tests.dispatch_fakes`` as a child: a scripted OpenCode behind a stub router."""

    def __init__(self, behaviour: str) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tests.dispatch_fakes", "--behaviour", behaviour],
                                        stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
        line = self.process.stdout.readline()
        assert line.startswith("router "), line
        self.router = line.split()[1]

    def stop(self) -> str:
        self.process.terminate()
        rest, _ = self.process.communicate(timeout=10)
        return rest


def test_cli_success_with_json_and_task_file(tmp_path):
    stub = _StubProcess("reply")
    try:
        task = tmp_path / "task.md"
        task.write_text("---\nproject: Project\n---\nSay hello\n")
        done = _cli(str(task), "--router", stub.router, "--json")
    finally:
        stub.stop()
    assert done.returncode == EXIT_DONE, done.stderr
    body = json.loads(done.stdout)
    assert body["status"] == "done" and body["text"] == "Hello from the fake model." and body["error"] is None
    assert body["session_id"].startswith("ses_") and body["duration_s"] >= 0


def test_cli_sigint_aborts_the_session_then_exits_130(tmp_path):
    stub = _StubProcess("hang")
    try:
        child = subprocess.Popen([sys.executable, "-m", "opencoderouter.dispatch", "--router", stub.router,
                                  "--project", "project", "-"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
        child.stdin.write("work forever")
        child.stdin.close()
        for line in child.stderr:
            if "following events" in line:
                break
        child.send_signal(signal.SIGINT)
        code = child.wait(10)
        rest = child.stderr.read()
    finally:
        output = stub.stop()
    assert code == EXIT_INTERRUPTED
    assert "interrupted; aborting session" in rest
    assert "abort ses_" in output


# -- credentials for a router with authentication ----------------------------------------------
def test_user_info_in_the_router_url_becomes_basic_auth():
    from opencoderouter.dispatch import split_credentials

    assert split_credentials("http://127.0.0.1:8080") == ("http://127.0.0.1:8080", None)
    assert split_credentials("http://alice:s%40cret@devbox:8080") == ("http://devbox:8080", "Basic YWxpY2U6c0BjcmV0")


def test_token_file_and_environment_give_a_bearer_token(tmp_path, monkeypatch):
    from opencoderouter.dispatch import _authorization, build_parser

    token = tmp_path / "token"
    token.write_text("t0ken\n")
    parse = build_parser().parse_args
    assert _authorization(parse(["--token-file", str(token)])) == (DEFAULT_ROUTER, "Bearer t0ken")
    monkeypatch.setenv("OPENCODEROUTER_TOKEN", "from-env")
    assert _authorization(parse([])) == (DEFAULT_ROUTER, "Bearer from-env")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(DispatchError) as caught:
        _authorization(parse(["--token-file", str(empty)]))
    assert caught.value.exit_code == EXIT_BAD_INPUT and "is empty" in caught.value.message


@pytest_twisted.ensureDeferred
async def test_router_credentials_go_to_the_router_only(harness):
    h = harness("reply")
    h.stub.required_authorization = b"Bearer t0ken"
    result = await h.dispatch(authorization="Bearer t0ken")
    assert result.exit_code == EXIT_DONE
    # The backend in this harness is another origin: it must never see the router's token.
    assert all(b"authorization" not in {k.lower() for k in headers} for _, _, headers in h.opencode.requests_seen)


@pytest_twisted.ensureDeferred
async def test_refused_credentials_are_bad_input(harness):
    h = harness("reply")
    h.stub.required_authorization = b"Bearer right"
    result = await h.dispatch(authorization="Bearer wrong")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "refused the credentials (401)" in h.err.getvalue()


def test_event_parser_reassembles_split_frames_and_skips_junk():
    from opencoderouter.dispatcher import _EventStream

    events: list[dict] = []
    stream = _EventStream(events.append, lambda: None)
    big = "x" * 300_000
    frame = b'data: {"type": "a", "properties": {"big": "' + big.encode() + b'"}}\r\n\r\n'
    for start in range(0, len(frame), 4096):
        stream.dataReceived(frame[start:start + 4096])
    stream.dataReceived(b"data: not json\n\n: comment\nevent: x\ndata: [1]\n\n")
    stream.dataReceived(b'data: {"type": "b"}\n\n')
    assert [e["type"] for e in events] == ["a", "b"] and events[0]["properties"]["big"] == big


def test_event_parser_drops_an_oversized_line_and_recovers(monkeypatch):
    from opencoderouter import dispatcher

    monkeypatch.setattr(dispatcher, "MAX_EVENT_BYTES", 1000)
    events: list[dict] = []
    stream = dispatcher._EventStream(events.append, lambda: None)
    for _ in range(10):
        stream.dataReceived(b"y" * 500)
    stream.dataReceived(b'tail\n\ndata: {"type": "after"}\n\n')
    assert [e["type"] for e in events] == ["after"]
