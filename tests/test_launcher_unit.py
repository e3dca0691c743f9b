"""The launcher's supervision logic, driven by a fake process reactor and a Clock (no processes)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from opencoderouter.launcher import Launcher, LauncherError, LauncherSettings, LauncherState
from opencoderouter.registry import Registry, Sighting

STARTING, RUNNING, RESTARTING, FAILED, STOPPED, ADOPTED = (
    LauncherState.STARTING, LauncherState.RUNNING, LauncherState.RESTARTING, LauncherState.FAILED,
    LauncherState.STOPPED, LauncherState.ADOPTED,
)
START = 30100


class FakeProcess:
    """The transport of a fake child: records signals, ends when the test says.

    Given a file descriptor for its stdout (``childFDs``, a detached child), it writes its output
    there, as a real child would, instead of handing it to the protocol.
    """

    def __init__(self, reactor: FakeProcessReactor, protocol: Any, executable: str, args: list[str],
                 env: dict[str, str], path: str, pid: int, child_fds: dict[int, Any] | None = None) -> None:
        self.reactor, self.proto = reactor, protocol
        self.executable, self.args, self.env, self.path, self.pid = executable, args, env, path, pid
        self.signals: list[int] = []
        self.stdin_closed = False
        self.written = b""
        self.child_fds = child_fds
        # The child's own copy of its stdout, as fork/exec would give it.
        self.out_fd = os.dup(child_fds[1]) if child_fds and isinstance(child_fds.get(1), int) else None

    def write(self, data: bytes) -> None:
        self.written += data

    @property
    def port(self) -> int:
        return int(self.args[self.args.index("--port") + 1])

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, sig: Any) -> None:
        self.signals.append(sig)

    def say(self, text: str, stream: str = "out") -> None:
        data = text.encode() + b"\n"
        if self.out_fd is not None:
            os.write(self.out_fd, data)
        elif stream == "out":
            self.proto.outReceived(data)
        else:
            self.proto.errReceived(data)

    def listening(self, port: int | None = None) -> None:
        self.say(f"opencode server listening on http://127.0.0.1:{port or self.port}")

    def exit(self, code: int = 0, sig: int | None = None, group_left: bool = False) -> None:
        if self.out_fd is not None:
            os.close(self.out_fd)
            self.out_fd = None
        if not group_left:
            self.reactor.groups.discard(self.pid)
        if code == 0 and sig is None:
            reason = Failure(ProcessDone(0))
        else:
            reason = Failure(ProcessTerminated(code if sig is None else None, sig))
        # As Twisted does: exited first, ended once every pipe closed too.
        self.proto.processExited(reason)
        self.proto.processEnded(reason)


class FakeProcessReactor(MemoryReactorClock):
    """A MemoryReactorClock that also 'spawns' processes (as txtorcon's tests do) and owns their groups."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.groups: set[int] = set()
        self.group_signals: list[tuple[int, int]] = []
        self._next_pid = 1000

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str] | None = None,
                     path: str | None = None, uid: Any = None, gid: Any = None, usePTY: bool = False,
                     childFDs: Any = None) -> FakeProcess:
        self._next_pid += 1
        process = FakeProcess(self, protocol, executable, list(args), dict(env or {}), path or "", self._next_pid,
                              childFDs)
        self.processes.append(process)
        self.groups.add(process.pid)
        protocol.makeConnection(process)
        return process

    def signal_group(self, pgid: int, sig: int) -> bool:
        self.group_signals.append((pgid, sig))
        return pgid in self.groups

    def addSystemEventTrigger(self, phase: str, eventType: str, callable: Any, *args: Any, **kw: Any) -> Any:
        super().addSystemEventTrigger(phase, eventType, callable, *args, **kw)
        return phase, eventType, (callable, args, kw)

    def removeSystemEventTrigger(self, triggerID: Any) -> None:
        phase, event_type, entry = triggerID
        self.triggers[phase][event_type].remove(entry)

    def fire_shutdown_triggers(self) -> list[Any]:
        """Run the 'before shutdown' triggers, as the reactor does when it is told to stop."""
        return [f(*args, **kw) for f, args, kw in self.triggers.get("before", {}).get("shutdown", [])]

    @property
    def last(self) -> FakeProcess:
        return self.processes[-1]


