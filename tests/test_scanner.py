"""Scanner: socket-table listing, probes (StubTreq), the loop (Clock), and real hostile neighbours."""

from __future__ import annotations

import gzip
import json
import os
import socket
import threading
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from pytest_twisted import ensureDeferred
from treq import content as treq_content
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from opencoderouter.api import RouterAPI
from opencoderouter.listeners import Listener, list_listeners, netlink_listeners, proc_listeners
from opencoderouter.loopback_http import MAX_BODY, loopback_agent, probe_client
from opencoderouter.registry import Registry, Sighting
from opencoderouter.scanner import Prober, Scanner

from .support import FakeOpenCodeProcess, free_port_block

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:7530 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1 0 100 0 0 10 0
   1: 00000000:7531 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 112 1 0 100 0 0 10 0
   2: 0A000001:7532 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 113 1 0 100 0 0 10 0
   3: 0100007F:7533 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 114 1 0 100 0 0 10 0
   4: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 115 1 0 100 0 0 10 0
"""
TCP6_TABLE = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:7534 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 116 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:7535 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 117 1 0 100 0 0 10 0
"""  # noqa: E501 - the kernel's own line width


def test_listeners_come_from_the_kernel_socket_table(tmp_path: Path):
    (tmp_path / "tcp").write_text(TCP_TABLE)
    (tmp_path / "tcp6").write_text(TCP6_TABLE)
    listeners = list_listeners(30000, 31000, proc_net=str(tmp_path))
    # 30002 listens on another address, 30003 is a connection, 8080 is out of range; 30005 is on ::1
    # only, so it is reached there (30004 on :: takes 127.0.0.1 too: that is preferred).
    assert listeners == {
        30000: Listener(30000, 1000, 111),
        30001: Listener(30001, 0, 112),
        30004: Listener(30004, 1001, 116),
        30005: Listener(30005, 1001, 117, "::1"),
    }


def test_netlink_and_the_proc_tables_agree_on_what_is_reachable():
    """The fast kernel query must see exactly what the /proc parse sees (loopback and any-address)."""
    base = free_port_block(5)
    binds = [(socket.AF_INET, "127.0.0.1", base), (socket.AF_INET, "0.0.0.0", base + 1),
             (socket.AF_INET6, "::", base + 2), (socket.AF_INET6, "::1", base + 3)]
    sockets = []
    try:
        for family, address, port in binds:
            sock = socket.socket(family)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((address, port))
            sock.listen()
            sockets.append(sock)
        fast = netlink_listeners(base, base + 4)
        slow = proc_listeners(base, base + 4)
    finally:
        for sock in sockets:
            sock.close()
    assert fast is not None, "sock_diag is available on Linux"
    # Every one is reachable, with our uid; the one on ::1 alone is reached on ::1.
    assert sorted(fast) == sorted(slow) == [base, base + 1, base + 2, base + 3]
    assert fast == slow
    assert [fast[p].address for p in sorted(fast)] == ["127.0.0.1", "127.0.0.1", "127.0.0.1", "::1"]
    assert {listener.uid for listener in fast.values()} == {os.getuid()}


def test_no_socket_table_means_unknown(tmp_path: Path):
    assert list_listeners(30000, 31000, proc_net=str(tmp_path)) is None


def test_the_real_socket_table_lists_our_own_listener():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        found = list_listeners(port, port)
    assert found is not None and found[port].uid == os.getuid()


class JSONLeaf(Resource):
    isLeaf = True

    def __init__(self, routes: dict[str, tuple[int, bytes]], headers: dict[bytes, bytes] | None = None):
        super().__init__()
        self.routes = routes
        self.headers = headers or {}
        self.seen_accept_encoding: list[bytes | None] = []

    def render(self, request):
        self.seen_accept_encoding.append(request.getHeader(b"accept-encoding"))
        code, body = self.routes.get(request.path.decode(), (200, b"<html>web ui</html>"))
        request.setResponseCode(code)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return body


