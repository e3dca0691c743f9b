"""A fake OpenCode server for tests, in the spirit of ``treq.testing``: fast, in-process, documented.

``FakeOpenCode(directory)`` is a twisted.web leaf resource that answers like ``opencode serve`` run in
``directory``. Use it in memory (``StubTreq(fake)``, ``RequestTraversalAgent(fake)``) or on a socket
(``fake.listen(reactor, port=0)`` returns the IListeningPort; WebSockets need a socket).

What it answers (OpenCode's JSON shapes; errors are ``{"name": ..., "data": {"message": ...}}``):

- ``GET /global/health``: ``{"healthy": true, "version": version}``.
- ``GET /path`` and ``GET /project/current``: the project of ``?directory=`` (default: ``directory``);
  the git root above it is the worktree, and a folder outside git is project ``global`` at ``/``.
- ``GET /event`` and ``GET /global/event``: SSE streams (the global one wraps each event as
  ``{"directory", "project", "payload"}``); ``server.connected`` first, ``server.heartbeat`` every
  ``heartbeat`` seconds on ``clock`` (0: never).
- ``POST /pty``: a new terminal id; ``GET /pty/{id}/connect``: its WebSocket, which echoes every text
  and binary message, answers pings, closes with code 1000 and reason "bye" when sent ``__close__``,
  and answers the client's close handshake. An unknown id is 404, a GET without an upgrade 400.
- ``POST /session`` (a new session, title from the body), ``GET /session`` (sessions, newest first; ``?directory=``
  and ``?limit=`` filter), ``GET /session/status`` (the busy ones),
  ``POST /session/{id}/prompt_async`` (204, then a turn: ``session.status`` busy,
  ``message.part.delta`` with ``reply_text``, ``session.status`` idle, ``session.idle``),
  ``POST /session/{id}/abort``; every ``POST /session/{id}/...`` of an unknown session is 404.
- ``GET /permission`` and ``GET /question``: the pending requests (``?directory=`` filters by their session's
  directory); ``POST /permission/{id}/reply`` (``{"reply": "once"|"always"|"reject"}``), ``POST
  /question/{id}/reply`` and ``/reject`` answer one (``permission.replied`` / ``question.replied`` /
  ``question.rejected``, then the turn ends: a reject without a message or a rejected question ends it at
  once, otherwise the text delta comes first), an unknown id is 404. ``ask_permission(session_id, ...)`` and
  ``ask_question(session_id, questions)`` make the session busy and emit the request, as a tool would.
- Every other path, with any method: 200 ``text/html``, the web UI's page.
- With ``password``, every request but ``OPTIONS`` needs Basic auth as ``username`` (or
  ``?auth_token=`` holding the base64 credentials), else 401 with a ``WWW-Authenticate`` challenge.

State tests may read (and change): ``sessions`` (id -> session JSON), ``busy`` (ids of busy
sessions), ``permissions`` and ``questions`` (id -> pending request), ``streams`` (the open event
streams as ``(request, wrapped)``), ``requests_seen`` (``(method, raw URI, raw headers)`` of every
request, in order), ``ptys`` (terminal id -> its open
WebSocket connections), ``heartbeat``, ``reply_text``. ``emit(type, properties)`` sends an event to
every open stream; ``close_streams()`` ends them all and stops the heartbeat.

Extending it: ``route(method, pattern, handler)`` adds an endpoint (``method`` None answers any method;
``{name}`` in the pattern matches one path segment and is passed to the handler by keyword; a final
``*`` matches any rest). A handler returns the body (``opencode_json`` and ``opencode_error`` build
JSON ones) or ``NOT_DONE_YET``. Added routes are matched before the built-in ones, so they can also
replace one; the built-in handlers a replacement may wrap are public (``event_stream``,
``prompt_async``, ``abort``), and a subclass changes what a turn emits by overriding
``run_turn(session_id)``. Requests to added routes are recorded and authenticated like the rest.

As a command that behaves like ``opencode serve`` (the same "listening" line, ``ServeError`` and exit 1
on a taken port, the unsecured warning without ``OPENCODE_SERVER_PASSWORD``):

    python -m opencoderouter.testing serve --port 30000 [--hostname 127.0.0.1] [--directory DIR]
        [--heartbeat SECONDS] [--version-string VERSION]

The project directory is the working directory, as with the real server (``--directory`` overrides);
``OPENCODE_SERVER_PASSWORD`` (and ``OPENCODE_SERVER_USERNAME``) lock it as they lock the real one;
``--print-logs``, ``--pure`` and ``--log-level`` are accepted and ignored. ``main(argv, server_class)``
runs the same command with a subclass (``python -m tests.proxy_backend serve ...`` does).
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet import task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.websocket import WebSocketResource, WebSocketTransport

FAKE_VERSION = "1.18.33-fake"
WEB_UI = (
    b"<!doctype html><html><head><meta charset=utf-8><title>OpenCode</title>"
    b'<script type="module" src="/assets/index.js"></script></head><body><div id="root"></div></body></html>'
)

#: A route's handler: called with the request and the pattern's ``{name}`` segments by keyword.
Handler = Callable[..., "bytes | int"]


def opencode_json(request: IRequest, body: Any, code: int = 200) -> bytes:
    """Answer ``body`` as OpenCode does (plain ``application/json``, none of the router's extra headers)."""
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


def opencode_error(request: IRequest, name: str, message: str, code: int) -> bytes:
    """An OpenCode error answer: ``{"name": name, "data": {"message": message}}``."""
    return opencode_json(request, {"name": name, "data": {"message": message}}, code)


def git_root(directory: str) -> str | None:
    """The nearest folder at or above ``directory`` holding ``.git``, or None outside git."""
    current = directory
    while True:
        if os.path.isdir(os.path.join(current, ".git")):
            return current
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


class Route:
    """One endpoint: a method (None: any), a path pattern and the handler that answers it."""

    def __init__(self, method: str | None, pattern: str, handler: Handler) -> None:
        self.method = method.encode("ascii") if method is not None else None
        self.pattern = pattern
        self.handler = handler
        regex = ""
        for piece in re.split(r"(\{\w+\}|\*$)", pattern):
            if piece == "*":
                regex += ".*"
            elif piece.startswith("{"):
                regex += f"(?P<{piece[1:-1]}>[^/]+)"
            else:
                regex += re.escape(piece)
        self._regex = re.compile(regex, re.DOTALL)

    def match(self, method: bytes, path: str) -> dict[str, str] | None:
        """The pattern's segments if this route answers ``method`` on ``path``, else None."""
        if self.method is not None and method != self.method:
            return None
        found = self._regex.fullmatch(path)
        return found.groupdict() if found else None


class FakeOpenCode(Resource):
    """The fake server: its routes and its state (see the module docstring for the interface)."""

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
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.directory = directory
        self.version = version
        self.heartbeat = heartbeat
        self.clock = clock
        self.reply_text = reply_text
        self._credentials = base64.b64encode(f"{username}:{password}".encode()).decode() if password else None
        self.sessions: dict[str, dict[str, Any]] = {}
        self.busy: set[str] = set()
        self.permissions: dict[str, dict[str, Any]] = {}
        self.questions: dict[str, dict[str, Any]] = {}
        self.streams: list[tuple[IRequest, bool]] = []
        self.requests_seen: list[tuple[bytes, bytes, dict[bytes, list[bytes]]]] = []
        self.ptys: dict[str, list[PtyEcho]] = {}
        self._ids = itertools.count(1)
        self._heartbeat_loop: task.LoopingCall | None = None
        self._added: list[Route] = []
        self._built_in = [
            Route("GET", "/global/health", self._health),
            Route("GET", "/path", self._path),
            Route("GET", "/project/current", self._project),
            Route("GET", "/event", lambda request: self.event_stream(request, wrapped=False)),
            Route("GET", "/global/event", lambda request: self.event_stream(request, wrapped=True)),
            Route("POST", "/pty", self._new_pty),
            Route("GET", "/pty/{pty_id}/connect", self._pty_connect),
            Route("POST", "/session", self._new_session),
            Route("GET", "/session", self._list_sessions),
            Route("GET", "/session/status", self._status),
            Route("GET", "/permission", lambda request: self._pending(request, self.permissions)),
            Route("GET", "/question", lambda request: self._pending(request, self.questions)),
            Route("POST", "/permission/{request_id}/reply", self._permission_reply),
            Route("POST", "/question/{request_id}/{answer}", self._question_answer),
            Route("POST", "/session/{session_id}/prompt_async", self.prompt_async),
            Route("POST", "/session/{session_id}/abort", self.abort),
            Route("POST", "/session/{session_id}/{action}", self._other_session_action),
        ]

    def route(self, method: str | None, pattern: str, handler: Handler) -> None:
        """Answer ``method`` (None: any) on paths matching ``pattern`` with ``handler``, before the built-ins."""
        self._added.append(Route(method, pattern, handler))

    # -- HTTP ------------------------------------------------------------------
    def render(self, request: IRequest) -> bytes | int:
        """Record and authenticate the request, then answer from the first matching route or the web UI."""
        self.requests_seen.append((request.method, request.uri, dict(request.requestHeaders.getAllRawHeaders())))
        if not self._authorised(request):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="Secure Area"')
            return b""
        path = request.path.decode("latin-1")
        for route in (*self._added, *self._built_in):
            params = route.match(request.method, path)
            if params is not None:
                return route.handler(request, **params)
        return self._web_ui(request)

    def _authorised(self, request: IRequest) -> bool:
        if self._credentials is None or request.method == b"OPTIONS":
            return True
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        token = (request.args.get(b"auth_token") or [b""])[0].decode("latin-1")
        return secrets.compare_digest(header, f"Basic {self._credentials}") or secrets.compare_digest(
            token, self._credentials
        )

    def _directory(self, request: IRequest) -> str:
        return (request.args.get(b"directory") or [self.directory.encode()])[0].decode("utf-8", "replace")

    def _web_ui(self, request: IRequest, **_: str) -> bytes:
        request.setHeader(b"content-type", b"text/html;charset=UTF-8")
        return WEB_UI

    def _health(self, request: IRequest) -> bytes:
        return opencode_json(request, {"healthy": True, "version": self.version})

    def _path(self, request: IRequest) -> bytes:
        directory = self._directory(request)
        home = os.path.expanduser("~")
        return opencode_json(request, {
            "home": home,
            "state": os.path.join(home, ".local/state/opencode"),
            "config": os.path.join(home, ".config/opencode"),
            "worktree": git_root(directory) or "/",
            "directory": directory,
        })

    def _project(self, request: IRequest) -> bytes:
        root = git_root(self._directory(request))
        body: dict[str, Any] = {
            "id": "fake" + str(abs(hash(root)))[:8] if root else "global",
            "worktree": root or "/",
            "time": {"created": int(time.time() * 1000)},
            "sandboxes": [],
        }
        if root:
            body["vcs"] = "git"
        return opencode_json(request, body)

    # -- events --------------------------------------------------------------
    def emit(self, event_type: str, properties: dict[str, Any] | None = None) -> None:
        """Send one event to every open ``/event`` and ``/global/event`` stream."""
        payload = self._event(event_type, properties)
        for request, wrapped in list(self.streams):
            request.write(self._event_bytes(payload, wrapped))

    def _event(self, event_type: str, properties: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": f"evt_{next(self._ids):08d}", "type": event_type, "properties": properties or {}}

    def _event_bytes(self, payload: dict[str, Any], wrapped: bool) -> bytes:
        body = {"directory": self.directory, "project": "fake", "payload": payload} if wrapped else payload
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    def event_stream(self, request: Request, wrapped: bool) -> int:
        """Open an SSE stream (``wrapped``: the ``/global/event`` form) starting with ``server.connected``."""
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache, no-transform")
        request.setHeader(b"x-accel-buffering", b"no")
        entry: tuple[IRequest, bool] = (request, wrapped)
        self.streams.append(entry)

        def forget(result: Failure | None) -> None:
            if entry in self.streams:
                self.streams.remove(entry)

        request.notifyFinish().addBoth(forget)
        request.write(self._event_bytes(self._event("server.connected"), wrapped))
        if self._heartbeat_loop is None and self.heartbeat > 0:
            self._heartbeat_loop = task.LoopingCall(self.emit, "server.heartbeat")
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

    # -- terminals -------------------------------------------------------------
    def _new_pty(self, request: IRequest) -> bytes:
        pty_id = f"pty_fake{next(self._ids):08d}"
        self.ptys[pty_id] = []
        return opencode_json(request, {"id": pty_id, "title": "Terminal", "command": "/bin/sh", "status": "running"})

    def _pty_connect(self, request: IRequest, pty_id: str) -> bytes | int:
        if pty_id not in self.ptys:
            return opencode_error(request, "NotFoundError", f"PTY not found: {pty_id}", 404)
        upgrade = (request.getHeader(b"upgrade") or b"").lower()
        if not request.getHeader(b"sec-websocket-key") or upgrade != b"websocket":
            return opencode_error(request, "BadRequest", "expected a WebSocket upgrade", 400)
        return WebSocketResource(_PtyEchoFactory(self.ptys[pty_id])).render(request)

    # -- sessions --------------------------------------------------------------
    def _new_session(self, request: IRequest) -> bytes:
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            return opencode_error(request, "BadRequest", "invalid JSON", 400)
        session_id = f"ses_fake{next(self._ids):08d}"
        now = int(time.time() * 1000)
        session = {
            "id": session_id,
            "slug": session_id,
            "projectID": "fake",
            "directory": self._directory(request),
            "title": body.get("title") if isinstance(body, dict) and body.get("title") else "New session",
            "version": self.version,
            "time": {"created": now, "updated": now},
        }
        self.sessions[session_id] = session
        return opencode_json(request, session)

    def _list_sessions(self, request: IRequest) -> bytes:
        directory = request.args.get(b"directory")
        listed = sorted(self.sessions.values(), key=lambda s: s["time"]["updated"], reverse=True)
        if directory:
            listed = [s for s in listed if s["directory"] == directory[0].decode("utf-8", "replace")]
        limit = (request.args.get(b"limit") or [b""])[0]
        if limit.isdigit():
            listed = listed[: int(limit)]
        return opencode_json(request, listed)

    def _status(self, request: IRequest) -> bytes:
        return opencode_json(request, {session_id: {"type": "busy"} for session_id in self.busy})

    def _session_not_found(self, request: IRequest, session_id: str) -> bytes:
        return opencode_error(request, "NotFoundError", f"Session not found: {session_id}", 404)

    def prompt_async(self, request: IRequest, session_id: str) -> bytes:
        """``POST /session/{id}/prompt_async``: 204 at once, then ``run_turn`` on the next tick."""
        if session_id not in self.sessions:
            return self._session_not_found(request, session_id)
        try:
            body = json.loads(request.content.read() or b"")
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("parts"), list):
            return opencode_error(request, "BadRequest", "parts is required", 400)
        self.busy.add(session_id)
        self.clock.callLater(0, self.run_turn, session_id)
        request.setResponseCode(204)
        return b""

    def run_turn(self, session_id: str) -> None:
        """The model's turn: busy, one text delta of ``reply_text``, idle."""
        self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
        self.emit("message.part.delta", {
            "sessionID": session_id, "messageID": "msg_fake", "partID": "prt_fake", "field": "text",
            "delta": self.reply_text,
        })
        self.busy.discard(session_id)
        self.emit("session.status", {"sessionID": session_id, "status": {"type": "idle"}})
        self.emit("session.idle", {"sessionID": session_id})

    # -- permissions and questions -----------------------------------------------
    def ask_permission(self, session_id: str, permission: str = "bash", command: str = "rm -rf build") -> str:
        """A tool of ``session_id`` asks for permission (the session is busy until it is answered); its id."""
        request_id = f"per_fake{next(self._ids):08d}"
        request = {"id": request_id, "sessionID": session_id, "permission": permission, "patterns": [command],
                   "metadata": {"command": command}, "always": [command.split(" ")[0] + " *"],
                   "tool": {"messageID": "msg_fake", "callID": "call_fake"}}
        self.permissions[request_id] = request
        self.busy.add(session_id)
        self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
        self.emit("permission.asked", request)
        return request_id

    def ask_question(self, session_id: str, questions: list[dict[str, Any]]) -> str:
        """The question tool of ``session_id`` asks ``questions`` (the session is busy until answered); its id."""
        request_id = f"que_fake{next(self._ids):08d}"
        request = {"id": request_id, "sessionID": session_id, "questions": questions,
                   "tool": {"messageID": "msg_fake", "callID": "call_fake_question"}}
        self.questions[request_id] = request
        self.busy.add(session_id)
        self.emit("session.status", {"sessionID": session_id, "status": {"type": "busy"}})
        self.emit("question.asked", request)
        return request_id

    def _pending(self, request: IRequest, pending: dict[str, dict[str, Any]]) -> bytes:
        directory = request.args.get(b"directory")
        listed = list(pending.values())
        if directory:
            wanted = directory[0].decode("utf-8", "replace")
            listed = [r for r in listed if self.sessions.get(r["sessionID"], {}).get("directory", self.directory)
                      == wanted]
        return opencode_json(request, listed)

    def _permission_reply(self, request: IRequest, request_id: str) -> bytes:
        if request_id not in self.permissions:
            return opencode_json(request, {"_tag": "PermissionNotFoundError", "requestID": request_id,
                                           "message": f"Permission request not found: {request_id}"}, 404)
        try:
            body = json.loads(request.content.read() or b"{}")
        except ValueError:
            body = None
        reply = body.get("reply") if isinstance(body, dict) else None
        if reply not in ("once", "always", "reject"):
            return opencode_error(request, "BadRequest", f'Expected "once" | "always" | "reject", got {reply!r}', 400)
        pending = self.permissions.pop(request_id)
        self.emit("permission.replied", {"sessionID": pending["sessionID"], "requestID": request_id, "reply": reply})
        ends_now = reply == "reject" and not (isinstance(body, dict) and body.get("message"))
        self.clock.callLater(0, self._end_turn, pending["sessionID"], not ends_now)
        return opencode_json(request, True)

    def _question_answer(self, request: IRequest, request_id: str, answer: str) -> bytes:
        if answer not in ("reply", "reject"):
            return self._web_ui(request)
        pending = self.questions.pop(request_id, None)
        if pending is None:
            return opencode_error(request, "NotFoundError", f"Question request not found: {request_id}", 404)
        if answer == "reply":
            try:
                body = json.loads(request.content.read() or b"{}")
            except ValueError:
                body = {}
            answers = body.get("answers") if isinstance(body, dict) else None
            self.emit("question.replied", {"sessionID": pending["sessionID"], "requestID": request_id,
                                           "answers": answers})
        else:
            self.emit("question.rejected", {"sessionID": pending["sessionID"], "requestID": request_id})
        self.clock.callLater(0, self._end_turn, pending["sessionID"], answer == "reply")
        return opencode_json(request, True)

    def _end_turn(self, session_id: str, answer_first: bool) -> None:
        if answer_first:
            self.emit("message.part.delta", {"sessionID": session_id, "messageID": "msg_fake", "partID": "prt_fake",
                                             "field": "text", "delta": self.reply_text})
        self.busy.discard(session_id)
        self.emit("session.status", {"sessionID": session_id, "status": {"type": "idle"}})
        self.emit("session.idle", {"sessionID": session_id})

    def abort(self, request: IRequest, session_id: str) -> bytes:
        """``POST /session/{id}/abort``: the session is no longer busy; answers ``true``."""
        if session_id not in self.sessions:
            return self._session_not_found(request, session_id)
        self.busy.discard(session_id)
        return opencode_json(request, True)

    def _other_session_action(self, request: IRequest, session_id: str, action: str) -> bytes:
        # Like every real session action, one on an unknown session is 404; the fake has no others.
        if session_id not in self.sessions:
            return self._session_not_found(request, session_id)
        return self._web_ui(request)

    def listen(self, reactor: IReactorTCP, port: int = 0, interface: str = "127.0.0.1") -> IListeningPort:
        """Listen on ``interface:port`` (0: any free port); returns the IListeningPort."""
        site = Site(self)
        site.noisy = False
        # A Site is a ServerFactory; Twisted's generic parameters for the two do not line up.
        return reactor.listenTCP(port, cast(ServerFactory, site), interface=interface)


class _ClosingWithReason(Protocol):
    def loseConnection(self, code: int = 1000, reason: str = "") -> None: ...


class PtyEcho:
    """A terminal's WebSocket: echoes every message; ``__close__`` makes the server close."""

    def __init__(self, open_connections: list[PtyEcho]) -> None:
        self.open_connections = open_connections
        self.transport: WebSocketTransport | None = None

    def negotiationStarted(self, transport: WebSocketTransport) -> None:
        """Keep the transport to answer on."""
        self.transport = transport

    def negotiationFinished(self) -> None:
        """Count the connection (tests look at how many are open)."""
        self.open_connections.append(self)

    def textMessageReceived(self, message: str) -> None:
        """Echo a text message (or close on ``__close__``)."""
        assert self.transport is not None
        if message == "__close__":
            self._close()
        else:
            self.transport.sendTextMessage(message)

    def bytesMessageReceived(self, data: bytes | bytearray) -> None:
        """Echo a binary message (or close on ``__close__``)."""
        assert self.transport is not None
        if data == b"__close__":
            self._close()
        else:
            self.transport.sendBytesMessage(bytes(data))

    def pongReceived(self, payload: bytes) -> None:
        """Pongs need no answer."""

    def _close(self) -> None:
        # Twisted's transport takes a close reason, though its declared WebSocketTransport does not.
        cast(_ClosingWithReason, self.transport).loseConnection(1000, "bye")

    def connectionLost(self, reason: Failure) -> None:
        """Forget the connection."""
        if self in self.open_connections:
            self.open_connections.remove(self)


class _PtyEchoFactory:
    def __init__(self, open_connections: list[PtyEcho]) -> None:
        self.open_connections = open_connections

    def buildProtocol(self, request: Request) -> PtyEcho:
        return PtyEcho(self.open_connections)


def main(argv: list[str] | None = None, server_class: type[FakeOpenCode] = FakeOpenCode) -> int:
    """``python -m opencoderouter.testing serve --port N --hostname H``: run like ``opencode serve``."""
    parser = argparse.ArgumentParser(prog="fake-opencode", description="A fake OpenCode server for tests.")
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
    address = port.getHost()
    assert isinstance(address, (IPv4Address, IPv6Address))
    print(f"opencode server listening on http://{args.hostname}:{address.port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
