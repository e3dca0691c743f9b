"""Periodic jobs: one small helper for every loop the router runs (scans, mDNS refresh, heartbeats).

A periodic job catches and logs its own errors, so one exception never stops the loop for good
(``LoopingCall`` stops at the first failure), and a job still running when the next tick comes is
not started a second time. ``stopService`` fires once the job in progress (if any) has ended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger()


def logging_errors(job: Callable[[], Any], what: str, logger: Logger = log) -> Callable[[], Deferred[None]]:
    """``job`` wrapped so that an exception or a failed Deferred is logged (as ``what``) and swallowed."""

    def run() -> Deferred[None]:
        result: Deferred[Any] = defer.maybeDeferred(job)
        result.addErrback(lambda failure: logger.failure("{what} failed", failure, what=what))
        return result.addCallback(lambda _: None)

    return run


class PeriodicService(TimerService):
    """Runs ``job`` every ``interval`` seconds on ``clock`` (first run at start), logging its errors."""

    def __init__(self, interval: float, job: Callable[[], Any], what: str, clock: IReactorTime,
                 logger: Logger = log) -> None:
        super().__init__(interval, logging_errors(job, what, logger))
        self.clock = clock