def make_launcher(tmp_path: Path, names: tuple[str, ...] = ("alpha",), served: dict[str, int] | None = None,
                  taken: frozenset[int] | set[int] = frozenset(), reactor: FakeProcessReactor | None = None,
                  slug_for: Any = None, **settings: Any) -> tuple[Launcher, FakeProcessReactor, list[str]]:
    reactor = reactor if reactor is not None else FakeProcessReactor()
    directories = []
    for name in names:
        directory = tmp_path / name
        directory.mkdir(parents=True, exist_ok=True)
        directories.append(str(directory))
    served = served or {}
    launcher = Launcher(
        directories,
        LauncherSettings(opencode_bin="/usr/bin/opencode-test", port_range=(START, START + 9),
                         **{k: v for k, v in settings.items() if k != "reaper"}),
        reactor,
        find_served=lambda path: succeed(served.get(path)),
        port_is_free=lambda port: port not in taken,
        signal_group=reactor.signal_group,
        environ={"PATH": "/usr/bin", "HOME": "/home/x", "FROM_ROUTER": "1"},
        parent_pid=4242,
        reaper=settings.pop("reaper", False),
        slug_for=slug_for,
    )
    return launcher, reactor, directories


def test_child_runs_opencode_serve_in_its_directory_with_the_full_environment(tmp_path: Path) -> None:
    launcher, reactor, (directory,) = make_launcher(tmp_path, extra_env={"EXTRA": "yes"})
    launcher.startService()
    child = reactor.last
    assert child.path == directory
    assert child.env == {"PATH": "/usr/bin", "HOME": "/home/x", "FROM_ROUTER": "1", "EXTRA": "yes"}
    # The exec wrapper (setsid + parent-death signal) runs opencode with the router's pid to check.
    assert child.args[-7:] == ["4242", "/usr/bin/opencode-test", "serve", "--hostname", "127.0.0.1", "--port",
                               str(START)]
    assert "prctl" in child.args[4] and "setsid" in child.args[4]
    assert child.stdin_closed
    (instance,) = launcher.instances()
    assert (instance.state, instance.pid, instance.port, instance.slug) == (STARTING, child.pid, START, "alpha")


def test_listening_line_makes_the_instance_running_on_the_port_it_names(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path)
    launcher.startService()
    reactor.last.say("Warning: OPENCODE_SERVER_PASSWORD is not set; server is unsecured.")
    reactor.last.listening(START + 5)
    (instance,) = launcher.instances()
    assert (instance.state, instance.port) == (RUNNING, START + 5)
    assert instance.lines[-1] == f"opencode server listening on http://127.0.0.1:{START + 5}"
    # Readiness cancels the start-up timeout.
    reactor.advance(31)
    assert instance.state == RUNNING and reactor.last.signals == [] and reactor.group_signals == []


def test_ports_in_use_and_other_instances_ports_are_skipped(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, names=("a", "b"), taken={START, START + 1})
    launcher.startService()
    reactor.last.listening()
    assert [p.port for p in reactor.processes] == [START + 2, START + 3]


def test_taken_port_is_retried_with_the_next_free_port(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path)
    launcher.startService()
    first = reactor.last
    # Lost the race for the port: OpenCode prints ServeError and exits 1.
    first.say("Error: Unexpected error", stream="err")
    first.say("ServeError", stream="err")
    first.exit(1)
    assert len(reactor.processes) == 2, "retried at once, no backoff"
    assert reactor.last.port == START + 1
    reactor.last.listening()
    (instance,) = launcher.instances()
    assert (instance.state, instance.port, instance.restarts) == (RUNNING, START + 1, 0)
    assert list(instance.failures) == []


def test_port_retries_are_bounded(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, port_attempts=3)
    launcher.startService()
    for _ in range(3):
        reactor.last.say("ServeError", stream="err")
        reactor.last.exit(1)
    (instance,) = launcher.instances()
    assert len(reactor.processes) == 3
    assert instance.state == RESTARTING and "before it was ready" in instance.reason


