"""The fake OpenCode server (opencoderouter.testing) itself: in memory through StubTreq, real sockets for WebSockets."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
import websocket
from treq.testing import StubTreq
from twisted.internet import reactor, task, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest, IResponse

from opencoderouter.testing import FAKE_VERSION, WEB_UI, FakeOpenCode, main, opencode_json

from .support import LISTENING, free_port, subprocess_env

BASE = "http://fake.test"


def result(deferred: Deferred[Any]) -> Any:
    """The value of a Deferred that StubTreq has already fired."""
    results: list[Any] = []
    deferred.addBoth(results.append)
    assert results, "the request did not finish"
    if hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


class Client:
    """StubTreq over one fake, with small helpers that flush and return finished answers."""

    def __init__(self, fake: FakeOpenCode) -> None:
        self.stub = StubTreq(fake)
        # StubTreq makes one method per treq function at run time, so mypy cannot see this one.
        self._request: Callable[..., Deferred[IResponse]] = self.stub.request  # type: ignore[attr-defined]

    def request(self, method: str, path: str, **kwargs: Any) -> IResponse:
        response = self._request(method, BASE + path, **kwargs)
        self.stub.flush()
        return result(response)

    def body(self, response: IResponse) -> bytes:
        content = treq.content(response)
        self.stub.flush()
        return result(content)

    def json(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        response = self.request(method, path, **kwargs)
        assert response.headers.getRawHeaders("content-type") == ["application/json"]
        return response.code, json.loads(self.body(response))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A git project with a subfolder."""
    (tmp_path / "repo" / ".git").mkdir(parents=True)
    (tmp_path / "repo" / "src").mkdir()
    return tmp_path / "repo"


def test_health_answers_the_version(tmp_path: Path, clock: Clock) -> None:
    client = Client(FakeOpenCode(str(tmp_path), version="9.9.9-x", clock=clock))
    assert client.json("GET", "/global/health") == (200, {"healthy": True, "version": "9.9.9-x"})
    assert FAKE_VERSION.endswith("-fake")


def test_path_and_project_of_a_git_folder_name_its_root(project: Path, clock: Clock) -> None:
    client = Client(FakeOpenCode(str(project / "src"), clock=clock))
    code, paths = client.json("GET", "/path")
    assert code == 200
    assert paths["directory"] == str(project / "src") and paths["worktree"] == str(project)
    assert {"home", "state", "config"} <= paths.keys()
    code, current = client.json("GET", "/project/current")
    assert current["worktree"] == str(project) and current["vcs"] == "git"
    assert current["id"].startswith("fake") and current["id"] != "global"


def test_a_folder_outside_git_is_the_global_project(tmp_path: Path, clock: Clock) -> None:
    (tmp_path / "plain").mkdir()
    client = Client(FakeOpenCode(str(tmp_path / "plain"), clock=clock))
    assert client.json("GET", "/path")[1]["worktree"] == "/"
    code, current = client.json("GET", "/project/current")
    assert (current["id"], current["worktree"]) == ("global", "/") and "vcs" not in current


def test_directory_query_overrides_the_served_folder(project: Path, tmp_path: Path, clock: Clock) -> None:
    client = Client(FakeOpenCode(str(tmp_path), clock=clock))
    query = {"directory": str(project / "src")}
    assert client.json("GET", "/path", params=query)[1]["directory"] == str(project / "src")
    assert client.json("GET", "/project/current", params=query)[1]["worktree"] == str(project)
    session = client.json("POST", "/session", params=query, json={})[1]
    assert session["directory"] == str(project / "src")


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD"])
@pytest.mark.parametrize("path", ["/", "/some/where", "/global/health/", "/session/ses_x", "/assets/index.js"])
def test_unknown_paths_answer_the_web_ui_for_any_method(tmp_path: Path, clock: Clock, method: str, path: str) -> None:
    client = Client(FakeOpenCode(str(tmp_path), clock=clock))
    response = client.request(method, path)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/html;charset=UTF-8"]
    assert client.body(response) == (b"" if method == "HEAD" else WEB_UI)


