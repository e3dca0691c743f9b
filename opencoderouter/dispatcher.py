"""Hand one task to an OpenCode server and follow it to the end: the engine behind ``opencoderouter-dispatch``.

Flow, all through the router: ``GET /api/resolve`` (its agent summary: a note when the project's
other sessions are busy, waiting for a person or failed) → ``POST {url}session`` → open ``{url}event``
(before prompting, so no event is missed) → ``POST {url}session/{id}/prompt_async`` → follow this
session's events until ``session.idle`` (done) or ``session.error`` (failed). A dropped event stream
is reopened with backoff and reconciled with ``/session/status`` and the session's messages.

Python API: ``parse_task(text)`` (:mod:`.task_file`) → :class:`~.task_file.Task`;
``Dispatcher(reactor, task, options).run()`` → Deferred firing with a :class:`Result`
(``result.exit_code`` is the command's exit status).

The same flow runs inside the router (``opencoderouter.tasks``): there ``resolve`` finds the
:class:`Target` in the registry instead of asking the router over HTTP, ``before_prompt`` journals
the session before the prompt goes out, ``resume(session_id)`` follows (reconciles) a session
prompted before a restart, and ``detach()`` stops following without aborting the session.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import IO, Any, cast
from urllib.parse import quote, urlsplit

import treq
from treq.client import HTTPClient
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers

from .backoff import doubling_backoff
from .inflight import InFlight
from .loopback_http import shown_url
from .sse import SSEReader
from .task_file import (
    EXIT_BAD_INPUT,
    EXIT_DONE,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_SESSION_ERROR,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    DispatchError,
    Task,
)

DEFAULT_ROUTER = "http://127.0.0.1:8080"
#: An event bigger than this is skipped (memory bound against a hostile or broken stream).
MAX_EVENT_BYTES = 64 * 1024 * 1024
#: Delays between attempts to reopen a lost event stream: 0.25 s doubling to 5 s.
_RECONNECT_BACKOFF = doubling_backoff(0.25, 5.0)


@dataclass
class Result:
    """How a dispatch ended (what ``--json`` prints, plus the exit code)."""

    session_id: str | None
    status: str
    error: dict[str, Any] | None
    text: str
    duration_s: float
    exit_code: int
    project: str | None = None
    url: str | None = None
    #: Permission requests seen and how they were answered: ``{"permission", "patterns", "reply"}``.
    permissions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object."""
        body = asdict(self)
        body["duration_s"] = round(self.duration_s, 3)
        return body


@dataclass
class Options:
    """How to dispatch: where the router is, what to print, how long to wait."""

    router: str = DEFAULT_ROUTER
    quiet: bool = False
    permissions: str = "reject"
    timeout: float | None = None
    reconnect_timeout: float = 30.0
    #: No byte on the event stream for this long (OpenCode sends a heartbeat every 10 s): reconnect.
    stream_idle_timeout: float = 35.0
    request_timeout: float = 15.0
    #: ``Authorization`` value for the router (Bearer token or Basic), sent only to the router's own origin.
    authorization: str | None = None
    out: IO[str] = field(default_factory=lambda: sys.stdout)
    err: IO[str] = field(default_factory=lambda: sys.stderr)
    #: Where activity lines go instead of ``err`` (the router's log, for in-process dispatches).
    say: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Target:
    """Where a task runs: an OpenCode base URL (ending in ``/``), the project directory, and how to get in."""

    base_url: str
    directory: str
    slug: str | None = None
    #: ``Authorization`` value for ``base_url``'s origin only (a locked backend's password, in-process).
    authorization: str | None = None
    #: Worth saying before the task starts (e.g. what the project's other sessions are doing).
    note: str | None = None


#: Finds the Target of a task, or raises DispatchError (``not_found`` when the project is not running).
Resolver = Callable[[Task], "Target | Deferred[Target]"]
#: Called with the Dispatcher once its session exists, just before the prompt is sent; may return a Deferred.
BeforePrompt = Callable[["Dispatcher"], Any]


