"""``/metrics``: Prometheus text from a per-router registry; scanner, proxy and launcher hooks."""

from __future__ import annotations

import http.client
from typing import Any

import prometheus_client
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from opencoderouter.listeners import Listener
from opencoderouter.metrics import (
    MAX_SLUG_LABELS,
    OTHER_SLUG,
    RouterMetrics,
    status_class,
)
from opencoderouter.registry import Registry, Sighting
from opencoderouter.scanner import Prober, Scanner
from opencoderouter.testing import FakeOpenCode

from .forwarding_harness import Harness
from .support import http_get, wait_for


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from Prometheus text, via prometheus_client's parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def scrape(metrics: RouterMetrics) -> str:
    """GET /metrics through the resource, in memory."""
    stub = StubTreq(metrics.resource())
    response = stub.get("http://router/")
    stub.flush()
    result = response.result
    assert result.code == 200
    assert result.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain; version=")
    body = stub.content(result)
    stub.flush()
    return body.result.decode("utf-8")


def test_metrics_report_backends_by_state():
    clock = Clock()
    registry = Registry(clock, stale_after=30)
    metrics = RouterMetrics(registry)
    registry.record_scan([Sighting(30001, "/p/a", "1", None), Sighting(30002, "/p/b", "1", None)])
    text = scrape(metrics)
    assert value(text, "opencoderouter_backends", state="up") == 2
    assert value(text, "opencoderouter_backends", state="down") == 0
    registry.record_scan([Sighting(30001, "/p/a", "1", None)])
    text = scrape(metrics)
    assert value(text, "opencoderouter_backends", state="up") == 1
    assert value(text, "opencoderouter_backends", state="down") == 1


def test_each_router_has_its_own_registry_and_leaves_the_global_one_alone():
    before = set(prometheus_client.REGISTRY._names_to_collectors)
    first = RouterMetrics(Registry(Clock(), 30))
    second = RouterMetrics(Registry(Clock(), 30))  # would raise "Duplicated timeseries" on a shared registry
    first.scan_finished("full", 0.1)
    assert value(scrape(first), "opencoderouter_scans_total", kind="full") == 1
    assert value(scrape(second), "opencoderouter_scans_total", kind="full") == 0
    assert set(prometheus_client.REGISTRY._names_to_collectors) == before


def test_path_below_metrics_is_404():
    stub = StubTreq(RouterMetrics(Registry(Clock(), 30)).resource())
    response = stub.get("http://router/extra")
    stub.flush()
    assert response.result.code == 404


class _ByPort(Resource):
    """Answers as FakeOpenCode on one port, 404 on another, never on a third (like a hung service)."""

    isLeaf = True

    def __init__(self, opencode_port: int, other_port: int, silent_port: int, directory: str) -> None:
        super().__init__()
        self.routes = {opencode_port: FakeOpenCode(directory, heartbeat=0, clock=Clock())}
        self.other_port, self.silent_port = other_port, silent_port

    def render(self, request: IRequest) -> Any:
        port = int(request.getHeader(b"host").decode().rsplit(":", 1)[1])
        if port in self.routes:
            return self.routes[port].render(request)
        if port == self.silent_port:
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"nothing here"


def test_scans_and_probe_outcomes_are_counted(tmp_path):
    clock = Clock()
    registry = Registry(clock, stale_after=30)
    metrics = RouterMetrics(registry)
    client = StubTreq(_ByPort(30001, 30002, 30003, str(tmp_path)))
    prober = Prober(client, clock, timeout=0.8, metrics=metrics)
    listeners = {p: Listener(p, 0, p) for p in (30001, 30002, 30003)}
    scanner = Scanner(
        registry, prober, clock, port_range=(30001, 30003), interval=5, concurrency=5,
        list_listeners=lambda start, end: listeners, owner_name=str, metrics=metrics,
    )
    scan = scanner.scan_safely()
    client.flush()
    clock.advance(0.5)
    client.flush()
    assert not scan.called  # the silent port holds the scan until its probe times out
    clock.advance(0.5)
    client.flush()
    assert scan.called
    text = scrape(metrics)
    assert value(text, "opencoderouter_scans_total", kind="full") == 1
    assert value(text, "opencoderouter_scan_duration_seconds_count", kind="full") == 1
    assert value(text, "opencoderouter_scan_duration_seconds_sum", kind="full") == 1.0
    assert value(text, "opencoderouter_probes_total", outcome="opencode") == 1
    assert value(text, "opencoderouter_probes_total", outcome="not_opencode") == 1
    assert value(text, "opencoderouter_probes_total", outcome="timeout") == 1
    assert value(text, "opencoderouter_backends", state="up") == 1
    # A quick check with nothing new to probe is not a scan.
    scanner.quick_check_safely()
    client.flush()
    assert value(scrape(metrics), "opencoderouter_scans_total", kind="quick") == 0


