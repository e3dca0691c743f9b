"""``oc`` and ``oc-kill``: start and stop ``opencode serve`` instances without the router.

``oc DIR...`` starts one detached ``opencode serve`` per directory on a free port of 30000-31000,
skipping directories where the calling user already runs one, one at a time, each once the previous is ready.
It is the router's launcher (detached mode) on a reactor run by ``task.react``.
``oc-kill`` stops every ``opencode serve`` process of the calling user (never another user's), with
the launcher's SIGTERM-then-SIGKILL group stop. Both read the process table from ``/proc`` (Linux).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogBeginner,
)
from zope.interface import provider

from .child import LauncherError, LauncherSettings, StartFailed, port_is_free
from .config import ProjectDirectoryError, parse_duration, project_directory
from .launcher import Launcher
from .listeners import list_listeners
from .process_groups import signal_group, stop_group

_SOCKET_LINK = re.compile(r"^socket:\[(\d+)\]$")


@dataclass(frozen=True)
class ServeProcess:
    """A running ``opencode serve`` process, as ``/proc`` shows it."""

    pid: int
    uid: int
    cwd: str | None
    port: int | None
    start_time: int
    pgid: int


def is_opencode_serve(argv: Sequence[str]) -> bool:
    """True for ``opencode serve ...`` (also run through an interpreter, e.g. ``python .../opencode serve``)."""
    for index, word in enumerate(argv[:3]):
        if os.path.basename(word) == "opencode":
            return argv[index + 1 : index + 2] == ["serve"]
    return False


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return handle.read().decode("utf-8", "surrogateescape")
    except OSError:
        return None


def _stat_fields(proc: str, pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (field 3 onwards), or None when gone."""
    text = _read(f"{proc}/{pid}/stat")
    if text is None or ")" not in text:
        return None
    return text.rsplit(")", 1)[1].split()


def _real_uid(proc: str, pid: int) -> int | None:
    status = _read(f"{proc}/{pid}/status")
    for line in (status or "").splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    return None


def _socket_inodes(proc: str, pid: int) -> set[int]:
    inodes: set[int] = set()
    try:
        fds = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            match = _SOCKET_LINK.match(os.readlink(f"{proc}/{pid}/fd/{fd}"))
        except OSError:
            continue
        if match:
            inodes.add(int(match.group(1)))
    return inodes


def serve_processes(uid: int | None, proc: str = "/proc") -> list[ServeProcess]:
    """Every ``opencode serve`` process whose real uid is ``uid`` (every user's with None), by pid."""
    listeners = list_listeners(1, 65535, proc_net=f"{proc}/net") or {}
    port_by_inode = {listener.inode: port for port, listener in listeners.items()}
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        owner = _real_uid(proc, pid)
        # The uid filter comes first: another user's process is never looked at further, let alone signalled.
        if owner is None or (uid is not None and owner != uid):
            continue
        cmdline = _read(f"{proc}/{pid}/cmdline")
        if not cmdline or not is_opencode_serve(cmdline.rstrip("\0").split("\0")):
            continue
        fields = _stat_fields(proc, pid)
        if fields is None or fields[0] == "Z":
            continue
        try:
            cwd: str | None = os.readlink(f"{proc}/{pid}/cwd")
        except OSError:
            cwd = None
        ports = sorted(port_by_inode[i] for i in _socket_inodes(proc, pid) if i in port_by_inode)
        found.append(ServeProcess(pid, owner, cwd, ports[0] if ports else None, int(fields[19]), int(fields[2])))
    return sorted(found, key=lambda p: p.pid)


def _same_process(process: ServeProcess, proc: str = "/proc") -> bool:
    """True while ``process.pid`` is still the process we listed (not a recycled pid)."""
    fields = _stat_fields(proc, process.pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == process.start_time


# -- oc ------------------------------------------------------------------------------------------

#: Grace after SIGTERM for a start that timed out, before its group gets SIGKILL.
_TIMED_OUT_GRACE = 2.0
EXIT_INTERRUPTED = 130


def _default_log_dir() -> str:
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "opencoderouter", "oc")


