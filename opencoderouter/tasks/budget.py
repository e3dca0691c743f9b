"""A client-side request budget: at most N requests in any window of W seconds, for several windows at once."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from twisted.internet.interfaces import IReactorTime

#: TickTick's limits as clients report them (not in the official doc): 100 a minute, 300 per 5 minutes.
TICKTICK_WINDOWS = ((100, 60.0), (300, 300.0))


class RateBudget:
    """Sliding windows: a request may go when fewer than ``limit`` went in the last ``window`` seconds, for each.

    Each window is counted ``margin`` seconds longer than it is: the server counts requests when
    they arrive, and two requests sent exactly a window apart may arrive closer than that.
    """

    def __init__(self, clock: IReactorTime, windows: Iterable[tuple[int, float]] = TICKTICK_WINDOWS,
                 margin: float = 2.0) -> None:
        self.clock = clock
        self.windows = tuple(windows)
        self.margin = margin
        if not self.windows or any(limit < 1 or window <= 0 for limit, window in self.windows) or margin < 0:
            raise ValueError("every budget window needs a limit of at least 1 and a length above zero")
        self._sent: deque[float] = deque(maxlen=max(limit for limit, _ in self.windows))

    def wait_time(self, spare: int = 0) -> float:
        """Seconds until the next request may go (0: now) and still leave ``spare`` requests in every window."""
        now = self.clock.seconds()
        wait = 0.0
        sent = list(self._sent)
        for limit, window in self.windows:
            allowed = max(1, limit - spare)
            if len(sent) >= allowed:
                # The allowed-th most recent request must have left the window.
                wait = max(wait, sent[-allowed] + window + self.margin - now)
        return max(wait, 0.0)

    def take(self) -> None:
        """Count one request sent now (call only when ``wait_time()`` is 0)."""
        self._sent.append(self.clock.seconds())