def test_proxy_hooks_count_requests_by_slug_mode_and_status_class():
    metrics = RouterMetrics(Registry(Clock(), 30))
    metrics.proxy_meter("alpha", "path").finished(200, 0.02, 1500, 100)
    metrics.proxy_meter("alpha", "path").finished(204, 0.01, 0, 0)
    metrics.proxy_meter("alpha", "host").finished(502, 1.5, 10, 0)
    metrics.proxy_meter("beta", "host").finished(None, 0.8, 0, 0)  # backend never answered
    text = scrape(metrics)
    assert value(text, "opencoderouter_proxy_requests_total", slug="alpha", mode="path", status_class="2xx") == 2
    assert value(text, "opencoderouter_proxy_requests_total", slug="alpha", mode="host", status_class="5xx") == 1
    assert value(text, "opencoderouter_proxy_requests_total", slug="beta", mode="host", status_class="error") == 1
    assert value(text, "opencoderouter_proxy_request_duration_seconds_count", mode="path") == 2
    assert value(text, "opencoderouter_proxy_request_duration_seconds_bucket", mode="host", le="1.0") == 1
    assert value(text, "opencoderouter_proxy_bytes_total", slug="alpha", direction="to_client") == 1510
    assert value(text, "opencoderouter_proxy_bytes_total", slug="alpha", direction="to_backend") == 100


def test_stream_gauges_follow_opened_and_closed_streams():
    metrics = RouterMetrics(Registry(Clock(), 30))
    for kind in ("sse", "sse", "websocket"):
        metrics.stream_opened(kind)
    metrics.stream_closed("sse")
    text = scrape(metrics)
    assert value(text, "opencoderouter_proxy_open_streams", kind="sse") == 1
    assert value(text, "opencoderouter_proxy_open_streams", kind="websocket") == 1


def test_label_values_are_bounded():
    metrics = RouterMetrics(Registry(Clock(), 30))
    for number in range(MAX_SLUG_LABELS + 50):
        metrics.proxy_meter(f"project-{number}", "path").finished(200, 0.01, 0, 0)
    metrics.proxy_meter("x", "/some/path?with=query").finished(999, 0.01, 0, 0)  # a bad mode and status
    metrics.probe_finished("weird")
    metrics.scan_finished("odd", 0.1)
    text = scrape(metrics)
    requests = {labels: v for (name, labels), v in samples(text).items() if name == "opencoderouter_proxy_requests_total"}
    slugs = {dict(labels)["slug"] for labels in requests}
    assert len(slugs) == MAX_SLUG_LABELS + 1
    assert OTHER_SLUG in slugs
    assert value(text, "opencoderouter_proxy_requests_total", slug=OTHER_SLUG, mode="path", status_class="2xx") == 50
    assert value(text, "opencoderouter_proxy_requests_total", slug=OTHER_SLUG, mode="other", status_class="error") == 1
    assert value(text, "opencoderouter_probes_total", outcome="error") == 1
    assert value(text, "opencoderouter_scans_total", kind="other") == 1


def test_status_class_names():
    assert [status_class(s) for s in (101, 200, 304, 404, 503, None, 0, 1000)] == [
        "1xx", "2xx", "3xx", "4xx", "5xx", "error", "error", "error",
    ]


def test_launcher_instances_by_state_and_their_restarts():
    from types import SimpleNamespace as Instance

    metrics = RouterMetrics(Registry(Clock(), 30))
    text = scrape(metrics)
    assert not any(name == "opencoderouter_instances" for name, _ in samples(text))  # no launcher: no gauge
    instances = [Instance(slug="alpha", state="running", restarts=2), Instance(slug="beta", state="running", restarts=0),
                 Instance(slug="gamma", state="failed", restarts=5)]
    metrics.watch_launcher(lambda: instances)
    text = scrape(metrics)
    assert value(text, "opencoderouter_instances", state="running") == 2
    assert value(text, "opencoderouter_instances", state="failed") == 1
    assert value(text, "opencoderouter_instances", state="starting") == 0
    assert value(text, "opencoderouter_launcher_restarts_total", slug="alpha") == 2
    assert value(text, "opencoderouter_launcher_restarts_total", slug="gamma") == 5
    instances[0].restarts = 3  # read live at each scrape
    assert value(scrape(metrics), "opencoderouter_launcher_restarts_total", slug="alpha") == 3


