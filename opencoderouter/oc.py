"""``oc`` and ``oc-kill``: start and stop ``opencode serve`` instances without the router.

``oc DIR...`` starts one detached ``opencode serve`` per directory on a free port of 30000-31000,
skipping directories where the calling user already runs one, one at a time, each once the previous is ready.
``oc-kill`` stops every ``opencode serve`` process of the calling user (never another user's).
Both read the process table from ``/proc`` (Linux).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .config import parse_duration
from .launcher import LISTENING_LINE, PORT_TAKEN, port_is_free
from .listeners import list_listeners
from .registry import slugify

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


@dataclass
class _Start:
    directory: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    offset: int
    tried: set[int]
    deadline: float


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
    parser.add_argument("--log-dir", default=None, help=f"where each server's output goes (default {_default_log_dir()})")
    return parser


def oc_main(argv: Sequence[str] | None = None) -> int:
    """``oc DIR...``: exit status 0 when every directory is served (started or already running)."""
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
    ok = True
    running = serve_processes(os.getuid())
    claimed = {p.port for p in running if p.port is not None}
    seen: set[str] = set()
    for argument in args.directories:
        path = os.path.realpath(os.path.expanduser(argument))
        if not os.path.isdir(path):
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
        started = _spawn(executable, path, log_dir, args, claimed, tried=set())
        if started is None:
            print(f"failed {path}: no free port in {args.scan_start}-{args.scan_end}", flush=True)
            ok = False
        else:
            # One at a time: servers starting together on a fresh HOME race on OpenCode's SQLite
            # migration and one of them exits 1 (the launcher serialises its starts for the same reason).
            ok = _wait_ready([started], executable, log_dir, args, claimed) and ok
    return 0 if ok else 1


def _spawn(executable: str, path: str, log_dir: Path, args: argparse.Namespace, claimed: set[int],
           tried: set[int]) -> _Start | None:
    port = next((p for p in range(args.scan_start, args.scan_end + 1)
                 if p not in claimed and p not in tried and port_is_free(p)), None)
    if port is None:
        return None
    claimed.add(port)
    log_path = log_dir / f"{slugify(os.path.basename(path) or 'root')}.log"
    with open(log_path, "ab") as log:
        log.write(f"--- oc: opencode serve --port {port} in {path}\n".encode())
        offset = log.tell()
        # Its own session: no terminal, no SIGHUP when the terminal closes; it outlives oc.
        process = subprocess.Popen(
            [executable, "serve", "--hostname", "127.0.0.1", "--port", str(port)],
            cwd=path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return _Start(path, port, process, log_path, offset, tried | {port}, time.monotonic() + args.startup_timeout)


def _new_output(start: _Start) -> str:
    with open(start.log_path, "rb") as log:
        log.seek(start.offset)
        return log.read().decode("utf-8", "replace")


def _wait_ready(starts: list[_Start], executable: str, log_dir: Path, args: argparse.Namespace,
                claimed: set[int]) -> bool:
    ok = True
    pending = list(starts)
    while pending:
        for start in list(pending):
            output = _new_output(start)
            match = LISTENING_LINE.search(output)
            if match:
                pending.remove(start)
                print(f"started {start.directory} on :{match.group(2)} (pid {start.process.pid})", flush=True)
                continue
            status = start.process.poll()
            if status is not None:
                pending.remove(start)
                if PORT_TAKEN.search(output) and len(start.tried) < 10:
                    retry = _spawn(executable, start.directory, log_dir, args, claimed, start.tried)
                    if retry is not None:
                        pending.append(retry)
                        continue
                last = output.strip().splitlines()[-1] if output.strip() else "no output"
                print(f"failed {start.directory}: exited with status {status} ({last}); log {start.log_path}",
                      flush=True)
                ok = False
            elif time.monotonic() > start.deadline:
                pending.remove(start)
                _stop([_as_serve_process(start.process.pid)], grace=2.0, quiet=True)
                start.process.wait()
                print(f"failed {start.directory}: not ready within {args.startup_timeout:g}s; stopped it; "
                      f"log {start.log_path}", flush=True)
                ok = False
        if pending:
            time.sleep(0.05)
    return ok


def _as_serve_process(pid: int) -> ServeProcess:
    fields = _stat_fields("/proc", pid) or ["?"] * 20
    return ServeProcess(pid, os.getuid(), None, None, int(fields[19]) if fields[19].isdigit() else 0, pid)


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


def _stop(processes: list[ServeProcess], grace: float, quiet: bool = False) -> None:
    for process in processes:
        _signal(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    left = list(processes)
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        for process in list(left):
            if not _same_process(process):
                left.remove(process)
                if not quiet:
                    print(f"stopped {_describe(process)}", flush=True)
    for process in left:
        if _same_process(process):
            _signal(process, signal.SIGKILL)
        if not quiet:
            print(f"killed {_describe(process)}: it did not exit within {grace:g}s of SIGTERM", flush=True)


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
    _stop(processes, args.grace)
    return 0