def test_a_known_path_with_another_method_answers_the_web_ui(tmp_path: Path, clock: Clock) -> None:
    client = Client(FakeOpenCode(str(tmp_path), clock=clock))
    for method, path in [("POST", "/global/health"), ("PUT", "/session"), ("DELETE", "/pty")]:
        response = client.request(method, path)
        assert (response.code, client.body(response)) == (200, WEB_UI)


def test_password_requires_basic_auth_or_the_token(tmp_path: Path, clock: Clock) -> None:
    fake = FakeOpenCode(str(tmp_path), clock=clock, password="pw", username="alice")
    client = Client(fake)
    refused = client.request("GET", "/global/health")
    assert refused.code == 401 and refused.headers.getRawHeaders("www-authenticate") == ['Basic realm="Secure Area"']
    assert client.request("GET", "/anything").code == 401
    assert client.request("GET", "/global/health", auth=("alice", "wrong")).code == 401
    assert client.request("GET", "/global/health", auth=("alice", "pw")).code == 200
    token = base64.b64encode(b"alice:pw").decode()
    assert client.request("GET", "/global/health", params={"auth_token": token}).code == 200
    assert client.request("OPTIONS", "/global/health").code == 200  # CORS preflights carry no credentials


def test_every_request_is_recorded_with_its_raw_uri_and_headers(tmp_path: Path, clock: Clock) -> None:
    fake = FakeOpenCode(str(tmp_path), clock=clock, password="pw")
    client = Client(fake)
    client.request("GET", "/global/health?x=%2F", headers={"X-Custom": "1"})
    client.request("POST", "/nowhere")
    assert [(method, uri) for method, uri, _ in fake.requests_seen] == [
        (b"GET", b"/global/health?x=%2F"), (b"POST", b"/nowhere")]
    assert fake.requests_seen[0][2][b"X-Custom"] == [b"1"]


class EventStream:
    """An open ``/event`` (or ``/global/event``) stream read through StubTreq."""

    def __init__(self, client: Client, path: str = "/event") -> None:
        self.client = client
        self.response = client.request("GET", path)
        self.chunks: list[bytes] = []
        self.done = treq.collect(self.response, self.chunks.append)
        client.stub.flush()

    def events(self) -> list[dict[str, Any]]:
        self.client.stub.flush()
        raw = b"".join(self.chunks)
        assert raw.endswith(b"\n\n")
        return [json.loads(block.removeprefix(b"data: ")) for block in raw.split(b"\n\n") if block]

    def types(self) -> list[str]:
        return [event.get("type") or event["payload"]["type"] for event in self.events()]


def test_event_streams_start_connected_and_beat_on_the_clock(tmp_path: Path, clock: Clock) -> None:
    fake = FakeOpenCode(str(tmp_path), clock=clock, heartbeat=5)
    client = Client(fake)
    plain, wrapped = EventStream(client, "/event"), EventStream(client, "/global/event")
    assert plain.response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    assert len(fake.streams) == 2
    assert plain.types() == ["server.connected"]
    clock.advance(5)
    assert plain.types() == ["server.connected", "server.heartbeat"]
    first = wrapped.events()[0]
    assert first["directory"] == str(tmp_path) and first["payload"]["type"] == "server.connected"
    fake.emit("custom.thing", {"n": 1})
    assert plain.events()[-1]["properties"] == {"n": 1} and wrapped.types()[-1] == "custom.thing"
    fake.close_streams()
    client.stub.flush()
    assert fake.streams == [] and clock.getDelayedCalls() == []
    result(plain.done)


def test_a_prompt_is_accepted_then_answered_by_one_turn_of_events(tmp_path: Path, clock: Clock) -> None:
    fake = FakeOpenCode(str(tmp_path), clock=clock, heartbeat=0, reply_text="Hi there.")
    client = Client(fake)
    stream = EventStream(client)
    code, session = client.json("POST", "/session", json={"title": "Fix it"})
    assert code == 200 and session["title"] == "Fix it" and session["directory"] == str(tmp_path)
    assert fake.sessions == {session["id"]: session}
    sid = session["id"]
    answer = client.request("POST", f"/session/{sid}/prompt_async", json={"parts": [{"type": "text", "text": "go"}]})
    assert answer.code == 204 and client.body(answer) == b""
    assert fake.busy == {sid}
    assert client.json("GET", "/session/status")[1] == {sid: {"type": "busy"}}
    clock.advance(0)
    events = stream.events()[1:]
    assert [event["type"] for event in events] == [
        "session.status", "message.part.delta", "session.status", "session.idle"]
    assert [event["properties"].get("status") for event in events] == [{"type": "busy"}, None, {"type": "idle"}, None]
    assert events[1]["properties"]["delta"] == "Hi there."
    assert all(event["properties"]["sessionID"] == sid for event in events)
    assert fake.busy == set() and client.json("GET", "/session/status")[1] == {}
    fake.close_streams()