def test_router_process_serves_metrics_that_move(tmp_path, fake_opencode_factory, router_factory):
    backend = fake_opencode_factory(tmp_path / "alpha")
    router = router_factory("--scan-start", str(backend.port), "--scan-end", str(backend.port), "--scan-interval", "300ms")

    def scraped() -> str:
        status, headers, body = http_get(router.url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
        return body.decode()

    first = wait_for(lambda: (t := scraped()) and value(t, "opencoderouter_backends", state="up") == 1 and t,
                     what="the backend in /metrics")
    scans = value(first, "opencoderouter_scans_total", kind="full")
    wait_for(lambda: value(scraped(), "opencoderouter_scans_total", kind="full") >= scans + 2, what="more scans")
    text = scraped()
    assert value(text, "opencoderouter_probes_total", outcome="opencode") >= scans + 2
    assert value(text, "opencoderouter_scan_duration_seconds_count", kind="full") >= scans + 2
    # An open dashboard stream is counted, and uncounted once its client hangs up.
    connection = http.client.HTTPConnection("127.0.0.1", router.port, timeout=5)
    connection.request("GET", "/api/events")
    response = connection.getresponse()
    assert response.status == 200
    wait_for(lambda: value(scraped(), "opencoderouter_dashboard_streams") == 1, what="stream counted")
    response.close()
    connection.close()
    wait_for(lambda: value(scraped(), "opencoderouter_dashboard_streams") == 0, what="stream uncounted")


def test_forwarded_requests_are_counted_with_status_bytes_and_duration():
    metrics = RouterMetrics(Registry(Clock(), 30))
    h = Harness(metrics=metrics)
    for index in range(3):
        h.send(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 10\r\n\r\n0123456789")
        if index == 0:
            h.accept()
        h.answer(b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello")
    assert h.out().count(b"HTTP/1.1 201 ") == 3
    text = scrape(metrics)
    assert value(text, "opencoderouter_proxy_requests_total", slug="alpha", mode="path", status_class="2xx") == 3
    assert value(text, "opencoderouter_proxy_bytes_total", slug="alpha", direction="to_client") == 15
    assert value(text, "opencoderouter_proxy_bytes_total", slug="alpha", direction="to_backend") == 30
    assert value(text, "opencoderouter_proxy_request_duration_seconds_count", mode="path") == 3


def test_forwarded_event_streams_are_counted_open_until_they_end():
    metrics = RouterMetrics(Registry(Clock(), 30))
    h = Harness(metrics=metrics)
    h.get(b"/event", headers=b"Accept: text/event-stream\r\n")
    h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert value(scrape(metrics), "opencoderouter_proxy_open_streams", kind="sse") == 1
    h.reactor.advance(90)
    h.answer(b"0\r\n\r\n")
    text = scrape(metrics)
    assert value(text, "opencoderouter_proxy_open_streams", kind="sse") == 0
    assert value(text, "opencoderouter_proxy_request_duration_seconds_sum", mode="path") == 90


def test_router_counts_proxied_requests_by_the_status_the_client_saw(tmp_path, fake_opencode_factory, router_factory):
    backend = fake_opencode_factory(tmp_path / "alpha")
    router = router_factory("--scan-start", str(backend.port), "--scan-end", str(backend.port))
    wait_for(lambda: http_get(router.url + "/api/backends")[2].count(b'"slug"') == 1, what="the backend")
    statuses = [http_get(router.url + "/alpha/global/health")[0] for _ in range(4)]
    statuses.append(http_get(router.url + "/global/health", headers={"Host": f"alpha-{_user(router)}.localhost"})[0])
    text = http_get(router.url + "/metrics")[2].decode()
    path_classes = {f"{s // 100}xx" for s in statuses[:4]}
    assert len(path_classes) == 1
    [path_class] = path_classes
    assert value(text, "opencoderouter_proxy_requests_total", slug="alpha", mode="path", status_class=path_class) == 4
    assert value(text, "opencoderouter_proxy_requests_total", slug="alpha", mode="host",
                 status_class=f"{statuses[4] // 100}xx") == 1


def _user(router: Any) -> str:
    import json

    return json.loads(http_get(router.url + "/api/health")[2])["username"]
