"""Shared pieces of the benchmark: ports, child processes, /proc readings, statistics."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"


def code_under_test() -> Path:
    """The checkout whose ``opencoderouter`` is benchmarked: this one, or ``run.py --code PATH``."""
    return Path(os.environ.get("OCR_BENCH_CODE") or REPO)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# -- environment ----------------------------------------------------------------------------------
def child_env(**extra: str) -> dict[str, str]:
    """Environment for a child that imports this checkout's code (and its twistd plugin)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(code_under_test()), env.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def pinned(command: list[str], cpus: str | None) -> list[str]:
    """``command`` run under ``taskset -c cpus`` when pinning is on (taskset execs: same PID)."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus, *command]
    return command


# -- ports ------------------------------------------------------------------------------------------
def port_free(port: int) -> bool:
    """True when nothing listens on 127.0.0.1:port right now."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port that is free right now (outside any block handed out below)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening_ports(start: int, end: int) -> set[int]:
    """Ports in start..end with a listening socket (any address), from /proc/net/tcp*."""
    found: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if start <= port <= end:
                    found.add(port)
    return found


def free_block(size: int, start: int = 10000, end: int = 30000) -> int:
    """First port of ``size`` consecutive free ports, so a router scan finds only our servers.

    The default range lies below Linux's ephemeral ports (32768+), where thousands of
    benchmark connections would otherwise take ports of the block.
    """
    port = start + (os.getpid() * 131 + int(time.time())) % (end - start - size)
    for _ in range(200):  # bounded: wrap around the range at most a few times
        if port + size >= end:
            port = start
        if not listening_ports(port, port + size - 1) and all(port_free(p) for p in range(port, port + size)):
            return port
        port += size
    raise RuntimeError(f"no {size} consecutive free ports in {start}-{end}")


# -- HTTP -----------------------------------------------------------------------------------------
def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET with urllib: (status, body) for any status; (0, b"") when nothing answers."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, ValueError):
        return 0, b""


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "it") -> Any:
    """Poll ``predicate`` until truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


# -- /proc --------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (from /proc/PID/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_cpu(pid: int, seconds: float) -> float:
    """Percent of one core used by ``pid`` over the next ``seconds``."""
    wall0, cpu0 = time.monotonic(), cpu_seconds(pid)
    time.sleep(seconds)
    wall1, cpu1 = time.monotonic(), cpu_seconds(pid)
    return 100.0 * (cpu1 - cpu0) / (wall1 - wall0)


def measure_cpus(pids: dict[str, int], seconds: float) -> dict[str, float]:
    """Percent of one core used by each of ``pids`` over the same next ``seconds``."""
    wall0, before = time.monotonic(), {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    wall = time.monotonic() - wall0
    return {name: 100.0 * (cpu_seconds(pid) - before[name]) / wall for name, pid in pids.items()}


# -- statistics -------------------------------------------------------------------------------------
def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(fraction * len(ordered) + 0.5)) - 1))
    return ordered[index]


def summary(values: Iterable[float]) -> dict[str, float]:
    """Median and spread (min, max) of several runs."""
    items = [v for v in values if v == v]
    if not items:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(items), "min": min(items), "max": max(items), "n": len(items)}


# -- processes --------------------------------------------------------------------------------------
class Child:
    """A child process in its own process group, stopped by ``stop()`` (and on interpreter exit)."""

    def __init__(self, command: list[str], log: Path, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        self.process = subprocess.Popen(command, cwd=cwd, env=env or child_env(), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.process.pid

    def alive(self) -> bool:
        """True while the process runs."""
        return self.process.poll() is None

    def log(self) -> str:
        """Everything the child wrote so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL after ``timeout``, reap."""
        if self.process.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                self.process.wait()
        self._log.close()


class RouterAPI(Child):
    """What the benchmark asks of any router it runs: health, ``/api/backends``, a Host per backend."""

    port: int
    url: str
    #: The path that answers 200 once the router serves.
    health_path = "/api/health"

    def healthy(self) -> bool:
        """True when the health path answers 200."""
        if not self.alive():
            raise RuntimeError(f"{type(self).__name__} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
        return http_get(self.url + self.health_path, timeout=0.5)[0] == 200

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Block until the router answers."""
        wait_until(self.healthy, timeout, 0.01, f"{type(self).__name__} {self.health_path}")

    def host_header(self, entry: dict[str, Any]) -> str:
        """The Host header that reaches the backend ``entry`` (from ``/api/backends``) in host mode."""
        return f"{entry['domain']}:{self.port}"

    def backends(self) -> list[dict[str, Any]]:
        """The router's /api/backends (both routers answer a JSON list with port, slug and domain)."""
        status, body = http_get(self.url + "/api/backends")
        return json.loads(body) if status == 200 else []

    def wait_backends(self, ports: Iterable[int], timeout: float = 20.0) -> dict[int, dict[str, Any]]:
        """Block until every port in ``ports`` is registered; returns them by port."""
        wanted = set(ports)

        def ready() -> dict[int, dict[str, Any]] | None:
            found = {b["port"]: b for b in self.backends() if b.get("port") in wanted}
            return found if len(found) == len(wanted) else None

        return wait_until(ready, timeout, 0.05, f"router to register ports {sorted(wanted)[:5]}...")


