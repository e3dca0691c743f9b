"""The 150 s SSE stream through a router subprocess: it runs on a worker of its own (marker ``long``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .proxy_stack import SSEReader, Stack, open_stream, running_stack

HEARTBEAT = 1.0  # seconds between the backend's heartbeats
#: 150 heartbeats 1 s apart: longer than the 120 s after which the original router cut every stream.
HEARTBEATS = 150


@pytest.fixture
def stack(tmp_path) -> Iterator[Stack]:
    """A router with backend ``alpha`` (1 s heartbeats), for this test alone."""
    with running_stack(tmp_path, heartbeat=HEARTBEAT) as made:
        yield made


@pytest.mark.slow
@pytest.mark.long
def test_sse_stream_with_1s_heartbeats_keeps_delivering_for_150s(stack):
    # A read waiting 10 heartbeats' worth fails the test: a guard against a hang, not a latency bound
    # (that each event is forwarded as soon as it is written is test_proxy_streaming's lock-step test).
    sock = open_stream(stack.router.port, "/alpha/event", timeout=10 * HEARTBEAT)
    try:
        reader = SSEReader(sock)
        assert reader.next_event()["type"] == "server.connected"
        ids = []
        while len(ids) < HEARTBEATS:
            event = reader.next_event()
            if event["type"] == "server.heartbeat":
                ids.append(int(event["id"].removeprefix("evt_")))
        # Every heartbeat the backend wrote in those 150 s arrived, once and in order (the stream is
        # this backend's only one, so its event ids are consecutive).
        assert ids == list(range(ids[0], ids[0] + HEARTBEATS))
        assert reader.next_event()["type"] == "server.heartbeat", "the stream is still open afterwards"
    finally:
        sock.close()
