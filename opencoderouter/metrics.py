"""Prometheus metrics: one CollectorRegistry per router, hooks for the scanner, proxy and launcher.

Label cardinality is bounded on purpose: backends are labelled by slug only (never by path), at
most ``MAX_SLUG_LABELS`` distinct slugs get their own series, and every other label takes values
from a small fixed set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from . import __version__
from .agent_sessions import SessionStatus
from .agent_state import BackendState
from .child import LauncherState
from .registry import Registry

#: Distinct slugs that get their own series; later ones are counted under ``OTHER_SLUG``.
MAX_SLUG_LABELS = 200
OTHER_SLUG = "_other"

ROUTING_MODES = ("host", "path")
STREAM_KINDS = ("sse", "websocket")
PROBE_OUTCOMES = ("opencode", "not_opencode", "timeout", "refused", "error")
SCAN_KINDS = ("full", "quick")
#: Launcher instance states (the launcher's own list).
INSTANCE_STATES = tuple(state.value for state in LauncherState)
#: Agent session statuses, backend agent states and kinds of pending request (the agent watcher's).
SESSION_STATUSES = tuple(status.value for status in SessionStatus)
AGENT_STATES = tuple(state.value for state in BackendState)
PENDING_KINDS = ("permission", "question")

# Proxied requests range from a health check (ms) to an SSE stream held for hours.
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
_SCAN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def status_class(status: int | None) -> str:
    """``2xx``..``5xx`` for an HTTP status; ``error`` when no status was sent (backend unreachable, aborted)."""
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


def _one_of(value: str, allowed: Iterable[str], fallback: str = "other") -> str:
    return value if value in allowed else fallback


class _BackendCollector:
    """Reads backends and launcher instances at scrape time, so the figures can never drift from them."""

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        #: ``() -> instances`` (each with ``state``, ``slug`` and ``restarts``), once a launcher runs.
        self.instances: Callable[[], Iterable[Any]] | None = None
        self.slug_label: Callable[[str], str] = str

    def collect(self) -> Iterable[Metric]:
        """Yield the backend (and launcher instance) gauges."""
        backends = self._registry.backends()
        family = GaugeMetricFamily("opencoderouter_backends", "Discovered backends by state.", labels=["state"])
        up = sum(1 for b in backends if b.up)
        family.add_metric(["up"], up)
        family.add_metric(["down"], len(backends) - up)
        yield family
        if self.instances is not None:
            listed = list(self.instances())
            states = GaugeMetricFamily(
                "opencoderouter_instances", "Launcher-managed instances by state.", labels=["state"]
            )
            for state in INSTANCE_STATES:
                states.add_metric([state], sum(1 for i in listed if getattr(i, "state", None) == state))
            yield states
            # The launcher keeps each instance's restart count: read it rather than count events twice.
            restarts: dict[str, float] = {}
            for instance in listed:
                label = self.slug_label(str(getattr(instance, "slug", "")))
                restarts[label] = restarts.get(label, 0) + int(getattr(instance, "restarts", 0) or 0)
            counter = CounterMetricFamily(
                "opencoderouter_launcher_restarts", "Managed instances restarted after exiting.", labels=["slug"]
            )
            for label, count in sorted(restarts.items()):
                counter.add_metric([label], count)
            yield counter


class _AgentCollector:
    """Reads the agent watcher's counts at scrape time."""

    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        """Yield the agent gauges (every label value, zeros included)."""
        counts = self._counts()
        for name, help_text, label, values, prefix in (
            ("opencoderouter_agent_sessions", "Followed sessions by status.", "status", SESSION_STATUSES, "sessions"),
            ("opencoderouter_agent_pending", "Permission requests and questions waiting for a person.", "kind",
             PENDING_KINDS, "pending"),
            ("opencoderouter_agent_backends", "Followed backends by agent state.", "state", AGENT_STATES, "backends"),
        ):
            family = GaugeMetricFamily(name, help_text, labels=[label])
            for value in values:
                family.add_metric([value], counts.get(f"{prefix}:{value}", 0))
            yield family
        yield GaugeMetricFamily("opencoderouter_agent_streams", "Open /global/event streams to backends.",
                                value=counts.get("streams", 0))


