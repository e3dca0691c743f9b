"""The launcher's detached mode (what ``oc`` runs) and ``start``, on the fake process reactor and its Clock."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from twisted.python.failure import Failure

from opencoderouter.launcher import Launcher, LauncherError, LauncherState, StartFailed
from opencoderouter.metrics import INSTANCE_STATES
from opencoderouter.process_groups import POLL_INTERVAL

from .test_launcher_unit import START, FakeProcessReactor, make_launcher


def detached(tmp_path: Path, names: tuple[str, ...] = (), **settings: Any) -> tuple[Launcher, FakeProcessReactor, Path]:
    """A started detached launcher writing logs to ``tmp_path/logs`` (no directories given up front)."""
    log_dir = tmp_path / "logs"
    log_dir.mkdir()
    launcher, reactor, _ = make_launcher(tmp_path, names=names, detached_log_dir=str(log_dir), **settings)
    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir(exist_ok=True)
    launcher.startService()
    return launcher, reactor, log_dir


def outcome(d: Any) -> list[Any]:
    """The results (an Instance, or a Failure) ``d`` has fired with so far."""
    results: list[Any] = []
    d.addBoth(results.append)
    return results


def test_detached_child_has_its_own_session_no_parent_death_signal_and_writes_to_its_log(tmp_path: Path) -> None:
    launcher, reactor, log_dir = detached(tmp_path, reaper=True)
    started = outcome(launcher.start(str(tmp_path / "alpha")))
    child = reactor.last
    assert len(reactor.processes) == 1, "no reaper: a detached child is meant to outlive us"
    # The same wrapper (setsid, then exec) with "-" for the parent: no PR_SET_PDEATHSIG.
    assert child.args[-7:] == ["-", "/usr/bin/opencode-test", "serve", "--hostname", "127.0.0.1", "--port", str(START)]
    assert "setsid" in child.args[4]
    assert child.child_fds is not None and child.child_fds[1] == child.child_fds[2]
    assert child.out_fd is not None, "stdout and stderr go to a file, not a pipe of ours"
    child.say("Performing one time database migration...")
    child.listening()
    assert started == [], "the log is read on the next look, not before"
    reactor.advance(POLL_INTERVAL)
    (instance,) = started
    assert (instance.state, instance.port, instance.pid) == (LauncherState.RUNNING, START, child.pid)
    log_text = (log_dir / "alpha.log").read_text()
    assert log_text.startswith(f"--- opencode serve --hostname 127.0.0.1 --port {START} in {tmp_path / 'alpha'}\n")
    assert log_text.endswith(f"opencode server listening on http://127.0.0.1:{START}\n")
    assert instance.log_path == str(log_dir / "alpha.log")
    assert not reactor.getDelayedCalls(), "once ready, its log is not read any more"


def test_a_second_run_appends_to_the_same_log(tmp_path: Path) -> None:
    launcher, reactor, log_dir = detached(tmp_path)
    (log_dir / "alpha.log").write_text("an earlier run\n")
    outcome(launcher.start(str(tmp_path / "alpha")))
    reactor.last.listening()
    reactor.advance(POLL_INTERVAL)
    assert (log_dir / "alpha.log").read_text().splitlines()[0] == "an earlier run"


def test_a_start_that_exits_fails_with_its_exit_and_last_line_and_is_not_restarted(tmp_path: Path) -> None:
    launcher, reactor, _ = detached(tmp_path)
    started = outcome(launcher.start(str(tmp_path / "alpha")))
    reactor.last.say("Error: fake start-up failure")
    reactor.last.say("")
    reactor.last.exit(2)  # its last words are read at its exit, before the next look
    (failure,) = started
    assert isinstance(failure, Failure)
    failed = failure.value
    assert isinstance(failed, StartFailed)
    assert (failed.exit_text, failed.last_line, failed.timed_out) == (
        "exited with status 2", "Error: fake start-up failure", False)
    assert failed.reason == "exited with status 2 before it was ready"
    assert failed.instance.state is LauncherState.FAILED
    reactor.advance(600)
    assert len(reactor.processes) == 1, "nobody stays to restart a detached child"


def test_serve_error_in_the_log_retries_the_next_port_within_the_same_start(tmp_path: Path) -> None:
    launcher, reactor, _ = detached(tmp_path)
    started = outcome(launcher.start(str(tmp_path / "alpha")))
    reactor.last.say("ServeError")
    reactor.last.exit(1)
    assert started == [] and reactor.last.port == START + 1
    reactor.last.listening()
    reactor.advance(POLL_INTERVAL)
    assert started[0].port == START + 1 and started[0].restarts == 0


def test_a_start_that_times_out_fails_only_once_its_whole_group_is_gone(tmp_path: Path) -> None:
    launcher, reactor, _ = detached(tmp_path, startup_timeout=3, stop_timeout=2)
    started = outcome(launcher.start(str(tmp_path / "alpha")))
    hung = reactor.last
    reactor.advance(3)
    assert (hung.pid, signal.SIGTERM) in reactor.group_signals
    reactor.advance(2)
    assert (hung.pid, signal.SIGKILL) in reactor.group_signals
    hung.exit(sig=signal.SIGKILL, group_left=True)  # a grandchild is still there
    assert started == []
    reactor.groups.discard(hung.pid)
    reactor.advance(POLL_INTERVAL)
    (failure,) = started
    assert failure.check(StartFailed) and failure.value.timed_out
    assert failure.value.reason == "no listening line within 3s"


def test_stop_service_leaves_running_detached_children_alone(tmp_path: Path) -> None:
    launcher, reactor, _ = detached(tmp_path)
    outcome(launcher.start(str(tmp_path / "alpha")))
    reactor.last.listening()
    reactor.advance(POLL_INTERVAL)
    stopped = outcome(launcher.stopService())
    assert stopped == [None]
    assert reactor.group_signals == [] and reactor.last.signals == []


def test_starts_wait_for_each_other_and_an_already_running_directory_answers_at_once(tmp_path: Path) -> None:
    launcher, reactor, _ = detached(tmp_path)
    first = outcome(launcher.start(str(tmp_path / "alpha")))
    second = outcome(launcher.start(str(tmp_path / "beta")))
    assert len(reactor.processes) == 1, "one start at a time"
    reactor.last.listening()
    reactor.advance(POLL_INTERVAL)
    assert first and not second and len(reactor.processes) == 2
    again = outcome(launcher.start(str(tmp_path / "alpha")))
    assert again == first, "already running: nothing is started"
    reactor.last.listening()
    reactor.advance(POLL_INTERVAL)
    assert second[0].port == START + 1


def test_start_refuses_what_is_not_a_directory_with_the_configs_sentence(tmp_path: Path) -> None:
    launcher, reactor, _ = detached(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    (failure,) = outcome(launcher.start(str(tmp_path / "notes.txt")))
    assert failure.check(LauncherError)
    assert str(failure.value) == f"project directory {tmp_path / 'notes.txt'} is not a directory"
    assert reactor.processes == []


def test_an_unwritable_log_directory_is_a_failed_start_that_says_so(tmp_path: Path) -> None:
    launcher, reactor, log_dir = detached(tmp_path)
    os.rmdir(log_dir)
    (failure,) = outcome(launcher.start(str(tmp_path / "alpha")))
    assert failure.check(StartFailed) and failure.value.exit_text is None
    assert failure.value.reason.startswith(f"could not write its log {log_dir / 'alpha.log'}:")
    assert reactor.processes == []


def test_stopping_a_start_in_progress_fails_it(tmp_path: Path) -> None:
    launcher, reactor, _ = detached(tmp_path)
    started = outcome(launcher.start(str(tmp_path / "alpha")))
    queued = outcome(launcher.start(str(tmp_path / "beta")))
    launcher.stopService()
    assert queued[0].check(StartFailed) and queued[0].value.reason == "stopped before it was started"
    reactor.last.exit(sig=signal.SIGTERM)
    assert started[0].check(StartFailed) and started[0].value.reason == "stopped before it was ready"
    assert started[0].value.stopped and queued[0].value.stopped, "stopped, not failed on their own"


def test_states_are_one_list_shown_as_their_plain_names() -> None:
    assert INSTANCE_STATES == ("starting", "running", "restarting", "failed", "stopped", "adopted")
    assert [str(state) for state in LauncherState] == list(INSTANCE_STATES)
    assert f"{LauncherState.RUNNING}" == "running" and LauncherState("failed") is LauncherState.FAILED
    assert json.dumps({"state": LauncherState.ADOPTED}) == '{"state": "adopted"}'


def test_without_a_registry_slugs_follow_the_registrys_rule(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, names=("projects/api", "Alpha Beta"))
    launcher.startService()
    assert [i.slug for i in launcher.instances()] == ["api-projects", "alpha-beta"], "api is the router's own"
