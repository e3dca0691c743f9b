"""The launcher: starts, watches, restarts and stops ``opencode serve`` for project directories.

One :class:`Launcher` service owns every child. Each child runs through a tiny exec wrapper that puts
it in its own session and process group and asks the kernel to SIGKILL it when the router dies (even
by SIGKILL), and a small reaper process takes down the children's whole groups (OpenCode spawns LSP/MCP
grandchildren) in that case, so no OpenCode process of ours outlives the router. Stopping signals each
whole group, SIGTERM first and SIGKILL after a grace period.

Children start one at a time (the start gate): instances share one HOME, and several OpenCode servers
starting at once on a fresh HOME race on the SQLite migration of its shared database and exit 1.
"""

from __future__ import annotations

import collections
import os
import posixpath
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, DeferredLock
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .registry import RESERVED_SLUGS, slugify

log = Logger()

#: The readiness line; it carries the port the server really listens on.
LISTENING_LINE = re.compile(r"opencode server listening on http://(\S+?):(\d+)")
#: What OpenCode prints (then exits 1) when its port is taken.
PORT_TAKEN = re.compile(r"ServeError|EADDRINUSE|address already in use", re.IGNORECASE)

STARTING, RUNNING, RESTARTING, FAILED, STOPPED, ADOPTED = (
    "starting", "running", "restarting", "failed", "stopped", "adopted",
)

#: Runs before OpenCode: own session (hence own process group, no terminal), parent-death signal,
#: then exec. Checking the parent after prctl closes the race where the router died before it.
_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "os.setsid()\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL,0,0,0)\n"  # PR_SET_PDEATHSIG
    "if os.getppid()!=int(sys.argv[1]):sys.stderr.write('the router exited before opencode started\\n');sys.exit(125)\n"
    "try:os.execvp(sys.argv[2],sys.argv[2:])\n"
    "except OSError as e:sys.stderr.write('cannot run %s: %s\\n'%(sys.argv[2],e.strerror));sys.exit(127)\n"
)

#: One reaper per launcher: told each child's process group, it outlives a router killed with SIGKILL
#: just long enough to SIGTERM (then SIGKILL) those whole groups, grandchildren included. Its stdin
#: reaching EOF is the signal: only the router holds the other end, and the kernel closes it when
#: the router dies, however it dies. Lines: "+ PGID" (watch), "- PGID" (forget).
_REAPER = (
    "import os,signal,sys,time\n"
    "os.setsid()\n"
    "signal.signal(signal.SIGINT,signal.SIG_IGN)\n"
    "groups=set()\n"
    "for line in sys.stdin:\n"
    " op,_,pgid=line.strip().partition(' ')\n"
    " (groups.add if op=='+' else groups.discard)(int(pgid))\n"
    "def send(g,s):\n"
    " try:os.killpg(g,s)\n"
    " except ProcessLookupError:return False\n"
    " except PermissionError:pass\n"
    " return True\n"
    "live=[g for g in groups if send(g,signal.SIGTERM)]\n"
    "end=time.monotonic()+float(sys.argv[1])\n"
    "while live and time.monotonic()<end:\n"
    " time.sleep(0.05);live=[g for g in live if send(g,0)]\n"
    "for g in live:send(g,signal.SIGKILL)\n"
)

_MAX_LINE = 8192
_POLL = 0.05


def wrapped_command(executable: str, args: list[str], parent_pid: int) -> tuple[str, list[str]]:
    """The (executable, argv) that runs ``executable args`` in its own group with a parent-death signal."""
    return sys.executable, [sys.executable, "-I", "-S", "-c", _WRAPPER, str(parent_pid), executable, *args]


