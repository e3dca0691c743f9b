"""The launcher: starts, watches, restarts and stops ``opencode serve`` for project directories.

One :class:`Launcher` service owns every child. For the router, each child runs through a tiny exec
wrapper that puts it in its own session and process group and asks the kernel to SIGKILL it when
the router dies (even by SIGKILL), and a small reaper process takes down the children's whole
groups (OpenCode spawns LSP/MCP grandchildren) in that case, so no OpenCode process of ours
outlives the router. Stopping signals each whole group, SIGTERM first and SIGKILL after a grace
period (see :mod:`opencoderouter.process_groups`).

For ``oc`` it runs **detached** (``LauncherSettings.detached_log_dir``): the child still gets its
own session but no parent-death signal and no reaper, it writes to ``{log_dir}/{slug}.log`` (read
back for its listening line) instead of a pipe, it is not restarted, and it keeps running when
the launcher stops.

Children start one at a time (the start gate): instances share one HOME, and several OpenCode servers
starting at once on a fresh HOME race on the SQLite migration of its shared database and exit 1.
The slug of each instance is the registry's (``slug_for``), read whenever it is shown.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from . import child
from .backoff import doubling_backoff
from .child import (
    LISTENING_LINE,
    OVER,
    PORT_TAKEN,
    Instance,
    LauncherError,
    LauncherSettings,
    LauncherState,
    LogTail,
    Run,
    StartFailed,
    port_is_free,
)
from .config import ProjectDirectoryError, project_directory
from .process_groups import (
    POLL_INTERVAL,
    Reaper,
    reaper_command,
    signal_group,
    stop_group,
    wrapped_command,
)
from .registry import Backend, Naming, Registry

if TYPE_CHECKING:
    from .listeners import Listener
    from .scanner import Prober

log = Logger()

def _unregistered_slugs(reactor: Any) -> Callable[[str], str]:
    """A ``slug_for`` without a router: the slug each directory would get from an empty registry."""
    return Registry(reactor, stale_after=0.0, naming=Naming(username="", os_user="")).slug_for_path


class Launcher(Service):
    """Starts ``opencode serve`` per project directory, restarts crashes, stops every child on stop."""

    def __init__(
        self,
        directories: Iterable[str],
        settings: LauncherSettings,
        reactor: Any,
        find_served: Callable[[str], Awaitable[int | None] | Deferred[int | None]] | None = None,
        used_ports: Callable[[], Iterable[int]] = tuple,
        port_is_free: Callable[[int], bool] = port_is_free,
        signal_group: Callable[[int, int], bool] = signal_group,
        environ: dict[str, str] | None = None,
        parent_pid: int | None = None,
        reaper: bool = True,
        slug_for: Callable[[str], str] | None = None,
    ) -> None:
        self.directories = list(directories)
        self.settings = settings
        self._reactor = reactor
        self._find_served = find_served
        self._used_ports = used_ports
        self._port_is_free = port_is_free
        self._signal_group = signal_group
        self._environ = dict(os.environ if environ is None else environ)
        self._parent_pid = parent_pid
        #: The naming authority: the router passes ``registry.slug_for_path``.
        self._slug_for = slug_for if slug_for is not None else _unregistered_slugs(reactor)
        self._instances: dict[str, Instance] = {}
        self._runs: dict[str, Run] = {}
        self._restart_calls: dict[str, IDelayedCall] = {}
        self._stops: dict[str, Deferred[None]] = {}
        self._adding: set[str] = set()
        #: One start at a time, from spawn until ready, exit or start-up timeout (see the module docstring).
        self._start_gate = DeferredLock()
        #: Starts waiting for the gate, by directory, so a stop can take them out of the queue.
        self._queued: dict[str, Deferred[DeferredLock]] = {}
        #: Callers of ``start`` waiting for a start of this directory to be over.
        self._waiters: dict[str, list[Deferred[Instance]]] = {}
        self._use_reaper = reaper and settings.detached_log_dir is None
        self._reaper: Reaper | None = None
        #: Groups of leaders that exited on their own, being cleaned up: stopService waits for them.
        self._cleanups: dict[int, Deferred[bool]] = {}

    @property
    def detached(self) -> bool:
        """Children outlive the launcher (``oc``), rather than dying with it (the router)."""
        return self.settings.detached_log_dir is not None

    # -- service ---------------------------------------------------------
    def startService(self) -> None:
        """Start (or adopt) every configured directory."""
        super().startService()
        for directory in dict.fromkeys(self.directories):  # each directory once, in the given order
            self.add(directory).addErrback(_log_add_failure, directory)

    def stopService(self) -> Deferred[None]:
        """Stop every child; fires when each one and its process group have exited.

        Detached, the children that run are left running (that is what detached means); what is
        still starting is stopped.
        """
        super().stopService()
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()
        stops = [
            self._stop(instance) for instance in list(self._instances.values())
            if not (self.detached and instance.state is LauncherState.RUNNING)
        ]
        stops += [_chain(d) for d in self._cleanups.values()]
        return defer.gatherResults(stops, consumeErrors=True).addCallback(self._stop_reaper)

    def _stop_reaper(self, _: object) -> Deferred[None]:
        reaper, self._reaper = self._reaper, None
        return reaper.close() if reaper is not None else defer.succeed(None)

    def _ensure_reaper(self) -> None:
        """Start the reaper before the first child (and again if it died)."""
        if not self._use_reaper or (self._reaper is not None and self._reaper.alive):
            return
        self._reaper = Reaper()
        executable, argv = reaper_command(self.settings.stop_timeout)
        try:
            self._reactor.spawnProcess(self._reaper, executable, argv, env=dict(os.environ))
        except OSError as error:
            log.error("could not start the launcher's reaper ({error}); children still die with the router, "
                      "their grandchildren may not", error=error)
            self._reaper = None
            return
        # A replacement (someone killed the last one) must know the groups that already run.
        for pgid in [run.pid for run in self._runs.values() if run.pid is not None] + list(self._cleanups):
            self._reaper.tell("+", pgid)

    # -- registry observer: an adopted server that goes away is replaced by our own -----
    def added(self, backend: Backend) -> None:
        """Nothing to do: adoption is decided when a directory is added."""

    def updated(self, backend: Backend) -> None:
        """Nothing to do."""

    def removed(self, backend: Backend) -> None:
        """The adopted server of one of our directories was pruned: start our own."""
        instance = self._instances.get(backend.project_path)
        if instance is None or instance.state is not LauncherState.ADOPTED or not self.running:
            return
        log.info("{slug}: the adopted server on port {port} is gone; starting opencode for {directory}",
                 slug=instance.slug, port=backend.port, directory=instance.directory)
        instance.state = LauncherState.STOPPED
        self.add(instance.directory).addErrback(_log_add_failure, instance.directory)

    # -- queries ---------------------------------------------------------
    def instances(self) -> list[Instance]:
        """Every instance, in the order they were added."""
        return list(self._instances.values())

    def find(self, slug: str) -> Instance | None:
        """The instance with this slug."""
        return next((i for i in self._instances.values() if i.slug == slug), None)

    def by_directory(self, directory: str) -> Instance | None:
        """The instance for this (resolved) directory."""
        return self._instances.get(directory)

    # -- commands --------------------------------------------------------
    def add(self, directory: str) -> Deferred[Instance]:
        """Start ``opencode serve`` in ``directory`` unless something already serves it (then adopt).

        Fires with the instance at once (``starting``, queued behind other starts, or as it was when
        it already runs).
        """
        return defer.ensureDeferred(self._add(directory))

    def start(self, directory: str) -> Deferred[Instance]:
        """Like :meth:`add`, but fire once the start is over.

        With the instance when it is running (or adopted, or was already running); with a
        :class:`StartFailed` when it exited, timed out (fired once its group is gone), found no
        port or was stopped before it was ready; with a LauncherError when it is refused.
        """
        return defer.ensureDeferred(self._start(directory))

    async def _start(self, directory: str) -> Instance:
        path = _resolve(directory)
        waiter: Deferred[Instance] = Deferred()
        waiters = self._waiters.setdefault(path, [])
        waiters.append(waiter)
        try:
            instance = await self._add(path)
        except BaseException:
            self._forget_waiter(path, waiter)
            raise
        if not waiter.called and instance.state in (LauncherState.RUNNING, LauncherState.ADOPTED):
            self._forget_waiter(path, waiter)
            return instance
        return await waiter

    def _forget_waiter(self, path: str, waiter: Deferred[Instance]) -> None:
        waiters = self._waiters.get(path, [])
        if waiter in waiters:
            waiters.remove(waiter)

    async def _add(self, directory: str) -> Instance:
        path = _resolve(directory)
        existing = self._instances.get(path)
        if existing is not None and existing.state not in OVER:
            return existing
        if path in self._adding:
            raise LauncherError(f"{path} is already being started")
        if not self.settings.opencode_bin:
            raise LauncherError("no opencode executable: install opencode-ai or pass --opencode-bin /path/to/opencode")
        self._adding.add(path)
        try:
            served = None
            if self._find_served is not None:
                served = await defer.ensureDeferred(_as_coroutine(self._find_served(path)))
        finally:
            self._adding.discard(path)
        if not self.running:
            raise LauncherError("the router is stopping")
        instance = existing or Instance(path, self._slug_for)
        instance.lines = collections.deque(instance.lines, maxlen=self.settings.log_lines)
        self._instances[path] = instance
        if served is not None:
            instance.state, instance.port, instance.pid = LauncherState.ADOPTED, served, None
            instance.reason = f"already served on port {served} by a server this router did not start"
            log.info("{slug}: {directory} is already served on port {port}; adopting it, not starting another",
                     slug=instance.slug, directory=path, port=served)
            return instance
        instance.failures.clear()
        instance.delay, instance.backoff_attempt, instance.reason = 0.0, 0, None
        instance.state = LauncherState.STARTING
        self._queue_start(instance)
        return instance

    def stop_instance(self, slug: str) -> Deferred[Instance]:
        """Stop one managed instance; fires with it once its process group has exited."""
        instance = self.find(slug)
        if instance is None:
            return defer.fail(KeyError(slug))
        if instance.state is LauncherState.ADOPTED:
            # Not ours to kill; forget it so the list shows only what we manage.
            del self._instances[instance.directory]
            instance.state = LauncherState.STOPPED
            return defer.succeed(instance)
        return self._stop(instance).addCallback(lambda _: instance)

    # -- internals: starting ---------------------------------------------
    def _pick_port(self, instance: Instance, tried: set[int]) -> int | None:
        start, end = self.settings.port_range
        # Ports the registry knows are busy, except this instance's own previous port.
        busy = set(tried) | (set(self._used_ports()) - {instance.port})
        busy |= {
            i.port for i in self._instances.values()
            if i is not instance and i.port is not None and i.state not in OVER
        }
        # The previous port first, so that a restarted instance keeps its address when it can.
        candidates = ([instance.port] if instance.port is not None else []) + list(range(start, end + 1))
        for port in candidates:
            if start <= port <= end and port not in busy and self._port_is_free(port):
                return port
        return None

    def _queue_start(self, instance: Instance) -> None:
        """Spawn ``instance`` once no other start is in progress (at once when none is)."""
        waiting = self._start_gate.acquire()
        self._queued[instance.directory] = waiting

        def go(_: object) -> None:
            if self._queued.get(instance.directory) is waiting:
                del self._queued[instance.directory]
            if not self.running or instance.state is not LauncherState.STARTING:
                # Stopped while it waited (the stop normally cancels the wait; this is the safety net).
                self._start_gate.release()
                return
            try:
                self._spawn(instance, tried=set())
            except Exception:
                # A bug must not leave the gate held: every later start would wait forever.
                run = self._runs.get(instance.directory)
                if run is None or not run.holds_gate:
                    self._start_gate.release()
                raise

        def cancelled(failure: Failure) -> None:
            failure.trap(CancelledError)

        waiting.addCallbacks(go, cancelled).addErrback(_log_start_failure, instance)
        if self._start_gate.locked and instance.directory in self._queued:
            log.info("{slug}: waiting for another opencode to finish starting", slug=instance.slug)

    def _release_gate(self, run: Run) -> None:
        """Let the next queued start go, once per run that held the gate."""
        if run.holds_gate:
            run.holds_gate = False
            self._start_gate.release()

    def _spawn(self, instance: Instance, tried: set[int]) -> None:
        """Start one child; called holding the start gate, which passes to the run (or is released)."""
        self._restart_calls.pop(instance.directory, None)
        port = self._pick_port(instance, tried)
        if port is None:
            self._start_gate.release()
            start, end = self.settings.port_range
            self._failed_run(instance, f"no free port in {start}-{end}")
            return
        instance.port = port
        run = Run(self, instance, port)
        run.tried |= tried
        args = ["serve", "--hostname", self.settings.host, "--port", str(port)]
        opencode = self.settings.opencode_bin or "opencode"
        env = dict(self._environ)
        env.update(self.settings.extra_env)
        child_fds: dict[int, int] | None = None
        if self.settings.detached_log_dir is None:
            # The pid now, not at construction: twistd may have forked to daemonize since.
            parent_pid = self._parent_pid if self._parent_pid is not None else os.getpid()
            executable, argv = wrapped_command(opencode, args, parent_pid)
        else:
            executable, argv = wrapped_command(opencode, args, None)
            try:
                child_fds = self._open_log(instance, run, self.settings.detached_log_dir, args)
            except OSError as error:
                self._start_gate.release()
                self._failed_run(instance, f"could not write its log {instance.log_path}: {error.strerror}")
                return
        self._runs[instance.directory] = run
        self._ensure_reaper()
        try:
            self._reactor.spawnProcess(run, executable, argv, env=env, path=instance.directory, childFDs=child_fds)
        except OSError as error:
            del self._runs[instance.directory]
            self._start_gate.release()
            if run.tail is not None:
                run.tail.close()
            self._failed_run(instance, f"could not start {self.settings.opencode_bin}: {error}")
            return
        finally:
            for fd in set((child_fds or {}).values()):
                os.close(fd)  # the child has its own copies
        run.holds_gate = True
        instance.pid = run.pid
        instance.started_at = self._reactor.seconds()
        if run.pid is not None and self._reaper is not None:
            self._reaper.tell("+", run.pid)
        log.info("{slug}: starting opencode serve on port {port} in {directory} (pid {pid})",
                 slug=instance.slug, port=port, directory=instance.directory, pid=run.pid)
        run.startup_timer = self._reactor.callLater(self.settings.startup_timeout, self._startup_timed_out, run)
        if run.tail is not None:
            run.tail_call = self._reactor.callLater(POLL_INTERVAL, self._follow_log, run)

    def _open_log(self, instance: Instance, run: Run, log_dir: str, args: list[str]) -> dict[int, int]:
        """Open a detached child's log for appending (a header first) and its tail; the child's fds."""
        instance.log_path = os.path.join(log_dir, f"{instance.slug}.log")
        log_fd = os.open(instance.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            os.write(log_fd, f"--- opencode {' '.join(args)} in {instance.directory}\n".encode(
                "utf-8", "surrogateescape"))
            run.tail = LogTail(instance.log_path, os.lseek(log_fd, 0, os.SEEK_CUR))
            null_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(log_fd)
            if run.tail is not None:
                run.tail.close()
            raise
        return {0: null_fd, 1: log_fd, 2: log_fd}

    def _follow_log(self, run: Run) -> None:
        """Read a detached child's new output until it is ready or has exited."""
        run.tail_call = None
        if run.tail is None or run.has_ended:
            return
        data = run.tail.read()
        if data:
            run.received("stdout", data)
        if run.tail is not None and not run.has_ended:
            run.tail_call = self._reactor.callLater(POLL_INTERVAL, self._follow_log, run)

    def _stop_following(self, run: Run) -> None:
        if run.tail_call is not None and run.tail_call.active():
            run.tail_call.cancel()
        run.tail_call = None
        if run.tail is not None:
            run.tail.close()
            run.tail = None

    def _read_rest_of_log(self, run: Run) -> None:
        """At a detached child's exit: what it wrote last (a ServeError, its error message)."""
        while run.tail is not None and (data := run.tail.read()):
            run.received("stdout", data)
        self._stop_following(run)

    def _line(self, run: Run, stream: str, line: str) -> None:
        instance = run.instance
        instance.lines.append(line)
        if line.strip():
            run.last_line = line.strip()
        log.info("{slug}: {line}", slug=instance.slug, line=line, stream=stream)
        if not run.ready:
            match = LISTENING_LINE.search(line)
            if match:
                self._ready(run, int(match.group(2)))
            elif PORT_TAKEN.search(line):
                run.port_taken = True

    def _ready(self, run: Run, port: int) -> None:
        run.ready = True
        run.ready_at = self._reactor.seconds()
        self._release_gate(run)
        if run.startup_timer is not None and run.startup_timer.active():
            run.startup_timer.cancel()
        # Detached, the rest of its output is for its log file only.
        self._stop_following(run)
        instance = run.instance
        if run.stopping:
            return
        instance.port, instance.state, instance.reason = port, LauncherState.RUNNING, None
        log.info("{slug}: ready on port {port} (pid {pid})", slug=instance.slug, port=port, pid=run.pid)
        self._settle(instance, None)

    def _startup_timed_out(self, run: Run) -> None:
        if run.ready or run.has_ended or run.stopping:
            return
        run.timed_out = True
        # The gate waits no longer than the timeout: a start stuck this long must not hold up the others.
        self._release_gate(run)
        log.warn("{slug}: no listening line within {timeout:g}s; stopping it",
                 slug=run.instance.slug, timeout=self.settings.startup_timeout)
        run.termination = self._terminate(run, stopping=False)

    def _settle(self, instance: Instance, failure: StartFailed | None) -> None:
        """A start is over: tell the callers of ``start`` waiting for it."""
        for waiter in self._waiters.pop(instance.directory, []):
            if failure is None:
                waiter.callback(instance)
            else:
                waiter.errback(failure)

    # -- internals: exits and restarts -----------------------------------
    def _ended(self, run: Run, reason: Failure) -> None:
        instance = run.instance
        if run.startup_timer is not None and run.startup_timer.active():
            run.startup_timer.cancel()
        if self._runs.get(instance.directory) is run:
            del self._runs[instance.directory]
        exit_text = child.exit_text(reason)
        instance.last_exit = exit_text
        instance.pid = None
        log.info("{slug}: opencode (pid {pid}) {exit}", slug=instance.slug, pid=run.pid, exit=exit_text)
        if run.pid is not None and not run.stopping:
            # The leader is gone; its grandchildren (LSP, MCP servers) must not linger as orphans.
            self._clean_group(run.pid)
        tried = run.tried
        retry_port = (
            run.holds_gate and not run.stopping and self.running and run.port_taken
            and len(tried) < self.settings.port_attempts
        )
        if retry_port:
            # Still the same start: the gate passes to the retry's run.
            run.holds_gate = False
            log.info("{slug}: port {port} was taken; trying another", slug=instance.slug, port=run.port)
            instance.port = None
            self._spawn(instance, tried)
            return
        self._release_gate(run)
        if run.stopping or not self.running:
            instance.state = LauncherState.STOPPED
            self._settle(instance, StartFailed(instance, "stopped before it was ready", exit_text,
                                               last_line=run.last_line, stopped=True))
            return
        if run.timed_out:
            why = f"no listening line within {self.settings.startup_timeout:g}s"
        elif not run.ready:
            why = f"{exit_text} before it was ready"
        else:
            why = exit_text
        if run.ready_at is not None and self._reactor.seconds() - run.ready_at >= self.settings.stable_after:
            instance.failures.clear()
            instance.backoff_attempt = 0
        self._failed_run(instance, why, run, exit_text)

    def _failed_run(self, instance: Instance, why: str, run: Run | None = None,
                    exit_text: str | None = None) -> None:
        now = self._reactor.seconds()
        instance.failures.append(now)
        while instance.failures and now - instance.failures[0] > self.settings.failure_window:
            instance.failures.popleft()
        instance.reason = why
        if self.detached:
            # Nobody stays to restart it: the caller of ``start`` reports the failure.
            instance.state = LauncherState.FAILED
            log.warn("{slug}: {why}", slug=instance.slug, why=why)
        elif len(instance.failures) >= self.settings.max_failures:
            instance.state = LauncherState.FAILED
            instance.reason = (
                f"{len(instance.failures)} failures within {self.settings.failure_window:g}s, last: {why}; "
                "left stopped"
            )
            log.error("{slug}: {reason}", slug=instance.slug, reason=instance.reason)
        else:
            backoff = doubling_backoff(self.settings.backoff_initial, self.settings.backoff_max)
            instance.delay = backoff(instance.backoff_attempt)
            instance.backoff_attempt += 1
            instance.state = LauncherState.RESTARTING
            log.warn("{slug}: {why}; restarting in {delay:g}s", slug=instance.slug, why=why, delay=instance.delay)
            self._restart_calls[instance.directory] = self._reactor.callLater(instance.delay, self._restart, instance)
        failure = StartFailed(instance, why, exit_text, timed_out=run is not None and run.timed_out,
                              last_line=run.last_line if run is not None else None)
        if run is not None and run.termination is not None:
            # A timed-out start is over once its whole group is gone ("stopped it" must be true).
            _chain(run.termination).addBoth(lambda _: self._settle(instance, failure))
        else:
            self._settle(instance, failure)

    def _restart(self, instance: Instance) -> None:
        self._restart_calls.pop(instance.directory, None)
        if not self.running or instance.state is not LauncherState.RESTARTING:
            return
        instance.restarts += 1
        instance.state = LauncherState.STARTING
        self._queue_start(instance)

    # -- internals: stopping ---------------------------------------------
    def _stop(self, instance: Instance) -> Deferred[None]:
        call = self._restart_calls.pop(instance.directory, None)
        if call is not None and call.active():
            call.cancel()
        waiting = self._queued.pop(instance.directory, None)
        if waiting is not None:
            waiting.cancel()  # out of the start queue: it never spawns
        pending = self._stops.get(instance.directory)
        if pending is not None:
            return _chain(pending)
        run = self._runs.get(instance.directory)
        if run is None:
            if instance.state is not LauncherState.ADOPTED:
                instance.state = LauncherState.STOPPED
                self._settle(instance, StartFailed(instance, "stopped before it was started", stopped=True))
            return defer.succeed(None)
        log.info("{slug}: stopping (pid {pid})", slug=instance.slug, pid=run.pid)
        done = self._terminate(run, stopping=True)
        self._stops[instance.directory] = done

        def finished(result: object) -> object:
            self._stops.pop(instance.directory, None)
            instance.state = LauncherState.STOPPED
            instance.pid = None
            return result

        done.addBoth(finished)
        return _chain(done)

    def _terminate(self, run: Run, stopping: bool) -> Deferred[None]:
        """SIGTERM the run's group, SIGKILL it after the grace period; fires once the group is empty."""
        run.stopping = run.stopping or stopping
        pgid = run.pid
        if pgid is None:
            return _chain(run.ended)

        def warn_before_kill() -> None:
            if not run.has_ended:
                log.warn("{slug}: pid {pid} did not exit within {grace:g}s of SIGTERM; sending SIGKILL",
                         slug=run.instance.slug, pid=pgid, grace=self.settings.stop_timeout)

        stopped = stop_group(
            self._reactor,
            lambda sig: self._send(run, sig),
            lambda: self._signal_group(pgid, 0),
            self.settings.stop_timeout,
            exited=run.ended,
            before_kill=warn_before_kill,
            what=f"process group {pgid}",
        )
        return stopped.addCallback(lambda _: self._forget_group(pgid))

    def _forget_group(self, pgid: int) -> None:
        if self._reaper is not None:
            self._reaper.tell("-", pgid)

    def _send(self, run: Run, sig: int) -> None:
        if run.pid is None:
            return
        if not self._signal_group(run.pid, sig) and not run.has_ended:
            # The wrapper may not have called setsid yet: signal the process itself.
            try:
                cast(IProcessTransport, run.transport).signalProcess(sig)
            except Exception:  # already gone: nothing to signal
                pass

    def _clean_group(self, pgid: int) -> None:
        """After a leader exited on its own: SIGTERM what is left of its group, SIGKILL it later."""
        if not self._signal_group(pgid, 0):
            self._forget_group(pgid)
            return
        log.info("process group {pgid} outlived its leader; terminating it", pgid=pgid)
        done = stop_group(
            self._reactor,
            lambda sig: self._signal_group(pgid, sig),
            lambda: self._signal_group(pgid, 0),
            self.settings.stop_timeout,
            what=f"process group {pgid}",
        )
        self._cleanups[pgid] = done

        def cleaned(gentle: bool) -> bool:
            self._cleanups.pop(pgid, None)
            self._forget_group(pgid)
            return gentle

        done.addCallback(cleaned)