def opencode_like(directory: str | None = "/home/a/proj", worktree: str = "/home/a/proj", path_code: int = 200):
    return JSONLeaf(
        {
            "/global/health": (200, b'{"healthy": true, "version": "1.18.33"}'),
            "/path": (path_code, json.dumps({"directory": directory}).encode()),
            "/project/current": (200, json.dumps({"id": "x", "worktree": worktree}).encode()),
        }
    )


class RecordingMetrics:
    """A ScanMetrics that keeps every probe outcome, in order."""

    def __init__(self):
        self.outcomes: list[str] = []

    def scan_finished(self, kind, duration):
        pass

    def probe_finished(self, outcome):
        self.outcomes.append(outcome)


def probe_with(resource: Resource, port: int = 30000, client: HTTPClient | None = None, metrics=None):
    prober = Prober(client or StubTreq(resource), Clock(), timeout=5, metrics=metrics)
    results = []
    prober.probe(port, owner="alice").addBoth(results.append)
    assert len(results) == 1
    return results[0]


def test_probe_recognises_opencode_and_asks_for_gzip_at_most():
    resource = opencode_like()
    assert probe_with(resource) == Sighting(30000, "/home/a/proj", "1.18.33", "alice")
    # treq asks for gzip (and decodes it); nothing else is accepted.
    assert set(resource.seen_accept_encoding) == {b"gzip"}


def gzipped_opencode() -> JSONLeaf:
    """OpenCode-like answers, every one gzip-compressed."""
    routes = opencode_like().routes
    return JSONLeaf({path: (code, gzip.compress(body)) for path, (code, body) in routes.items()},
                    headers={b"content-encoding": b"gzip"})


def test_probe_decodes_gzipped_answers():
    assert probe_with(gzipped_opencode()).project_path == "/home/a/proj"
    client = probe_client(RequestTraversalAgent(gzipped_opencode()))
    assert probe_with(None, client=client).project_path == "/home/a/proj"


#: A few MB of zeros, compressed (~1,000:1): what a hostile neighbour would send as a gzip bomb.
BOMB_SIZE = 32 << 20
GZIP_BOMB = gzip.compress(bytes(BOMB_SIZE), compresslevel=9)


