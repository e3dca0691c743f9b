"""InFlight: Deferreds remembered until they end, cancelled all at once, optionally bounded in time."""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from opencoderouter.inflight import InFlight


def _cancelled(result: object) -> bool:
    return isinstance(result, Failure) and result.check(CancelledError) is not None


def test_cancel_all_cancels_what_is_still_running_and_leaves_what_ended() -> None:
    inflight = InFlight(Clock())
    ended: Deferred[str] = Deferred()
    running: Deferred[str] = Deferred()
    results: list[object] = []
    assert inflight.track(ended) is ended
    inflight.track(running).addBoth(results.append)
    ended.callback("answer")
    inflight.cancel_all()
    assert ended.result == "answer"
    assert len(results) == 1 and _cancelled(results[0])


def test_a_timeout_fails_it_with_timeout_error_on_the_clock_it_was_given() -> None:
    clock = Clock()
    inflight = InFlight(clock)
    results: list[object] = []
    inflight.track(Deferred(), timeout=5).addBoth(results.append)
    inflight.track(Deferred()).addBoth(results.append)  # no timeout: waits as long as it takes
    clock.advance(4.9)
    assert results == []
    clock.advance(0.1)
    assert len(results) == 1 and isinstance(results[0], Failure) and results[0].check(TimeoutError)
    assert clock.getDelayedCalls() == []
    inflight.cancel_all()
    assert len(results) == 2 and _cancelled(results[1])


def test_a_tracked_deferred_passes_its_result_or_failure_on_unchanged() -> None:
    clock = Clock()
    inflight = InFlight(clock)
    results: list[object] = []
    answered: Deferred[str] = Deferred()
    inflight.track(answered, timeout=5).addBoth(results.append)
    answered.callback("fine")
    assert clock.getDelayedCalls() == []  # the timeout ends with the answer
    failing: Deferred[str] = Deferred()
    inflight.track(failing).addErrback(lambda failure: results.append(failure.value))
    failing.errback(ValueError("broken"))
    assert results[0] == "fine" and isinstance(results[1], ValueError)