def test_crash_is_restarted_with_exponential_backoff(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, max_failures=100, failure_window=1000)
    launcher.startService()
    (instance,) = launcher.instances()
    delays = []
    for expected in (1, 2, 4, 8, 16, 32, 60, 60):
        reactor.last.listening()
        reactor.advance(0.5)
        reactor.last.exit(3)
        assert instance.state == RESTARTING and instance.last_exit == "exited with status 3"
        spawned = len(reactor.processes)
        reactor.advance(expected - 0.01)
        assert len(reactor.processes) == spawned, f"restarted before {expected}s"
        reactor.advance(0.01)
        assert len(reactor.processes) == spawned + 1
        delays.append(expected)
    assert instance.restarts == 8 and instance.state == STARTING


def test_crash_loop_ends_in_failed_with_the_reason(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path)
    launcher.startService()
    (instance,) = launcher.instances()
    for _ in range(4):
        reactor.last.exit(2)
        assert instance.state == RESTARTING
        reactor.advance(instance.delay)
    reactor.last.exit(2)
    assert instance.state == FAILED
    assert "5 failures within 60s" in instance.reason and "exited with status 2 before it was ready" in instance.reason
    spawned = len(reactor.processes)
    reactor.advance(600)
    assert len(reactor.processes) == spawned, "a failed instance is left stopped"


def test_backoff_and_failure_count_reset_after_a_long_run(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path)
    launcher.startService()
    (instance,) = launcher.instances()
    for _ in range(3):
        reactor.last.exit(1)
        reactor.advance(instance.delay)
    assert instance.delay == 4
    reactor.last.listening()
    reactor.advance(61)
    reactor.last.exit(1, sig=None)
    assert instance.delay == 1 and len(instance.failures) == 1 and instance.state == RESTARTING


def test_startup_timeout_stops_the_child_and_counts_as_a_failed_start(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, startup_timeout=30)
    launcher.startService()
    child = reactor.last
    reactor.advance(29.9)
    assert reactor.group_signals == []
    reactor.advance(0.1)
    assert reactor.group_signals == [(child.pid, signal.SIGTERM)]
    child.exit(sig=signal.SIGTERM)
    (instance,) = launcher.instances()
    assert instance.state == RESTARTING
    assert instance.reason == "no listening line within 30s"
    assert instance.last_exit == "killed by SIGTERM"


def test_stop_sends_sigterm_then_sigkill_and_fires_only_when_the_group_is_gone(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, stop_timeout=5)
    launcher.startService()
    child = reactor.last
    child.listening()
    stopped: list[object] = []
    launcher.stopService().addBoth(stopped.append)
    assert reactor.group_signals == [(child.pid, signal.SIGTERM)]
    reactor.advance(4.9)
    assert stopped == [] and (child.pid, signal.SIGKILL) not in reactor.group_signals
    reactor.advance(0.1)
    assert (child.pid, signal.SIGKILL) in reactor.group_signals
    # The leader dies, a grandchild in its group lingers a moment: still not stopped.
    child.exit(sig=signal.SIGKILL, group_left=True)
    reactor.advance(0.05)
    assert stopped == []
    reactor.groups.discard(child.pid)
    reactor.advance(0.05)
    assert stopped == [None]
    (instance,) = launcher.instances()
    assert (instance.state, instance.pid, instance.last_exit) == (STOPPED, None, "killed by SIGKILL")
    reactor.advance(60)
    assert len(reactor.processes) == 1, "no restart after a stop"


def test_stop_fires_at_once_when_the_group_exits_on_sigterm(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, names=("a", "b"))
    launcher.startService()
    reactor.last.listening()
    stopped: list[object] = []
    launcher.stopService().addBoth(stopped.append)
    reactor.processes[0].exit(sig=signal.SIGTERM)
    assert stopped == []
    reactor.processes[1].exit(0)
    assert stopped == [None]
    assert all(sig != signal.SIGKILL for _, sig in reactor.group_signals)
    assert not reactor.getDelayedCalls(), "no timer left behind"


def test_stop_during_backoff_cancels_the_restart(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path)
    launcher.startService()
    reactor.last.exit(1)
    stopped: list[object] = []
    launcher.stopService().addBoth(stopped.append)
    assert stopped == [None]
    reactor.advance(120)
    assert len(reactor.processes) == 1
    assert launcher.instances()[0].state == STOPPED


