"""Stopping a process group (SIGTERM, looks, SIGKILL after the grace), on a Clock."""

from __future__ import annotations

import signal
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from opencoderouter.process_groups import KILL_GIVE_UP, POLL_INTERVAL, stop_group, wrapped_command


class Group:
    """A fake process group: records signals; gone when the test says, or at the signal it dies of."""

    def __init__(self, dies_of: int | None = signal.SIGTERM) -> None:
        self.sent: list[int] = []
        self.alive = True
        self.looks = 0
        self.dies_of = dies_of

    def send(self, sig: int) -> None:
        self.sent.append(sig)
        if sig == self.dies_of:
            self.alive = False

    def is_alive(self) -> bool:
        self.looks += 1
        return self.alive


def fired(d: Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def test_a_group_that_exits_on_sigterm_is_stopped_gently_and_leaves_no_timer() -> None:
    clock, group = Clock(), Group()
    done = fired(stop_group(clock, group.send, group.is_alive, grace=5))
    assert done == [True] and group.sent == [signal.SIGTERM]
    assert clock.getDelayedCalls() == []


def test_a_group_that_ignores_sigterm_gets_sigkill_after_the_grace_and_is_waited_for() -> None:
    clock, group = Clock(), Group(dies_of=None)
    done = fired(stop_group(clock, group.send, group.is_alive, grace=5))
    clock.advance(5 - POLL_INTERVAL)
    assert group.sent == [signal.SIGTERM] and done == []
    clock.advance(POLL_INTERVAL)
    assert group.sent[:2] == [signal.SIGTERM, signal.SIGKILL] and done == []
    kills = group.sent.count(signal.SIGKILL)
    clock.advance(POLL_INTERVAL)
    assert group.sent.count(signal.SIGKILL) == kills + 1, "repeated at each look, for a process forked late"
    group.alive = False
    clock.advance(POLL_INTERVAL)
    assert done == [False] and clock.getDelayedCalls() == []


def test_with_a_leader_of_ours_the_first_look_waits_for_its_exit() -> None:
    clock, group = Clock(), Group(dies_of=None)
    exited: Deferred[None] = Deferred()
    done = fired(stop_group(clock, group.send, group.is_alive, grace=5, exited=exited))
    clock.advance(1)
    assert group.looks == 0, "no polling while the leader runs: its exit is an event"
    group.alive = False
    exited.callback(None)
    assert done == [True] and group.looks == 1 and clock.getDelayedCalls() == []


def test_a_group_that_survives_sigkill_is_given_up_on() -> None:
    clock, group = Clock(), Group(dies_of=None)
    before_kill: list[str] = []
    done = fired(stop_group(clock, group.send, group.is_alive, grace=1, before_kill=lambda: before_kill.append("!")))
    clock.pump([POLL_INTERVAL] * int((1 + KILL_GIVE_UP + 1) / POLL_INTERVAL))
    assert before_kill == ["!"] and done == [False] and clock.getDelayedCalls() == []


def test_a_detached_child_is_wrapped_without_the_parent_death_signal() -> None:
    _, attached = wrapped_command("opencode", ["serve"], 4242)
    _, detached = wrapped_command("opencode", ["serve"], None)
    assert attached[5:] == ["4242", "opencode", "serve"] and detached[5:] == ["-", "opencode", "serve"]
    assert attached[4] == detached[4], "one wrapper"
