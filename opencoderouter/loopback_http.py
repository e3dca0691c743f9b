"""HTTP to untrusted ports of this machine: the scanner's treq client and its bounds.

Any port in the scan range may belong to a hostile neighbour, so the client connects by IP
without name resolution, logs nothing per connection, keeps no cookie (a neighbour's would be sent
to every other port of 127.0.0.1), reads at most a fixed number of body bytes *after* gzip
decoding, and inflates compressed answers a small piece at a time so that a compression bomb
stops at that cap.
"""

from __future__ import annotations

from http.cookiejar import DefaultCookiePolicy
from typing import Any, cast

from treq.client import HTTPClient
from treq.cookies import IndexableCookieJar
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

#: Largest body read, counted after gzip decoding; OpenCode's probe answers are a few hundred bytes.
MAX_BODY = 64 * 1024

#: How much of a compressed answer is inflated at a time: deflate turns one byte into at most
#: ~1,032, so one step makes at most ~260 KB however hostile the sender.
ENCODED_PIECE = 256


class BodyTooLarge(Exception):
    """The answer's body (decoded) is longer than the limit."""


class _LimitedBody(Protocol):
    """Collect a (decoded) response body up to a limit; abort the connection past it."""

    def __init__(self, finished: Deferred[bytes], limit: int) -> None:
        self.finished = finished
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        """Keep ``data`` while the total stays within the limit; past it, stop reading and fail."""
        if self.finished.called:
            return  # a decoder may still flush a last piece after the abort
        self.size += len(data)
        if self.size > self.limit:
            self.abort()
            self.finished.errback(BodyTooLarge(f"answer larger than {self.limit} bytes"))
            return
        self.chunks.append(data)

    def abort(self) -> None:
        """Stop the sender: the connection is closed without reading the rest."""
        # A body's transport is the response's IPushProducer (IResponse.deliverBody).
        producer = IPushProducer(self.transport, None)
        if producer is not None:
            producer.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Fire with the body when it ended, or with the failure."""
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self.chunks))
        else:
            self.finished.errback(reason)


def read_body(response: IResponse, limit: int = MAX_BODY) -> Deferred[bytes]:
    """Read a whole body, at most ``limit`` bytes after decoding; cancelling aborts the connection."""
    if response.length == 0:
        return defer.succeed(b"")
    body: _LimitedBody

    def cancel(_: Deferred[bytes]) -> None:
        body.abort()

    finished: Deferred[bytes] = Deferred(cancel)
    body = _LimitedBody(finished, limit)
    response.deliverBody(body)
    return finished


@implementer(IStreamClientEndpoint)
class _QuietEndpoint:
    """An endpoint whose connections log nothing: one probe connection is no news."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:  # noqa: N803 - Twisted's name
        """Connect ``protocolFactory`` without its "Starting factory" / "Stopping factory" lines."""
        # ``noisy`` is Factory's public switch for those lines; the pool hands us a fresh factory.
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        return self._endpoint.connect(protocolFactory)

    def __repr__(self) -> str:
        return repr(self._endpoint)


#: The URL host that stands for ``::1``: treq builds request URLs with hyperlink, whose ``to_uri``
#: IDNA-encodes the host and fails on an IPv6 literal; the endpoint factory maps this name back.
IPV6_LOOPBACK_HOST = "ipv6-loopback.invalid"


def loopback_url(address: str, port: int, path: str) -> str:
    """``http://ADDRESS:PORT/path`` for a probe of a loopback listener (``::1`` through its stand-in name)."""
    host = IPV6_LOOPBACK_HOST if address == "::1" else address
    return f"http://{host}:{port}{path}"


def shown_url(url: str) -> str:
    """``url`` as a person should read it: the ``::1`` stand-in name back as ``[::1]``."""
    return url.replace(f"//{IPV6_LOOPBACK_HOST}:", "//[::1]:", 1)


class LoopbackEndpoints:
    """An Agent endpoint factory: plain TCP to the URL's IP address, no name resolution.

    Agent's default ``HostnameEndpoint`` resolves even an IP literal in a thread and waits
    0.3 s between attempts, which makes a refused port cost 300 ms instead of microseconds.
    """

    def __init__(self, reactor: Any, connect_timeout: float) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """A quiet TCP endpoint for ``uri``'s host and port."""
        host = uri.host.decode("ascii")
        if host == IPV6_LOOPBACK_HOST:
            host = "::1"
        endpoint = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
        return _QuietEndpoint(endpoint(self._reactor, host, uri.port, timeout=self._timeout))


