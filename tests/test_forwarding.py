"""The forwarding engine in memory: a real RouterChannel on the client side, backend connections on
StringTransports from a MemoryReactorClock, time driven by the clock.

Covers what forwarding guarantees (relay, hop-by-hop rules, 502/504, disconnects both ways,
backpressure, keep-alive reuse and retry) and every response-framing edge the parser must get
right (chunk extensions, trailers, ``gzip, chunked``, bodies that end at close, 1xx before the
final response, HEAD and 204/304, malformed and smuggling responses).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from opencoderouter.headers import is_websocket_upgrade

from .forwarding_harness import Harness


def forwarding_timers(h: Harness) -> list[Any]:
    """The forwarder's pending timers (the channel's own head deadline is not one)."""
    return [c for c in h.reactor.getDelayedCalls() if c.active() and getattr(c.func, "__name__", "") == "_timed_out"]


def json_body(out: bytes) -> Any:
    return json.loads(out.split(b"\r\n\r\n", 1)[1])


# -- the request ----------------------------------------------------------------------------------
def test_forwarded_request_strips_hop_by_hop_keeps_duplicates_and_adds_forwarded_fields():
    h = Harness()
    h.get(headers=b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
                  b"Proxy-Authorization: x\r\nUpgrade: h2c\r\nX-Dup: a\r\nX-Dup: b\r\nX-Forwarded-For: 10.0.0.1\r\n"
                  b"X-Forwarded-Prefix: /evil\r\n")
    _, backend = h.accept()
    head = backend.value()
    lines = head.split(b"\r\n")
    assert lines[0] == b"GET /x HTTP/1.1"
    names = {line.split(b":", 1)[0].lower() for line in lines[1:] if line}
    assert not names & {b"connection", b"x-hop", b"keep-alive", b"te", b"proxy-authorization", b"upgrade"}
    assert b"X-Dup: a\r\nX-Dup: b\r\n" in head
    assert b"Host: 127.0.0.1:4321\r\n" in head
    assert b"X-Forwarded-For: 10.0.0.1, 192.168.1.1\r\n" in head
    assert b"X-Forwarded-Host: router:8080\r\n" in head and b"X-Forwarded-Prefix: /alpha\r\n" in head
    assert b"X-Forwarded-Proto: http\r\n" in head and b"/evil" not in head


def test_forwarded_request_drops_expect_and_the_clients_own_framing_and_keeps_duplicates():
    h = Harness()
    h.send(b"POST /x HTTP/1.1\r\nHost: router:8080\r\nConnection: X-Hop\r\nX-Hop: 1\r\nExpect: 100-continue\r\n"
           b"Content-Length: 3\r\nX-Dup: a\r\nX-Dup: b\r\n\r\nabc")
    _, backend = h.accept()
    head, _, body = backend.value().partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    names = [line.split(b":", 1)[0].lower() for line in lines[1:]]
    assert b"X-Dup: a\r\nX-Dup: b\r\n" in head + b"\r\n" and b"Host: 127.0.0.1:4321" in lines
    assert not set(names) & {b"x-hop", b"expect", b"connection"}
    assert names.count(b"content-length") == 1 and body == b"abc"


def test_websocket_upgrade_needs_get_http11_and_both_headers():
    from twisted.web.server import Request
    from twisted.web.test.requesthelper import DummyChannel

    def made(method: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
        request = Request(DummyChannel())
        request.method, request.clientproto = method, b"HTTP/1.1"
        for name, value in headers:
            request.requestHeaders.addRawHeader(name, value)
        return request

    good = [(b"Upgrade", b"WebSocket"), (b"Connection", b"keep-alive, Upgrade")]
    assert is_websocket_upgrade(made(b"GET", good))
    assert not is_websocket_upgrade(made(b"POST", good))
    assert not is_websocket_upgrade(made(b"GET", [(b"Upgrade", b"websocket")]))
    assert not is_websocket_upgrade(made(b"GET", [(b"Upgrade", b"h2c"), (b"Connection", b"upgrade")]))


def test_our_password_replaces_the_clients_authorization_for_our_locked_backend():
    h = Harness(locked=True)
    h.get(headers=b"Authorization: Basic bWFsbG9yeTp4\r\n")
    _, backend = h.accept()
    assert backend.value().count(b"Authorization:") == 1
    assert b"Authorization: Basic b3BlbmNvZGU6cHc=\r\n" in backend.value()


def test_a_body_goes_with_its_length_and_a_post_without_body_says_zero():
    h = Harness()
    h.send(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n\r\nhello")
    _, backend = h.accept()
    assert backend.value().endswith(b"Content-Length: 5\r\n\r\nhello")
    h.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
    h.send(b"POST /y HTTP/1.1\r\nHost: r\r\n\r\n")
    assert b"POST /y HTTP/1.1" in backend.value() and backend.value().endswith(b"Content-Length: 0\r\n\r\n")


def test_a_request_with_both_content_length_and_transfer_encoding_is_refused():
    h = Harness()
    h.send(b"POST /x HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert h.out().startswith(b"HTTP/1.1 400 ")
    assert h.reactor.tcpClients == []


def test_target_that_is_not_a_plain_path_gets_400():
    for target in (b"http://evil/x", b"/\xc3\xa9", b"/a\x7fb"):
        h = Harness()
        h.get(target)
        assert h.out().startswith(b"HTTP/1.1 400 "), target
        assert h.reactor.tcpClients == []


# -- the response ---------------------------------------------------------------------------------
def test_backend_response_is_relayed_with_status_headers_and_body():
    h = Harness()
    h.get()
    h.accept()
    h.answer(b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Type: text/plain\r\n"
             b"Connection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 5\r\n\r\nhel")
    h.answer(b"lo")
    out = h.out()
    assert out.startswith(b"HTTP/1.1 201 Created\r\n")
    assert out.count(b"Set-Cookie: ") == 2 and b"Content-Length: 5\r\n" in out
    assert b"X-Secret" not in out and b"Keep-Alive" not in out and b"Server:" not in out
    assert out.endswith(b"\r\n\r\nhello")
    assert not h.client_transport.disconnecting


def test_chunked_body_passes_through_unchanged_with_extensions_and_trailers():
    h = Harness()
    h.get()
    h.accept()
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Trailer\r\n\r\n" + body[:9])
    h.answer(body[9:20])
    h.answer(body[20:])
    head, _, relayed = h.out().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"Trailer:" not in head
    assert relayed == body  # byte for byte: never de-chunked and re-chunked
    h.get(b"/next")
    assert len(h.backends) == 1 and b"GET /next" in h.backends[0][1].value()  # the connection was reused


def test_gzip_chunked_transfer_coding_is_passed_on_as_it_is():
    h = Harness()
    h.get()
    h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\n\x1f\x8b\x08\r\n0\r\n\r\n")
    head, _, relayed = h.out().partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: gzip, chunked" in head and relayed == b"3\r\n\x1f\x8b\x08\r\n0\r\n\r\n"


def test_a_body_that_ends_at_close_reaches_an_http11_client_chunked_and_keeps_it_connected():
    h = Harness()
    h.get()
    protocol, backend = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npart one, ")
    h.answer(b"part two")
    protocol.connectionLost(Failure(ConnectionDone()))
    out = h.out()
    assert b"Transfer-Encoding: chunked" in out
    assert out.endswith(b"a\r\npart one, \r\n8\r\npart two\r\n0\r\n\r\n")
    assert not h.client_transport.disconnecting


def test_an_http10_client_gets_chunked_bodies_decoded_and_the_connection_closed():
    h = Harness()
    h.send(b"GET /x HTTP/1.0\r\nHost: r\r\n\r\n")
    h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    out = h.out()
    assert out.startswith(b"HTTP/1.0 200 OK\r\n") and b"Transfer-Encoding" not in out
    assert b"Connection: close\r\n" in out and out.endswith(b"\r\n\r\nhello")
    assert h.client_transport.disconnecting


def test_interim_1xx_answers_are_skipped_for_the_final_one():
    h = Harness()
    h.get()
    h.accept()
    h.answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    out = h.out()
    assert out.startswith(b"HTTP/1.1 200 OK\r\n") and out.endswith(b"ok") and b"Early" not in out


@pytest.mark.parametrize("status", [b"204 No Content", b"304 Not Modified"])
def test_204_and_304_have_no_body(status):
    h = Harness()
    h.get()
    h.accept()
    h.answer(b"HTTP/1.1 " + status + b"\r\nETag: \"x\"\r\n\r\n")
    out = h.out()
    assert out.startswith(b"HTTP/1.1 " + status) and out.endswith(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in out and b"Content-Length" not in out
    h.get(b"/again")
    assert b"GET /again" in h.backends[0][1].value()


def test_head_keeps_the_length_a_get_would_have_and_sends_no_body():
    h = Harness()
    h.send(b"HEAD /x HTTP/1.1\r\nHost: r\r\n\r\n")
    h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    out = h.out()
    assert b"Content-Length: 1234\r\n" in out and out.endswith(b"\r\n\r\n")
    h.get(b"/next")
    assert b"GET /next" in h.backends[0][1].value()


@pytest.mark.parametrize("head", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    b"HTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
])
def test_a_malformed_or_smuggling_response_head_is_a_502(head):
    h = Harness()
    h.get()
    _, backend = h.accept()
    h.answer(head)
    out = h.out()
    assert out.startswith(b"HTTP/1.1 502 ") and "malformed" in json_body(out)["message"]
    assert backend.disconnecting


def test_a_malformed_chunk_cuts_the_clients_response_visibly():
    h = Harness()
    h.get()
    _, backend = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
    assert h.client_transport.disconnecting and backend.disconnecting
    assert not h.out().endswith(b"0\r\n\r\n")


def test_an_oversized_response_head_is_a_502():
    h = Harness()
    h.get()
    h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000)
    assert h.out().startswith(b"HTTP/1.1 502 ")


def test_bytes_after_a_complete_response_retire_the_connection():
    h = Harness()
    h.get()
    _, backend = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n\r\n")
    assert h.out().endswith(b"\r\n\r\nok") and backend.disconnecting


# -- failures and time ------------------------------------------------------------------------------
def test_no_response_headers_within_the_bound_gives_504():
    h = Harness(timeout=5)
    h.get()
    _, backend = h.accept()
    h.reactor.advance(4.9)
    assert h.out() == b""
    h.reactor.advance(0.2)
    out = h.out()
    assert out.startswith(b"HTTP/1.1 504 ") and json_body(out)["error"] == "gateway_timeout"
    assert backend.disconnecting


def test_refused_connection_gives_502_naming_the_backend():
    h = Harness()
    h.get()
    _, _, factory, _, _ = h.reactor.tcpClients[0]
    factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    out = h.out()
    assert out.startswith(b"HTTP/1.1 502 ")
    answer = json_body(out)
    assert answer["backend"] == "alpha" and "refused" in answer["message"] and "4321" in answer["message"]
    assert not forwarding_timers(h)


def test_a_backend_that_closes_before_answering_gives_502():
    h = Harness()
    h.get()
    protocol, _ = h.accept()
    protocol.connectionLost(Failure(ConnectionLost()))
    assert h.out().startswith(b"HTTP/1.1 502 ")


class _PausingTransport(StringTransport):
    """A backend whose buffer is full after every write: the body writer must wait for resume."""

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()


def test_body_upload_progress_restarts_the_bound():
    h = Harness(timeout=5)
    h.send(b"POST /up HTTP/1.1\r\nHost: r\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200_000)
    _, backend = h.accept(_PausingTransport())
    for _ in range(3):
        h.reactor.advance(4)
        backend.producer.resumeProducing()
    assert h.out() == b"", "the bound fired although the backend kept reading the body"
    while backend.producer is not None:
        backend.producer.resumeProducing()
    assert backend.value().endswith(b"\r\n\r\n" + b"x" * 200_000)
    h.reactor.advance(5.1)
    assert h.out().startswith(b"HTTP/1.1 504 ")


def test_client_disconnect_while_connecting_stops_the_attempt():
    h = Harness()
    h.get()
    connector = h.reactor.connectors[0]
    h.client.connectionLost(Failure(ConnectionDone()))
    assert connector.stoppedConnecting


def test_client_disconnect_while_waiting_or_streaming_closes_the_backend_connection():
    for answer in (b"", b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"a\r\ndata: {}\n\n\r\n"):
        h = Harness()
        h.get()
        _, backend = h.accept()
        if answer:
            h.answer(answer)
        h.client.connectionLost(Failure(ConnectionDone()))
        assert backend.disconnecting
        assert not forwarding_timers(h)


def test_backend_dying_mid_body_closes_the_client_connection():
    h = Harness()
    h.get()
    protocol, _ = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\ndata: {}\n\n\r\n")
    protocol.connectionLost(Failure(ConnectionLost()))
    assert h.client_transport.disconnecting
    assert not h.out().endswith(b"0\r\n\r\n")  # no clean end of the chunked body


def test_a_slow_client_pauses_the_backend_connection():
    h = Harness()
    h.get()
    _, backend = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
    h.client.pauseProducing()  # the client's socket buffer is full
    assert backend.producerState == "paused"
    h.client.resumeProducing()
    assert backend.producerState == "producing"


# -- the pool ---------------------------------------------------------------------------------------
def test_idle_connections_are_reused_and_closed_after_the_idle_timeout():
    h = Harness()
    h.get()
    _, backend = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    assert h.forwarder.pool.idle_count(4321) == 1
    h.reactor.advance(3.9)
    assert not backend.disconnecting
    h.reactor.advance(0.2)
    assert backend.disconnecting


def test_a_reused_connection_closed_by_the_backend_is_retried_once_for_a_get():
    h = Harness()
    h.get()
    first, _ = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    h.get(b"/second")
    first.connectionLost(Failure(ConnectionLost()))  # the backend dropped it just as we wrote
    h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nbb")
    assert h.out().endswith(b"\r\n\r\nbb") and b"502" not in h.out()


def test_a_post_on_a_connection_the_backend_dropped_is_not_repeated():
    h = Harness()
    h.get()
    first, _ = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    h.send(b"POST /once HTTP/1.1\r\nHost: r\r\nContent-Length: 1\r\n\r\nz")
    first.connectionLost(Failure(ConnectionLost()))
    assert len(h.reactor.tcpClients) == 1 and b"HTTP/1.1 502 " in h.out()


def test_close_closes_idle_connections_and_fires_when_they_are_closed():
    h = Harness()
    h.get()
    protocol, backend = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na")
    closed: list[object] = []
    h.forwarder.close().addCallback(closed.append)
    assert backend.disconnecting and not closed
    protocol.connectionLost(Failure(ConnectionDone()))
    assert closed == [None]


def test_backend_timeout_flag_takes_durations_and_names_itself_on_bad_values():
    from opencoderouter.config import Options

    options = Options()
    options.parseOptions(["--backend-timeout", "1m30s"])
    assert options["backend-timeout"] == 90.0
    defaults = Options()
    defaults.parseOptions([])
    assert defaults["backend-timeout"] == 30.0
    for bad in ("0", "soon", "-5s"):
        with pytest.raises(SystemExit) as caught:
            Options().parseOptions(["--backend-timeout", bad])
        assert "--backend-timeout" in str(caught.value) and bad in str(caught.value)


def test_a_connection_left_paused_by_a_slow_client_reads_again_for_the_next_request():
    h = Harness()
    h.get()
    _, backend = h.accept()
    h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nabc")
    h.client.pauseProducing()  # the client stopped reading: the backend connection is paused...
    h.answer(b"def")  # ...and the rest of the body was already on its way
    assert backend.producerState == "paused"
    h.client.resumeProducing()
    h.get(b"/next")
    assert b"GET /next" in backend.value() and backend.producerState == "producing"


def test_a_same_origin_origin_is_rewritten_like_the_host_and_others_pass_unchanged():
    h = Harness()
    h.get(headers=b"Origin: http://router:8080\r\n")
    _, backend = h.accept()
    assert b"Origin: http://127.0.0.1:4321\r\n" in backend.value()
    h.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
    h.get(b"/y", headers=b"Origin: https://app.example.org\r\n")
    assert b"Origin: https://app.example.org\r\n" in backend.value()
