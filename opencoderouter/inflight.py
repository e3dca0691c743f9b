"""Deferreds still running (requests, mostly), remembered so that stopping can cancel them all at once.

:class:`InFlight` is what a client keeps beside its HTTP client: each request goes through
:meth:`InFlight.track` (optionally bounded in time on the clock it was given), and
:meth:`InFlight.cancel_all` cancels every one not yet ended, so a stop never waits for a slow answer.
"""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

_T = TypeVar("_T")


class InFlight:
    """The Deferreds tracked and not yet ended; ``clock`` measures their timeouts."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._running: set[Deferred[Any]] = set()

    def track(self, d: Deferred[_T], timeout: float | None = None) -> Deferred[_T]:
        """Remember ``d`` until it ends; with ``timeout``, cancel it after that many seconds (it fails with
        ``twisted.internet.defer.TimeoutError``). Returns ``d``."""
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        self._running.add(d)

        def forget(result: object) -> object:
            self._running.discard(d)
            return result

        d.addBoth(forget)  # passes the result on unchanged: ``d`` still fires with a _T
        return d

    def cancel_all(self) -> None:
        """Cancel every tracked Deferred still running."""
        for d in list(self._running):
            d.cancel()