def test_already_served_directory_is_adopted_not_started(tmp_path: Path) -> None:
    directory = os.path.realpath(tmp_path / "alpha")
    launcher, reactor, _ = make_launcher(tmp_path, served={directory: 30555})
    launcher.startService()
    assert reactor.processes == []
    (instance,) = launcher.instances()
    assert (instance.state, instance.port, instance.pid) == (ADOPTED, 30555, None)
    stopped: list[object] = []
    launcher.stopService().addBoth(stopped.append)
    assert stopped == [None] and reactor.group_signals == [], "an adopted server is not ours to stop"


def test_leftover_group_of_a_crashed_leader_is_terminated(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, stop_timeout=5)
    launcher.startService()
    child = reactor.last
    child.listening()
    child.exit(1, group_left=True)
    assert (child.pid, signal.SIGTERM) in reactor.group_signals
    reactor.advance(5)
    assert (child.pid, signal.SIGKILL) in reactor.group_signals


def test_output_lines_are_kept_up_to_the_limit(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, log_lines=3)
    launcher.startService()
    child = reactor.last
    child.proto.outReceived(b"one\ntw")
    child.proto.outReceived(b"o\nthree\n")
    child.proto.errReceived(b"four\n")
    child.proto.outReceived(b"x" * 20000)  # no newline: cut, not buffered forever
    (instance,) = launcher.instances()
    assert list(instance.lines)[:2] == ["three", "four"]
    assert len(instance.lines[-1]) == 8192


def test_same_named_directories_get_distinct_slugs(tmp_path: Path) -> None:
    # The slugs are the registry's: once the scanner found each server, same-named directories differ.
    reactor = FakeProcessReactor()
    registry = Registry(reactor, stale_after=30)
    launcher, reactor, _ = make_launcher(tmp_path, names=("one/app", "two/app", "api"), reactor=reactor,
                                         slug_for=registry.slug_for_path)
    launcher.startService()
    for instance in launcher.instances():
        reactor.last.listening()
        assert instance.port is not None
        registry.record(Sighting(instance.port, instance.directory, "1"))
    assert [i.slug for i in launcher.instances()] == ["app", "app-two", "api-" + slug_of(tmp_path)]


def slug_of(path: Path) -> str:
    from opencoderouter.registry import slugify

    return slugify(path.name)


def test_no_free_port_is_a_failed_start_with_the_range_named(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, taken=set(range(START, START + 10)))
    launcher.startService()
    (instance,) = launcher.instances()
    assert reactor.processes == []
    assert instance.state == RESTARTING and instance.reason == f"no free port in {START}-{START + 9}"


def test_add_refuses_a_file_and_a_missing_directory(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path)
    launcher.startService()
    (tmp_path / "file").write_text("x")
    for bad, words in ((tmp_path / "file", "is not a directory"), (tmp_path / "nope", "does not exist")):
        failures: list[Failure] = []
        launcher.add(str(bad)).addErrback(failures.append)
        assert failures and failures[0].check(LauncherError) and words in str(failures[0].value)


def test_add_without_an_opencode_binary_says_so(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, names=())
    launcher.settings.opencode_bin = None
    launcher.startService()
    failures: list[Failure] = []
    launcher.add(str(tmp_path)).addErrback(failures.append)
    assert "--opencode-bin" in str(failures[0].value)


def test_stop_instance_then_add_starts_it_again(tmp_path: Path) -> None:
    launcher, reactor, (directory,) = make_launcher(tmp_path)
    launcher.startService()
    reactor.last.listening()
    done: list[Any] = []
    launcher.stop_instance("alpha").addCallback(done.append)
    reactor.last.exit(sig=signal.SIGTERM)
    assert done and done[0].state == STOPPED
    added: list[Any] = []
    launcher.add(directory).addCallback(added.append)
    assert added[0].state == STARTING and len(reactor.processes) == 2
    failures: list[Failure] = []
    launcher.stop_instance("nope").addErrback(failures.append)
    assert failures[0].check(KeyError)


def test_restart_reuses_the_previous_port_even_though_the_registry_remembers_it(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path)
    launcher._used_ports = lambda: [START]  # the registry still lists the crashed server's port
    launcher.startService()
    assert reactor.last.port == START + 1
    reactor.last.listening()
    reactor.last.exit(1)
    reactor.advance(1)
    assert reactor.last.port == START + 1


