"""Unit tests of the forwarding logic with a Clock, a recording agent and twisted.web's DummyChannel."""

from __future__ import annotations

import json
from io import BytesIO

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.test.requesthelper import DummyChannel

from opencoderouter.config import Options
from opencoderouter.forwarding import Forwarder, _SpooledBody
from opencoderouter.headers import forward_request_headers, is_websocket_upgrade
from opencoderouter.proxy import BackendResource


def make_request(method: bytes = b"GET", uri: bytes = b"/x", headers=(), body: bytes = b"") -> server.Request:
    channel = DummyChannel()
    request = server.Request(channel)
    request.test_channel = channel  # finish() drops request.channel
    request.method, request.uri, request.clientproto = method, uri, b"HTTP/1.1"
    request.path = uri.split(b"?")[0]
    for name, value in headers:
        request.requestHeaders.addRawHeader(name, value)
    request.content = BytesIO(body)
    return request


def written(request: server.Request) -> bytes:
    return request.test_channel.transport.written.getvalue()


class BackendTransport:
    """Records what the proxy does to the backend connection."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class FakeResponse:
    """Just enough of IResponse for the proxy."""

    def __init__(self, code=200, headers=None, length=None) -> None:
        self.code, self.phrase, self.length = code, b"OK", length
        self.headers = Headers(headers or {})
        self.transport = BackendTransport()
        self.protocol = None

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)


class RecordingAgent:
    """Stands in for the Agent: each forward() returns a Deferred the test fires or watches."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def forward(self, port, method, target, headers, body):
        cancelled: list[bool] = []
        deferred: Deferred = Deferred(lambda d: cancelled.append(True))
        self.calls.append((port, method, target, headers, body, deferred, cancelled))
        return deferred


def forwarding(timeout: float = 5.0):
    clock = Clock()
    forwarder = Forwarder(clock, backend_timeout=timeout, connect_timeout=1.0)
    agent = RecordingAgent()
    forwarder.agent = agent  # type: ignore[assignment]
    return clock, forwarder, agent


def render(forwarder, request, target=b"/rest?q=1", prefix=b"/alpha"):
    resource = BackendResource("127.0.0.1", 4321, target, forwarder.reactor, forwarder=forwarder, prefix=prefix,
                               name="alpha")
    assert resource.render(request) == server.NOT_DONE_YET


def test_forwarded_headers_strip_hop_by_hop_and_keep_duplicates():
    request = make_request(headers=[
        (b"Host", b"router:8080"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"5"),
        (b"TE", b"trailers"), (b"Proxy-Authorization", b"x"), (b"Upgrade", b"h2c"), (b"X-Dup", b"a"),
        (b"X-Dup", b"b"), (b"X-Forwarded-For", b"10.0.0.1"), (b"Content-Length", b"3"), (b"Expect", b"100-continue"),
    ])
    headers = forward_request_headers(request, 4321, b"/alpha")
    names = {name.lower() for name, _ in headers.getAllRawHeaders()}
    assert not names & {b"connection", b"x-hop", b"keep-alive", b"te", b"proxy-authorization", b"upgrade",
                        b"content-length", b"expect"}
    assert headers.getRawHeaders(b"x-dup") == [b"a", b"b"]
    assert headers.getRawHeaders(b"host") == [b"127.0.0.1:4321"]
    assert headers.getRawHeaders(b"x-forwarded-for") == [b"10.0.0.1, 192.168.1.1"]
    assert headers.getRawHeaders(b"x-forwarded-host") == [b"router:8080"]
    assert headers.getRawHeaders(b"x-forwarded-prefix") == [b"/alpha"]


def test_websocket_upgrade_needs_get_http11_and_both_headers():
    good = [(b"Upgrade", b"WebSocket"), (b"Connection", b"keep-alive, Upgrade")]
    assert is_websocket_upgrade(make_request(headers=good))
    assert not is_websocket_upgrade(make_request(method=b"POST", headers=good))
    assert not is_websocket_upgrade(make_request(headers=[(b"Upgrade", b"websocket")]))
    assert not is_websocket_upgrade(make_request(headers=[(b"Upgrade", b"h2c"), (b"Connection", b"upgrade")]))


