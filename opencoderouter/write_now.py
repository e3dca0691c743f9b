"""Bytes onto a TCP socket at once when nothing is queued before them.

Why: ``FileDescriptor.write`` never sends. It queues the bytes and registers the socket for
writability (an ``epoll_ctl``); the reactor sends on its next turn and unregisters (another
``epoll_ctl``). For a proxy that is two system calls and one more loop turn per write, and a batch
of reads is answered only after the whole batch was read: with 1,000 open event streams one event
reaches the last client after all 1,000 were read. A profile of the router relaying SSE to 1,000
streams put 10 % of its time in those two ``epoll_ctl`` calls alone. :func:`write_now` sends at
once, as asyncio's transports do, and queues only what the kernel did not take, so order,
backpressure (``pauseProducing`` past ``bufferSize``) and error reporting stay Twisted's.

It reads two private attributes of ``twisted.internet.abstract.FileDescriptor`` (``_tempDataLen``,
``_writeDisconnected``) to know that nothing is queued and the transport may still write; only
here, and ``tests/test_twisted_contract.py`` fails loudly if a Twisted release changes them. Any
transport other than a plain (non-TLS) ``twisted.internet.tcp.Connection`` gets an ordinary
``write``.
"""

from __future__ import annotations

from twisted.internet.tcp import Connection


def write_now(transport: object, data: bytes) -> None:
    """Send ``data`` on ``transport`` now if nothing is queued before it; queue what the kernel did not take."""
    if isinstance(transport, Connection) and _idle(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):
            if sent >= len(data):
                return
            data = data[sent:]
        # An exception (the connection is broken): the queued write below meets it again on the
        # reactor's next turn and reports the loss the ordinary way.
    transport.write(data)  # type: ignore[attr-defined]


def _idle(transport: Connection) -> bool:
    """True when the transport is connected, may write, and has nothing queued."""
    return bool(
        transport.connected
        and not transport.TLS
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
        and not transport._writeDisconnected
    )