def test_a_directory_given_twice_is_started_once(tmp_path: Path) -> None:
    launcher, reactor, (directory,) = make_launcher(tmp_path)
    launcher.directories.append(directory)
    launcher.startService()
    assert len(reactor.processes) == 1


def test_the_reaper_is_told_each_group_and_stops_last(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, names=("a", "b"), reaper=True)
    launcher.startService()
    reaper, first = reactor.processes
    first.listening()
    second = reactor.last
    assert "killpg" in reaper.args[4] and reaper.args[-1] == "5.0"
    assert reaper.written == f"+ {first.pid}\n+ {second.pid}\n".encode()
    first.exit(1)  # crashed, its group is gone: the reaper forgets it
    assert reaper.written.endswith(f"- {first.pid}\n".encode())
    stopped: list[object] = []
    launcher.stopService().addBoth(stopped.append)
    second.exit(sig=signal.SIGTERM)
    assert reaper.written.endswith(f"- {second.pid}\n".encode())
    assert reaper.stdin_closed and stopped == [], "stopService waits for the reaper to exit"
    reaper.exit(0)
    assert stopped == [None]


def test_an_adopted_server_that_disappears_is_replaced_by_our_own(tmp_path: Path) -> None:
    from opencoderouter.registry import Backend

    directory = os.path.realpath(tmp_path / "alpha")
    served = {directory: 30555}
    launcher, reactor, _ = make_launcher(tmp_path, served=served)
    launcher.startService()
    (instance,) = launcher.instances()
    assert instance.state == ADOPTED and reactor.processes == []
    del served[directory]
    launcher.removed(Backend("elsewhere", "/elsewhere", 30556, "1", None, 0, 0))
    assert reactor.processes == [], "another project's removal changes nothing"
    launcher.removed(Backend("alpha", directory, 30555, "1", None, 0, 0))
    assert instance.state == STARTING and reactor.last.path == directory


def test_only_the_routers_own_users_servers_are_adopted() -> None:
    from opencoderouter.launcher import served_port_finder
    from opencoderouter.listeners import Listener, username_for_uid
    from opencoderouter.registry import Registry, Sighting

    clock = MemoryReactorClock()
    registry = Registry(clock, stale_after=30)
    me, other = os.getuid(), os.getuid() + 4242
    serving = {30001: "/p/theirs-and-mine", 30002: "/p/theirs-and-mine", 30003: "/p/only-theirs", 30004: "/p/known"}

    class Prober:
        def probe(self, port: int, owner: str | None = None, address: str | None = None) -> Any:
            return succeed(Sighting(port, serving[port], "1"))

    listeners = {30001: Listener(30001, other, 1), 30002: Listener(30002, me, 2), 30003: Listener(30003, other, 3)}
    find = served_port_finder(registry, Prober(), (30000, 30010), lambda start, end: listeners, uid=me)
    results: list[Any] = []
    for path in ("/p/theirs-and-mine", "/p/only-theirs", "/p/nothing"):
        find(path).addCallback(results.append)
    registry.record(Sighting(30004, "/p/known", "1", username_for_uid(me)))
    registry.record(Sighting(30005, "/p/known-theirs", "1", "someone-else"))
    find("/p/known").addCallback(results.append)
    find("/p/known-theirs").addCallback(results.append)
    assert results == [30002, None, None, 30004, None]


# -- the start gate: one child starts at a time (concurrent starts race on OpenCode's shared SQLite migration) --


def test_children_start_one_at_a_time_each_after_the_previous_listening_line(tmp_path: Path) -> None:
    launcher, reactor, (first_dir, second_dir, third_dir) = make_launcher(tmp_path, names=("a", "b", "c"))
    launcher.startService()
    assert [p.path for p in reactor.processes] == [first_dir]
    a, b, c = launcher.instances()
    assert (b.state, b.pid, c.state, c.pid) == (STARTING, None, STARTING, None), "queued, not spawned"
    reactor.advance(29)  # any time short of the start-up timeout: still waiting
    reactor.last.say("Performing one time database migration...")
    assert len(reactor.processes) == 1
    reactor.last.listening()
    assert [p.path for p in reactor.processes] == [first_dir, second_dir]
    assert a.state == RUNNING and b.pid == reactor.last.pid
    reactor.last.listening()
    assert [p.path for p in reactor.processes] == [first_dir, second_dir, third_dir]
    reactor.last.listening()
    assert [i.state for i in launcher.instances()] == [RUNNING] * 3


