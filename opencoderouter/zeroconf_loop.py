"""python-zeroconf on its own loop thread, driven from the reactor with Deferreds.

python-zeroconf's synchronous calls block their caller for one to two seconds while they probe and
announce, and its asyncio API must run on zeroconf's own event loop. We use the plain ``Zeroconf``
object with ``use_asyncio=False``, which starts *its own* asyncio loop in a daemon thread, and run
coroutines on that loop with ``asyncio.run_coroutine_threadsafe``; completion comes back to the
reactor with ``callFromThread`` as an ordinary Deferred. Why not ``deferToThread`` with the sync
calls: each would hold one of the reactor's ten pool threads for seconds, starving every other user
of the pool (e.g. name resolution). Why not the asyncio reactor: it would tie the whole router to one
event loop implementation for one feature. Only the constructor and ``close`` (which wait for that
loop thread) go through the reactor's thread pool.

The advertiser (:mod:`.mdns`) and the LAN browser (:mod:`.lan_mdns`) both stand on this.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure


class ZeroconfLoop:
    """One ``Zeroconf`` object and its loop thread, seen from the reactor."""

    def __init__(self, reactor: Any, zeroconf: Any) -> None:
        self._reactor = reactor
        self.zeroconf = zeroconf

    @classmethod
    def open(cls, reactor: Any, interfaces: Sequence[str | int], **options: Any) -> Deferred[ZeroconfLoop]:
        """Open the sockets on ``interfaces`` (the constructor waits for the loop thread, hence the pool)."""
        from zeroconf import Zeroconf

        made = deferToThreadPool(reactor, reactor.getThreadPool(), Zeroconf, interfaces=list(interfaces),
                                 use_asyncio=False, **options)
        return made.addCallback(lambda zc: cls(reactor, zc))

    def run(self, make: Callable[[], Awaitable[Any]]) -> Deferred[Any]:
        """Run a coroutine on zeroconf's loop; the Deferred fires on the reactor thread."""

        async def wrapped() -> Any:
            return await make()

        future = asyncio.run_coroutine_threadsafe(wrapped(), self.zeroconf.loop)

        def cancel(_: Deferred[Any]) -> None:
            future.cancel()

        result: Deferred[Any] = Deferred(cancel)

        def finished(done: Any) -> None:
            if result.called:  # cancelled from the reactor side already
                return
            if done.cancelled():
                result.errback(defer.CancelledError())
            elif done.exception() is not None:
                result.errback(Failure(done.exception()))
            else:
                result.callback(done.result())

        future.add_done_callback(lambda done: self._reactor.callFromThread(finished, done))
        return result

    def call_from_loop(self, function: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        """From zeroconf's loop thread: run ``function`` on the reactor thread."""
        self._reactor.callFromThread(function, *args, **kwargs)

    def update_interfaces(self, interfaces: Sequence[str | int]) -> Deferred[None]:
        """Add and drop sockets to match ``interfaces``."""
        return self.run(lambda: self.zeroconf.async_update_interfaces(list(interfaces)))

    def close(self) -> Deferred[None]:
        """Close (blocking until zeroconf's loop thread ends, hence in a pool thread)."""
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self.zeroconf.close)
