"""``GET /api/events``: the registry's changes as a Server-Sent Events stream (the dashboard's feed).

Each stream starts with a ``snapshot`` event (router facts, every backend, and what other parts add,
e.g. ``lan``), then carries
``added``/``updated``/``removed`` events with the backend's JSON. The registry only reports real
changes, so a ``seen`` event (``{"last_seen": {slug: unix time}}``) follows the scans' fresh
sightings at most once per ``tick``; a comment line goes out when nothing else was sent for
``heartbeat`` seconds, so idle connections are not cut by proxies and dead ones are noticed.
A browser's EventSource reconnects by itself and gets a fresh snapshot.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from .api import backend_json, request_authority
from .channel import server_request
from .periodic import logging_errors
from .registry import Backend, Registry
from .responses import error_body, json_response

#: More simultaneous dashboards than this get 503: each stream holds a connection and a buffer.
MAX_STREAMS = 256


def dashboard_backend_json(backend: Backend, authority: str, mdns: bool = False) -> dict[str, Any]:
    """The API's backend object plus what the dashboard shows: liveness, host label, times as numbers."""
    body = backend_json(backend, authority, mdns)
    body.update(
        {
            "up": backend.up,
            "host_label": backend.host_label,
            "first_seen_unix": backend.first_seen,
            "last_seen_unix": backend.last_seen,
        }
    )
    return body