class Router(RouterAPI):
    """``twistd -n opencoderouter`` on 127.0.0.1, mDNS off, scanning only ``scan`` ports.

    ``python``: the interpreter (CPython by default; the PyPy section passes its venv's);
    ``path_prefix``: folders put before the code on PYTHONPATH (the PyPy section's typing shim).
    """

    def __init__(self, workdir: Path, scan: tuple[int, int], cpus: str | None = None,
                 extra: list[str] | None = None, port: int | None = None, wait: bool = True,
                 preload: str | None = None, python: str | None = None,
                 path_prefix: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--port", str(self.port), "--hostname", "127.0.0.1", "--mdns=false",
                "--scan-start", str(scan[0]), "--scan-end", str(scan[1]), *(extra or [])]
        # ``preload``: a bench module imported first (e.g. stock_proxy, for a baseline run).
        code = (f"import sys; sys.path.insert(0, {str(BENCH)!r}); import {preload}; " if preload else "")
        command = [python or sys.executable, "-c", code + "from twisted.scripts.twistd import run; run()",
                   "-n", "--pidfile=", "opencoderouter", *args]
        env = child_env()
        if path_prefix:
            env["PYTHONPATH"] = os.pathsep.join([*path_prefix, env["PYTHONPATH"]])
        self.started = time.monotonic()
        super().__init__(pinned(command, cpus), workdir / f"router-{self.port}.log", cwd=workdir, env=env)
        if wait:
            self.wait_healthy()

    def host_header(self, entry: dict[str, Any]) -> str:
        """``{slug}-{user}.localhost:PORT``: the SSH-tunnel form, which needs no DNS."""
        return re.sub(r"\.local$", ".localhost", entry["domain"]) + f":{self.port}"


#: The Go original router (/work/shared/peers/README.md); ``OCR_BENCH_GO`` points elsewhere.
GO_ROUTER = Path(os.environ.get("OCR_BENCH_GO") or "/work/shared/peers/opencoderouter-go")


class GoRouter(RouterAPI):
    """The Go original router on 127.0.0.1, mDNS off, scanning only ``scan`` ports.

    Run from a copy in ``workdir`` (the shared binary is read-only and may lack the executable bit).
    It has no ``/api/health``; ``/api/backends`` answering means it serves. It answers host mode
    for ``{slug}-{user}.local`` only (not ``.localhost``), so ``host_header`` keeps the domain it reports.
    """

    health_path = "/api/backends"

    def __init__(self, workdir: Path, scan: tuple[int, int], cpus: str | None = None,
                 binary: Path = GO_ROUTER) -> None:
        if not binary.exists():
            raise FileNotFoundError(f"{binary} is missing: set OCR_BENCH_GO to the Go router's binary")
        copy = workdir / "opencoderouter-go"
        if not copy.exists():
            shutil.copyfile(binary, copy)
            copy.chmod(0o755)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(copy), "--port", str(self.port), "--hostname", "127.0.0.1", "--mdns=false",
                   "--scan-start", str(scan[0]), "--scan-end", str(scan[1])]
        super().__init__(pinned(command, cpus), workdir / f"go-router-{self.port}.log", cwd=workdir)
        self.wait_healthy()


class Backend(Child):
    """``bench/backend.py`` serving ``ports`` (one project folder each)."""

    def __init__(self, workdir: Path, ports: list[int], cpus: str | None = None, name: str = "bench",
                 heartbeat: float = 10.0, git: bool = False) -> None:
        self.ports = ports
        self.root = Path(tempfile.mkdtemp(prefix="backend-", dir=workdir))
        command = [sys.executable, str(BENCH / "backend.py"), "--root", str(self.root),
                   "--ports", ",".join(map(str, ports)), "--name", name, "--heartbeat", str(heartbeat)]
        if git:
            command.append("--git")
        super().__init__(pinned(command, cpus), self.root / "backend.log")
        self.listening_at_ns = self._wait_ready()

    def _wait_ready(self, timeout: float = 20.0) -> int:
        def ready() -> int | None:
            if not self.alive():
                raise RuntimeError(f"bench backend exited:\n{self.log()[-2000:]}")
            for line in self.log().splitlines():
                if line.startswith("READY "):
                    return int(line.split()[1])
            return None

        return wait_until(ready, timeout, 0.005, "bench backend")
