"""The one retry delay rule: Twisted's ``backoffPolicy``, doubling, without jitter.

The launcher's restarts (1 s, 2 s, 4 s ... 60 s), dispatch's event-stream reconnects (0.25 s
doubling to 5 s), ``opencoderouter-status --watch``'s (1 s doubling to 5 s) and the other retries
(the agent watcher, the task service, TickTick) and the spacing of answers to wrong credentials
(0.25 s doubling to 8 s) use it. No jitter, so the delays are exactly the
documented ones: each user of it is a single client, not a crowd that could retry in step.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.internet import backoffPolicy


def _no_jitter() -> float:
    return 0.0


def doubling_backoff(initial: float, maximum: float) -> Callable[[int], float]:
    """``attempt → delay``: ``initial`` for attempt 0, doubling with each attempt, never above ``maximum``."""
    return backoffPolicy(initialDelay=initial, maxDelay=maximum, factor=2.0, jitter=_no_jitter)