def test_a_session_without_a_title_is_a_new_session_and_bad_json_is_400(tmp_path: Path, clock: Clock) -> None:
    client = Client(FakeOpenCode(str(tmp_path), clock=clock))
    assert client.json("POST", "/session")[1]["title"] == "New session"
    code, error = client.json("POST", "/session", data=b"{nope")
    assert code == 400 and error["name"] == "BadRequest"


def test_a_prompt_without_parts_is_400_and_abort_ends_a_busy_session(tmp_path: Path, clock: Clock) -> None:
    fake = FakeOpenCode(str(tmp_path), clock=clock)
    client = Client(fake)
    sid = client.json("POST", "/session", json={})[1]["id"]
    code, error = client.json("POST", f"/session/{sid}/prompt_async", json={"text": "no parts"})
    assert code == 400 and error == {"name": "BadRequest", "data": {"message": "parts is required"}}
    fake.busy.add(sid)
    assert client.json("POST", f"/session/{sid}/abort") == (200, True)
    assert fake.busy == set()


@pytest.mark.parametrize("action", ["prompt_async", "abort", "summarize"])
def test_an_unknown_session_is_a_json_404(tmp_path: Path, clock: Clock, action: str) -> None:
    client = Client(FakeOpenCode(str(tmp_path), clock=clock))
    code, error = client.json("POST", f"/session/ses_nope/{action}", json={"parts": []})
    assert code == 404
    assert error == {"name": "NotFoundError", "data": {"message": "Session not found: ses_nope"}}


def test_added_routes_come_first_and_get_their_path_segments(tmp_path: Path, clock: Clock) -> None:
    fake = FakeOpenCode(str(tmp_path), clock=clock)
    calls: list[str] = []

    def health(request: IRequest) -> bytes:
        return opencode_json(request, {"healthy": False}, 503)

    def item(request: IRequest, item_id: str) -> bytes:
        calls.append(item_id)
        return opencode_json(request, {"item": item_id})

    fake.route("GET", "/global/health", health)
    fake.route(None, "/items/{item_id}", item)
    fake.route(None, "/prefix*", lambda request: b"prefixed")
    client = Client(fake)
    assert client.json("GET", "/global/health") == (503, {"healthy": False})
    assert client.json("DELETE", "/items/a%2Fb") == (200, {"item": "a%2Fb"})
    assert client.body(client.request("POST", "/prefix/and/more")) == b"prefixed"
    assert client.body(client.request("GET", "/items/a/b")) == WEB_UI  # one segment only
    assert calls == ["a%2Fb"] and len(fake.requests_seen) == 4


def test_pty_is_created_and_connect_needs_a_known_id_and_an_upgrade(tmp_path: Path, clock: Clock) -> None:
    fake = FakeOpenCode(str(tmp_path), clock=clock)
    client = Client(fake)
    code, pty = client.json("POST", "/pty", json={})
    assert code == 200 and pty["status"] == "running" and fake.ptys == {pty["id"]: []}
    code, error = client.json("GET", "/pty/pty_nope/connect")
    assert code == 404 and error["data"]["message"] == "PTY not found: pty_nope"
    code, error = client.json("GET", f"/pty/{pty['id']}/connect")
    assert code == 400 and error["name"] == "BadRequest"


# -- WebSockets need a socket: the fake listens on 127.0.0.1, websocket-client runs in a thread ------------
@pytest.fixture
def listening(tmp_path: Path) -> Iterator[tuple[FakeOpenCode, int]]:
    fake = FakeOpenCode(str(tmp_path), heartbeat=0)
    port = fake.listen(reactor, 0)
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    yield fake, address.port
    pytest_twisted.blockon(maybeDeferred(port.stopListening))


def _new_pty(port: int) -> str:
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}/pty", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())["id"]


