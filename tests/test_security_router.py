"""The security issue's time-dependent defences on the router as makeService builds it, in memory.

The failure throttle and the request-head bound are about seconds; here the seconds are a
MemoryReactorClock's, moved by the test (tests/router_in_memory.py), so nothing depends on how busy
the machine is. The same flags as a real router take; the attacks of test_security.py that need a
backend or real sockets stay there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .router_in_memory import InMemoryRouter

TOKEN = "s3cret-token-for-tests-0123456789"
WRONG = "Authorization: Bearer wrong-token-123456"


def write_secret(path: Path, text: str) -> str:
    """Write a 0600 file; return its path."""
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


@pytest.fixture
def router_with(tmp_path: Path) -> Iterator:
    """Start in-memory routers with flags; all stopped afterwards."""
    started: list[InMemoryRouter] = []

    def start(*flags: str) -> InMemoryRouter:
        router = InMemoryRouter(*flags)
        started.append(router)
        return router

    yield start
    for router in started:
        router.stop()


def test_repeated_wrong_tokens_are_slowed_down_without_blocking_others(tmp_path, router_with):
    router = router_with("--auth-token-file", write_secret(tmp_path / "token", TOKEN))
    durations = []
    for _ in range(4):
        attempt = router.connect()
        attempt.get("/api/backends", WRONG)
        durations.append(router.advance_until(attempt))
        assert attempt.status() == 401
    # 0.25 s, 0.5 s, 1 s, 2 s: each answer waits longer.
    assert durations[3] > 1.5 and durations[3] > durations[0] * 3
    # While a fifth wrong attempt waits (4 s), other clients and the right token are served at once.
    waiting = router.connect()
    waiting.get("/api/backends", WRONG)
    router.reactor.advance(0.2)
    health = router.connect()
    health.get("/api/health")
    assert health.status() == 200, "answered without the clock moving"
    assert waiting.status() is None
    router.advance_until(waiting)
    assert [waiting.status()] == [401]


def test_slowloris_is_dropped_while_normal_clients_and_long_streams_are_served(router_with):
    router = router_with("--header-timeout", "2s")
    clock = router.reactor
    # A long response opened before (the dashboard's event stream: a heartbeat every 15 s).
    stream = router.connect()
    stream.get("/api/events", "Accept: text/event-stream")
    assert stream.status() == 200
    slow = router.connect()
    slow.send(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
    began = clock.seconds()
    dropped_after = None
    normal_latencies = []
    while clock.seconds() - began < 8:
        slow.send(b"X")  # one header byte at a time
        t0 = clock.seconds()
        normal = router.connect()
        normal.get("/api/health")
        assert normal.status() == 200
        normal_latencies.append(clock.seconds() - t0)
        clock.advance(0.5)
        if slow.closed or slow.received().startswith(b"HTTP/1.1 408"):
            dropped_after = clock.seconds() - began
            break
    assert dropped_after is not None and 1.5 < dropped_after < 5, dropped_after
    assert max(normal_latencies) < 1.0
    assert slow.received().startswith(b"HTTP/1.1 408 ")

    # The event stream opened before is still flowing after more than the head timeout.
    clock.advance(2.5)
    assert not stream.closed
    before = stream.received().count(b": heartbeat")
    while stream.received().count(b": heartbeat") < before + 2:
        clock.advance(1)
        assert clock.seconds() - began < 120, "no heartbeats on the event stream"
    assert not stream.closed

    # A connection that sends nothing is closed quietly after the same bound.
    idle = router.connect()
    waited = router.advance_until(idle)
    assert idle.received() == b""
    assert 1.5 < waited < 5
