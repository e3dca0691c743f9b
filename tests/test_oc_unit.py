"""``oc`` and ``oc-kill`` in memory: the launcher on the fake process reactor, a fake process table."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from opencoderouter import oc
from opencoderouter.oc import ServeProcess, oc_run, stop_processes
from opencoderouter.process_groups import POLL_INTERVAL

from .test_launcher_unit import START, FakeProcessReactor


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """An executable file for --opencode-bin (never run: the reactor is fake)."""
    binary = tmp_path / "bin" / "opencode"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return binary


def test_oc_prints_one_line_per_directory_in_order_and_exits_1_on_any_failure(
    tmp_path: Path, fake_bin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alpha, beta, broken, hung = (tmp_path / name for name in ("alpha", "beta", "broken", "hung"))
    for directory in (alpha, beta, broken, hung):
        directory.mkdir()
    (tmp_path / "notes.txt").write_text("x")
    logs = tmp_path / "logs"
    reactor = FakeProcessReactor()
    running_beta = ServeProcess(pid=3977, uid=os.getuid(), cwd=str(beta), port=START + 5, start_time=1, pgid=3977)
    argv = ["--scan-start", str(START), "--scan-end", str(START + 9), "--opencode-bin", str(fake_bin),
            "--log-dir", str(logs), "--startup-timeout", "3s",
            str(alpha), str(beta), str(tmp_path / "notes.txt"), str(broken), str(alpha), str(hung)]
    status: list[Any] = []
    Deferred.fromCoroutine(oc_run(reactor, argv, serving=lambda uid: [running_beta], port_is_free=lambda port: True,
                                  signal_group=reactor.signal_group)).addBoth(status.append)

    first = reactor.last
    first.listening()
    reactor.advance(POLL_INTERVAL)
    reactor.last.say("Error: fake start-up failure")
    reactor.last.exit(2)
    stuck = reactor.last
    reactor.advance(3)  # the start-up timeout: SIGTERM ...
    reactor.advance(2)  # ... and SIGKILL after oc's grace
    assert [sig for pgid, sig in reactor.group_signals if pgid == stuck.pid][:2] == [signal.SIGTERM, signal.SIGKILL]
    stuck.exit(sig=signal.SIGKILL)
    reactor.advance(POLL_INTERVAL)

    assert status == [1]
    assert capsys.readouterr().out.splitlines() == [
        f"started {alpha} on :{START} (pid {first.pid})",
        f"skipped {beta}: already running on :{START + 5} (pid 3977)",
        f"error: {tmp_path / 'notes.txt'} is not a directory",
        f"failed {broken}: exited with status 2 (Error: fake start-up failure); log {logs / 'broken.log'}",
        f"failed {hung}: not ready within 3s; stopped it; log {logs / 'hung.log'}",
    ]
    # Ports of running servers and ports given out in this run are not given again.
    assert [p.port for p in reactor.processes] == [START, START + 1, START + 2]
    assert first.signals == [] and (first.pid, signal.SIGTERM) not in reactor.group_signals, "left running"


def test_interrupted_oc_stops_the_start_in_progress_and_leaves_started_servers_running(
    tmp_path: Path, fake_bin: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("alpha", "beta", "gamma"):
        (tmp_path / name).mkdir()
    reactor = FakeProcessReactor()
    argv = ["--scan-start", str(START), "--scan-end", str(START + 9), "--opencode-bin", str(fake_bin),
            "--log-dir", str(tmp_path / "logs"), *(str(tmp_path / name) for name in ("alpha", "beta", "gamma"))]
    status: list[Any] = []
    Deferred.fromCoroutine(oc_run(reactor, argv, serving=lambda uid: [], port_is_free=lambda port: True,
                                  signal_group=reactor.signal_group)).addBoth(status.append)
    started = reactor.last
    started.listening()
    reactor.advance(POLL_INTERVAL)
    starting = reactor.last
    assert starting is not started
    (stopping,) = reactor.fire_shutdown_triggers()  # SIGINT: the reactor is stopping
    assert reactor.group_signals == [(starting.pid, signal.SIGTERM)], "only the start in progress"
    stopped: list[Any] = []
    stopping.addBoth(stopped.append)
    starting.exit(sig=signal.SIGTERM)
    assert stopped == [None]
    assert status == [130] and len(reactor.processes) == 2, "gamma is not started any more"
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"failed {tmp_path / 'beta'}: interrupted before it was ready; stopped it; log {tmp_path / 'logs' / 'beta.log'}"
    ]


def test_oc_leaves_no_shutdown_trigger_behind(tmp_path: Path, fake_bin: Path) -> None:
    (tmp_path / "alpha").mkdir()
    reactor = FakeProcessReactor()
    argv = ["--opencode-bin", str(fake_bin), "--log-dir", str(tmp_path / "logs"), str(tmp_path / "alpha")]
    status: list[Any] = []
    Deferred.fromCoroutine(oc_run(reactor, argv, serving=lambda uid: [], port_is_free=lambda port: True,
                                  signal_group=reactor.signal_group)).addBoth(status.append)
    reactor.last.listening()
    reactor.advance(POLL_INTERVAL)
    assert status == [0] and reactor.fire_shutdown_triggers() == []


def test_oc_with_no_free_port_says_which_range(tmp_path: Path, fake_bin: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "alpha").mkdir()
    status: list[Any] = []
    argv = ["--scan-start", str(START), "--scan-end", str(START + 1), "--opencode-bin", str(fake_bin),
            "--log-dir", str(tmp_path / "logs"), str(tmp_path / "alpha")]
    reactor = FakeProcessReactor()
    Deferred.fromCoroutine(oc_run(reactor, argv, serving=lambda uid: [], port_is_free=lambda port: False,
                                  signal_group=reactor.signal_group)).addBoth(status.append)
    assert status == [1]
    assert capsys.readouterr().out == f"failed {tmp_path / 'alpha'}: no free port in {START}-{START + 1}\n"


def test_oc_kill_stops_gently_or_kills_after_the_grace_one_line_each(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gentle = ServeProcess(pid=101, uid=0, cwd="/p/a", port=30000, start_time=1, pgid=101)
    stubborn = ServeProcess(pid=102, uid=0, cwd="/p/b", port=None, start_time=1, pgid=102)
    alive = {101: True, 102: True}
    sent: list[tuple[int, int]] = []

    def signal_process(process: ServeProcess, sig: int) -> None:
        sent.append((process.pid, sig))
        if process.pid == 101 or sig == signal.SIGKILL:
            alive[process.pid] = False

    monkeypatch.setattr(oc, "_same_process", lambda process: alive[process.pid])
    monkeypatch.setattr(oc, "_signal", signal_process)
    clock = Clock()
    status: list[Any] = []
    Deferred.fromCoroutine(stop_processes(clock, [gentle, stubborn], grace=5)).addBoth(status.append)
    assert capsys.readouterr().out == "stopped pid 101 (/p/a on :30000)\n"
    clock.advance(5)
    clock.advance(POLL_INTERVAL)
    assert status == [0]
    assert capsys.readouterr().out == "killed pid 102 (/p/b): it did not exit within 5s of SIGTERM\n"
    assert sent == [(101, signal.SIGTERM), (102, signal.SIGTERM), (102, signal.SIGKILL)]
    assert clock.getDelayedCalls() == []