def _echo_session(port: int) -> dict[str, Any]:
    pty = _new_pty(port)
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/pty/{pty}/connect", timeout=5)
    try:
        seen: dict[str, Any] = {"status": ws.getstatus()}
        ws.send("ls -la\r")
        seen["text"] = ws.recv()
        big = bytes(range(256)) * 1000
        ws.send_binary(big)
        seen["binary"] = ws.recv() == big
        ws.ping(b"are you there")
        pong = ws.recv_data_frame(control_frame=True)[1]
        seen["pong"] = (pong.opcode, pong.data)
        ws.send("__close__")
        close = ws.recv_data_frame(control_frame=True)[1]
        seen["close"] = (close.opcode, close.data)
        assert ws.sock is not None
        ws.sock.settimeout(2)
        seen["hung_up"] = ws.sock.recv(1) == b""
    finally:
        ws.shutdown()
    return seen


@pytest_twisted.ensureDeferred
async def test_pty_websocket_echoes_answers_pings_and_closes_on_request(listening: tuple[FakeOpenCode, int]) -> None:
    fake, port = listening
    seen = await threads.deferToThread(_echo_session, port)
    assert seen["status"] == 101
    assert seen["text"] == "ls -la\r" and seen["binary"]
    assert seen["pong"] == (websocket.ABNF.OPCODE_PONG, b"are you there")
    assert seen["close"] == (websocket.ABNF.OPCODE_CLOSE, (1000).to_bytes(2, "big") + b"bye")
    assert seen["hung_up"]
    assert all(connections == [] for connections in fake.ptys.values())


def _client_close(port: int, fake: FakeOpenCode) -> tuple[int, Any]:
    pty = _new_pty(port)
    ws = websocket.create_connection(f"ws://127.0.0.1:{port}/pty/{pty}/connect", timeout=5)
    try:
        ws.send("x")
        assert ws.recv() == "x"
        open_before = len(fake.ptys[pty])
        ws.send_close(1000, b"done")
        answer = ws.recv_data_frame(control_frame=True)[1]
        return open_before, (answer.opcode, answer.data)
    finally:
        ws.shutdown()


@pytest_twisted.ensureDeferred
async def test_pty_websocket_answers_the_clients_close_handshake(listening: tuple[FakeOpenCode, int]) -> None:
    fake, port = listening
    open_before, answer = await threads.deferToThread(_client_close, port, fake)
    assert open_before == 1
    assert answer == (websocket.ABNF.OPCODE_CLOSE, (1000).to_bytes(2, "big") + b"done")
    for _ in range(200):
        if all(connections == [] for connections in fake.ptys.values()):
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    assert all(connections == [] for connections in fake.ptys.values())


# -- the command ------------------------------------------------------------------------------------
def test_serve_on_a_taken_port_says_serve_error_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeOpenCode(str(tmp_path), heartbeat=0)
    taken = fake.listen(reactor, 0)
    try:
        address = taken.getHost()
        assert isinstance(address, IPv4Address)
        number = address.port
        assert main(["serve", "--port", str(number), "--directory", str(tmp_path)]) == 1
    finally:
        taken.stopListening()
    error = capsys.readouterr().err
    assert error.startswith(f"ServeError: Failed to start server on port {number}: ")


def test_serve_prints_the_warning_and_listening_lines_and_answers(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "opencoderouter.testing", "serve", "--port", str(port), "--hostname", "127.0.0.1",
         "--version-string", "2.0.0-cli", "--heartbeat", "0", "--print-logs", "--pure", "--log-level", "DEBUG"],
        cwd=tmp_path, env=subprocess_env(OPENCODE_SERVER_PASSWORD=""), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        warning, listening = process.stdout.readline(), process.stdout.readline()
        assert warning == b"Warning: OPENCODE_SERVER_PASSWORD is not set; server is unsecured.\n"
        found = LISTENING.search(listening)
        assert found is not None and found.groups() == (b"127.0.0.1", str(port).encode())
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/path", timeout=5) as response:
            assert json.loads(response.read())["directory"] == str(tmp_path.resolve())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/global/health", timeout=5) as response:
            assert json.loads(response.read())["version"] == "2.0.0-cli"
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout:
            process.stdout.close()