def sse_event(event: str, data: Any) -> bytes:
    """One SSE event; JSON never contains a raw newline, so one ``data:`` line is enough."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@implementer(IPushProducer)
class _Client:
    """One open stream: its request, the authority its URLs are built from, and its backlog state.

    It is the request's producer, so the connection tells it when the client stops reading
    (the kernel buffer and Twisted's are full); the stream is then dropped instead of letting
    an idle tab's backlog grow in the router's memory. Its EventSource reconnects for a fresh snapshot.
    """

    def __init__(self, request: IRequest, authority: str) -> None:
        self.request = server_request(request)
        self.authority = authority
        self.stalled = False

    def pauseProducing(self) -> None:
        """The client is not keeping up."""
        self.stalled = True

    def resumeProducing(self) -> None:
        """The client caught up."""
        self.stalled = False

    def stopProducing(self) -> None:
        """The connection is going away; notifyFinish does the clean-up."""


class EventStream(Resource):
    """The SSE resource, and a Registry observer that fans each change out to every open stream."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        registry: Registry,
        clock: IReactorTime,
        router_info: Callable[[], dict[str, Any]] = dict,
        heartbeat: float = 15.0,
        tick: float = 1.0,
        retry_ms: int = 1000,
        max_streams: int = MAX_STREAMS,
        on_open: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        mdns: bool = False,
        snapshot_extras: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        #: More keys for every stream's snapshot (e.g. ``lan``: the LAN directory), from other parts.
        self._snapshot_extras = snapshot_extras
        self.registry = registry
        self.clock = clock
        self.router_info = router_info
        self.heartbeat = heartbeat
        self.tick = tick
        self.retry_ms = retry_ms
        self.max_streams = max_streams
        self._on_open = on_open
        self._on_close = on_close
        #: With mDNS on, backend objects carry ``mdns_name`` (as in ``/api/backends``).
        self.mdns = mdns
        self.clients: list[_Client] = []
        self._loop: LoopingCall | None = None
        self._subscribed = False
        self._last_seen_sent: dict[str, float] = {}
        self._last_write = 0.0

    # -- the resource --------------------------------------------------------
    def render_GET(self, request: IRequest) -> Any:
        """Open a stream: headers, the snapshot, then changes until the client goes away."""
        if len(self.clients) >= self.max_streams:
            request.setHeader(b"retry-after", b"5")
            message = f"{self.max_streams} event streams are open already"
            return json_response(request, error_body("too_many_streams", message), 503)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache, no-transform")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method == b"HEAD":
            return b""
        client = _Client(request, request_authority(request))
        # Built before the stream is registered: if it fails, the request gets a 500 and leaves nothing behind.
        snapshot = sse_event("snapshot", self._snapshot(client))
        self.clients.append(client)
        client.request.registerProducer(client, True)
        client.request.notifyFinish().addBoth(self._finished, client)
        if self._on_open is not None:
            self._on_open()
        self._start()
        self._last_write = self.clock.seconds()
        request.write(f"retry: {self.retry_ms}\n\n".encode("ascii") + snapshot)
        return NOT_DONE_YET

    def _snapshot(self, client: _Client) -> dict[str, Any]:
        backends = self.registry.backends()
        snapshot = {
            "router": self.router_info(),
            "backends": [self._backend_json(b, client) for b in backends],
            "server_time": self.clock.seconds(),
        }
        if self._snapshot_extras is not None:
            snapshot.update(self._snapshot_extras())
        return snapshot

    def _finished(self, result: Failure | None, client: _Client) -> None:
        # Fires on a clean finish and on a client disconnect alike: either way the stream is gone.
        if client in self.clients:
            self.clients.remove(client)
            if self._on_close is not None:
                self._on_close()
        if not self.clients:
            self._stop()

    # -- registry observer -------------------------------------------------------
    def added(self, backend: Backend) -> None:
        """Send ``added``."""
        self._send_backend("added", backend)

    def updated(self, backend: Backend) -> None:
        """Send ``updated``."""
        self._send_backend("updated", backend)

    def removed(self, backend: Backend) -> None:
        """Send ``removed``."""
        self._send_backend("removed", backend)

    def _send_backend(self, event: str, backend: Backend) -> None:
        now = self.clock.seconds()
        if event == "removed":
            self._last_seen_sent.pop(backend.slug, None)
        else:
            self._last_seen_sent[backend.slug] = backend.last_seen
        for client in list(self.clients):
            data = {"backend": self._backend_json(backend, client), "server_time": now}
            self._write(client, sse_event(event, data))

    def _backend_json(self, backend: Backend, client: _Client) -> dict[str, Any]:
        return dashboard_backend_json(backend, client.authority, self.mdns)

    def publish(self, event: str, data: Any) -> None:
        """Send any other event to every stream (e.g. the launcher's ``instances``)."""
        chunk = sse_event(event, data)
        for client in list(self.clients):
            self._write(client, chunk)

    def _write(self, client: _Client, chunk: bytes) -> None:
        self._last_write = self.clock.seconds()
        if client.stalled:
            self.log.info("dropping a dashboard event stream whose client stopped reading", event="stream_stalled")
            self._finished(None, client)
            transport = getattr(getattr(client.request, "channel", None), "transport", None)
            if transport is not None:
                transport.abortConnection()
            return
        try:
            client.request.write(chunk)
        except Exception:
            # A request finished under us: drop it rather than let one stream break the others.
            self.log.failure("dropping a dashboard event stream that failed")
            self._finished(None, client)

    # -- lifecycle -------------------------------------------------------------
    def _start(self) -> None:
        # Subscribe only while someone listens: no work per change with no dashboard open.
        if not self._subscribed:
            self.registry.subscribe(self)
            self._subscribed = True
        if self._loop is None and self.tick > 0:
            self._loop = LoopingCall(logging_errors(self._tick, "dashboard event tick", self.log))
            self._loop.clock = self.clock
            self._loop.start(self.tick, now=False)

    def _stop(self) -> None:
        if self._subscribed:
            self.registry.unsubscribe(self)
            self._subscribed = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _tick(self) -> None:
        """Send fresh last-seen times, else a heartbeat comment when the line has been quiet."""
        now = self.clock.seconds()
        seen = {b.slug: b.last_seen for b in self.registry.backends()}
        fresh = {slug: t for slug, t in seen.items() if self._last_seen_sent.get(slug) != t}
        if fresh:
            self._last_seen_sent.update(fresh)
            self.publish("seen", {"last_seen": fresh, "server_time": now})
        elif self.heartbeat > 0 and now - self._last_write >= self.heartbeat:
            chunk = f": heartbeat {now:.0f}\n\n".encode("ascii")
            for client in list(self.clients):
                self._write(client, chunk)

    def close(self) -> None:
        """End every stream (router shutting down): browsers reconnect to the next router."""
        for client in list(self.clients):
            try:
                client.request.unregisterProducer()
                client.request.finish()
            except Exception:
                self.log.failure("could not finish a dashboard event stream")
                self._finished(None, client)
        self._stop()
