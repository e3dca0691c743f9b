"""The agent watcher: one ``/global/event`` stream per backend, and each backend's agent state.

An observer of the Registry. For every routed backend it may read (an unlocked one, or one of
your own locked ones that ``--opencode-password-file`` opens, under the same rule as the
forwarder's :class:`~.forwarding.BackendCredentials`) it keeps one ``GET /global/event`` open and
feeds the events to that backend's :class:`~.agent_state.AgentState`. On every (re)connect it
reconciles from the snapshot endpoints (``/session/status``, ``/permission``, ``/question`` per
directory, ``/session``, and for a few sessions their last message and todo list); events that
arrive meanwhile are applied again on top of the snapshot, so nothing is lost in between.

Failure handling: a refused or cut stream is retried after 0.25 s doubling to 1 s until the registry
removes the backend (a restarted server is followed again within about a second; the registry
seeing it come back reconnects at once); 35 s without a heartbeat
(OpenCode sends one every 10 s), an event over the size cap, bytes that are not server-sent
events or JSON, a refused login or a snapshot that is not what OpenCode answers count as a
broken stream: the backend is shown ``unknown``, the problem is logged once (until it recovers),
and the stream is retried after 1 s doubling to 60 s. Nothing a backend sends can raise out of
here. ``stopService`` fires once every stream and request has closed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import HTTPConnectionPool, ResponseDone, ResponseNeverReceived
from twisted.web.iweb import IResponse

from .agent_snapshot import BackendReader, SnapshotError
from .agent_state import AgentState, BackendState, Change, Summary
from .backoff import doubling_backoff
from .forwarding import BackendCredentials
from .loopback_http import loopback_agent, probe_client
from .registry import Backend, Registry
from .sse import EventStreamBody

log = Logger()

#: OpenCode sends ``server.heartbeat`` every 10 s; this long without one is a lost stream.
HEARTBEAT_TIMEOUT = 35.0
#: An event bigger than this marks the stream as broken (OpenCode's biggest are a tool's output or a diff).
MAX_EVENT_BYTES = 4 * 1024 * 1024
#: How long one snapshot request may take.
REQUEST_TIMEOUT = 10.0
#: How long the stream's response head may take at first. OpenCode sends it at once; a server that
#: is starting accepts connections before it serves them (and drops them later), so retry soon
#: instead. Each head that times out in a row doubles the bound (up to REQUEST_TIMEOUT), so a server
#: that is slow but serving still gets through.
STREAM_HEAD_TIMEOUT = 0.5
#: Reconnect delays: after a refused or cut connection (a refused connect on the loopback costs
#: next to nothing, and a restarted server is followed again within half a second), and after a
#: broken stream.
_QUICK_RETRY = doubling_backoff(0.25, 0.5)
_SLOW_RETRY = doubling_backoff(1.0, 60.0)
#: A busy stream is read at most this often (see :class:`~.sse.EventStreamBody`).
READ_BATCH = 0.2
#: Snapshots read at the same time (a router restart with 50 backends reads them a few at a time).
CONCURRENT_SNAPSHOTS = 2
#: Changes a person sees go out this soon; a bare "last activity" change at most this often.
STATE_DELAY = 0.05
ACTIVITY_DELAY = 5.0

# Text deltas are most of a busy stream: their session is found without decoding the JSON. In a
# JSON text a quote inside a string is escaped, so these byte patterns only match the structure.
_DELTA = b'"type":"message.part.delta"'
_SYNC = b'"type":"sync"'
_SESSION_ID = re.compile(rb'"sessionID":"([A-Za-z0-9_-]{1,128})"')
_QUIET = frozenset({"server.heartbeat", "server.connected"})


def agent_client(reactor: Any, connect_timeout: float = 5.0) -> tuple[HTTPClient, HTTPConnectionPool]:
    """The watcher's treq client (loopback, no name resolution, no cookies) and its connection pool."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    # Closed well before OpenCode would drop an idle connection.
    pool.cachedConnectionTimeout = 4
    pool.retryAutomatically = False
    return probe_client(loopback_agent(reactor, connect_timeout, pool=pool)), pool


def _head_timed_out(failure: Failure) -> bool:
    """True when the request was cancelled by its time bound (treq reports it inside ResponseNeverReceived)."""
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return True
    value = failure.value
    if isinstance(value, ResponseNeverReceived):
        return any(reason.check(defer.TimeoutError, defer.CancelledError) for reason in value.reasons)
    return False


