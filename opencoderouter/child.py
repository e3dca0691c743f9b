"""One managed ``opencode serve``: the launcher's settings, an instance's state, and the process of one run.

:class:`Instance` is what the API shows for a project directory the launcher manages (or adopted);
:class:`Run` is one child process of it (its output lines, readiness and exit), reporting to the
:class:`~.launcher.Launcher`, which decides what follows.
"""

from __future__ import annotations

import collections
import enum
import re
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from .launcher import Launcher

#: The readiness line; it carries the port the server really listens on.
LISTENING_LINE = re.compile(r"opencode server listening on http://(\S+):(\d+)")
#: What OpenCode prints (then exits 1) when its port is taken.
PORT_TAKEN = re.compile(r"ServeError|EADDRINUSE|address already in use", re.IGNORECASE)


class LauncherState(str, enum.Enum):
    """What an instance is doing; the values are what the API, the logs and the metrics labels show."""

    STARTING = "starting"
    RUNNING = "running"
    #: Waiting for its backoff delay before the next start.
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"
    #: Already served when it was given: listed and routed, not ours to stop.
    ADOPTED = "adopted"

    def __str__(self) -> str:
        return self.value


#: States in which an instance is not wanted running any more.
#: States in which an instance runs no child.
OVER = (LauncherState.STOPPED, LauncherState.FAILED)

_MAX_LINE = 8192
#: Most bytes of a detached child's log read per look (the rest waits for the next one).
_LOG_CHUNK = 1 << 20


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing holds ``host:port`` right now."""
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
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
    #: Set: run children detached (they outlive the launcher, are never restarted), each one's
    #: output appended to ``{detached_log_dir}/{slug}.log``.
    detached_log_dir: str | None = None


@dataclass
class Instance:
    """One project directory the launcher manages (or adopted because it already ran)."""

    directory: str
    #: The naming authority (the registry): the slug is read through it, never stored.
    slug_for: Callable[[str], str] = field(repr=False, compare=False)
    state: LauncherState = LauncherState.STARTING
    pid: int | None = None
    port: int | None = None
    restarts: int = 0
    started_at: float | None = None
    last_exit: str | None = None
    reason: str | None = None
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=50))
    failures: collections.deque[float] = field(default_factory=collections.deque)
    #: The backoff delay of the pending (or last) restart.
    delay: float = 0.0
    #: Restarts scheduled since the backoff was last reset: the backoff policy's attempt number.
    backoff_attempt: int = 0
    #: Where a detached child's output goes.
    log_path: str | None = None

    @property
    def slug(self) -> str:
        """The slug that routes to this directory (the registry's, as of now)."""
        return self.slug_for(self.directory)

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


class StartFailed(Exception):
    """A start that ended without a listening line (see :meth:`Launcher.start`)."""

    def __init__(self, instance: Instance, reason: str, exit_text: str | None = None, timed_out: bool = False,
                 last_line: str | None = None, stopped: bool = False) -> None:
        super().__init__(reason)
        self.instance = instance
        #: The launcher's sentence, e.g. "exited with status 2 before it was ready".
        self.reason = reason
        #: How the child ended ("exited with status 2"), None when none was started.
        self.exit_text = exit_text
        #: It printed no listening line within the start-up timeout and was stopped (group gone).
        self.timed_out = timed_out
        #: The last non-blank line it printed.
        self.last_line = last_line
        #: It did not fail: it was stopped (``stop_instance``, ``stopService``) before it was ready.
        self.stopped = stopped


class LogTail:
    """Reads what a detached child appends to its log file (it writes there, not into a pipe of ours)."""

    def __init__(self, path: str, offset: int) -> None:
        self._handle: IO[bytes] | None = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._handle.seek(offset)

    def read(self) -> bytes:
        """The bytes appended since the last read (at most ``_LOG_CHUNK``)."""
        return self._handle.read(_LOG_CHUNK) if self._handle is not None else b""

    def close(self) -> None:
        """Stop reading."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class Run(ProcessProtocol):
    """One child process of an instance: its output lines, readiness and exit."""

    def __init__(self, launcher: Launcher, instance: Instance, port: int) -> None:
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
        self.last_line: str | None = None
        #: A detached child's log file, read until it is ready or has exited.
        self.tail: LogTail | None = None
        self.tail_call: IDelayedCall | None = None
        #: Fires once a start-up timeout's stop of the group is complete.
        self.termination: Deferred[None] | None = None
        self._buffers = {"stdout": b"", "stderr": b""}

    def connectionMade(self) -> None:
        """Remember the pid; the child is its own process group leader (setsid in the wrapper)."""
        self.pid = cast(IProcessTransport, self.transport).pid
        # Nobody reads its stdin; closing it lets OpenCode see EOF rather than a dangling pipe.
        cast(IProcessTransport, self.transport).closeStdin()

    def outReceived(self, data: bytes) -> None:
        """Lines from the child's stdout."""
        self.received("stdout", data)

    def errReceived(self, data: bytes) -> None:
        """Lines from the child's stderr."""
        self.received("stderr", data)

    def received(self, stream: str, data: bytes) -> None:
        """Split output into lines and hand each to the launcher."""
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
            self.launcher._read_rest_of_log(self)
            self.launcher._ended(self, reason)
        finally:
            self.ended.callback(None)

    def processEnded(self, reason: Failure) -> None:
        """Every pipe closed too: flush partial lines."""
        self._flush()
        if not self.has_ended:
            self.processExited(reason)

    def _flush(self) -> None:
        for stream, rest in self._buffers.items():
            if rest:
                self.launcher._line(self, stream, rest[:_MAX_LINE].decode("utf-8", "replace"))
        self._buffers = {"stdout": b"", "stderr": b""}


def exit_text(reason: Failure) -> str:
    """How a child ended, as a phrase (``exited with status 1``, ``killed by SIGTERM``)."""
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
