"""``GET /api/events``: the SSE stream the dashboard follows (unit tests, no sockets)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from opencoderouter.events import EventStream
from opencoderouter.registry import Naming, Registry, Sighting


def parse_sse(chunks: list[bytes]) -> list[tuple[str, Any]]:
    """(event name, decoded data) per event; comments come back as ("comment", text)."""
    events: list[tuple[str, Any]] = []
    for block in b"".join(chunks).decode("utf-8").split("\n\n"):
        if not block:
            continue
        name, data, comment = "message", None, None
        for line in block.split("\n"):
            if line.startswith(":"):
                comment = line[1:].strip()
            elif line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
            elif line.startswith("retry: "):
                name, data = "retry", int(line[len("retry: ") :])
        events.append(("comment", comment) if comment is not None and data is None else (name, data))
    return events


def make_stream(clock: Clock, **kwargs: Any) -> tuple[Registry, EventStream]:
    registry = Registry(clock, stale_after=30, naming=Naming(username="alice", os_user="alice"))
    info = {"version": "9.9", "username": "alice", "scan_start": 30000, "scan_end": 30010}
    return registry, EventStream(registry, clock, router_info=lambda: info, **kwargs)


class StreamRequest(DummyRequest):
    """DummyRequest treats any producer as a pull producer (loops forever): keep it like a channel does."""

    producer = None

    def registerProducer(self, producer, streaming):
        assert streaming and self.producer is None
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


def open_stream(stream: EventStream, host: bytes = b"localhost:8080") -> StreamRequest:
    request = StreamRequest([b""])
    request.requestHeaders.setRawHeaders(b"host", [host])
    stream.render(request)
    return request


def test_stream_starts_with_retry_and_a_snapshot_of_every_backend():
    clock = Clock()
    registry, stream = make_stream(clock)
    registry.record_scan([Sighting(30001, "/home/alice/alpha", "1.18.33", "alice")])
    request = open_stream(stream)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"text/event-stream; charset=utf-8"]
    assert request.responseHeaders.getRawHeaders(b"cache-control") == [b"no-cache, no-transform"]
    events = parse_sse(request.written)
    assert events[0] == ("retry", 1000)
    name, snapshot = events[1]
    assert name == "snapshot"
    assert snapshot["router"]["version"] == "9.9"
    [backend] = snapshot["backends"]
    assert backend["slug"] == "alpha"
    assert backend["project_path"] == "/home/alice/alpha"
    assert backend["up"] is True
    assert backend["domain"] == "alpha-alice.local"
    assert backend["host_label"] == "alpha-alice"
    assert backend["url"] == "http://localhost:8080/alpha/"
    assert backend["last_seen_unix"] == 0.0
    assert request.finished == 0


def test_new_backend_is_sent_as_added_event():
    clock = Clock()
    registry, stream = make_stream(clock)
    request = open_stream(stream)
    del request.written[:]
    registry.record_scan([Sighting(30002, "/srv/Beta", "1.18.33", None)])
    [(name, data)] = parse_sse(request.written)
    assert name == "added"
    assert data["backend"]["slug"] == "beta"
    assert data["backend"]["project_name"] == "Beta"
    assert data["backend"]["port"] == 30002


def test_backend_that_stops_answering_is_sent_as_updated_and_down():
    clock = Clock()
    registry, stream = make_stream(clock)
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])
    request = open_stream(stream)
    del request.written[:]
    registry.record_scan([])
    [(name, data)] = parse_sse(request.written)
    assert name == "updated"
    assert data["backend"]["slug"] == "alpha"
    assert data["backend"]["up"] is False


def test_backend_on_a_new_port_is_sent_as_updated():
    clock = Clock()
    registry, stream = make_stream(clock)
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])
    request = open_stream(stream)
    del request.written[:]
    registry.record_scan([Sighting(30005, "/p/alpha", "1", None)])
    [(name, data)] = parse_sse(request.written)
    assert (name, data["backend"]["port"]) == ("updated", 30005)


def test_pruned_backend_is_sent_as_removed():
    clock = Clock()
    registry, stream = make_stream(clock)
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])
    request = open_stream(stream)
    clock.advance(31)
    del request.written[:]
    registry.prune_stale()
    [(name, data)] = parse_sse(request.written)
    assert name == "removed"
    assert data["backend"]["slug"] == "alpha"
    assert data["server_time"] == 31


def test_fresh_sightings_are_sent_as_seen_times_once_per_change():
    clock = Clock()
    registry, stream = make_stream(clock)
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])
    request = open_stream(stream)
    clock.advance(1)
    del request.written[:]
    clock.advance(1)
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])  # last_seen moves, nothing else
    clock.advance(1)
    clock.advance(1)
    assert parse_sse(request.written) == [("seen", {"last_seen": {"alpha": 2.0}, "server_time": 3.0})]


def test_quiet_stream_gets_a_heartbeat_comment():
    clock = Clock()
    _, stream = make_stream(clock, heartbeat=15)
    request = open_stream(stream)
    del request.written[:]
    clock.pump([1] * 14)
    assert request.written == []
    clock.pump([1] * 2)
    [(name, text)] = parse_sse(request.written)
    assert name == "comment" and text.startswith("heartbeat")


def test_client_disconnect_drops_the_stream_and_stops_all_work():
    clock = Clock()
    opened, closed = [], []
    registry, stream = make_stream(clock, on_open=lambda: opened.append(1), on_close=lambda: closed.append(1))
    first, second = open_stream(stream), open_stream(stream)
    assert len(stream.clients) == 2 and registry._observers == [stream]
    first.processingFailed(Failure(ConnectionDone("client went away")))
    assert len(stream.clients) == 1
    second.processingFailed(Failure(ConnectionDone("client went away")))
    assert stream.clients == []
    assert registry._observers == []  # no dashboard: the registry has nobody to tell
    assert clock.getDelayedCalls() == []  # no tick or heartbeat left running
    assert (len(opened), len(closed)) == (2, 2)
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])  # nothing written to dead requests
    assert b"added" not in b"".join(first.written + second.written)


def test_each_client_gets_urls_for_the_host_it_used():
    clock = Clock()
    registry, stream = make_stream(clock)
    local = open_stream(stream, b"localhost:8080")
    tunnel = open_stream(stream, b"127.0.0.1:9999")
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])
    assert parse_sse(local.written)[-1][1]["backend"]["url"] == "http://localhost:8080/alpha/"
    assert parse_sse(tunnel.written)[-1][1]["backend"]["url"] == "http://127.0.0.1:9999/alpha/"


def test_more_streams_than_the_limit_get_503():
    clock = Clock()
    _, stream = make_stream(clock, max_streams=1)
    open_stream(stream)
    refused = DummyRequest([b""])
    body = stream.render(refused)
    assert refused.responseCode == 503
    assert json.loads(body)["error"] == "too_many_streams"
    assert len(stream.clients) == 1


def test_close_finishes_every_stream():
    clock = Clock()
    registry, stream = make_stream(clock)
    requests = [open_stream(stream), open_stream(stream)]
    stream.close()
    assert [r.finished for r in requests] == [1, 1]
    assert stream.clients == [] and registry._observers == [] and clock.getDelayedCalls() == []


def test_hostile_project_path_is_carried_as_data_not_markup():
    clock = Clock()
    registry, stream = make_stream(clock)
    hostile = '/tmp/<script>alert("x")</script>'
    request = open_stream(stream)
    registry.record_scan([Sighting(30001, hostile, "<b>1</b>", None)])
    data = parse_sse(request.written)[-1][1]["backend"]
    # JSON round-trips the exact text; the page renders it with text nodes (see the browser test).
    assert data["project_path"] == hostile and data["version"] == "<b>1</b>"
    raw = b"".join(request.written)
    assert b"\n<script" not in raw and raw.count(b"\ndata: ") == 2


def test_advertised_mdns_names_are_on_each_backend_and_their_changes_are_sent():
    clock = Clock()
    registry, stream = make_stream(clock, mdns=True)
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])
    registry.set_mdns_name("alpha", "alpha-alice-2")
    request = open_stream(stream)
    registry.record(Sighting(30002, "/p/beta", "1", None))
    registry.set_mdns_name("beta", "beta-alice-2")
    events = parse_sse(request.written)
    assert events[1][1]["backends"][0]["mdns_name"] == "alpha-alice-2"
    assert events[2] == ("added", events[2][1]) and events[2][1]["backend"]["mdns_name"] is None
    assert events[3] == ("updated", events[3][1]) and events[3][1]["backend"]["mdns_name"] == "beta-alice-2"


def test_a_client_that_stops_reading_is_dropped_not_buffered():
    clock = Clock()
    registry, stream = make_stream(clock)
    slow, fine = open_stream(stream), open_stream(stream)
    producer = slow.producer  # the connection pauses it when its buffers are full
    producer.pauseProducing()
    registry.record_scan([Sighting(30001, "/p/alpha", "1", None)])
    assert [c.request for c in stream.clients] == [fine]
    assert b"event: added" not in b"".join(slow.written)
    assert b"event: added" in b"".join(fine.written)
    producer.resumeProducing()  # too late: it reconnects and gets a fresh snapshot instead
    registry.record_scan([Sighting(30002, "/p/beta", "1", None)])
    assert b"beta" not in b"".join(slow.written)
