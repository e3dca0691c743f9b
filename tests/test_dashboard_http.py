"""The dashboard over real sockets: a twistd router, fake OpenCode servers, the page and its event stream."""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import pytest
from pytest_twisted import ensureDeferred
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.server import Site

from opencoderouter.dashboard import load_assets
from opencoderouter.events import EventStream
from opencoderouter.registry import Registry

from .support import free_port_block, http_get

#: Seconds a wait for an event may take before the test fails: a hang guard, not a latency bound.
GUARD = 15


class SSEReader:
    """A blocking reader of one ``/api/events`` stream (test side only)."""

    def __init__(self, port: int, host_header: str | None = None) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        headers = {"Accept": "text/event-stream"}
        if host_header:
            headers["Host"] = host_header
        self.connection.request("GET", "/api/events", headers=headers)
        self.response = self.connection.getresponse()

    def next_event(self, timeout: float) -> tuple[str, Any]:
        """The next event with data (comments and ``retry`` skipped), within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        name, data = "message", None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no event within {timeout}s")
            self.connection.sock.settimeout(remaining)
            try:
                line = self.response.fp.readline().decode("utf-8")
            except TimeoutError:
                raise AssertionError(f"no event within {timeout}s") from None
            if line == "":
                raise AssertionError("the stream ended")
            line = line.rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and data is not None:
                return name, data

    def wait_for(self, wanted: str, timeout: float, slug: str | None = None) -> tuple[dict[str, Any], float]:
        """Skip events until ``wanted`` (for ``slug``); returns its data and how long it took."""
        began = time.monotonic()
        while True:
            left = timeout - (time.monotonic() - began)
            name, data = self.next_event(max(left, 0.001))
            if name == wanted and (slug is None or data.get("backend", {}).get("slug") == slug):
                return data, time.monotonic() - began

    def close(self) -> None:
        """Hang up."""
        self.response.close()
        self.connection.close()


@pytest.fixture
def reader_factory():
    """Open /api/events streams; all closed afterwards."""
    readers: list[SSEReader] = []

    def open_reader(*args: Any, **kwargs: Any) -> SSEReader:
        reader = SSEReader(*args, **kwargs)
        readers.append(reader)
        return reader

    yield open_reader
    for reader in readers:
        reader.close()


@pytest.mark.slow
def test_event_stream_over_a_socket_reports_added_down_and_removed(
    tmp_path, fake_opencode_factory, router_factory, reader_factory
):
    base = free_port_block(3)
    fake_opencode_factory(tmp_path / "alpha", port=base)
    router = router_factory(
        "--scan-start", str(base), "--scan-end", str(base + 2), "--scan-interval", "1s", "--stale-after", "3s"
    )
    stream = reader_factory(router.port, host_header=f"localhost:{router.port}")
    assert stream.response.status == 200
    assert stream.response.getheader("Content-Type") == "text/event-stream; charset=utf-8"
    # Each wait below guards against a hang (GUARD s); the order of the events is what is checked.
    name, snapshot = stream.next_event(GUARD)
    assert name == "snapshot"
    assert snapshot["router"]["listen_port"] == router.port
    assert (snapshot["router"]["scan_start"], snapshot["router"]["scan_end"]) == (base, base + 2)
    assert snapshot["router"]["mdns"] is False
    if not snapshot["backends"]:  # the router may have started before its first scan ended
        stream.wait_for("added", GUARD, "alpha")
    beta = fake_opencode_factory(tmp_path / "beta", port=base + 1)
    added, _ = stream.wait_for("added", GUARD, "beta")
    assert added["backend"]["port"] == base + 1
    assert added["backend"]["url"] == f"http://localhost:{router.port}/beta/"
    beta.stop()
    down, _ = stream.wait_for("updated", GUARD, "beta")
    assert down["backend"]["up"] is False
    removed, _ = stream.wait_for("removed", GUARD, "beta")
    assert removed["backend"]["slug"] == "beta"


def test_dashboard_page_and_its_assets(tmp_path, router_factory):
    base = free_port_block(1)
    router = router_factory("--scan-start", str(base), "--scan-end", str(base))
    status, headers, body = http_get(router.url + "/?from=bookmark", headers={"Accept": "text/html"})
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    page = body.decode()
    assert '<script src="/_router/dashboard.js" defer></script>' in page
    for asset, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        assert f"/_router/{asset}" in page
        status, headers, _ = http_get(f"{router.url}/_router/{asset}")
        assert (status, headers["Content-Type"].split(";")[0]) == (200, kind)
    # A validator lets browsers revalidate instead of downloading again.
    status, headers, _ = http_get(router.url + "/_router/dashboard.js")
    status, _, body = http_get(router.url + "/_router/dashboard.js", headers={"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")
    for missing in ("/_router/", "/_router/nope.js", "/_router/index.html", "/_router/x/dashboard.js",
                    "/_router/..%2fdashboard.py"):
        assert http_get(router.url + missing)[0] == 404, missing
    # A mistyped project path is never answered by the dashboard.
    status, headers, body = http_get(router.url + "/no-such-project/", headers={"Accept": "text/html"})
    assert status == 404 and b"OpenCodeRouter" not in body


def test_page_never_builds_markup_from_strings():
    """The script must only create text nodes: no HTML parser entry point, no eval."""
    for name in ("dom.js", "dashboard.js", "lan.js", "tasks.js"):
        script = load_assets()[name].body.decode()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in script, (name, sink)
    page = load_assets()["index.html"].body.decode()
    assert "<script>" not in page  # only external scripts, which the CSP requires


def test_assets_hold_every_file_the_page_names():
    assets = load_assets()
    page = assets["index.html"].body.decode()
    for name in ("dom.js", "dashboard.js", "lan.js", "tasks.js", "dashboard.css", "favicon.svg"):
        assert f'"/_router/{name}"' in page and name in assets
    # Deferred scripts run in document order: the shared helpers come before their users.
    assert page.index("/_router/dom.js") < page.index("/_router/dashboard.js")


@ensureDeferred
async def test_a_client_that_stops_reading_is_dropped_over_a_real_socket():
    """A stalled tab must not make the router buffer events without bound."""
    clock_registry = Registry(reactor, stale_after=30)
    stream = EventStream(clock_registry, reactor, tick=0)
    site = Site(stream)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        stalled.connect(("127.0.0.1", port.getHost().port))
        stalled.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for _ in range(100):
            if stream.clients:
                break
            await deferLater(reactor, 0.01)
        assert len(stream.clients) == 1
        big = {"pad": "x" * 16384}
        sent = 0
        # Never read: the kernel buffers fill, then Twisted's, then the stream is paused and dropped.
        while stream.clients and sent < 1000:
            stream.publish("instances", big)
            sent += 1
            await deferLater(reactor, 0.001)
        assert stream.clients == [], f"still streaming after {sent} events of 16 KiB"
        # Dropped once the kernel (loopback buffers autotune to a few MiB) and Twisted (64 KiB) are full.
        assert sent < 400
    finally:
        stalled.close()
        await port.stopListening()