@implementer(IPushProducer)
class _StopNoticing:
    """A body's transport that remembers whether the reader above asked it to stop."""

    def __init__(self, transport: IPushProducer) -> None:
        self._transport = transport
        self.stopped = False

    def stopProducing(self) -> None:
        """Stop the sender, and remember it."""
        self.stopped = True
        self._transport.stopProducing()

    def pauseProducing(self) -> None:
        """Pause the sender."""
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        """Resume the sender."""
        self._transport.resumeProducing()


class _InPieces(Protocol):
    """Hands an encoded body to its decoder ``piece`` bytes at a time, and nothing once it stops.

    Twisted's ``GzipDecoder`` (which treq uses) inflates each chunk it gets in one call: one 64 KiB
    read of compressed zeros would become ~64 MB before the size cap above it could look.
    """

    def __init__(self, decoder: IProtocol, piece: int) -> None:
        self._decoder = decoder
        self._piece = piece
        self._watch: _StopNoticing | None = None

    def connectionMade(self) -> None:
        """Connect the decoder to a transport that notices when it is told to stop."""
        self._watch = _StopNoticing(IPushProducer(self.transport))
        # IResponse.deliverBody connects body protocols to an IPushProducer, which IProtocol types as ITransport.
        self._decoder.makeConnection(cast(ITransport, self._watch))

    def dataReceived(self, data: bytes) -> None:
        """Pass ``data`` on piece by piece until the reader has had enough."""
        for offset in range(0, len(data), self._piece):
            if self._watch is not None and self._watch.stopped:
                return
            self._decoder.dataReceived(data[offset : offset + self._piece])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """The body ended (or failed): tell the decoder."""
        self._decoder.connectionLost(reason)


@implementer(IResponse)
class _DeliveredInPieces:
    """A response whose encoded body reaches its decoder in small pieces (see ``_InPieces``)."""

    def __init__(self, response: IResponse, piece: int) -> None:
        self._response = response
        self._piece = piece
        self.version = response.version
        self.code = response.code
        self.phrase = response.phrase
        self.headers = response.headers
        self.length = response.length
        self.request = response.request
        self.previousResponse = response.previousResponse

    def deliverBody(self, protocol: IProtocol) -> None:  # noqa: N802 - Twisted's name
        """Deliver the body to ``protocol`` a piece at a time."""
        self._response.deliverBody(_InPieces(protocol, self._piece))

    def setPreviousResponse(self, response: IResponse) -> None:  # noqa: N802 - Twisted's name
        """Record the response this one redirects from."""
        self.previousResponse = response
        self._response.setPreviousResponse(response)


@implementer(IAgent)
class _EncodedBodiesInPieces:
    """An Agent whose compressed answers are inflated a little at a time by the decoder above it."""

    def __init__(self, agent: IAgent, piece: int = ENCODED_PIECE) -> None:
        self._agent = agent
        self._piece = piece

    def request(self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: IBodyProducer | None = None) -> Deferred[IResponse]:  # noqa: N803 - Twisted's name
        """Send the request; wrap an answer that has a ``Content-Encoding``."""
        return self._agent.request(method, uri, headers, bodyProducer).addCallback(self._wrap)

    def _wrap(self, response: IResponse) -> IResponse:
        if response.headers.hasHeader(b"content-encoding"):
            return _DeliveredInPieces(response, self._piece)
        return response


def loopback_agent(reactor: Any, connect_timeout: float, pool: HTTPConnectionPool | None = None) -> IAgent:
    """An Agent for talking to 127.0.0.1 without name resolution or per-connection log lines.

    Without ``pool`` it opens one connection per request and keeps none (nothing to close).
    """
    return Agent.usingEndpointFactory(reactor, LoopbackEndpoints(reactor, connect_timeout), pool=pool)


def probe_client(agent: IAgent) -> HTTPClient:
    """The probes' treq client over ``agent``: no cookies kept, compressed answers inflated in pieces."""
    # A neighbour's cookie would otherwise be sent to every other port of 127.0.0.1.
    no_cookies = IndexableCookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return HTTPClient(_EncodedBodiesInPieces(agent), cookiejar=no_cookies)
