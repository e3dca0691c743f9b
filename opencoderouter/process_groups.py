"""Process groups of ``opencode serve``: run a child in its own group, signal it, stop it with a grace period.

Used by the launcher (the router's children and ``oc``'s detached servers) and by ``oc-kill``.
OpenCode starts LSP/MCP grandchildren in its process group, so stopping means the whole group:
SIGTERM, a grace period, then SIGKILL, and only then is it stopped.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: How often a stop looks whether anything of the group is left.
POLL_INTERVAL = 0.05
#: How long a stop keeps looking after SIGKILL before it gives up (with an error in the log).
KILL_GIVE_UP = 10.0

#: Runs before OpenCode: own session (hence own process group, no terminal), then exec. Unless the
#: parent pid is "-" (a detached child, meant to outlive us), it also sets the parent-death signal;
#: checking the parent after prctl closes the race where the parent died before it.
_WRAPPER = (
    "import ctypes,os,signal,sys\n"
    "os.setsid()\n"
    "if sys.argv[1]!='-':\n"
    " ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL,0,0,0)\n"  # PR_SET_PDEATHSIG
    " if os.getppid()!=int(sys.argv[1]):\n"
    "  sys.stderr.write('the router exited before opencode started\\n');sys.exit(125)\n"
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


def wrapped_command(executable: str, args: list[str], parent_pid: int | None) -> tuple[str, list[str]]:
    """The (executable, argv) that runs ``executable args`` in its own session and process group.

    With ``parent_pid`` the child also gets SIGKILL when that parent dies; with None it is detached
    and outlives its parent.
    """
    parent = "-" if parent_pid is None else str(parent_pid)
    return sys.executable, [sys.executable, "-I", "-S", "-c", _WRAPPER, parent, executable, *args]


def reaper_command(stop_timeout: float) -> tuple[str, list[str]]:
    """The (executable, argv) of the reaper process (see :class:`Reaper`)."""
    return sys.executable, [sys.executable, "-I", "-S", "-c", _REAPER, repr(stop_timeout)]


class Reaper(ProcessProtocol):
    """Our end of the reaper process, which takes the watched groups down when we die however we die."""

    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.alive = False

    def connectionMade(self) -> None:
        """The reaper runs."""
        self.alive = True

    def tell(self, op: str, pgid: int) -> None:
        """Watch (``+``) or forget (``-``) a process group."""
        if self.alive:
            cast(IProcessTransport, self.transport).write(f"{op} {pgid}\n".encode("ascii"))

    def close(self) -> Deferred[None]:
        """Let it go (it exits on EOF without signalling anything); fires once it has exited."""
        if not self.alive:
            return succeed(None)
        cast(IProcessTransport, self.transport).closeStdin()
        return self.ended

    def errReceived(self, data: bytes) -> None:
        """The reaper only writes when something is wrong."""
        log.warn("launcher reaper: {text}", text=data.decode("utf-8", "replace").rstrip())

    def processEnded(self, reason: Failure) -> None:
        """Gone (normally because we closed its stdin)."""
        self.alive = False
        self.ended.callback(None)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid`` (0 only tests); False when the group is gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(
    clock: IReactorTime,
    send: Callable[[int], object],
    alive: Callable[[], bool],
    grace: float,
    exited: Deferred[None] | None = None,
    before_kill: Callable[[], object] | None = None,
    what: str = "process group",
) -> Deferred[bool]:
    """SIGTERM now, SIGKILL after ``grace`` if anything is left; fires once ``alive()`` is false.

    Fires with True when SIGTERM was enough, False when SIGKILL had to be sent. With ``exited`` (a
    Deferred firing when the leader, a child of ours, has exited) the first look waits for it;
    after that, or at once without it, ``alive()`` is asked every ``POLL_INTERVAL`` seconds. After
    SIGKILL each look repeats it (for processes forked late) and the wait gives up after
    ``KILL_GIVE_UP`` seconds. No timer outlives the returned Deferred.
    """
    return _GroupStop(clock, send, alive, grace, exited, before_kill, what).done


class _GroupStop:
    """One :func:`stop_group`: its SIGKILL timer and its looks."""

    def __init__(self, clock: IReactorTime, send: Callable[[int], object], alive: Callable[[], bool],
                 grace: float, exited: Deferred[None] | None, before_kill: Callable[[], object] | None,
                 what: str) -> None:
        self.done: Deferred[bool] = Deferred()
        self._clock, self._send, self._alive = clock, send, alive
        self._before_kill, self._what = before_kill, what
        self._killed_at: float | None = None
        self._look_call: IDelayedCall | None = None
        send(signal.SIGTERM)
        self._kill_call = clock.callLater(grace, self._kill)
        if exited is None:
            self._look()
        else:
            exited.addBoth(self._leader_exited)

    def _leader_exited(self, result: object) -> object:
        self._look()
        return result

    def _kill(self) -> None:
        if self.done.called:
            return
        if self._before_kill is not None:
            self._before_kill()
        self._killed_at = self._clock.seconds()
        self._send(signal.SIGKILL)

    def _look(self) -> None:
        self._look_call = None
        if self.done.called:
            return
        if not self._alive():
            self._finish(self._killed_at is None)
            return
        if self._killed_at is not None:
            if self._clock.seconds() - self._killed_at > KILL_GIVE_UP:
                log.error("{what} survived SIGKILL for {seconds:g}s; giving up on it", what=self._what,
                          seconds=KILL_GIVE_UP)
                self._finish(False)
                return
            self._send(signal.SIGKILL)
        self._look_call = self._clock.callLater(POLL_INTERVAL, self._look)

    def _finish(self, gentle: bool) -> None:
        for call in (self._kill_call, self._look_call):
            if call is not None and call.active():
                call.cancel()
        self.done.callback(gentle)