def test_a_start_that_fails_lets_the_next_one_go_and_its_restart_queues_behind(tmp_path: Path) -> None:
    launcher, reactor, (first_dir, second_dir) = make_launcher(tmp_path, names=("a", "b"))
    launcher.startService()
    reactor.last.say("Error: Failed to run the query 'CREATE TABLE `workspace`'", stream="err")
    reactor.last.exit(1)
    assert [p.path for p in reactor.processes] == [first_dir, second_dir], "the failed start freed the gate"
    a, _ = launcher.instances()
    assert a.state == RESTARTING
    reactor.advance(a.delay)
    assert a.state == STARTING and len(reactor.processes) == 2, "the restart waits for b's start"
    reactor.last.listening()
    assert [p.path for p in reactor.processes] == [first_dir, second_dir, first_dir]
    reactor.last.listening()
    assert a.state == RUNNING and a.restarts == 1


def test_a_start_that_times_out_lets_the_next_one_go(tmp_path: Path) -> None:
    launcher, reactor, (_, second_dir) = make_launcher(tmp_path, names=("a", "b"), startup_timeout=30)
    launcher.startService()
    stuck = reactor.last
    reactor.advance(29.9)
    assert len(reactor.processes) == 1
    reactor.advance(0.1)
    assert (stuck.pid, signal.SIGTERM) in reactor.group_signals
    assert reactor.last.path == second_dir, "waited no longer than the start-up timeout"


def test_a_port_retry_is_part_of_the_same_start(tmp_path: Path) -> None:
    launcher, reactor, (first_dir, second_dir) = make_launcher(tmp_path, names=("a", "b"))
    launcher.startService()
    reactor.last.say("ServeError", stream="err")
    reactor.last.exit(1)
    assert [p.path for p in reactor.processes] == [first_dir, first_dir]
    reactor.last.listening()
    assert reactor.last.path == second_dir


def test_stop_service_while_a_start_waits_in_the_queue_neither_spawns_nor_hangs(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, names=("a", "b", "c"))
    launcher.startService()
    stopped: list[object] = []
    launcher.stopService().addBoth(stopped.append)
    assert stopped == [], "the start in progress is being stopped"
    reactor.last.exit(sig=signal.SIGTERM)
    assert stopped == [None]
    reactor.advance(120)
    assert len(reactor.processes) == 1, "the queued starts never spawned"
    assert [i.state for i in launcher.instances()] == [STOPPED] * 3
    assert not reactor.getDelayedCalls()


def test_stop_service_during_a_port_retry_leaves_the_queue_empty(tmp_path: Path) -> None:
    launcher, reactor, _ = make_launcher(tmp_path, names=("a", "b"))
    launcher.startService()
    stopped: list[object] = []
    launcher.stopService().addBoth(stopped.append)
    reactor.last.say("ServeError", stream="err")  # lost its port just as the router stops
    reactor.last.exit(1)
    assert stopped == [None] and len(reactor.processes) == 1


def test_stopping_a_queued_instance_takes_it_out_of_the_queue(tmp_path: Path) -> None:
    launcher, reactor, (first_dir, second_dir, third_dir) = make_launcher(tmp_path, names=("a", "b", "c"))
    launcher.startService()
    done: list[Any] = []
    launcher.stop_instance("b").addCallback(done.append)
    assert done and done[0].state == STOPPED and done[0].pid is None
    reactor.last.listening()
    assert [p.path for p in reactor.processes] == [first_dir, third_dir], "b was skipped"
    added: list[Any] = []
    launcher.add(second_dir).addCallback(added.append)
    assert added[0].state == STARTING and len(reactor.processes) == 2, "queued behind c"
    reactor.last.listening()
    assert reactor.last.path == second_dir


def test_a_bug_while_starting_does_not_block_the_starts_behind_it(tmp_path: Path) -> None:
    launcher, reactor, (_, second_dir) = make_launcher(tmp_path, names=("a", "b"))
    calls: list[int] = []

    def used_ports() -> list[int]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("registry bug")
        return []

    launcher._used_ports = used_ports
    launcher.startService()
    assert [p.path for p in reactor.processes] == [second_dir]