class RouterMetrics:
    """Every metric of one router, in its own CollectorRegistry (never the process-global one)."""

    def __init__(self, registry: Registry) -> None:
        self.collector_registry = CollectorRegistry(auto_describe=True)
        self._backends = _BackendCollector(registry)
        self.collector_registry.register(self._backends)
        self._slugs: set[str] = set()
        reg = self.collector_registry
        Gauge("opencoderouter_info", "Router version.", ["version"], registry=reg).labels(__version__).set(1)
        self.scans = Counter("opencoderouter_scans", "Completed scans.", ["kind"], registry=reg)
        self.scan_duration = Histogram(
            "opencoderouter_scan_duration_seconds", "Time one scan took.", ["kind"],
            buckets=_SCAN_BUCKETS, registry=reg,
        )
        self.probes = Counter("opencoderouter_probes", "Port probes by outcome.", ["outcome"], registry=reg)
        self.requests = Counter(
            "opencoderouter_proxy_requests", "Proxied requests finished.", ["slug", "mode", "status_class"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "opencoderouter_proxy_request_duration_seconds", "Time from request to the end of the response.",
            ["mode"], buckets=_REQUEST_BUCKETS, registry=reg,
        )
        self.bytes_relayed = Counter(
            "opencoderouter_proxy_bytes", "Bytes relayed to and from backends (bodies and WebSocket frames).",
            ["slug", "direction"], registry=reg,
        )
        self.open_streams = Gauge(
            "opencoderouter_proxy_open_streams", "Proxied SSE streams and WebSockets open now.", ["kind"],
            registry=reg,
        )
        self.dashboard_streams = Gauge(
            "opencoderouter_dashboard_streams", "Open /api/events streams (dashboards watching).", registry=reg
        )
        # Pre-create the fixed label sets so that dashboards see zeros rather than missing series.
        for kind in SCAN_KINDS:
            self.scans.labels(kind)
            self.scan_duration.labels(kind)
        for outcome in PROBE_OUTCOMES:
            self.probes.labels(outcome)
        for kind in STREAM_KINDS:
            self.open_streams.labels(kind)

    # -- label hygiene -----------------------------------------------------
    def slug_label(self, slug: str) -> str:
        """``slug`` if it has (or may still get) its own series, else ``_other``."""
        if slug in self._slugs:
            return slug
        if len(self._slugs) >= MAX_SLUG_LABELS:
            return OTHER_SLUG
        self._slugs.add(slug)
        return slug

    # -- scanner hooks -----------------------------------------------------
    def scan_finished(self, kind: str, duration: float) -> None:
        """A full or quick scan ended after ``duration`` seconds."""
        kind = _one_of(kind, SCAN_KINDS)
        self.scans.labels(kind).inc()
        self.scan_duration.labels(kind).observe(max(duration, 0.0))

    def probe_finished(self, outcome: str) -> None:
        """One port probe ended: ``opencode``, ``not_opencode``, ``timeout``, ``refused`` or ``error``."""
        self.probes.labels(_one_of(outcome, PROBE_OUTCOMES, "error")).inc()

    # -- proxy hooks -------------------------------------------------------
    def proxy_meter(self, slug: str, mode: str) -> ProxyMeter:
        """The metric children of one backend in one routing mode, bound once (forwarding keeps them)."""
        return ProxyMeter(self, slug, _one_of(mode, ROUTING_MODES))

    def stream_opened(self, kind: str) -> None:
        """A long-lived proxied stream started (``sse`` or ``websocket``)."""
        self.open_streams.labels(_one_of(kind, STREAM_KINDS)).inc()

    def stream_closed(self, kind: str) -> None:
        """A stream counted by ``stream_opened`` ended."""
        self.open_streams.labels(_one_of(kind, STREAM_KINDS)).dec()

    # -- dashboard hooks ---------------------------------------------------
    def dashboard_stream_opened(self) -> None:
        """A dashboard connected to ``/api/events``."""
        self.dashboard_streams.inc()

    def dashboard_stream_closed(self) -> None:
        """A dashboard's event stream ended."""
        self.dashboard_streams.dec()

    # -- launcher hooks ----------------------------------------------------
    def watch_launcher(self, instances: Callable[[], Iterable[Any]]) -> None:
        """Report launcher instances by state, and their restarts, from ``instances()`` at every scrape."""
        self._backends.instances = instances
        self._backends.slug_label = self.slug_label

    # -- agent watcher hooks -----------------------------------------------
    def watch_agents(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report the agent watcher's sessions, pending requests, backends and streams from ``counts()``."""
        self.collector_registry.register(_AgentCollector(counts))

    # -- exposition --------------------------------------------------------
    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.collector_registry)

    def resource(self) -> MetricsResource:
        """The ``/metrics`` resource."""
        return MetricsResource(self)


class ProxyMeter:
    """Counts one backend's proxied requests in one routing mode, with the label children looked up once."""

    __slots__ = ("_metrics", "_label", "_mode", "_by_class", "_duration", "_to_client", "_to_backend")

    def __init__(self, metrics: RouterMetrics, slug: str, mode: str) -> None:
        self._metrics = metrics
        self._label = metrics.slug_label(slug)
        self._mode = mode
        self._by_class: dict[str, Any] = {}
        self._duration = metrics.request_duration.labels(mode)
        self._to_client = metrics.bytes_relayed.labels(self._label, "to_client")
        self._to_backend = metrics.bytes_relayed.labels(self._label, "to_backend")

    def finished(self, status: int | None, duration: float, response_bytes: int, request_bytes: int) -> None:
        """A proxied request ended (``status`` None when the client left before any answer)."""
        kind = status_class(status)
        child = self._by_class.get(kind)
        if child is None:
            child = self._by_class[kind] = self._metrics.requests.labels(self._label, self._mode, kind)
        child.inc()
        self._duration.observe(max(duration, 0.0))
        if response_bytes > 0:
            self._to_client.inc(response_bytes)
        if request_bytes > 0:
            self._to_backend.inc(request_bytes)


class MetricsResource(Resource):
    """``GET /metrics``: the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: RouterMetrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: IRequest) -> bytes:
        """The current metrics; anything below ``/metrics`` is a 404."""
        if request.postpath not in ([], [b""]):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Not found: only /metrics exists here.\n"
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return self.metrics.render()


def stream_kind(request: IRequest) -> str | None:
    """``websocket`` or ``sse`` when the request asks for a long-lived stream, else None."""
    if (request.getHeader(b"upgrade") or b"").strip().lower() == b"websocket":
        return "websocket"
    if b"text/event-stream" in (request.getHeader(b"accept") or b"").lower():
        return "sse"
    return None