class _Reaper(ProcessProtocol):
    """The launcher's end of the reaper process (see ``_REAPER``)."""

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.alive = False

    def connectionMade(self) -> None:
        """The reaper runs."""
        self.alive = True

    def tell(self, op: str, pgid: int) -> None:
        """Watch (``+``) or forget (``-``) a process group."""
        if self.alive:
            self.transport.write(f"{op} {pgid}\n".encode("ascii"))  # type: ignore[union-attr]

    def errReceived(self, data: bytes) -> None:
        """The reaper only writes when something is wrong."""
        log.warn("launcher reaper: {text}", text=data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:
        """Gone (normally because the launcher closed its stdin)."""
        self.alive = False
        self.ended.callback(None)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing holds ``host:port`` right now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid`` (0 only tests); False when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LauncherError(ValueError):
    """A request the launcher refuses; the message is a sentence for the user."""


@dataclass
class LauncherSettings:
    """How the launcher starts and supervises children."""

    opencode_bin: str | None
    port_range: tuple[int, int]
    host: str = "127.0.0.1"
    startup_timeout: float = 30.0
    stop_timeout: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    #: A run that stayed up this long resets the backoff and the failure count.
    stable_after: float = 60.0
    failure_window: float = 60.0
    max_failures: int = 5
    #: Ports tried in a row when each one turns out taken (ServeError).
    port_attempts: int = 10
    log_lines: int = 50
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class Instance:
    """One project directory the launcher manages (or adopted because it already ran)."""

    directory: str
    slug: str
    state: str = STARTING
    pid: int | None = None
    port: int | None = None
    restarts: int = 0
    started_at: float | None = None
    last_exit: str | None = None
    reason: str | None = None
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    failures: collections.deque[float] = field(default_factory=collections.deque)
    delay: float = 0.0

    def describe(self) -> dict[str, Any]:
        """The JSON-ready view the API shows."""
        return {
            "directory": self.directory,
            "slug": self.slug,
            "pid": self.pid,
            "port": self.port,
            "state": self.state,
            "restarts": self.restarts,
            "started_at": self.started_at,
            "last_exit": self.last_exit,
            "reason": self.reason,
            "log": list(self.lines),
        }


class _Run(ProcessProtocol):
    """One child process of an instance: its output lines, readiness and exit."""

    def __init__(self, launcher: "Launcher", instance: Instance, port: int) -> None:
        self.launcher = launcher
        self.instance = instance
        self.port = port
        self.pid: int | None = None
        self.ready = False
        self.ready_at: float | None = None
        self.port_taken = False
        self.stopping = False
        self.timed_out = False
        self.ended: Deferred[None] = Deferred()
        self.has_ended = False
        self.startup_timer: IDelayedCall | None = None
        #: True while this run's start holds the launcher's start gate (released on ready, exit or timeout).
        self.holds_gate = False
        #: Ports this start attempt already found taken, so a retry picks another.
        self.tried: set[int] = {port}
        self._buffers = {"stdout": b"", "stderr": b""}

    def connectionMade(self) -> None:
        """Remember the pid; the child is its own process group leader (setsid in the wrapper)."""
        self.pid = self.transport.pid  # type: ignore[union-attr]
        # Nobody reads its stdin; closing it lets OpenCode see EOF rather than a dangling pipe.
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        """Lines from the child's stdout."""
        self._received("stdout", data)

    def errReceived(self, data: bytes) -> None:
        """Lines from the child's stderr."""
        self._received("stderr", data)

    def _received(self, stream: str, data: bytes) -> None:
        buffered = self._buffers[stream] + data
        *lines, rest = buffered.split(b"\n")
        # A child writing without newlines must not grow our memory: cut an overlong partial line.
        if len(rest) > _MAX_LINE:
            lines.append(rest)
            rest = b""
        self._buffers[stream] = rest
        for line in lines:
            self.launcher._line(self, stream, line[:_MAX_LINE].decode("utf-8", "replace").rstrip("\r"))

    def processExited(self, reason: Failure) -> None:
        """The child exited: decide what follows now, not when its pipes close.

        A grandchild that inherited stdout keeps the pipes open (so ``processEnded`` waits for it);
        the launcher must still restart the instance and clean up that grandchild.
        """
        self.has_ended = True
        try:
            self.launcher._ended(self, reason)
        finally:
            self.ended.callback(None)

    def processEnded(self, reason: Failure) -> None:
        """Every pipe closed too: flush partial lines."""
        for stream, rest in self._buffers.items():
            if rest:
                self.launcher._line(self, stream, rest[:_MAX_LINE].decode("utf-8", "replace"))
        self._buffers = {"stdout": b"", "stderr": b""}
        if not self.has_ended:
            self.processExited(reason)


def _exit_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, ProcessDone):
        return "exited with status 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                name = signal.Signals(value.signal).name
            except ValueError:
                name = str(value.signal)
            return f"killed by {name}"
        return f"exited with status {value.exitCode}"
    return f"ended: {reason.getErrorMessage()}"


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
        self._instances: dict[str, Instance] = {}
        self._runs: dict[str, _Run] = {}
        self._restart_calls: dict[str, IDelayedCall] = {}
        self._stops: dict[str, Deferred[None]] = {}
        self._adding: set[str] = set()
        #: One start at a time, from spawn until ready, exit or start-up timeout (see the module docstring).
        self._start_gate = DeferredLock()
        #: Starts waiting for the gate, by directory, so a stop can take them out of the queue.
        self._queued: dict[str, Deferred[DeferredLock]] = {}
        self._use_reaper = reaper
        self._reaper: _Reaper | None = None
        #: Groups of leaders that exited on their own, being cleaned up: stopService waits for them.
        self._cleanups: dict[int, Deferred[None]] = {}

    # -- service ---------------------------------------------------------
    def startService(self) -> None:
        """Start (or adopt) every configured directory."""
        super().startService()
        for directory in dict.fromkeys(self.directories):  # each directory once, in the given order
            self.add(directory).addErrback(_log_add_failure, directory)

    def stopService(self) -> Deferred[None]:
        """Stop every child; fires when each one and its process group have exited."""
        super().stopService()
        for call in self._restart_calls.values():
            if call.active():
                call.cancel()
        self._restart_calls.clear()
        stops = [self._stop(instance) for instance in list(self._instances.values())]
        stops += [_chain(d) for d in self._cleanups.values()]
        return defer.gatherResults(stops, consumeErrors=True).addCallback(self._stop_reaper)

    def _stop_reaper(self, _: object) -> Deferred[None]:
        reaper, self._reaper = self._reaper, None
        if reaper is None or not reaper.alive:
            return defer.succeed(None)
        reaper.transport.closeStdin()  # type: ignore[union-attr]
        return reaper.ended

    def _ensure_reaper(self) -> None:
        """Start the reaper before the first child (and again if it died)."""
        if not self._use_reaper or (self._reaper is not None and self._reaper.alive):
            return
        self._reaper = _Reaper()
        argv = [sys.executable, "-I", "-S", "-c", _REAPER, repr(self.settings.stop_timeout)]
        try:
            self._reactor.spawnProcess(self._reaper, sys.executable, argv, env=dict(os.environ))
        except OSError as error:
            log.error("could not start the launcher's reaper ({error}); children still die with the router, "
                      "their grandchildren may not", error=error)
            self._reaper = None
            return
        # A replacement (someone killed the last one) must know the groups that already run.
        for pgid in [run.pid for run in self._runs.values() if run.pid is not None] + list(self._cleanups):
            self._reaper.tell("+", pgid)

    # -- registry observer: an adopted server that goes away is replaced by our own -----
    def added(self, backend: Any) -> None:
        """Nothing to do: adoption is decided when a directory is added."""

    def updated(self, backend: Any) -> None:
        """Nothing to do."""

    def removed(self, backend: Any) -> None:
        """The adopted server of one of our directories was pruned: start our own."""
        instance = self._instances.get(backend.project_path)
        if instance is None or instance.state != ADOPTED or not self.running:
            return
        log.info("{slug}: the adopted server on port {port} is gone; starting opencode for {directory}",
                 slug=instance.slug, port=backend.port, directory=instance.directory)
        instance.state = STOPPED
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
        """Start ``opencode serve`` in ``directory`` unless something already serves it (then adopt)."""
        return defer.ensureDeferred(self._add(directory))

    async def _add(self, directory: str) -> Instance:
        path = resolve_directory(directory)
        existing = self._instances.get(path)
        if existing is not None and existing.state not in (STOPPED, FAILED):
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
        instance = existing or Instance(path, self._free_slug(path))
        instance.lines = collections.deque(instance.lines, maxlen=self.settings.log_lines)
        self._instances[path] = instance
        if served is not None:
            instance.state, instance.port, instance.pid = ADOPTED, served, None
            instance.reason = f"already served on port {served} by a server this router did not start"
            log.info("{slug}: {directory} is already served on port {port}; adopting it, not starting another",
                     slug=instance.slug, directory=path, port=served)
            return instance
        instance.failures.clear()
        instance.delay, instance.reason = 0.0, None
        instance.state = STARTING
        self._queue_start(instance)
        return instance

    def stop_instance(self, slug: str) -> Deferred[Instance]:
        """Stop one managed instance; fires with it once its process group has exited."""
        instance = self.find(slug)
        if instance is None:
            return defer.fail(KeyError(slug))
        if instance.state == ADOPTED:
            # Not ours to kill; forget it so the list shows only what we manage.
            del self._instances[instance.directory]
            instance.state = STOPPED
            return defer.succeed(instance)
        return self._stop(instance).addCallback(lambda _: instance)

    # -- internals: starting ---------------------------------------------
    def _free_slug(self, path: str) -> str:
        taken = {i.slug for i in self._instances.values() if i.directory != path} | set(RESERVED_SLUGS)
        base = slugify(posixpath.basename(path.rstrip("/")) or "root")
        parent = slugify(posixpath.basename(posixpath.dirname(path.rstrip("/"))) or "root")
        for candidate in (base, f"{base}-{parent}"):
            if candidate not in taken:
                return candidate
        counter = 2
        while f"{base}-{counter}" in taken:
            counter += 1
        return f"{base}-{counter}"

    def _pick_port(self, instance: Instance, tried: set[int]) -> int | None:
        start, end = self.settings.port_range
        # Ports the registry knows are busy, except this instance's own previous port.
        busy = set(tried) | (set(self._used_ports()) - {instance.port})
        busy |= {
            i.port for i in self._instances.values()
            if i is not instance and i.port is not None and i.state not in (STOPPED, FAILED)
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
            if not self.running or instance.state != STARTING:
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

    def _release_gate(self, run: _Run) -> None:
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
        run = _Run(self, instance, port)
        run.tried |= tried
        args = ["serve", "--hostname", self.settings.host, "--port", str(port)]
        # The pid now, not at construction: twistd may have forked to daemonize since.
        parent_pid = self._parent_pid if self._parent_pid is not None else os.getpid()
        executable, argv = wrapped_command(self.settings.opencode_bin or "opencode", args, parent_pid)
        env = dict(self._environ)
        env.update(self.settings.extra_env)
        self._runs[instance.directory] = run
        self._ensure_reaper()
        try:
            self._reactor.spawnProcess(run, executable, argv, env=env, path=instance.directory)
        except OSError as error:
            del self._runs[instance.directory]
            self._start_gate.release()
            self._failed_run(instance, f"could not start {self.settings.opencode_bin}: {error}")
            return
        run.holds_gate = True
        instance.pid = run.pid
        instance.started_at = self._reactor.seconds()
        if run.pid is not None and self._reaper is not None:
            self._reaper.tell("+", run.pid)
        log.info("{slug}: starting opencode serve on port {port} in {directory} (pid {pid})",
                 slug=instance.slug, port=port, directory=instance.directory, pid=run.pid)
        run.startup_timer = self._reactor.callLater(self.settings.startup_timeout, self._startup_timed_out, run)

    def _line(self, run: _Run, stream: str, line: str) -> None:
        instance = run.instance
        instance.lines.append(line)
        log.info("{slug}: {line}", slug=instance.slug, line=line, stream=stream)
        if not run.ready:
            match = LISTENING_LINE.search(line)
            if match:
                self._ready(run, int(match.group(2)))
            elif PORT_TAKEN.search(line):
                run.port_taken = True

    def _ready(self, run: _Run, port: int) -> None:
        run.ready = True
        run.ready_at = self._reactor.seconds()
        self._release_gate(run)
        if run.startup_timer is not None and run.startup_timer.active():
            run.startup_timer.cancel()
        instance = run.instance
        if run.stopping:
            return
        instance.port, instance.state, instance.reason = port, RUNNING, None
        log.info("{slug}: ready on port {port} (pid {pid})", slug=instance.slug, port=port, pid=run.pid)

    def _startup_timed_out(self, run: _Run) -> None:
        if run.ready or run.has_ended or run.stopping:
            return
        run.timed_out = True
        # The gate waits no longer than the timeout: a start stuck this long must not hold up the others.
        self._release_gate(run)
        log.warn("{slug}: no listening line within {timeout:g}s; stopping it",
                 slug=run.instance.slug, timeout=self.settings.startup_timeout)
        self._terminate(run, stopping=False)

    # -- internals: exits and restarts -----------------------------------
    def _ended(self, run: _Run, reason: Failure) -> None:
        instance = run.instance
        if run.startup_timer is not None and run.startup_timer.active():
            run.startup_timer.cancel()
        if self._runs.get(instance.directory) is run:
            del self._runs[instance.directory]
        exit_text = _exit_text(reason)
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
            instance.state = STOPPED
            return
        if run.timed_out:
            why = f"no listening line within {self.settings.startup_timeout:g}s"
        elif not run.ready:
            why = f"{exit_text} before it was ready"
        else:
            why = exit_text
        if run.ready_at is not None and self._reactor.seconds() - run.ready_at >= self.settings.stable_after:
            instance.failures.clear()
            instance.delay = 0.0
        self._failed_run(instance, why)

    def _failed_run(self, instance: Instance, why: str) -> None:
        now = self._reactor.seconds()
        instance.failures.append(now)
        while instance.failures and now - instance.failures[0] > self.settings.failure_window:
            instance.failures.popleft()
        instance.reason = why
        if len(instance.failures) >= self.settings.max_failures:
            instance.state = FAILED
            instance.reason = (
                f"{len(instance.failures)} failures within {self.settings.failure_window:g}s, last: {why}; "
                "left stopped"
            )
            log.error("{slug}: {reason}", slug=instance.slug, reason=instance.reason)
            return
        instance.delay = (
            self.settings.backoff_initial if instance.delay <= 0 else min(instance.delay * 2, self.settings.backoff_max)
        )
        instance.state = RESTARTING
        log.warn("{slug}: {why}; restarting in {delay:g}s", slug=instance.slug, why=why, delay=instance.delay)
        self._restart_calls[instance.directory] = self._reactor.callLater(instance.delay, self._restart, instance)

    def _restart(self, instance: Instance) -> None:
        self._restart_calls.pop(instance.directory, None)
        if not self.running or instance.state != RESTARTING:
            return
        instance.restarts += 1
        instance.state = STARTING
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
            if instance.state != ADOPTED:
                instance.state = STOPPED
            return defer.succeed(None)
        log.info("{slug}: stopping (pid {pid})", slug=instance.slug, pid=run.pid)
        done = self._terminate(run, stopping=True)
        self._stops[instance.directory] = done

        def finished(result: object) -> object:
            self._stops.pop(instance.directory, None)
            instance.state = STOPPED
            instance.pid = None
            return result

        done.addBoth(finished)
        return _chain(done)

    def _terminate(self, run: _Run, stopping: bool) -> Deferred[None]:
        """SIGTERM the run's group, SIGKILL it after the grace period; fires once the group is empty."""
        run.stopping = run.stopping or stopping
        pgid = run.pid
        if pgid is None:
            return run.ended
        self._send(run, signal.SIGTERM)
        kill_call = self._reactor.callLater(self.settings.stop_timeout, self._send, run, signal.SIGKILL)
        done: Deferred[None] = Deferred()

        def ended(_: object) -> None:
            self._wait_group_gone(pgid, kill_call, done)

        run.ended.addCallback(ended)
        done.addCallback(lambda _: self._forget_group(pgid))
        return done

    def _forget_group(self, pgid: int) -> None:
        if self._reaper is not None:
            self._reaper.tell("-", pgid)

    def _send(self, run: _Run, sig: int) -> None:
        if run.pid is None:
            return
        if sig == signal.SIGKILL and not run.has_ended:
            log.warn("{slug}: pid {pid} did not exit within {grace:g}s of SIGTERM; sending SIGKILL",
                     slug=run.instance.slug, pid=run.pid, grace=self.settings.stop_timeout)
        if not self._signal_group(run.pid, sig) and not run.has_ended:
            # The wrapper may not have called setsid yet: signal the process itself.
            try:
                run.transport.signalProcess(sig)  # type: ignore[union-attr]
            except Exception:  # already gone: nothing to signal
                pass

    def _wait_group_gone(self, pgid: int, kill_call: IDelayedCall, done: Deferred[None]) -> None:
        """Poll until no process of group ``pgid`` is left (the SIGKILL timer handles stragglers)."""
        give_up = self._reactor.seconds() + self.settings.stop_timeout + 10.0

        def check() -> None:
            if not self._signal_group(pgid, 0):
                if kill_call.active():
                    kill_call.cancel()
                done.callback(None)
                return
            if not kill_call.active() and self._reactor.seconds() > give_up:
                log.error("process group {pgid} survived SIGKILL for 10s; giving up on it", pgid=pgid)
                done.callback(None)
                return
            if not kill_call.active():
                # SIGKILL already went out (or the leader exited after it): repeat it for late forks.
                self._signal_group(pgid, signal.SIGKILL)
            self._reactor.callLater(_POLL, check)

        check()

    def _clean_group(self, pgid: int) -> None:
        """After a leader exited on its own: SIGTERM what is left of its group, SIGKILL it later."""
        if not self._signal_group(pgid, 0):
            self._forget_group(pgid)
            return
        log.info("process group {pgid} outlived its leader; terminating it", pgid=pgid)
        self._signal_group(pgid, signal.SIGTERM)
        kill_call = self._reactor.callLater(self.settings.stop_timeout, self._signal_group, pgid, signal.SIGKILL)
        done: Deferred[None] = Deferred()
        self._cleanups[pgid] = done


        def cleaned(_: object) -> None:
            self._cleanups.pop(pgid, None)
            self._forget_group(pgid)

        done.addCallback(cleaned)
        self._wait_group_gone(pgid, kill_call, done)


def _log_add_failure(failure: Failure, directory: str) -> None:
    """A refused start is one log line with the reason; anything else is a bug worth a traceback."""
    if failure.check(LauncherError):
        log.error("not starting opencode for {directory}: {reason}", directory=directory, reason=failure.value)
    else:
        log.failure("could not start opencode for {directory}", failure, directory=directory)


def _log_start_failure(failure: Failure, instance: Instance) -> None:
    """A bug while starting a queued instance is logged, not lost in an unobserved Deferred."""
    log.failure("{slug}: could not start opencode", failure, slug=instance.slug)


def _chain(d: Deferred[None]) -> Deferred[None]:
    """A new Deferred that fires with ``d`` without taking its result away from other waiters."""
    out: Deferred[None] = Deferred()
    d.addBoth(lambda result: (out.callback(None) if not isinstance(result, Failure) else out.errback(result), result)[1])
    return out


async def _as_coroutine(value: Any) -> Any:
    return await value


def resolve_directory(directory: str) -> str:
    """The absolute, symlink-free path of a project directory, or a LauncherError saying what is wrong."""
    if not isinstance(directory, str) or not directory.strip() or "\x00" in directory:
        raise LauncherError(f"{directory!r} is not a directory path")
    path = os.path.realpath(os.path.abspath(os.path.expanduser(directory)))
    if not os.path.exists(path):
        raise LauncherError(f"project directory {directory} does not exist")
    if not os.path.isdir(path):
        raise LauncherError(f"project directory {directory} is not a directory")
    return path



def served_port_finder(
    registry: Any,
    prober: Any,
    port_range: tuple[int, int],
    list_listeners: Callable[[int, int], Any],
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
        ports = sorted(port for port, listener in (listeners or {}).items() if listener.uid == own_uid)
        sightings = await defer.gatherResults([prober.probe(port) for port in ports], consumeErrors=True)
        matches = sorted(s.port for s in sightings if s is not None and s.project_path == directory)
        return matches[0] if matches else None

    return lambda directory: defer.ensureDeferred(find(directory))