def peak_memory_of(action):
    """(result, peak bytes allocated while ``action`` ran)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = action()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_gzip_bomb_stops_at_the_decoded_cap_in_memory():
    bomb = JSONLeaf({"/global/health": (200, GZIP_BOMB)}, headers={b"content-encoding": b"gzip"})
    metrics = RecordingMetrics()
    client = probe_client(RequestTraversalAgent(bomb))
    result, peak = peak_memory_of(lambda: probe_with(None, client=client, metrics=metrics))
    assert result is None and metrics.outcomes == ["not_opencode"]
    # The 32 MB were never inflated at once: the probe stopped a piece past the 64 KiB cap.
    assert peak < 4 << 20, peak


def test_probe_falls_back_to_project_current_when_path_fails():
    assert probe_with(opencode_like(path_code=500)).project_path == "/home/a/proj"


def test_probe_never_slugs_the_root_worktree():
    assert probe_with(opencode_like(directory=None, worktree="/")) is None


@pytest.mark.parametrize(
    "routes",
    [
        {},  # 200 HTML to everything: a web UI proves nothing
        {"/global/health": (200, b'{"healthy": false}')},
        {"/global/health": (200, b"[1, 2]")},
        {"/global/health": (404, b'{"healthy": true}')},
        {"/global/health": (401, b"")},
    ],
)
def test_probe_rejects_what_is_not_opencode(routes):
    assert probe_with(JSONLeaf(routes)) is None


def test_probe_rejects_oversized_answers():
    huge = b'{"healthy": true, "pad": "' + b"x" * 200_000 + b'"}'
    assert probe_with(JSONLeaf({"/global/health": (200, huge)})) is None


class Hanging(Resource):
    isLeaf = True

    def render(self, request):
        return NOT_DONE_YET


def test_probe_is_bounded_by_the_timeout():
    clock = Clock()
    prober = Prober(StubTreq(Hanging()), clock, timeout=0.8)
    results = []
    prober.probe(30000).addBoth(results.append)
    assert results == []
    clock.advance(0.8)
    assert results == [None]


class ScriptedProber:
    """Answers probes from a table; raises for ports marked 'boom'."""

    def __init__(self, answers):
        self.answers = answers
        self.calls = []
        self.pending = {}

    def probe(self, port, owner=None, address=None):
        self.calls.append(port)
        answer = self.answers.get(port)
        if answer == "boom":
            raise RuntimeError("probe exploded")
        if answer == "hang":
            d = defer.Deferred()
            self.pending[port] = d
            return d
        return defer.succeed(answer)


def make_scanner(prober, listeners, clock=None, concurrency=20, quick_interval=0.5):
    clock = clock or Clock()
    registry = Registry(clock, stale_after=30)
    scanner = Scanner(registry, prober, clock, port_range=(30000, 30010), interval=5, concurrency=concurrency,
                      quick_interval=quick_interval, list_listeners=lambda start, end: listeners(),
                      owner_name=lambda uid: f"user{uid}")
    return scanner, registry, clock


def test_one_failing_probe_does_not_stop_the_scan_or_the_loop():
    table = {30000: Listener(30000, 1, 1), 30001: Listener(30001, 1, 2)}
    prober = ScriptedProber({30000: "boom", 30001: Sighting(30001, "/p/good", "1", "user1")})
    scanner, registry, clock = make_scanner(prober, lambda: table)
    scanner.startService()
    assert [b.slug for b in registry.backends()] == ["good"]
    clock.advance(5)
    assert scanner.scans_completed == 2
    scanner.stopService()


def test_an_exception_in_a_whole_scan_is_logged_and_the_loop_goes_on():
    calls = []

    def listeners():
        calls.append(1)
        if len(calls) == 1:
            raise OSError("socket table vanished")
        return {}

    scanner, _, clock = make_scanner(ScriptedProber({}), listeners, quick_interval=0)
    scanner.startService()
    assert scanner.scans_completed == 0
    clock.advance(5)
    assert scanner.scans_completed == 1
    scanner.stopService()


def test_scans_never_overlap_and_stop_waits_for_the_running_scan():
    table = {30000: Listener(30000, 1, 1)}
    prober = ScriptedProber({30000: "hang"})
    scanner, registry, clock = make_scanner(prober, lambda: table, quick_interval=0)
    scanner.startService()
    clock.advance(5)
    clock.advance(5)
    assert prober.calls == [30000]
    stopped = scanner.stopService()
    assert not stopped.called
    prober.pending[30000].callback(Sighting(30000, "/p/late", "1"))
    assert stopped.called


def test_a_quick_check_in_progress_holds_off_the_full_scan_and_the_stop():
    table = {30000: Listener(30000, 1, 1)}
    prober = ScriptedProber({30000: None, 30001: "hang"})
    scanner, _, clock = make_scanner(prober, lambda: table)
    scanner.startService()
    table[30001] = Listener(30001, 1, 2)
    clock.advance(0.5)
    assert prober.calls == [30000, 30001]
    clock.advance(4.5)  # the next full scan is due: it waits for the quick check instead of overlapping it
    assert prober.calls == [30000, 30001]
    stopped = scanner.stopService()
    assert not stopped.called
    prober.pending[30001].callback(None)
    assert stopped.called


def test_concurrency_is_bounded():
    table = {p: Listener(p, 1, p) for p in range(30000, 30010)}
    prober = ScriptedProber({p: "hang" for p in table})
    scanner, _, _ = make_scanner(prober, lambda: table, concurrency=3, quick_interval=0)
    scanner.startService()
    assert len(prober.calls) == 3
    prober.pending[30000].callback(None)
    assert len(prober.calls) == 4
    for port in list(prober.pending):
        if not prober.pending[port].called:
            prober.pending[port].callback(None)
    scanner.stopService()


def test_quick_check_probes_only_new_listeners_and_retries_a_slow_starter():
    table = {30000: Listener(30000, 1, 1)}
    answers = {30000: Sighting(30000, "/p/one", "1")}
    prober = ScriptedProber(answers)
    scanner, registry, clock = make_scanner(prober, lambda: table)
    scanner.startService()
    clock.advance(0.5)
    assert prober.calls == [30000]
    table[30001] = Listener(30001, 1, 2)  # accepts, but does not answer yet
    clock.advance(0.5)
    assert registry.by_port(30001) is None
    answers[30001] = Sighting(30001, "/p/two", "1")
    clock.advance(0.5)
    assert registry.by_port(30001).slug == "two"
    clock.advance(0.5)
    assert prober.calls == [30000, 30001, 30001]
    scanner.stopService()


def test_quick_check_gives_up_on_a_neighbour_that_is_not_opencode():
    table = {30000: Listener(30000, 1, 1)}
    prober = ScriptedProber({})
    scanner, _, clock = make_scanner(prober, lambda: table)
    scanner.startService()
    table[30001] = Listener(30001, 1, 2)
    for _ in range(9):  # 4.5 s: before the next full scan probes everything again
        clock.advance(0.5)
    assert prober.calls.count(30001) == 3
    scanner.stopService()


# --- real sockets: fake OpenCode servers among hostile neighbours ----------------------------


class HostileNeighbours:
    """Plain-socket servers that misbehave in the ways services in the range do."""

    def __init__(self, ports: dict[str, int]):
        self.ports = ports
        self.sockets = []
        self.stop = threading.Event()
        for kind, port in ports.items():
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(50)
            sock.settimeout(0.2)
            self.sockets.append(sock)
            threading.Thread(target=self._serve, args=(kind, sock), daemon=True).start()

    def _serve(self, kind, sock):
        held = []
        while not self.stop.is_set():
            try:
                connection, _ = sock.accept()
            except OSError:
                continue
            if kind == "silent":
                held.append(connection)  # accept and never answer
                continue
            try:
                connection.settimeout(1)
                connection.recv(4096)
                if kind == "html":
                    body = b"<html>hello</html>"
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s"
                                       % (len(body), body))
                elif kind == "garbage":
                    connection.sendall(b"\x00\xff\x13garbage\r\n\r\n\x01")
                elif kind == "unauthorized":
                    connection.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n")
                elif kind == "gzip bomb":
                    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                       b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s"
                                       % (len(GZIP_BOMB), GZIP_BOMB))
            except OSError:
                pass
            finally:
                connection.close()
        for connection in held:
            connection.close()

    def close(self):
        self.stop.set()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def gzip_bomber():
    """The port of a neighbour that answers every request with a gzip bomb."""
    port = free_port_block(1)
    neighbours = HostileNeighbours({"gzip bomb": port})
    yield port
    neighbours.close()


@pytest.fixture
def crowded_range(tmp_path):
    start = free_port_block(9)
    neighbours = HostileNeighbours({"html": start + 2, "silent": start + 3, "garbage": start + 4,
                                    "unauthorized": start + 5, "gzip bomb": start + 6})
    servers = []
    try:
        servers.append(FakeOpenCodeProcess(tmp_path / "one", port=start))
        servers.append(FakeOpenCodeProcess(tmp_path / "two", port=start + 1))
        yield start, start + 8, servers
    finally:
        neighbours.close()
        for server in servers:
            server.stop()


def real_prober(timeout: float = 0.8, metrics=None) -> Prober:
    """The router's own probe wiring, on the real reactor."""
    return Prober(probe_client(loopback_agent(reactor, timeout)), reactor, timeout=timeout, metrics=metrics)