def _oc_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oc",
        description="Start a detached `opencode serve` in each directory on a free port, "
        "skipping directories where you already run one.",
    )
    parser.add_argument("directories", nargs="+", metavar="DIR", help="project directory")
    parser.add_argument("--scan-start", type=int, default=30000, help="first port to use (default 30000)")
    parser.add_argument("--scan-end", type=int, default=31000, help="last port to use (default 31000)")
    parser.add_argument("--opencode-bin", default="opencode", help="OpenCode executable (default: opencode on PATH)")
    parser.add_argument("--startup-timeout", type=parse_duration, default=30.0,
                        help="how long to wait for each server to be ready (default 30s)")
    parser.add_argument("--log-dir", default=None,
                        help=f"where each server's output goes (default {_default_log_dir()})")
    return parser


def oc_main(argv: Sequence[str] | None = None) -> int:
    """``oc DIR...``: exit status 0 when every directory is served (started or already running)."""
    _show_errors("oc")
    return _react(lambda reactor: oc_run(reactor, argv))


async def oc_run(
    reactor: Any,
    argv: Sequence[str] | None = None,
    serving: Callable[[int], list[ServeProcess]] = serve_processes,
    port_is_free: Callable[[int], bool] = port_is_free,
    signal_group: Callable[[int, int], bool] = signal_group,
) -> int:
    """``oc DIR...`` on ``reactor``; returns the exit status (1 when any directory failed, 2 on bad usage).

    ``serving`` (the user's running servers), ``port_is_free`` and ``signal_group`` are the machine;
    tests pass fakes.
    """
    args = _oc_parser().parse_args(argv)
    if not 1 <= args.scan_start <= args.scan_end <= 65535:
        print(f"oc: the port range {args.scan_start}-{args.scan_end} is not usable", file=sys.stderr)
        return 2
    executable = shutil.which(os.path.expanduser(args.opencode_bin))
    if executable is None:
        print(f"oc: {args.opencode_bin} is not an executable file or a command on PATH; install opencode "
              "(npm install -g opencode-ai) or pass --opencode-bin /path/to/opencode", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or _default_log_dir())
    log_dir.mkdir(parents=True, exist_ok=True)
    running = serving(os.getuid())
    claimed = {p.port for p in running if p.port is not None}
    launcher = Launcher(
        [],
        LauncherSettings(
            opencode_bin=os.path.abspath(executable),
            port_range=(args.scan_start, args.scan_end),
            startup_timeout=args.startup_timeout,
            stop_timeout=_TIMED_OUT_GRACE,
            detached_log_dir=str(log_dir),
        ),
        reactor,
        # A port given out in this run is not given again: a stopped start's grandchild may still hold it.
        used_ports=lambda: claimed | {i.port for i in launcher.instances() if i.port is not None},
        port_is_free=port_is_free,
        signal_group=signal_group,
    )
    launcher.startService()
    # Interrupted (SIGINT, SIGTERM), the reactor stops: the start in progress is stopped first, not
    # left half-started; the servers that started keep running.
    on_shutdown = reactor.addSystemEventTrigger("before", "shutdown", launcher.stopService)
    ok, interrupted = True, False
    seen: set[str] = set()
    try:
        for argument in args.directories:
            try:
                path = project_directory(argument)
            except ProjectDirectoryError:
                print(f"error: {argument} is not a directory", flush=True)
                ok = False
                continue
            if path in seen:
                continue
            seen.add(path)
            existing = next((p for p in running if p.cwd == path), None)
            if existing is not None:
                where = f":{existing.port}" if existing.port else "an unknown port"
                print(f"skipped {path}: already running on {where} (pid {existing.pid})", flush=True)
                continue
            # One at a time (the launcher's start gate, and this loop): servers starting together on a
            # fresh HOME race on OpenCode's SQLite migration and one of them exits 1.
            try:
                instance = await launcher.start(path)
            except StartFailed as failure:
                print(f"failed {path}: {_failure_text(failure, args.startup_timeout)}", flush=True)
                ok = False
                if failure.stopped:
                    interrupted = True
                    break
            except LauncherError as error:
                print(f"failed {path}: {error}", flush=True)
                ok = False
            else:
                print(f"started {path} on :{instance.port} (pid {instance.pid})", flush=True)
    finally:
        reactor.removeSystemEventTrigger(on_shutdown)
        # The servers that started keep running: the launcher is detached.
        await launcher.stopService()
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if ok else 1


