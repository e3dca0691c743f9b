"""write_now on real loopback sockets: bytes leave in the call, never overtake queued bytes, and a
peer that stops reading still gets everything in order, with the producer paused on the way."""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator

import pytest
import pytest_twisted
from twisted.internet import defer, reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from opencoderouter.write_now import write_now


class Accepted(Protocol):
    """Hands its transport to the test once connected."""

    def __init__(self, ready: defer.Deferred[Accepted]) -> None:
        self.ready = ready
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.ready.callback(self)

    def connectionLost(self, reason: object = None) -> None:
        self.lost.callback(None)


class Pair:
    """A Twisted server connection and the raw client socket talking to it."""

    def __init__(self) -> None:
        self.ready: defer.Deferred[Accepted] = defer.Deferred()
        self.port = reactor.listenTCP(0, Factory.forProtocol(lambda: Accepted(self.ready)), interface="127.0.0.1")
        self.peer = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.peer.setblocking(False)

    def received_now(self) -> bytes:
        """What the peer can read at this instant (the reactor does not turn here)."""
        data = b""
        while select.select([self.peer], [], [], 0.2)[0]:
            piece = self.peer.recv(1 << 20)
            if not piece:
                break
            data += piece
        return data


@pytest.fixture
def pair() -> Iterator[Pair]:
    made = Pair()
    yield made
    made.peer.close()
    made.port.stopListening()


@pytest_twisted.ensureDeferred
async def test_with_nothing_queued_the_bytes_leave_within_the_call(pair: Pair) -> None:
    server = await pair.ready
    write_now(server.transport, b"event: one\n\n")
    # No reactor turn between the call and the read: the bytes were sent by write_now itself.
    assert pair.received_now() == b"event: one\n\n"
    server.transport.loseConnection()
    await server.lost


@pytest_twisted.ensureDeferred
async def test_bytes_never_overtake_what_is_already_queued(pair: Pair) -> None:
    server = await pair.ready
    server.transport.write(b"first ")
    write_now(server.transport, b"second")
    assert pair.received_now() == b"", "write_now sent past queued bytes"
    await pause(0.05)
    assert pair.received_now() == b"first second"
    server.transport.loseConnection()
    await server.lost


@implementer(IPushProducer)
class Counting:
    """A streaming producer that only counts what it is told."""

    def __init__(self) -> None:
        self.paused = 0
        self.resumed = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        self.resumed += 1

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_peer_that_stops_reading_gets_everything_in_order_and_the_producer_pauses(pair: Pair) -> None:
    server = await pair.ready
    producer = Counting()
    server.transport.registerProducer(producer, True)
    blocks = [bytes([65 + i % 26]) * 65536 for i in range(128)]  # 8 MiB, more than the kernel buffers hold
    for block in blocks:
        write_now(server.transport, block)
    assert producer.paused >= 1, "the queue passed bufferSize without pausing the producer"
    received = bytearray()
    expected = b"".join(blocks)
    for _ in range(2000):
        received += pair.received_now()
        if len(received) >= len(expected):
            break
        await pause(0.005)
    assert bytes(received) == expected
    assert producer.resumed >= 1
    server.transport.unregisterProducer()
    server.transport.loseConnection()
    await server.lost


@pytest_twisted.ensureDeferred
async def test_a_peer_gone_is_reported_as_a_lost_connection_not_raised(pair: Pair) -> None:
    server = await pair.ready
    pair.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    pair.peer.close()  # a reset, not a polite close
    await pause(0.05)
    for _ in range(3):
        write_now(server.transport, b"x" * 1000)
    await server.lost


def test_other_transports_get_an_ordinary_write() -> None:
    transport = StringTransport()
    write_now(transport, b"hello")
    assert transport.value() == b"hello"


def pause(seconds: float) -> defer.Deferred[None]:
    """Let the reactor turn for ``seconds``."""
    return deferLater(reactor, seconds, lambda: None)