@pytest.fixture(params=["socket table", "every port"])
def real_scanner(request, crowded_range):
    start, end, servers = crowded_range
    metrics = RecordingMetrics()
    registry = Registry(reactor, stale_after=30)
    kwargs = {} if request.param == "socket table" else {"list_listeners": lambda s, e: None}
    scanner = Scanner(registry, real_prober(metrics=metrics), reactor, (start, end), interval=60, concurrency=20,
                      quick_interval=0, **kwargs)
    return scanner, registry, servers, metrics, request.param


@ensureDeferred
async def test_scan_finds_fakes_and_never_registers_hostile_neighbours(real_scanner):
    scanner, registry, servers, metrics, mode = real_scanner
    await scanner.scan()
    found = {b.port: b.project_path for b in registry.backends()}
    assert found == {s.port: s.directory for s in servers}
    outcomes = Counter(metrics.outcomes)
    # Each port is probed once; the never-answering neighbour costs one probe timeout, not more,
    # and it ends last: the other probes ran meanwhile instead of waiting behind it.
    assert outcomes["opencode"] == 2 and outcomes["timeout"] == 1
    assert metrics.outcomes[-1] == "timeout"
    assert sum(outcomes.values()) == (9 if mode == "every port" else 7)
    if mode == "every port":
        assert outcomes["refused"] == 2