def _failure_text(failure: StartFailed, startup_timeout: float) -> str:
    """What ``oc`` prints after ``failed DIR:``."""
    log_path = f"; log {failure.instance.log_path}" if failure.instance.log_path else ""
    if failure.stopped:
        return f"interrupted before it was ready; stopped it{log_path}"
    if failure.timed_out:
        return f"not ready within {startup_timeout:g}s; stopped it{log_path}"
    if failure.exit_text is not None:
        return f"{failure.exit_text} ({failure.last_line or 'no output'}){log_path}"
    return failure.reason


def _react(main: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    """Run ``main(reactor)`` under ``task.react`` and return its exit status (react would exit the process)."""
    finished = False

    async def run(reactor: Any) -> None:
        nonlocal finished
        try:
            code: object = await main(reactor)
        except SystemExit as exit_:  # argparse: --help, or a usage error
            code = exit_.code
        finished = True
        raise SystemExit(code)

    try:
        task.react(run)
    except SystemExit as exit_:
        if not finished and exit_.code in (0, None):
            # The reactor stopped before main did: SIGINT or SIGTERM.
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        return exit_.code if isinstance(exit_.code, int) else 1


def _show_errors(program: str) -> None:
    """Log events of level error and above go to stderr; the launcher's other lines are for the log file."""

    @provider(ILogObserver)
    def write(event: LogEvent) -> None:
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        print(f"{program}: {text}", file=sys.stderr, flush=True)

    observer = FilteringLogObserver(write, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.error)])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


# -- oc-kill -------------------------------------------------------------------------------------


def _kill_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oc-kill",
        description="Stop every `opencode serve` process you own (SIGTERM, then SIGKILL after a grace period).",
    )
    parser.add_argument("--grace", type=parse_duration, default=5.0,
                        help="time to exit after SIGTERM before SIGKILL (default 5s)")
    parser.add_argument("--dry-run", action="store_true", help="list what would be stopped; stop nothing")
    parser.add_argument("directories", nargs="*", metavar="DIR",
                        help="stop only the servers of these project directories or of projects below them")
    return parser


def _under(cwd: str | None, roots: list[str]) -> bool:
    if not roots:
        return True
    return cwd is not None and any(cwd == root or cwd.startswith(root.rstrip("/") + "/") for root in roots)


def _describe(process: ServeProcess) -> str:
    where = f" on :{process.port}" if process.port else ""
    return f"pid {process.pid} ({process.cwd or 'unknown directory'}{where})"


def _signal(process: ServeProcess, sig: int) -> None:
    """Signal the process and, when it leads its own group, that group's members of the same user."""
    targets = [process.pid]
    if process.pgid == process.pid:
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != process.pid:
                fields = _stat_fields("/proc", int(entry))
                if fields and int(fields[2]) == process.pid and _real_uid("/proc", int(entry)) == process.uid:
                    targets.append(int(entry))
    for pid in targets:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_if_same(process: ServeProcess, sig: int) -> None:
    """Signal ``process`` unless its pid now belongs to another process."""
    if _same_process(process):
        _signal(process, sig)


async def stop_processes(reactor: Any, processes: list[ServeProcess], grace: float) -> int:
    """SIGTERM each process, SIGKILL those left after ``grace``; one line per process as it is gone."""

    def stop(process: ServeProcess) -> defer.Deferred[None]:
        def report(gentle: bool) -> None:
            if gentle:
                print(f"stopped {_describe(process)}", flush=True)
            else:
                print(f"killed {_describe(process)}: it did not exit within {grace:g}s of SIGTERM", flush=True)

        stopped = stop_group(reactor, lambda sig: _signal_if_same(process, sig), lambda: _same_process(process),
                             grace, what=f"pid {process.pid}")
        return stopped.addCallback(report)

    await defer.gatherResults([stop(process) for process in processes], consumeErrors=True)
    return 0


def oc_kill_main(argv: Sequence[str] | None = None) -> int:
    """``oc-kill [--dry-run]``: stop every ``opencode serve`` of the calling user."""
    args = _kill_parser().parse_args(argv)
    roots = [os.path.realpath(os.path.expanduser(d)) for d in args.directories]
    processes = [p for p in serve_processes(os.getuid()) if _under(p.cwd, roots)]
    if not processes:
        where = f" in {', '.join(roots)}" if roots else ""
        print(f"no opencode serve process of yours is running{where}", flush=True)
        return 0
    if args.dry_run:
        for process in processes:
            print(f"would stop {_describe(process)}", flush=True)
        return 0
    _show_errors("oc-kill")
    return _react(lambda reactor: stop_processes(reactor, processes, args.grace))
