"""The one retry delay rule (launcher restarts, dispatch reconnects)."""

from __future__ import annotations

from opencoderouter.backoff import doubling_backoff


def test_backoff_doubles_without_jitter_up_to_its_maximum() -> None:
    restarts, reconnects = doubling_backoff(1.0, 60.0), doubling_backoff(0.25, 5.0)
    assert [restarts(n) for n in range(8)] == [1, 2, 4, 8, 16, 32, 60, 60]
    assert [reconnects(n) for n in range(7)] == [0.25, 0.5, 1, 2, 4, 5, 5]