@ensureDeferred
async def test_a_gzip_bomb_from_a_real_neighbour_stops_at_the_decoded_cap(gzip_bomber):
    metrics = RecordingMetrics()
    prober = real_prober(metrics=metrics)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        sighting = await prober.probe(gzip_bomber)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sighting is None and metrics.outcomes == ["not_opencode"]
    # 32 MB of zeros arrive as ~32 KB: inflated in one go they would need 32 MB; the probe stops
    # a piece past the 64 KiB cap instead.
    assert BOMB_SIZE > 100 * MAX_BODY
    assert peak < 4 << 20, peak


@ensureDeferred
async def test_probe_connections_log_no_factory_lines():
    opencode = reactor.listenTCP(0, Site(opencode_like()), interface="127.0.0.1")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: the probe is refused
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert (await real_prober().probe(opencode.getHost().port)).project_path == "/home/a/proj"
        assert await real_prober().probe(closed.getsockname()[1]) is None
    finally:
        globalLogPublisher.removeObserver(events.append)
        closed.close()
        await opencode.stopListening()
    lines = [formatEvent(event) for event in events]
    assert not [line for line in lines if "Starting factory" in line or "Stopping factory" in line], lines


class _Silent(Protocol):
    """Accepts and never answers, until the test lets go."""

    def connectionMade(self):
        self.factory.held.append(self)


@ensureDeferred
async def test_the_api_answers_while_a_1001_port_scan_is_in_progress():
    """Probing every port (the non-Linux path) never blocks the reactor: the web server answers meanwhile.

    How fast it answers is measured by bench/scan_api_latency.py.
    """
    start = free_port_block(1001, start=20000, end=32000)  # below Linux's ephemeral ports
    opencode = [reactor.listenTCP(port, Site(opencode_like(f"/srv/p{port}", f"/srv/p{port}")), interface="127.0.0.1")
                for port in (start, start + 500)]
    silent_factory = Factory.forProtocol(_Silent)
    silent_factory.held = []
    silent = reactor.listenTCP(start + 1000, silent_factory, interface="127.0.0.1")
    registry = Registry(reactor, stale_after=30)
    metrics = RecordingMetrics()
    # A probe timeout far beyond the test: only letting go of the silent neighbour ends the scan.
    scanner = Scanner(registry, real_prober(timeout=60, metrics=metrics), reactor, (start, start + 1000),
                      interval=60, concurrency=20, quick_interval=0, list_listeners=lambda s, e: None)
    api = reactor.listenTCP(0, Site(RouterAPI(registry).resource()), interface="127.0.0.1")
    url = f"http://127.0.0.1:{api.getHost().port}/health".encode()
    client = Agent(reactor)  # one connection per request, none kept
    try:
        scan = defer.ensureDeferred(scanner.scan())
        answers = []
        for _ in range(100_000):  # bounded, should the scan never get that far
            if len(metrics.outcomes) >= 1000 and len(answers) >= 20:  # every other port probed meanwhile
                break
            response = await client.request(b"GET", url)
            await treq_content(response)
            answers.append((response.code, scan.called))
        assert len(metrics.outcomes) == 1000
        assert set(answers) == {(200, False)}
    finally:
        for connection in silent_factory.held:
            connection.transport.loseConnection()
    await scan
    assert {b.port for b in registry.backends()} == {start, start + 500}
    assert len(metrics.outcomes) == 1001
    for listener in (*opencode, silent, api):
        await listener.stopListening()