class _EventStream(Protocol):
    """Reads ``data: <json>`` SSE frames from a response body and hands each event on.

    The frames go through a lenient :class:`~.sse.SSEReader`: an event over ``MAX_EVENT_BYTES`` is
    skipped whole, a line that is not SSE or a frame that is not a JSON object is skipped, and the
    stream goes on (the session's stream matters more than one frame).
    """

    def __init__(self, on_event: Callable[[dict[str, Any]], None], on_bytes: Callable[[], None]) -> None:
        self.on_event = on_event
        self.on_bytes = on_bytes
        self.reader = SSEReader(self._on_data, MAX_EVENT_BYTES, strict=False)
        #: Fires (with None) when the body ends; ``reason`` says how.
        self.ended: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.closing = False

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 - Twisted's name
        """Note the bytes' arrival and feed them to the reader."""
        self.on_bytes()
        self.reader.feed(data)

    def _on_data(self, raw: bytes) -> None:
        try:
            event = json.loads(raw)
        except ValueError:
            return  # a frame we cannot read is skipped, not fatal
        if isinstance(event, dict):
            self.on_event(event)

    def close(self) -> None:
        """Stop reading (drops the connection)."""
        self.closing = True
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:  # noqa: N802 - Twisted's name
        """Report the end (clean or not) once."""
        self.reason = reason
        if not self.ended.called:
            self.ended.callback(None)


def _describe(error: Failure | Exception) -> str:
    value = error.value if isinstance(error, Failure) else error
    if isinstance(value, ResponseFailed):
        return "the connection was cut mid-response"
    if isinstance(value, ResponseDone):
        return "the server ended it"
    if isinstance(value, defer.CancelledError):
        return "no answer in time"
    text = str(value).strip() or value.__class__.__name__
    return text.rstrip(".")