def _describe(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, (defer.CancelledError, defer.TimeoutError)):
        return "no answer in time"
    text = str(value).strip() or type(value).__name__
    return text if len(text) <= 200 else text[:199] + "…"


class _Discard(Protocol):
    """Drops a body we have no use for: reads a short error page (its connection is reused), stops anything else."""

    def __init__(self, limit: int = 65536) -> None:
        self.done: Deferred[None] = Deferred()
        self.limit = limit
        self.size = 0

    def connectionMade(self) -> None:
        """With no limit left, stop at once."""
        if self.limit <= 0:
            IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        """Drop it; stop a sender that goes on and on."""
        self.size += len(data)
        if self.size > self.limit and self.transport is not None:
            IPushProducer(self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The body ended."""
        if not self.done.called:
            self.done.callback(None)


class _Watch:
    """One backend: its stream, its reconnects and its agent state."""

    def __init__(self, watcher: AgentWatcher, backend: Backend) -> None:
        self.watcher = watcher
        self.backend = backend
        self.slug = backend.slug
        self.state = AgentState(backend.project_path, max_sessions=watcher.max_sessions)
        self.generation = 0
        self.stream: EventStreamBody | None = None
        self.live = False
        self.attempt = 0
        #: Stream heads that timed out in a row (each doubles the next one's bound).
        self.head_timeouts = 0
        self.stopped = False
        self._retry: IDelayedCall | None = None
        self._heartbeat: IDelayedCall | None = None
        self.reader = BackendReader(watcher.client, watcher.clock, backend.address, backend.port, None,
                                    watcher.request_timeout)
        self._closing: set[Deferred[None]] = set()
        #: Events that arrived while a snapshot was being read (None: not reconciling).
        self._replay: list[tuple[dict[str, Any], Any]] | None = None
        self._logged: str | None = None

    # -- connecting -------------------------------------------------------------
    def start(self) -> None:
        """Open the stream now (closing any current one)."""
        self.generation += 1
        generation = self.generation
        self._cancel_retry()
        self._close_stream()
        self.reader.cancel_all()
        authorization, refusal = self.watcher.authorization(self.backend)
        if refusal is not None:
            self._set_unknown(refusal)
            return
        self.reader = BackendReader(self.watcher.client, self.watcher.clock, self.backend.address,
                                    self.backend.port, authorization, self.watcher.request_timeout)
        request = self.reader.track(self.watcher.client.get(
            self.reader.url("/global/event"), headers=self.reader.headers(b"text/event-stream"), unbuffered=True),
            timeout=min(self.watcher.stream_head_timeout * 2 ** self.head_timeouts, self.watcher.request_timeout))
        request.addCallbacks(lambda response: self._connected(generation, response),
                             lambda failure: self._failed(generation, failure))
        request.addErrback(lambda failure: log.failure("agent watcher: connecting to {slug} failed", failure,
                                                       slug=self.slug))

    def _connected(self, generation: int, response: IResponse) -> None:
        if generation != self.generation or self.stopped:
            response.deliverBody(_Discard(0))
            return
        self.head_timeouts = 0
        content_type = (response.headers.getRawHeaders(b"content-type") or [b""])[0].lower()
        if response.code != 200 or not content_type.startswith(b"text/event-stream"):
            response.deliverBody(_Discard())
            if response.code == 401:
                reason = "it refused the router's password (401)"
            else:
                reason = f"GET /global/event answered {response.code} {content_type.decode('latin-1')[:40]}"
            self.broken(generation, reason)
            return
        stream = EventStreamBody(
            lambda data: self.frame(generation, data),
            lambda reason: self.broken(generation, f"its event stream sent {reason}"),
            lambda reason: self.lost(generation, reason),
            self.watcher.max_event_bytes, self.watcher.clock, self.watcher.read_batch)
        self.stream = stream
        self.watcher.streams_open += 1
        stream.closed.addBoth(self._stream_closed)
        response.deliverBody(stream)
        self._beat(generation)
        self._reconcile(generation)

    def _stream_closed(self, result: Any) -> None:
        self.watcher.streams_open -= 1

    def _failed(self, generation: int, failure: Failure) -> None:
        if generation != self.generation or self.stopped:
            return
        if _head_timed_out(failure):
            self.attempt = 0  # it accepted the connection: it is there, or about to be
            self.head_timeouts = min(self.head_timeouts + 1, 8)
        self._drop(f"cannot reach it ({_describe(failure)})", slow=False)

    # -- the stream ----------------------------------------------------------------
    def frame(self, generation: int, data: bytes) -> None:
        """One event's data from the stream of ``generation``."""
        if generation != self.generation or self.stopped:
            return
        if _SYNC in data:
            return  # repeats the event before it, with a sequence number
        if _DELTA in data:
            match = _SESSION_ID.search(data)
            if match is not None:
                # Only the session's activity time moves: nothing to replay after a snapshot.
                if self.state.touch(match.group(1).decode(), self.watcher.clock.seconds()) and self.live:
                    self.watcher.changed(self.slug, Change.ACTIVITY)
                return
        try:
            event = json.loads(data)
        except ValueError:
            self.broken(generation, "its event stream sent a frame that is not JSON")
            return
        payload = event.get("payload", event) if isinstance(event, dict) else None
        if not isinstance(payload, dict):
            self.broken(generation, "its event stream sent a frame that is not an OpenCode event")
            return
        kind = payload.get("type")
        if kind in _QUIET:
            self._beat(generation)
            if kind == "server.heartbeat" and self.live:
                self._proven()
            return
        self._apply(payload, event.get("directory"))

    def _apply(self, payload: dict[str, Any], directory: Any) -> None:
        if self._replay is not None:
            if len(self._replay) < 10_000:
                self._replay.append((payload, directory))
            else:
                self._replay = None  # too busy to replay: reconcile again once this one ends
                self.watcher.clock.callLater(0, self._reconcile, self.generation)
        change = self.state.apply(payload, directory if isinstance(directory, str) else None,
                                  self.watcher.clock.seconds())
        if change is not Change.NONE and self.live:
            self.watcher.changed(self.slug, change)

    def _beat(self, generation: int) -> None:
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.reset(self.watcher.heartbeat_timeout)
        else:
            self._heartbeat = self.watcher.clock.callLater(self.watcher.heartbeat_timeout, self._silent, generation)

    def _silent(self, generation: int) -> None:
        self.broken(generation, f"no heartbeat on its event stream for {self.watcher.heartbeat_timeout:g}s")

    def broken(self, generation: int, reason: str) -> None:
        """The stream of ``generation`` broke the rules: drop it, show unknown, retry slowly."""
        if generation == self.generation and not self.stopped:
            self._drop(reason, slow=True)

    def lost(self, generation: int, reason: Failure) -> None:
        """The stream of ``generation`` ended."""
        if generation != self.generation or self.stopped:
            return
        self._drop("its event stream ended" if reason.check(ResponseDone) else "its event stream was cut", slow=False)

    def _drop(self, reason: str, slow: bool) -> None:
        self.generation += 1  # whatever the old stream still reports is ignored from here on
        self._close_stream()
        self._set_unknown(reason)
        if self._logged != reason:
            self._logged = reason
            log.warn("agent watcher: backend {slug} on port {port} shown as unknown: {reason}", slug=self.slug,
                     port=self.backend.port, reason=reason, event="agents_unknown")
        self._schedule(slow)

    def _set_unknown(self, reason: str) -> None:
        self.live = False
        self._replay = None
        if self.state.mark_unknown(reason):
            self.watcher.changed(self.slug, Change.STATE)

    def _schedule(self, slow: bool) -> None:
        if self.stopped:
            return
        delay = (_SLOW_RETRY if slow else _QUICK_RETRY)(self.attempt)
        self.attempt += 1
        self._cancel_retry()
        self._retry = self.watcher.clock.callLater(delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry = None
        try:
            self.start()
        except Exception:
            log.failure("agent watcher: reconnecting to {slug} failed", slug=self.slug)
            self._schedule(slow=True)

    def _cancel_retry(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _close_stream(self) -> None:
        if self._heartbeat is not None and self._heartbeat.active():
            self._heartbeat.cancel()
        self._heartbeat = None
        stream, self.stream = self.stream, None
        if stream is not None and not stream.closed.called:
            self._closing.add(stream.closed)
            stream.closed.addBoth(lambda _: self._closing.discard(stream.closed))
            stream.close()

    # -- reconciling -------------------------------------------------------------------
    @inlineCallbacks
    def _reconcile(self, generation: int) -> Any:
        """Read the snapshots, load them, apply the events that came meanwhile."""
        if generation != self.generation or self.stopped:
            return
        self._replay = []
        try:
            snapshot = yield self.watcher.snapshots.run(self._look, generation, "snapshot")
        except Exception as error:
            if generation == self.generation and not self.stopped:
                reason = str(error) if isinstance(error, SnapshotError) else f"its snapshot failed ({error})"
                self._drop(reason, slow=True)
            return
        if generation != self.generation or self.stopped:
            return
        replay, self._replay = self._replay or [], None
        now = self.watcher.clock.seconds()
        self.state.load(snapshot, now)
        for payload, directory in replay:
            self.state.apply(payload, directory if isinstance(directory, str) else None, now)
        self.live = True
        self.watcher.changed(self.slug, Change.STATE)
        # The second look (titles, errors, todo lists) only adds to what is shown.
        try:
            details = yield self.watcher.snapshots.run(self._look, generation, "details", snapshot)
        except Exception:
            log.failure("agent watcher: the second look at {slug} failed", slug=self.slug)
            return
        if generation == self.generation and not self.stopped and self.state.enrich(details):
            self.watcher.changed(self.slug, Change.STATE)

    def _look(self, generation: int, which: str, snapshot: Any = None) -> Deferred[Any]:
        """Read the snapshot (or its details) now that it is our turn, unless the stream is gone meanwhile."""
        if generation != self.generation or self.stopped:
            return defer.fail(defer.CancelledError())
        if which == "snapshot":
            return self.reader.snapshot(self.state, self.watcher.max_sessions)
        return self.reader.details(self.state, snapshot)

    def _proven(self) -> None:
        """A heartbeat on a reconciled stream: it works, so the next problem is news and is retried quickly."""
        self.attempt = 0
        if self._logged is not None:
            log.info("agent watcher: following backend {slug} again", slug=self.slug, event="agents_known")
            self._logged = None

    # -- the registry's news ---------------------------------------------------------------
    def update(self, backend: Backend) -> None:
        """The registry changed this backend: reconnect when what the stream depends on changed."""
        before, self.backend = self.backend, backend
        moved = (before.address, before.port, before.locked, before.router_credentials, before.owner) != \
            (backend.address, backend.port, backend.locked, backend.router_credentials, backend.owner)
        came_back = backend.up and not before.up and not self.live
        if moved or came_back:
            self.attempt = 0
            self.start()

    def stop(self) -> Deferred[Any]:
        """Close everything; fires once the stream and every request have ended."""
        self.stopped = True
        self.generation += 1
        self._cancel_retry()
        self._close_stream()
        self.reader.cancel_all()
        return defer.DeferredList(list(self._closing), consumeErrors=True)


class AgentWatcher(Service):
    """Every readable backend's agent state, kept live; a Registry observer (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        client: HTTPClient,
        credentials: BackendCredentials,
        on_change: Callable[[list[str]], None] | None = None,
        pool: HTTPConnectionPool | None = None,
        heartbeat_timeout: float = HEARTBEAT_TIMEOUT,
        max_event_bytes: int = MAX_EVENT_BYTES,
        max_sessions: int = 20,
        request_timeout: float = REQUEST_TIMEOUT,
        stream_head_timeout: float = STREAM_HEAD_TIMEOUT,
        read_batch: float = READ_BATCH,
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.client = client
        self.credentials = credentials
        self.on_change = on_change
        self.pool = pool
        self.heartbeat_timeout = heartbeat_timeout
        self.max_event_bytes = max_event_bytes
        self.max_sessions = max_sessions
        self.request_timeout = request_timeout
        self.stream_head_timeout = stream_head_timeout
        self.read_batch = read_batch
        self.snapshots = defer.DeferredSemaphore(CONCURRENT_SNAPSHOTS)
        self.watches: dict[str, _Watch] = {}
        #: Streams of removed backends still closing (stopService waits for them too).
        self._stopping: set[Deferred[Any]] = set()
        self.streams_open = 0
        self._dirty: dict[str, Change] = {}
        self._flush: IDelayedCall | None = None
        self._flush_due = 0.0

    # -- what it may read ---------------------------------------------------------
    def authorization(self, backend: Backend) -> tuple[bytes | None, str | None]:
        """The Authorization value for ``backend`` (None for an unlocked one), or why it is not read."""
        if not backend.locked:
            return None, None
        header = self.credentials.credentials_for(backend)
        if header is not None:
            return header, None
        if self.credentials.password is None:
            return None, "locked: the router follows a password-protected server only with --opencode-password-file"
        if not backend.router_credentials:
            return None, "locked: the password of --opencode-password-file does not open it"
        return None, ("locked: the router follows it only with its own authentication on, or when it listens "
                      "on the loopback only")

    # -- service -------------------------------------------------------------------------
    def startService(self) -> None:
        """Follow every backend the registry has, and every later one."""
        super().startService()
        self.registry.subscribe(self)
        for backend in self.registry.backends():
            self.added(backend)

    def stopService(self) -> Deferred[None]:
        """Close every stream and request; fires once they are all closed (and the pool, if ours)."""
        super().stopService()
        self.registry.unsubscribe(self)
        if self._flush is not None and self._flush.active():
            self._flush.cancel()
        self._flush = None
        watches, self.watches = list(self.watches.values()), {}
        done: Deferred[Any] = defer.DeferredList([watch.stop() for watch in watches] + list(self._stopping),
                                                 consumeErrors=True)
        if self.pool is not None:
            pool = self.pool
            done.addCallback(lambda _: pool.closeCachedConnections())
        return done.addCallback(lambda _: None)

    # -- registry observer --------------------------------------------------------------
    def added(self, backend: Backend) -> None:
        """Start following ``backend``."""
        if not self.running or backend.slug in self.watches:
            return
        watch = self.watches[backend.slug] = _Watch(self, backend)
        watch.start()

    def updated(self, backend: Backend) -> None:
        """Reconnect when its address, port, lock or owner changed, or it answers again."""
        watch = self.watches.get(backend.slug)
        if watch is None:
            self.added(backend)
        else:
            watch.update(backend)

    def removed(self, backend: Backend) -> None:
        """Stop following ``backend``."""
        watch = self.watches.pop(backend.slug, None)
        if watch is not None:
            stopping = watch.stop()
            self._stopping.add(stopping)
            stopping.addBoth(lambda _: self._stopping.discard(stopping))
            self._dirty.pop(backend.slug, None)

    # -- change notices ---------------------------------------------------------------------
    def changed(self, slug: str, change: Change) -> None:
        """Note a change; ``on_change`` hears of it soon (at once for what people see, else within 5 s)."""
        if self.on_change is None or change is Change.NONE or self._dirty.get(slug, Change.NONE) >= change:
            return  # nothing new, or already on its way
        self._dirty[slug] = max(self._dirty.get(slug, Change.NONE), change)
        delay = STATE_DELAY if change is Change.STATE else ACTIVITY_DELAY
        due = self.clock.seconds() + delay
        if self._flush is not None and self._flush.active():
            if due >= self._flush_due:
                return
            self._flush.cancel()
        self._flush_due = due
        self._flush = self.clock.callLater(delay, self._send_changes)

    def _send_changes(self) -> None:
        self._flush = None
        slugs = [slug for slug in self._dirty if slug in self.watches]
        self._dirty.clear()
        if slugs and self.on_change is not None:
            try:
                self.on_change(slugs)
            except Exception:
                log.failure("agent watcher: sending agent changes failed")

    # -- reading the state --------------------------------------------------------------------
    def state_of(self, slug: str) -> AgentState | None:
        """The agent state of ``slug`` (None when it is not followed)."""
        watch = self.watches.get(slug)
        return watch.state if watch is not None else None

    def states(self) -> Iterable[AgentState]:
        """Every followed backend's state."""
        return [watch.state for watch in self.watches.values()]

    def dashboard_json(self, slugs: Iterable[str] | None = None) -> dict[str, Any]:
        """``{"agents": [{"slug", "agents", "sessions"}]}``: the dashboard's snapshot and ``agents`` events."""
        chosen = list(self.watches) if slugs is None else [slug for slug in slugs if slug in self.watches]
        return {"agents": [{"slug": slug, "agents": summary_json(self.watches[slug].state),
                            "sessions": [s.to_json() for s in self.watches[slug].state.ordered()]}
                           for slug in chosen],
                "server_time": self.clock.seconds()}

    def counts(self) -> dict[str, int]:
        """Sessions by status, pending requests by kind, backends by state, open streams (for /metrics)."""
        totals: dict[str, int] = {"streams": self.streams_open}
        for state in self.states():
            state.counts(totals)
            key = f"backends:{state.summary().state.value}"
            totals[key] = totals.get(key, 0) + 1
        return totals


# -- JSON views (the API's, the dashboard's) ---------------------------------------------------------
def summary_json(state: AgentState | None) -> dict[str, Any]:
    """A backend's agent summary (``unknown`` when it is not followed)."""
    if state is None:
        return Summary(BackendState.UNKNOWN, reason="the router does not follow its agents").to_json()
    return state.summary().to_json()

