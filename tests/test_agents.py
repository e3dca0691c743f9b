"""The agent watcher against fake OpenCode servers, in memory: streams, snapshots, reconnects, hostile backends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.logger import globalLogPublisher
from twisted.web.client import URI
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from opencoderouter.agent_sessions import SessionStatus
from opencoderouter.agent_state import BackendState
from opencoderouter.forwarding import BackendCredentials, basic_header
from opencoderouter.loopback_http import IPV6_LOOPBACK_HOST
from opencoderouter.testing import FakeOpenCode, opencode_json

from .agent_harness import Harness


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def unknown_lines(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "agents_unknown"]


def watcher_timers(h: Harness) -> list[Any]:
    """Delayed calls of the watcher (the fakes' own heartbeat loops left out)."""
    return [call for call in h.clock.getDelayedCalls() if "FakeOpenCode" not in repr(call.func)]


def sse_route(fake: FakeOpenCode, *chunks: bytes) -> list[IRequest]:
    """Make ``GET /global/event`` answer these raw bytes (and stay open)."""
    opened: list[IRequest] = []

    def stream(request: IRequest) -> int:
        request.setHeader(b"content-type", b"text/event-stream")
        opened.append(request)
        for chunk in chunks:
            request.write(chunk)
        return NOT_DONE_YET

    fake.route("GET", "/global/event", stream)
    return opened


# -- following a backend ----------------------------------------------------------------------------
def test_a_new_backend_is_followed_and_known_once_its_snapshot_is_read():
    h = Harness()
    fake = h.serve("alpha")
    state = h.state("alpha")
    assert state.known and state.summary().state is BackendState.IDLE
    requested = h.requested(30000)
    assert requested[0] == "/global/event"
    assert {"/session/status?directory=/home/alice/alpha", "/permission?directory=/home/alice/alpha",
            "/question?directory=/home/alice/alpha"} <= {p.replace("%2F", "/") for p in requested}
    assert any(p.startswith("/session?roots=true&limit=20&directory=") for p in requested)
    assert len(fake.streams) == 1 and h.watcher.streams_open == 1


def test_permission_needs_you_with_the_command_then_working_then_idle_after_the_reply():
    h = Harness()
    fake = h.serve("alpha")
    sid = h.session(fake, "Clean up")
    fake.emit("session.updated", {"sessionID": sid, "info": fake.sessions[sid]})
    request_id = fake.ask_permission(sid, "bash", "rm -rf build/")
    h.pump()
    state = h.state("alpha")
    assert state.summary().state is BackendState.NEEDS_YOU and state.summary().needs_you == 1
    [session] = state.ordered()
    assert session.title == "Clean up" and session.permissions[request_id].asking() == "bash: rm -rf build/"
    h.advance(0.1)
    assert h.changes and "alpha" in h.changes[-1]

    # The reply (here straight to the fake; through the router in the real-server tests).
    fake.permissions.pop(request_id)
    fake.emit("permission.replied", {"sessionID": sid, "requestID": request_id, "reply": "once"})
    h.pump()
    assert state.summary().state is BackendState.WORKING
    fake.emit("session.status", {"sessionID": sid, "status": {"type": "idle"}})
    fake.emit("session.idle", {"sessionID": sid})
    h.pump()
    assert state.summary().state is BackendState.IDLE and session.status is SessionStatus.IDLE


def test_changes_people_see_are_sent_at_once_and_bare_activity_at_most_every_5_s():
    h = Harness()
    fake = h.serve("alpha")
    h.advance(0.1)
    h.changes.clear()
    sid = h.session(fake)
    fake.emit("session.status", {"sessionID": sid, "status": {"type": "busy"}})
    h.pump()
    h.advance(0.06)
    assert h.changes == [["alpha"]]
    for _ in range(100):
        fake.emit("message.part.delta", {"sessionID": sid, "messageID": "m", "partID": "p", "field": "text",
                                         "delta": "tok "})
    h.pump()
    h.advance(4.9)
    assert h.changes == [["alpha"]]
    h.advance(0.2)
    assert h.changes == [["alpha"], ["alpha"]]


def test_text_deltas_in_openCodes_compact_form_only_touch_the_activity_time():
    h = Harness()
    fake = h.serve("alpha")
    sid = h.session(fake)
    fake.emit("session.status", {"sessionID": sid, "status": {"type": "busy"}})
    h.pump()
    before = h.state("alpha").sessions[sid].last_activity
    h.clock.advance(3)
    [(request, _)] = fake.streams
    request.write(b'data: {"directory":"/home/alice/alpha","project":"global","payload":{"id":"evt_1",'
                  b'"type":"message.part.delta","properties":{"sessionID":"%s","messageID":"m","partID":"p",'
                  b'"field":"text","delta":"not kept \\"type\\":\\"sync\\""}}}\n\n' % sid.encode())
    h.pump()
    assert h.state("alpha").sessions[sid].last_activity == before + 3


# -- reconnecting and reconciling -------------------------------------------------------------------------
def test_a_lost_stream_shows_unknown_then_the_snapshot_restores_the_truth(logged):
    h = Harness()
    fake = h.serve("alpha")
    sid = h.session(fake, "Long task")
    request_id = fake.ask_permission(sid, "bash", "make deploy")
    h.pump()
    fake.close_streams()
    h.pump()
    state = h.state("alpha")
    assert state.summary().state is BackendState.UNKNOWN and state.summary().reason == "its event stream ended"
    # While nobody listened, the permission was answered and another one asked, in a new session.
    fake.permissions.clear()
    other = h.session(fake, "Second", "ses_b")
    fake.busy.discard(sid)
    fake.ask_permission(other, "edit", "src/app.py")
    h.advance(0.3)  # the first retry comes after 0.25 s
    assert state.known
    assert {s.id: s.status for s in state.sessions.values()} == {sid: SessionStatus.IDLE, other: SessionStatus.WORKING}
    assert request_id not in state.sessions[sid].permissions
    assert state.sessions[other].permissions and state.sessions[other].title == "Second"
    assert [e["reason"] for e in unknown_lines(logged)] == ["its event stream ended"]


def test_a_request_left_behind_by_an_abort_is_not_shown_after_a_reconnect():
    h = Harness()
    fake = h.serve("alpha")
    sid = h.session(fake)
    fake.ask_permission(sid)
    fake.busy.discard(sid)  # aborted: the server still lists the request, but the session is idle
    fake.close_streams()
    h.advance(0.3)
    assert h.state("alpha").summary().state is BackendState.IDLE
    assert fake.permissions, "the fake, like the real server, still lists it"


def test_events_during_the_snapshot_are_applied_on_top_of_it():
    h = Harness()
    fake = h.serve("alpha")
    sid = h.session(fake)
    held: list[IRequest] = []

    def slow_status(request: IRequest) -> int:
        held.append(request)
        return NOT_DONE_YET

    fake.route("GET", "/session/status", slow_status)
    fake.close_streams()
    h.advance(0.3)
    assert held and not h.state("alpha").known
    # The snapshot of the status was taken before this permission was asked; the event comes meanwhile.
    request_id = fake.ask_permission(sid)
    h.pump()
    for request in held:
        request.setHeader(b"content-type", b"application/json")
        request.write(b"{}")
        request.finish()
    h.pump()
    state = h.state("alpha")
    assert state.known and request_id in state.sessions[sid].permissions


def test_retries_back_off_to_twice_a_second_while_the_backend_refuses_and_a_sighting_reconnects_at_once():
    h = Harness()
    h.serve("alpha")
    h.stop_serving(30000)
    h.loopback.requests.clear()
    h.advance(10)
    # 0.25, then every half second: a restarted server is followed again within half a second.
    attempts = [p for p in h.requested(30000) if p == "/global/event"]
    assert 19 <= len(attempts) <= 21
    h.registry.record_scan([])  # the scan no longer sees it: down
    h.clock.advance(0.3)
    # It comes back: the registry says so, and the watcher connects at once (not at its next retry).
    fake = FakeOpenCode("/home/alice/alpha", clock=h.clock)
    h.serve("alpha", fake=fake)
    assert h.state("alpha").known and len(fake.streams) == 1


def test_a_port_change_moves_the_stream_to_the_new_port():
    h = Harness()
    old = h.serve("alpha", port=30000)
    new = h.serve("alpha", port=30001)
    assert old.streams == [] and len(new.streams) == 1 and h.state("alpha").known
    assert h.watcher.streams_open == 1


def test_a_backend_on_the_ipv6_loopback_is_followed_at_its_address_and_moved_with_it():
    h = Harness()
    h.serve("alpha", sighting={"address": "::1"})
    assert h.state("alpha").known
    hosts = {URI.fromBytes(uri).host.decode() for _, uri, _ in h.loopback.requests}
    assert hosts == {IPV6_LOOPBACK_HOST}  # the stand-in that LoopbackEndpoints connects to as ::1
    h.loopback.requests.clear()
    fake = h.serve("alpha", sighting={"address": "127.0.0.1"}, fake=h.loopback.fakes[30000])
    assert h.state("alpha").known and len(fake.streams) == 1
    first, *_ = h.loopback.requests
    assert first[1] == b"http://127.0.0.1:30000/global/event"


def test_a_removed_backend_is_no_longer_followed():
    h = Harness()
    fake = h.serve("alpha")
    h.clock.advance(31)
    h.registry.prune_stale()
    h.pump()
    assert h.watcher.state_of("alpha") is None and fake.streams == [] and h.watcher.streams_open == 0
    h.loopback.requests.clear()
    h.advance(10)
    assert h.loopback.requests == []


# -- heartbeats and hostile streams --------------------------------------------------------------------------
def test_35_s_without_a_heartbeat_is_a_lost_stream(logged):
    h = Harness()
    fake = h.serve("alpha", heartbeat=0)  # a server that never beats
    h.advance(34)
    assert h.state("alpha").known
    h.advance(1.1)
    state = h.state("alpha")
    assert state.summary().state is BackendState.UNKNOWN
    assert state.summary().reason == "no heartbeat on its event stream for 35s"
    assert fake.streams == [] or all(r.finished or r._disconnected for r, _ in fake.streams)
    h.advance(1.1)  # the slow retry (1 s) reconnects; it is known again until the next silence
    assert state.known
    h.advance(36)
    assert len(unknown_lines(logged)) == 1, "logged once, not at every retry"


def test_heartbeats_keep_a_quiet_stream_alive():
    h = Harness()
    h.serve("alpha", heartbeat=10)
    h.advance(120, step=1)
    assert h.state("alpha").known and h.watcher.streams_open == 1


@pytest.mark.parametrize("chunks, reason", [
    ((b"\x00\x01\x02 \xff\xfe garbage\n\n",), "its event stream sent a line that is not server-sent events"),
    ((b"data: {not json}\n\n",), "its event stream sent a frame that is not JSON"),
    ((b"data: [1, 2]\n\n",), "its event stream sent a frame that is not an OpenCode event"),
    ((b"data: " + b"x" * (5 * 1024 * 1024),), "its event stream sent an event larger than 4194304 bytes"),
])
def test_a_hostile_stream_is_shown_unknown_logged_once_and_never_raises(chunks, reason, logged):
    h = Harness()
    fake = FakeOpenCode("/home/alice/hostile", clock=h.clock)
    sse_route(fake, *chunks)
    h.serve("hostile", fake=fake)
    good = h.serve("good", port=30001)
    state = h.state("hostile")
    assert state.summary().state is BackendState.UNKNOWN and state.summary().reason.startswith(reason[:40])
    h.advance(200, step=1)
    assert [e["reason"][:40] for e in unknown_lines(logged)] == [reason[:40]]
    assert not [e for e in logged if e.get("log_failure") is not None]
    assert h.state("good").known and len(good.streams) == 1


def test_a_10_mb_event_is_refused_without_being_held():
    h = Harness(max_event_bytes=64 * 1024)
    fake = FakeOpenCode("/home/alice/big", clock=h.clock)
    opened = sse_route(fake)
    h.serve("big", fake=fake)
    assert opened
    request = opened[0]
    request.write(b"data: ")
    for _ in range(160):  # 10 MB in 64 KiB writes: the watcher drops the stream after the first two
        if request.finished or request._disconnected:
            break
        request.write(b"y" * 65536)
        h.pump(2)
    assert request._disconnected
    assert h.state("big").summary().reason == "its event stream sent an event larger than 65536 bytes"


def test_a_server_that_is_not_opencode_enough_is_unknown():
    h = Harness()
    fake = FakeOpenCode("/home/alice/old", clock=h.clock)
    # An older server: no /global/event (its web UI answers), or snapshots in HTML.
    fake.route("GET", "/global/event", lambda request: fake._web_ui(request))
    h.serve("old", fake=fake)
    assert h.state("old").summary().reason == "GET /global/event answered 200 text/html;charset=utf-8"
    other = FakeOpenCode("/home/alice/odd", clock=h.clock)
    other.route("GET", "/permission", lambda request: opencode_json(request, {"not": "a list"}))
    h.serve("odd", port=30001, fake=other)
    assert h.state("odd").summary().reason == "GET /permission answered JSON that OpenCode does not send"


# -- locked backends -------------------------------------------------------------------------------------------
def test_a_locked_backend_is_not_read_without_the_routers_password():
    h = Harness()
    fake = h.serve("locked", sighting={"locked": True}, password="pw")
    assert h.requested(30000) == [] and fake.requests_seen == []
    assert h.state("locked").summary().reason == \
        "locked: the router follows a password-protected server only with --opencode-password-file"


def test_a_locked_backend_opened_by_the_routers_password_is_followed_with_it():
    h = Harness(credentials=BackendCredentials("opencode", "pw", may_inject=True))
    fake = h.serve("locked", sighting={"locked": True, "router_credentials": True}, password="pw")
    assert h.state("locked").known
    assert fake.requests_seen and all(headers.get(b"Authorization") == [basic_header("opencode", "pw")]
                                      for _, _, headers in fake.requests_seen)


def test_a_locked_backend_is_not_read_when_the_router_itself_is_open_to_the_lan():
    h = Harness(credentials=BackendCredentials("opencode", "pw", may_inject=False))
    h.serve("locked", sighting={"locked": True, "router_credentials": True}, password="pw")
    assert h.requested(30000) == []
    assert "own authentication" in h.state("locked").summary().reason


def test_a_wrong_password_is_a_401_shown_as_unknown():
    h = Harness(credentials=BackendCredentials("opencode", "nope", may_inject=True))
    h.serve("locked", sighting={"locked": True, "router_credentials": True}, password="pw")
    assert h.state("locked").summary().reason == "it refused the router's password (401)"


# -- stopping ------------------------------------------------------------------------------------------------------
def test_stop_fires_once_every_stream_is_closed_and_leaves_no_timer():
    h = Harness()
    fakes = [h.serve(f"p{n}", port=30000 + n) for n in range(5)]
    h.stop_serving(30004)  # one in its retry delay
    stopped = h.stop()
    assert stopped.called
    assert all(fake.streams == [] for fake in fakes) and h.watcher.streams_open == 0
    assert watcher_timers(h) == []
    h.loopback.requests.clear()
    h.advance(10)
    assert h.loopback.requests == []


def test_stop_during_a_snapshot_cancels_it():
    h = Harness()
    fake = FakeOpenCode("/home/alice/slow", clock=h.clock)
    fake.route("GET", "/session/status", lambda request: NOT_DONE_YET)
    h.serve("slow", fake=fake)
    stopped = h.stop()
    assert stopped.called and watcher_timers(h) == []


def test_metrics_counts_cover_sessions_requests_backends_and_streams():
    h = Harness()
    fake = h.serve("alpha")
    fake.ask_permission(h.session(fake))
    h.serve("locked", port=30001, sighting={"locked": True})
    h.pump()
    counts = h.watcher.counts()
    assert counts["streams"] == 1 and counts["sessions:working"] == 1 and counts["pending:permission"] == 1
    assert counts["backends:needs_you"] == 1 and counts["backends:unknown"] == 1


def test_a_stream_head_that_never_comes_is_retried_soon_with_a_doubling_bound():
    h = Harness()
    fake = h.serve("alpha")
    opened: list[IRequest] = []
    ready = [False]

    def starting(request: IRequest) -> Any:
        if ready[0]:
            return fake.event_stream(request, wrapped=True)
        opened.append(request)  # accepted, never answered: a server still starting
        return NOT_DONE_YET

    fake.route("GET", "/global/event", starting)
    fake.close_streams()
    h.advance(0.4)  # the first retry comes after 0.25 s; its head may take 0.5 s
    assert len(opened) == 1
    h.advance(0.9)  # timed out at 0.75 s, retried 0.25 s later (at 1 s): this head may take 1 s
    assert len(opened) == 2
    h.advance(0.6)  # at 1.9 s the second head is still within its doubled bound
    assert len(opened) == 2, "the second head got its doubled bound"
    h.advance(0.7)  # timed out at 2 s, retried at 2.25 s
    assert len(opened) == 3
    assert h.state("alpha").summary().state is BackendState.UNKNOWN
    # The server is ready now: the next head comes, and the bound is back to its first value.
    ready[0] = True
    h.advance(2.0 + 0.25 + 0.1)
    assert h.state("alpha").known
    assert h.watcher.watches["alpha"].head_timeouts == 0
