"""A fast fake OpenCode server: the endpoints the router and its clients rely on.

In-process (``FakeOpenCode(directory).listen(reactor, port)``) for tests, or as a command that
behaves like ``opencode serve`` (prints the same "listening" line, exits 1 on a taken port):

    python -m opencoderouter.fake_opencode serve --port 30000 --hostname 127.0.0.1

The project directory is the working directory, as with the real server (``--directory`` overrides).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import struct
import itertools
import json
import os
import secrets
import sys
import time
from typing import Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

FAKE_VERSION = "1.18.33-fake"
_WEB_UI = (
    b"<!doctype html><html><head><meta charset=utf-8><title>OpenCode</title>"
    b'<script type="module" src="/assets/index.js"></script></head><body><div id="root"></div></body></html>'
)


def _git_root(directory: str) -> str | None:
    current = directory
    while True:
        if os.path.isdir(os.path.join(current, ".git")):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


class FakeOpenCode(Resource):
    """The fake server's root resource and state (sessions, event streams)."""

    isLeaf = True

    def __init__(
        self,
        directory: str,
        version: str = FAKE_VERSION,
        heartbeat: float = 10.0,
        clock: IReactorTime | None = None,
        password: str | None = None,
        username: str = "opencode",
        reply_text: str = "Hello from the fake model.",
    ) -> None:
        super().__init__()
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.directory = directory
        self.version = version
        self.heartbeat = heartbeat
        self.clock = clock
        self.reply_text = reply_text
        self._auth = base64.b64encode(f"{username}:{password}".encode()).decode() if password else None
        self.sessions: dict[str, dict[str, Any]] = {}
        self.busy: set[str] = set()
        self.streams: list[tuple[IRequest, bool]] = []
        self._ids = itertools.count(1)
        self._heartbeat_loop: task.LoopingCall | None = None
        self.requests_seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []
        self.ptys: dict[str, list["_PtyEcho"]] = {}

    # -- events --------------------------------------------------------------
    def emit(self, event_type: str, properties: dict[str, Any] | None = None) -> None:
        """Send one event to every open ``/event`` and ``/global/event`` stream."""
        payload = {"id": f"evt_{next(self._ids):08d}", "type": event_type, "properties": properties or {}}
        for request, wrapped in list(self.streams):
            body = {"directory": self.directory, "project": "fake", "payload": payload} if wrapped else payload
            request.write(b"data: " + json.dumps(body).encode() + b"\n\n")

    def _heartbeat(self) -> None:
        self.emit("server.heartbeat")

    def _open_stream(self, request: IRequest, wrapped: bool) -> object:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache, no-transform")
        request.setHeader(b"x-accel-buffering", b"no")
        entry = (request, wrapped)
        self.streams.append(entry)
        request.notifyFinish().addBoth(lambda _: self.streams.remove(entry) if entry in self.streams else None)
        first = {"id": f"evt_{next(self._ids):08d}", "type": "server.connected", "properties": {}}
        body = {"directory": self.directory, "project": "fake", "payload": first} if wrapped else first
        request.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        if self._heartbeat_loop is None and self.heartbeat > 0:
            self._heartbeat_loop = task.LoopingCall(self._heartbeat)
            self._heartbeat_loop.clock = self.clock
            self._heartbeat_loop.start(self.heartbeat, now=False)
        return NOT_DONE_YET

    def close_streams(self) -> None:
        """End every open event stream and stop the heartbeat."""
        if self._heartbeat_loop is not None and self._heartbeat_loop.running:
            self._heartbeat_loop.stop()
        self._heartbeat_loop = None
        for request, _ in list(self.streams):
            request.finish()

    # -- HTTP ------------------------------------------------------------------
    def _json(self, request: IRequest, body: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _authorised(self, request: IRequest) -> bool:
        if self._auth is None or request.method == b"OPTIONS":
            return True
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        token = (request.args.get(b"auth_token") or [b""])[0].decode("latin-1")
        return secrets.compare_digest(header, f"Basic {self._auth}") or secrets.compare_digest(token, self._auth)

    def render(self, request: IRequest) -> Any:
        """Answer like OpenCode: JSON for the API, the web UI's HTML for every unknown path."""
        self.requests_seen.append((request.method, request.uri, dict(request.requestHeaders.getAllRawHeaders())))
        if not self._authorised(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="Secure Area"')
            return b""
        path = request.path.decode("latin-1")
        method = request.method
        directory = (request.args.get(b"directory") or [self.directory.encode()])[0].decode("utf-8", "replace")
        if method == b"GET" and path == "/global/health":
            return self._json(request, {"healthy": True, "version": self.version})
        if method == b"GET" and path == "/path":
            home = os.path.expanduser("~")
            return self._json(
                request,
                {
                    "home": home,
                    "state": os.path.join(home, ".local/state/opencode"),
                    "config": os.path.join(home, ".config/opencode"),
                    "worktree": _git_root(directory) or "/",
                    "directory": directory,
                },
            )
        if method == b"GET" and path == "/project/current":
            root = _git_root(directory)
            body: dict[str, Any] = {
                "id": "fake" + str(abs(hash(root)))[:8] if root else "global",
                "worktree": root or "/",
                "time": {"created": int(time.time() * 1000)},
                "sandboxes": [],
            }
            if root:
                body["vcs"] = "git"
            return self._json(request, body)
        if method == b"GET" and path == "/event":
            return self._open_stream(request, wrapped=False)
        if method == b"GET" and path == "/global/event":
            return self._open_stream(request, wrapped=True)
        if method == b"POST" and path == "/pty":
            pty_id = f"pty_fake{next(self._ids):08d}"
            self.ptys[pty_id] = []
            return self._json(request, {"id": pty_id, "title": "Terminal", "command": "/bin/sh", "status": "running"})
        if method == b"GET" and path.startswith("/pty/") and path.endswith("/connect"):
            return self._pty_connect(request, path[len("/pty/") : -len("/connect")])
        if method == b"POST" and path == "/session":
            return self._create_session(request, directory)
        if method == b"GET" and path == "/session/status":
            return self._json(request, {sid: {"type": "busy"} for sid in self.busy})
        parts = path.strip("/").split("/")
        if len(parts) == 3 and parts[0] == "session" and method == b"POST":
            session = self.sessions.get(parts[1])
            if session is None:
                return self._json(
                    request, {"name": "NotFoundError", "data": {"message": f"Session not found: {parts[1]}"}}, 404
                )
            if parts[2] == "prompt_async":
                return self._prompt_async(request, session)
            if parts[2] == "abort":
                self.busy.discard(session["id"])
                return self._json(request, True)
        request.setHeader(b"content-type", b"text/html;charset=UTF-8")
        return _WEB_UI

    def _pty_connect(self, request: IRequest, pty_id: str) -> Any:
        """Accept a WebSocket for a terminal that echoes what it is sent."""
        if pty_id not in self.ptys:
            return self._json(request, {"name": "NotFoundError", "data": {"message": f"PTY not found: {pty_id}"}}, 404)
        key = request.getHeader(b"sec-websocket-key")
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if not key or upgrade != b"websocket":
            return self._json(request, {"name": "BadRequest", "data": {"message": "expected a WebSocket upgrade"}}, 400)
        accept = base64.b64encode(hashlib.sha1(key.strip() + _WS_GUID).digest())
        echo = _PtyEcho(self.ptys[pty_id])
        transport = _take_over_transport(request, echo)
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        return NOT_DONE_YET

    def _create_session(self, request: IRequest, directory: str) -> bytes:
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            return self._json(request, {"name": "BadRequest", "data": {"message": "invalid JSON"}}, 400)
        session_id = f"ses_fake{next(self._ids):08d}"
        now = int(time.time() * 1000)
        session = {
            "id": session_id,
            "slug": session_id,
            "projectID": "fake",
            "directory": directory,
            "title": body.get("title") if isinstance(body, dict) and body.get("title") else "New session",
            "version": self.version,
            "time": {"created": now, "updated": now},
        }
        self.sessions[session_id] = session
        return self._json(request, session)

    def _prompt_async(self, request: IRequest, session: dict[str, Any]) -> bytes:
        try:
            body = json.loads(request.content.read() or b"")
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("parts"), list):
            return self._json(request, {"name": "BadRequest", "data": {"message": "parts is required"}}, 400)
        session_id = session["id"]
        self.busy.add(session_id)
        self.clock.callLater(0, self._run_turn, session_id)
        request.setResponseCode(204)
        return b""

    def _run_turn(self, session_id: str) -> None:
        self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
        self.emit(
            "message.part.delta",
            {"sessionID": session_id, "messageID": "msg_fake", "partID": "prt_fake", "field": "text",
             "delta": self.reply_text},
        )
        self.busy.discard(session_id)
        self.emit("session.status", {"sessionID": session_id, "status": {"type": "idle"}})
        self.emit("session.idle", {"sessionID": session_id})

    def listen(self, reactor: Any, port: int = 0, interface: str = "127.0.0.1") -> Any:
        """Listen on ``interface:port``; returns the IListeningPort."""
        site = Site(self)
        site.noisy = False
        return reactor.listenTCP(port, site, interface=interface)


_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _take_over_transport(request: IRequest, protocol: Any) -> Any:
    """Detach the client's connection from twisted.web and give it to ``protocol`` (after a 101)."""
    channel = request.channel
    transport = channel.transport
    channel.setTimeout(None)
    transport.unregisterProducer()
    original_lost = channel.connectionLost

    def connection_lost(reason: Failure) -> None:
        try:
            protocol.connectionLost(reason)
        finally:
            original_lost(reason)

    channel.dataReceived = protocol.dataReceived
    channel.connectionLost = connection_lost
    protocol.makeConnection(transport)
    transport.resumeProducing()
    return transport


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked (server → client) RFC 6455 frame with FIN set."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


class _PtyEcho(Protocol):
    """A terminal's WebSocket that echoes each message; ``__close__`` makes the server close."""

    def __init__(self, registry: list["_PtyEcho"]) -> None:
        self.registry = registry
        self.buffer = b""
        self.closing = False

    def connectionMade(self) -> None:
        """Count the connection (tests look at how many are open)."""
        self.registry.append(self)

    def dataReceived(self, data: bytes) -> None:
        """Parse complete client frames (masked) and answer each."""
        self.buffer += data
        while True:
            frame = self._next_frame()
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 0x8:  # close: answer it, then hang up
                if not self.closing:
                    self.closing = True
                    self.transport.write(ws_frame(0x8, payload[:2]))
                self.transport.loseConnection()
                return
            if opcode == 0x9:
                self.transport.write(ws_frame(0xA, payload))
            elif opcode in (0x0, 0x1, 0x2):
                if payload == b"__close__":
                    self.closing = True
                    self.transport.write(ws_frame(0x8, struct.pack("!H", 1000) + b"bye"))
                    self.transport.loseConnection()
                    return
                self.transport.write(ws_frame(opcode, payload))

    def _next_frame(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        if len(buffer) < 2:
            return None
        opcode = buffer[0] & 0x0F
        masked = buffer[1] & 0x80
        length = buffer[1] & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack("!H", buffer[2:4])
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack("!Q", buffer[2:10])
            offset = 10
        mask = b""
        if masked:
            if len(buffer) < offset + 4:
                return None
            mask = buffer[offset : offset + 4]
            offset += 4
        if len(buffer) < offset + length:
            return None
        payload = buffer[offset : offset + length]
        self.buffer = buffer[offset + length :]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return opcode, payload

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """Forget the connection."""
        if self in self.registry:
            self.registry.remove(self)


def main(argv: list[str] | None = None, server_class: type[FakeOpenCode] = FakeOpenCode) -> int:
    """``fake_opencode serve --port N --hostname H``: run like ``opencode serve``."""
    parser = argparse.ArgumentParser(prog="fake-opencode", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve the fake API for the working directory")
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--hostname", default="127.0.0.1")
    serve.add_argument("--directory", default=None, help="project directory [default: working directory]")
    serve.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    serve.add_argument("--version-string", default=FAKE_VERSION)
    for ignored in ("--print-logs", "--pure"):
        serve.add_argument(ignored, action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--log-level", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from twisted.internet import reactor
    from twisted.internet.error import CannotListenError

    directory = os.path.realpath(args.directory or os.getcwd())
    server = server_class(
        directory,
        version=args.version_string,
        heartbeat=args.heartbeat,
        password=os.environ.get("OPENCODE_SERVER_PASSWORD") or None,
        username=os.environ.get("OPENCODE_SERVER_USERNAME", "opencode"),
    )
    try:
        port = server.listen(reactor, args.port, args.hostname)
    except CannotListenError as error:
        print(f"ServeError: Failed to start server on port {args.port}: {error.socketError}", file=sys.stderr)
        return 1
    if not os.environ.get("OPENCODE_SERVER_PASSWORD"):
        print("Warning: OPENCODE_SERVER_PASSWORD is not set; server is unsecured.", flush=True)
    print(f"opencode server listening on http://{args.hostname}:{port.getHost().port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(main())