class Dispatcher:
    """One task, start to finish: resolve, create a session, prompt, follow events, report a Result.

    ``resolve`` replaces the router's ``/api/resolve`` (the router's own task service finds the
    backend in its registry); ``before_prompt`` runs once the session exists, before the prompt is
    sent (a failure there stops the dispatch unprompted).
    """

    def __init__(self, reactor: Any, task: Task, options: Options | None = None,
                 client: HTTPClient | None = None, resolve: Resolver | None = None,
                 before_prompt: BeforePrompt | None = None) -> None:
        self.reactor = reactor
        self.task = task
        self.options = options or Options()
        self._resolver = resolve
        self._before_prompt = before_prompt
        self.target: Target | None = None
        if client is None:
            self._pool: HTTPConnectionPool | None = HTTPConnectionPool(reactor, persistent=False)
            client = HTTPClient(Agent(reactor, connectTimeout=self.options.request_timeout, pool=self._pool))
        else:
            self._pool = None
        self.http = client
        self.base_url: str | None = None
        self.directory: str | None = None
        self.session_id: str | None = None
        self.text_parts: list[str] = []
        # Keyed by ids from the server's JSON, whatever their type.
        self._part_types: dict[object, object] = {}
        self._user_messages: set[object] = set()
        self._tool_status: dict[object, object] = {}
        self._answered: set[str] = set()
        self.permissions: list[dict[str, Any]] = []
        self._stream: _EventStream | None = None
        self._finished: Deferred[tuple[str, dict[str, Any] | None]] = Deferred()
        self._started = reactor.seconds()
        self._timers: list[Any] = []
        self._reconnecting = False
        self._idle_timer: Any = None
        self._prompted = False
        self._stopping = False
        #: Set once we abort the session: its session.error/idle are our own doing, not the outcome.
        self._aborting = False
        #: Following a session prompted by an earlier run (``resume``): an answer that never started is lost.
        self._resumed = False
        #: Requests in flight, cancelled by ``detach``.
        self._inflight = InFlight(reactor)

    @property
    def permission_reply(self) -> str:
        """The answer to this task's permission requests: the task's own, else the options'."""
        return self.task.permissions or self.options.permissions

    @property
    def timeout(self) -> float | None:
        """Seconds before the session is aborted: the task's own, else the options'."""
        return self.task.timeout if self.task.timeout is not None else self.options.timeout

    # -- output ----------------------------------------------------------------
    def _say(self, message: str) -> None:
        """Activity for people: one line on stderr (or to ``options.say``)."""
        if self.options.say is not None:
            self.options.say(message)
            return
        self.options.err.write(f"[dispatch] {message}\n")
        self.options.err.flush()

    def _print_text(self, text: str) -> None:
        self.text_parts.append(text)
        if not self.options.quiet:
            self.options.out.write(text)
            self.options.out.flush()

    # -- HTTP helpers ------------------------------------------------------------
    def _url(self, path: str, **query: str) -> str:
        assert self.base_url is not None and self.directory is not None
        params = {"directory": self.directory, **query}
        return self.base_url + path + "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())

    def _headers(self, url: str, accept: bytes) -> Headers:
        """Request headers; credentials go to their own origin only (the router's, the target's), never elsewhere."""
        headers = Headers({b"accept": [accept]})
        if self.options.authorization and _origin(url) == _origin(self.options.router):
            headers.addRawHeader(b"authorization", self.options.authorization.encode("latin-1"))
        elif self.target is not None and self.target.authorization and _origin(url) == _origin(self.target.base_url):
            headers.addRawHeader(b"authorization", self.target.authorization.encode("latin-1"))
        return headers

    @inlineCallbacks
    def _request(self, method: str, url: str, body: Any = None, what: str = "the backend") -> Any:
        """One bounded JSON request; returns (status, decoded body or raw text)."""
        kwargs: dict[str, Any] = {"timeout": self.options.request_timeout,
                                  "headers": self._headers(url, b"application/json")}
        if body is not None:
            kwargs["json"] = body
        try:
            response = yield self._inflight.track(self.http.request(method, url, **kwargs))
            raw = yield self._inflight.track(treq.content(response))
        except Exception as error:  # every transport failure means "unreachable" to the user
            raise DispatchError(EXIT_UNREACHABLE, f"cannot reach {what} at {url.split('?')[0]}: {_describe(error)}",
                                "unreachable") from None
        try:
            decoded: Any = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode("utf-8", "replace")
        return response.code, decoded

    # -- the flow ----------------------------------------------------------------
    def run(self) -> Deferred[Result]:
        """Dispatch the task; fires with a :class:`Result` (never errbacks)."""
        return self._drive([self._resolve, self._choose_agent, self._create_session, self._open_events, self._prompt])

    def resume(self, session_id: str) -> Deferred[Result]:
        """Follow ``session_id``, prompted by an earlier run, to its end without prompting again.

        After a restart: still busy, its events are followed; idle, its stored outcome is the result;
        idle without an answer, it is an error (``PromptLost`` or ``TurnLost``), never a second prompt.
        """

        def adopt() -> None:
            self.session_id, self._prompted, self._resumed = session_id, True, True
            self._say(f"following session {session_id} again (it was prompted before)")

        @inlineCallbacks
        def reconcile() -> Any:
            yield self._reconcile()

        return self._drive([self._resolve, adopt, self._open_events, reconcile])

    def detach(self) -> None:
        """Stop following without aborting the session (the router is stopping; it is resumed later)."""
        if not self._finished.called:
            self._finished.callback(("detached", None))
        self._inflight.cancel_all()

    @inlineCallbacks
    def _drive(self, steps: list[Callable[[], Any]]) -> Any:
        if self.timeout is not None:
            # Bounds the whole dispatch; the session is aborted if it exists by then.
            self._timers.append(self.reactor.callLater(self.timeout, self._on_timeout))
        try:
            for step in steps:
                if self._finished.called:
                    break  # interrupted or timed out between steps: do not start the next one
                yield step()
            status, session_error = yield self._finished
        except DispatchError as error:
            status, code = error.status, error.exit_code
            error_body = {"name": "DispatchError", "message": error.message}
            if not self._finished.called:
                self._finished.callback((status, error_body))
            self._say(error.message)
            result = yield self._result(status, error_body, code)
            return result
        code = {"done": EXIT_DONE, "error": EXIT_SESSION_ERROR, "timeout": EXIT_TIMEOUT,
                "interrupted": EXIT_INTERRUPTED, "detached": EXIT_INTERRUPTED}.get(status, EXIT_UNREACHABLE)
        result = yield self._result(status, session_error, code)
        return result

    @inlineCallbacks
    def _result(self, status: str, error: dict[str, Any] | None, code: int) -> Any:
        self._stopping = True
        for timer in self._timers + [self._idle_timer]:
            if timer is not None and timer.active():
                timer.cancel()
        if self._stream is not None:
            self._stream.close()
        text = "".join(self.text_parts)
        if self.session_id and status in ("done", "error"):
            final = yield self._final_text()
            text = final if final is not None else text
        if self.text_parts and not self.options.quiet and not "".join(self.text_parts).endswith("\n"):
            self.options.out.write("\n")
            self.options.out.flush()
        if self._pool is not None:
            yield self._pool.closeCachedConnections()
        duration = self.reactor.seconds() - self._started
        if self.session_id is not None:
            self._say(f"{status} after {duration:.1f}s (session {self.session_id}, exit {code})")
        return Result(session_id=self.session_id, status=status, error=error, text=text,
                      duration_s=duration, exit_code=code,
                      project=self.directory, url=shown_url(self.base_url) if self.base_url else None,
                      permissions=self.permissions)

    @inlineCallbacks
    def _resolve(self) -> Any:
        if self._resolver is not None:
            target = yield defer.maybeDeferred(self._resolver, self.task)
        else:
            target = yield self._resolve_through_router()
        self.target = target
        self.base_url = target.base_url if target.base_url.endswith("/") else target.base_url + "/"
        self.directory = target.directory
        self._say(f"project {self.task.project!r} → {target.slug} at {shown_url(self.base_url)} ({self.directory})")
        if target.note:
            self._say(f"note: {target.note}")

    @inlineCallbacks
    def _resolve_through_router(self) -> Any:
        router = self.options.router.rstrip("/")
        by_path = "/" in self.task.project or self.task.project.startswith("~")
        key = "path" if by_path else "name"
        # scope=lan: a project on another box is answered with that box's router URL (older routers ignore it).
        url = f"{router}/api/resolve?{key}={quote(self.task.project, safe='')}&scope=lan"
        code, body = yield self._request("GET", url, what="the router")
        if code in (401, 403):
            raise DispatchError(EXIT_BAD_INPUT,
                                f"the router at {router} refused the credentials ({code}): pass --token-file, "
                                "OPENCODEROUTER_TOKEN or user:password@ in --router", "bad_input")
        if code == 404:
            known = yield self._known_projects(router)
            hint = f" (known: {', '.join(known)})" if known else ""
            raise DispatchError(EXIT_NOT_FOUND, f"no such project {self.task.project!r} on the router {router}{hint}",
                                "not_found")
        if code == 409 and isinstance(body, dict):
            raise DispatchError(EXIT_NOT_FOUND, f"the router at {router} knows several projects "
                                f"{self.task.project!r} on the network: {str(body.get('message'))[:400]}", "not_found")
        if code != 200 or not isinstance(body, dict) or not body.get("url") or not body.get("project_path"):
            raise DispatchError(EXIT_UNREACHABLE, f"the router at {router} answered {code} to {url}: {str(body)[:200]}",
                                "unreachable")
        # The router's agent watcher knows what the project's other sessions are doing.
        agents = body.get("agents")
        note = None
        if isinstance(agents, dict) and agents.get("state") in ("needs_you", "working", "error"):
            note = f"this project's other sessions: {str(agents.get('label'))[:80]} (opencoderouter-status shows them)"
        return Target(base_url=body["url"], directory=body["project_path"], slug=body.get("slug"), note=note)

    @inlineCallbacks
    def _known_projects(self, router: str) -> Any:
        try:
            code, body = yield self._request("GET", f"{router}/api/backends", what="the router")
        except DispatchError:
            return []
        if code != 200 or not isinstance(body, list):
            return []
        return [str(b.get("project_name") or b.get("slug")) for b in body if isinstance(b, dict)]

    @inlineCallbacks
    def _choose_agent(self) -> Any:
        """Check the agent against what the server offers; the default is the server's or ``build``."""
        code, agents = yield self._request("GET", self._url("agent"))
        if code != 200 or not isinstance(agents, list):
            return  # an old server without /agent: send what we have and let it decide
        names = [a.get("name") for a in agents if isinstance(a, dict) and a.get("mode") != "subagent"]
        if self.task.agent is not None:
            if self.task.agent not in names:
                offered = ", ".join(map(str, names))
                raise DispatchError(EXIT_BAD_INPUT,
                                    f"agent {self.task.agent!r} does not exist on this server (agents: {offered})",
                                    "bad_input")
            return
        code, config = yield self._request("GET", self._url("config"))
        default = config.get("default_agent") if code == 200 and isinstance(config, dict) else None
        self.task.agent = default if default in names else ("build" if "build" in names or not names else names[0])

    @inlineCallbacks
    def _create_session(self) -> Any:
        title = self.task.title or _title_from(self.task.prompt)
        code, body = yield self._request("POST", self._url("session"), {"title": title})
        if code != 200 or not isinstance(body, dict) or not str(body.get("id", "")).startswith("ses"):
            raise DispatchError(EXIT_UNREACHABLE,
                                f"creating a session at {self.base_url} failed: {code} {str(body)[:200]}",
                                "unreachable")
        self.session_id = body["id"]
        self._say(f"session {self.session_id} ({title!r})")

    @inlineCallbacks
    def _open_events(self) -> Any:
        """Open ``/event`` for the project directory; fires once the stream is flowing."""
        url = self._url("event")
        old, self._stream = self._stream, None
        if old is not None:
            old.close()  # never two streams: a half-dead one would only leak
        try:
            response = yield self._inflight.track(self.http.get(
                url, headers=self._headers(url, b"text/event-stream"), timeout=self.options.request_timeout,
                unbuffered=True))
        except Exception as error:
            raise DispatchError(EXIT_UNREACHABLE,
                                f"cannot open the event stream {url.split('?')[0]}: {_describe(error)}",
                                "unreachable") from None
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if response.code != 200 or not content_type.startswith(b"text/event-stream"):
            body = yield treq.content(response).addErrback(lambda _: b"")
            raise DispatchError(EXIT_UNREACHABLE,
                                f"the event stream {url.split('?')[0]} answered {response.code} "
                                f"{content_type.decode('latin-1')}: {body[:200].decode('utf-8', 'replace').strip()}",
                                "unreachable")
        stream = _EventStream(self._on_event, self._reset_idle_timer)
        self._stream = stream
        response.deliverBody(stream)
        stream.ended.addCallback(lambda _: self._on_stream_end(stream))
        self._reset_idle_timer()

    def _reset_idle_timer(self) -> None:
        if self._idle_timer is not None and self._idle_timer.active():
            self._idle_timer.reset(self.options.stream_idle_timeout)
            return
        self._idle_timer = self.reactor.callLater(self.options.stream_idle_timeout, self._on_stream_silent)

    def _on_stream_silent(self) -> None:
        if self._stream is not None and not self._finished.called:
            self._say(f"no event (not even a heartbeat) for {self.options.stream_idle_timeout:g}s; reconnecting")
            self._stream.close()

    @inlineCallbacks
    def _prompt(self) -> Any:
        body: dict[str, Any] = {"parts": [{"type": "text", "text": self.task.prompt}]}
        model = self.task.model_ref()
        if model is not None:
            body["model"] = model
        if self.task.agent:
            body["agent"] = self.task.agent
        if self._before_prompt is not None:
            try:
                yield defer.maybeDeferred(self._before_prompt, self)
            except Exception as error:
                raise DispatchError(EXIT_UNREACHABLE, f"not prompting session {self.session_id}: {_describe(error)}",
                                    "unreachable") from None
            if self._finished.called:
                return  # detached, interrupted or timed out meanwhile: the prompt is not sent
        # Before the request: the turn's first events can arrive before the 204 does.
        self._prompted = True
        code, answer = yield self._request("POST", self._url(f"session/{self.session_id}/prompt_async"), body)
        if code == 400:
            raise DispatchError(EXIT_BAD_INPUT, f"the server refused the prompt: {error_text(answer)}", "bad_input")
        if code not in (200, 204):
            raise DispatchError(EXIT_UNREACHABLE,
                                f"prompting session {self.session_id} failed: {code} {error_text(answer)}",
                                "unreachable")
        self._say(f"prompt sent (agent {self.task.agent or 'default'}, model {self.task.model or 'default'}); "
                  "following events")

    # -- events ------------------------------------------------------------------
    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        props = event.get("properties") or {}
        if not isinstance(props, dict) or self._finished.called or self._aborting:
            return
        session = (props.get("sessionID") or (props.get("part") or {}).get("sessionID")
                   or (props.get("info") or {}).get("sessionID"))
        if session != self.session_id:
            return
        if kind == "message.updated":
            info = props.get("info") or {}
            if info.get("role") == "user":
                self._user_messages.add(info.get("id"))
        elif kind == "message.part.updated":
            self._on_part(props.get("part") or {})
        elif kind == "message.part.delta":
            if props.get("field") == "text" and props.get("messageID") not in self._user_messages \
                    and self._part_types.get(props.get("partID"), "text") == "text":
                self._print_text(str(props.get("delta", "")))
        elif kind == "permission.asked":
            self._answer_permission(props)
        elif kind == "session.status":
            status = props.get("status") or {}
            if status.get("type") == "retry":
                self._say(f"the model call is being retried (attempt {status.get('attempt')}): {status.get('message')}")
        elif kind == "session.error":
            error = props.get("error") or {"name": "UnknownError"}
            self._say(f"session error: {error_text(error)}")
            self._finished.callback(("error", error))
        elif kind == "session.idle" and self._prompted:
            self._finished.callback(("done", None))

    def _on_part(self, part: dict[str, Any]) -> None:
        part_id, kind = part.get("id"), part.get("type")
        if part_id and kind:
            self._part_types[part_id] = kind
        if kind != "tool":
            return
        state = part.get("state") or {}
        status = state.get("status")
        if self._tool_status.get(part_id) == status:
            return
        self._tool_status[part_id] = status
        detail = state.get("title") or _short(state.get("input"))
        line = f"tool {part.get('tool')} {status}" + (f": {detail}" if detail else "")
        if status == "error":
            line += f" ({state.get('error')})"
        self._say(line)

    def _answer_permission(self, props: dict[str, Any]) -> None:
        request_id = props.get("id")
        if not request_id or request_id in self._answered:
            return
        self._answered.add(request_id)
        reply = self.permission_reply
        self.permissions.append({"permission": props.get("permission"), "patterns": props.get("patterns") or [],
                                 "reply": reply})
        patterns = ", ".join(map(str, props.get("patterns") or []))
        self._say(f"permission asked: {props.get('permission')} {patterns} → {reply}")

        def report(outcome: Any) -> None:
            code, body = outcome
            if code != 200:
                self._say(f"answering permission {request_id} failed: {code} {error_text(body)}")

        d = self._request("POST", self._url(f"permission/{request_id}/reply"), {"reply": reply})
        d.addCallbacks(report, lambda f: self._say(f"answering permission {request_id} failed: {f.getErrorMessage()}"))

    # -- losing and regaining the stream ---------------------------------------------
    def _on_stream_end(self, stream: _EventStream) -> None:
        if stream is not self._stream or self._finished.called or self._stopping:
            return
        why = _describe(stream.reason) if stream.reason is not None else "closed"
        self._say(f"event stream lost ({why}); reconnecting")
        self._reconnect()

    @inlineCallbacks
    def _reconnect(self) -> Any:
        if self._reconnecting:
            return
        self._reconnecting = True
        deadline = self.reactor.seconds() + self.options.reconnect_timeout
        attempt, last = 0, "no attempt yet"
        try:
            while not self._finished.called:
                try:
                    yield self._open_events()
                    ended = yield self._reconcile()
                    if not ended:
                        self._say("event stream back; the session is still running")
                    return
                except DispatchError as error:
                    last = error.message
                delay = _RECONNECT_BACKOFF(attempt)
                if self.reactor.seconds() + delay > deadline:
                    break
                yield _sleep(self.reactor, delay)
                attempt += 1
            if not self._finished.called:
                self._finished.errback(Failure(DispatchError(
                    EXIT_UNREACHABLE,
                    f"lost the backend of project {self.task.project!r} ({self.base_url}) for "
                    f"{self.options.reconnect_timeout:g}s: {last}; "
                    f"session {self.session_id} may still be running there",
                    "unreachable")))
        finally:
            self._reconnecting = False

    @inlineCallbacks
    def _reconcile(self, second_look: bool = False) -> Any:
        """After a reconnect: did the turn end while we were away? Returns True when it did."""
        code, statuses = yield self._request("GET", self._url("session/status"))
        if code != 200 or not isinstance(statuses, dict):
            raise DispatchError(EXIT_UNREACHABLE, f"/session/status answered {code}", "unreachable")
        if (statuses.get(self.session_id) or {}).get("type") in ("busy", "retry"):
            return False
        last = yield self._last_assistant()
        if self._finished.called or (last is None and not self._resumed):
            return False
        info = (last or {}).get("info") or {}
        if info.get("error"):
            self._say(f"session error (while disconnected): {error_text(info['error'])}")
            self._finished.callback(("error", info["error"]))
            return True
        if (info.get("time") or {}).get("completed"):
            self._say("the turn ended while the event stream was down")
            self._finished.callback(("done", None))
            return True
        # Not busy, yet the answer is unfinished: the server lost the turn (it was restarted mid-turn).
        # Look once more a moment later, so that a turn between two steps is not taken for lost.
        if not second_look:
            yield task.deferLater(self.reactor, 1.0, lambda: None)
            ended = yield self._reconcile(second_look=True)
            return ended
        if last is None:
            error = {"name": "PromptLost", "data": {"message": "the session is idle with no answer: the prompt never "
                                                               "reached it, and it is not sent twice"}}
        else:
            error = {"name": "TurnLost", "data": {"message": "the session is idle but its answer never finished "
                                                             "(was the OpenCode server restarted mid-turn?)"}}
        self._say(f"session error: {error_text(error)}")
        self._finished.callback(("error", error))
        return True

    @inlineCallbacks
    def _last_assistant(self) -> Any:
        code, messages = yield self._request("GET", self._url(f"session/{self.session_id}/message"))
        if code == 404 and self._resumed:
            # Deleted meanwhile: its outcome can never be known, and it is not sent again.
            return {"info": {"error": {"name": "SessionGone", "data": {
                "message": f"session {self.session_id} no longer exists on the backend"}}}}
        if code != 200 or not isinstance(messages, list):
            return None
        for message in reversed(messages):
            if isinstance(message, dict) and (message.get("info") or {}).get("role") == "assistant":
                return message
        return None

    @inlineCallbacks
    def _final_text(self) -> Any:
        """The turn's text as the server stored it (complete even if events were missed).

        Every assistant message after the last user message counts: a turn with tool calls is
        several assistant messages, and stdout showed the text of all of them.
        """
        try:
            code, messages = yield self._request("GET", self._url(f"session/{self.session_id}/message"))
        except DispatchError:
            return None
        if code != 200 or not isinstance(messages, list):
            return None
        texts: list[str] = []
        for message in messages:
            role = (message.get("info") or {}).get("role") if isinstance(message, dict) else None
            if role == "user":
                texts = []
            elif role == "assistant":
                texts += [p.get("text", "") for p in message.get("parts") or []
                          if isinstance(p, dict) and p.get("type") == "text" and not p.get("synthetic")]
        return "".join(texts) if texts else None

    # -- ending early ------------------------------------------------------------
    def _on_timeout(self) -> None:
        if not self._finished.called:
            self._say(f"timed out after {self.timeout:g}s; "
                      + (f"aborting session {self.session_id}" if self.session_id else "no session was created"))
            self._abort_then("timeout", {"name": "Timeout", "message": f"no result after {self.timeout:g}s"})

    def interrupt(self) -> None:
        """Abort the session and end the dispatch (SIGINT)."""
        if not self._finished.called:
            self._say("interrupted; " + (f"aborting session {self.session_id}" if self.session_id
                                         else "no session was created"))
            self._abort_then("interrupted", {"name": "Interrupted", "message": "interrupted by the user"})

    def _abort_then(self, status: str, error: dict[str, Any]) -> None:
        finished = self._finished
        self._aborting = True

        def done(_: Any) -> None:
            if not finished.called:
                finished.callback((status, error))

        if self.session_id is None or self.base_url is None:
            done(None)
            return
        d = self._request("POST", self._url(f"session/{self.session_id}/abort"), {})
        d.addErrback(lambda f: self._say(f"could not abort the session: {f.getErrorMessage()}"))
        d.addBoth(done)


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _title_from(prompt: str) -> str:
    first = next((line.strip() for line in prompt.splitlines() if line.strip()), "dispatched task")
    return first if len(first) <= 60 else first[:57] + "..."


def _short(value: Any) -> str:
    if not value:
        return ""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def error_text(error: Any) -> str:
    """``Name: message`` from an OpenCode error object."""
    if not isinstance(error, dict):
        return str(error)[:300]
    data = error.get("data")
    if not isinstance(data, dict):
        data = {}
    message = data.get("message") or error.get("message") or ""
    name = error.get("name") or error.get("_tag") or "Error"
    return f"{name}: {message}" if message else str(name)