def test_backend_response_is_relayed_with_status_headers_and_body():
    clock, forwarder, agent = forwarding()
    request = make_request()
    render(forwarder, request)
    port, method, target, headers, body, deferred, _ = agent.calls[0]
    assert (port, method, target, body) == (4321, b"GET", b"/rest?q=1", None)
    response = FakeResponse(201, {b"set-cookie": [b"a=1", b"b=2"], b"content-type": [b"text/plain"]}, length=5)
    deferred.callback((response, Headers()))
    response.protocol.dataReceived(b"hel")
    response.protocol.dataReceived(b"lo")
    response.protocol.connectionLost(Failure(ResponseDone()))
    out = written(request)
    assert out.startswith(b"HTTP/1.1 201 OK\r\n")
    assert out.count(b"Set-Cookie: ") == 2 and b"Content-Length: 5\r\n" in out
    assert out.endswith(b"\r\n\r\nhello")
    assert request.finished


def test_no_response_headers_within_the_bound_gives_504():
    clock, forwarder, agent = forwarding(timeout=5)
    request = make_request()
    render(forwarder, request)
    cancelled = agent.calls[0][6]  # cancelling fails the Deferred with CancelledError, as the Agent does
    clock.advance(4.9)
    assert not cancelled
    clock.advance(0.2)
    assert cancelled == [True]
    out = written(request)
    assert out.startswith(b"HTTP/1.1 504 ")
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"] == "gateway_timeout"


def test_refused_connection_gives_502_naming_the_backend():
    clock, forwarder, agent = forwarding()
    request = make_request()
    render(forwarder, request)
    agent.calls[0][5].errback(ConnectionRefusedError())
    out = written(request)
    assert out.startswith(b"HTTP/1.1 502 ")
    answer = json.loads(out.split(b"\r\n\r\n", 1)[1])
    assert answer["backend"] == "alpha" and "refused" in answer["message"] and "4321" in answer["message"]
    assert clock.getDelayedCalls() == []


def test_body_upload_progress_restarts_the_bound():
    clock, forwarder, agent = forwarding(timeout=5)
    request = make_request(method=b"POST", body=b"x" * 200_000)
    render(forwarder, request)
    body: _SpooledBody = agent.calls[0][4]
    assert body.length == 200_000

    class SlowConsumer:
        def __init__(self):
            self.data = b""

        def write(self, data):
            self.data += data
            body.pauseProducing()  # the backend's buffer is full after every piece

    consumer = SlowConsumer()
    done = body.startProducing(consumer)
    for _ in range(3):
        clock.advance(4)
        body.resumeProducing()
    assert not agent.calls[0][6], "the bound fired although the backend kept reading the body"
    clock.advance(4)
    body.resumeProducing()
    assert consumer.data == b"x" * 200_000
    assert done.called
    clock.advance(5.1)
    assert agent.calls[0][6] == [True]


def test_client_disconnect_while_waiting_cancels_the_backend_request():
    clock, forwarder, agent = forwarding()
    request = make_request()
    render(forwarder, request)
    request.connectionLost(Failure(ConnectionRefusedError("client went away")))
    assert agent.calls[0][6] == [True]
    assert clock.getDelayedCalls() == []


def test_client_disconnect_while_streaming_stops_the_backend_connection():
    clock, forwarder, agent = forwarding()
    request = make_request()
    render(forwarder, request)
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
    agent.calls[0][5].callback((response, Headers()))
    response.protocol.dataReceived(b"data: {}\n\n")
    request.connectionLost(Failure(ConnectionRefusedError("client went away")))
    assert response.transport.calls == ["stop"]


def test_backend_dying_mid_body_closes_the_client_connection():
    clock, forwarder, agent = forwarding()
    request = make_request()
    render(forwarder, request)
    response = FakeResponse(200, {b"content-type": [b"text/event-stream"]})
    agent.calls[0][5].callback((response, Headers()))
    response.protocol.dataReceived(b"data: {}\n\n")
    response.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionRefusedError())])))
    assert request.test_channel.transport.disconnected
    assert not written(request).endswith(b"0\r\n\r\n")  # no clean end of the chunked body


def test_target_that_is_not_a_plain_path_gets_400():
    clock, forwarder, agent = forwarding()
    for target in (b"http://evil/x", b"/a\x00b", b"/\xc3\xa9", b"*"):
        request = make_request()
        render(forwarder, request, target=target)
        assert written(request).startswith(b"HTTP/1.1 400 ")
    assert agent.calls == []


def test_backend_timeout_flag_takes_durations_and_names_itself_on_bad_values():
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