def _resolve(directory: str) -> str:
    """The project directory's real path, or a LauncherError with the config's sentence."""
    try:
        return project_directory(directory)
    except ProjectDirectoryError as error:
        raise LauncherError(str(error)) from None


def _log_add_failure(failure: Failure, directory: str) -> None:
    """A refused start is one log line with the reason; anything else is a bug worth a traceback."""
    if failure.check(LauncherError):
        log.error("not starting opencode for {directory}: {reason}", directory=directory, reason=failure.value)
    else:
        log.failure("could not start opencode for {directory}", failure, directory=directory)


def _log_start_failure(failure: Failure, instance: Instance) -> None:
    """A bug while starting a queued instance is logged, not lost in an unobserved Deferred."""
    log.failure("{slug}: could not start opencode", failure, slug=instance.slug)


def _chain(d: Deferred[Any]) -> Deferred[None]:
    """A new Deferred that fires with ``d`` without taking its result away from other waiters."""
    out: Deferred[None] = Deferred()

    def passed_on(result: object) -> object:
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(None)
        return result

    d.addBoth(passed_on)
    return out


async def _as_coroutine(value: Any) -> Any:
    return await value


def served_port_finder(
    registry: Registry,
    prober: Prober,
    port_range: tuple[int, int],
    list_listeners: Callable[[int, int], dict[int, Listener] | None],
    uid: int | None = None,
) -> Callable[[str], Deferred[int | None]]:
    """A ``find_served`` for the Launcher: the registry first, else a fresh probe of the range's listeners.

    Only servers of the router's own user count (as for ``oc``): another user's server in the
    directory runs with that user's rights, so the router starts its user's own.
    """
    from .listeners import username_for_uid

    own_uid = os.getuid() if uid is None else uid
    own_name = username_for_uid(own_uid)

    async def find(directory: str) -> int | None:
        backend = registry.by_path(directory)
        if backend is not None and backend.up and backend.owner in (None, own_name):
            return int(backend.port)
        listeners = list_listeners(*port_range)
        # Without a socket table (not Linux) only the registry can tell.
        own = sorted((port, listener.address) for port, listener in (listeners or {}).items()
                     if listener.uid == own_uid)
        sightings = await defer.gatherResults([prober.probe(port, None, address) for port, address in own],
                                              consumeErrors=True)
        matches = sorted(s.port for s in sightings if s is not None and s.project_path == directory)
        return matches[0] if matches else None

    return lambda directory: defer.ensureDeferred(find(directory))
