#!/usr/bin/env python3
"""OpenCodeRouter benchmarks: proxy overhead, SSE fan-out, discovery, idle cost, scans, start-up, agents.

    python bench/run.py                 # full run (~40 min)
    python bench/run.py --quick         # shorter windows and fewer runs (~5 min)
    python bench/run.py --only proxy,startup --no-real --pin on
    python bench/run.py --pypy          # also this router on Debian's pypy3, next to CPython

Every figure is measured against a baseline in the same run. The proxy and SSE figures are taken
for our router and for the Go original router (/work/shared/peers), in front of the same backend
processes with the same load generator, pinned to cores and not pinned. Prints a table with
PASS/FAIL per target (the Go router's figure is the bar for throughput) and writes everything (raw
runs included) to bench/results/bench-<time>.json. Only 127.0.0.1 is used, mDNS is off in every
router; every child process is stopped at the end.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pypy_env  # noqa: E402
from common import (  # noqa: E402
    BENCH,
    GO_ROUTER,
    REPO,
    Backend,
    GoRouter,
    Router,
    RouterAPI,
    child_env,
    code_under_test,
    cpu_seconds,
    free_block,
    http_get,
    measure_cpu,
    measure_cpus,
    percentile,
    pinned,
    rss_kib,
    summary,
    wait_until,
)
from targets import by_pinning, sse_counts, targets  # noqa: E402

SECTIONS = ("startup", "proxy", "sse", "discovery", "idle", "scan", "agents", "profile", "pypy")
#: The profile runs with --profile (or --only profile), PyPy with --pypy (or --only pypy).
DEFAULT_SECTIONS = tuple(name for name in SECTIONS if name not in ("profile", "pypy"))
#: Sections measured once per pinning (pinned and not pinned); the others once, pinned when pinning is on.
PER_PINNING = ("proxy", "sse")
CONNECTIONS = (1, 16, 64)


def pin_label(pin: bool) -> str:
    """The key of a pinning in the results: ``pinned`` or ``unpinned``."""
    return "pinned" if pin else "unpinned"


class Settings:
    """Sizes of every loop, for a full or a quick run, and where each process runs."""

    def __init__(self, quick: bool, pins: tuple[bool, ...], real: bool, profile: bool, runs: int | None,
                 stock_proxy: bool = False, go: bool = True) -> None:
        self.quick = quick
        #: Module imported into every router before twistd runs (a baseline's proxy swap).
        self.preload = "stock_proxy" if stock_proxy else None
        self.real = real
        self.profile = profile
        #: The pinnings the per-pinning sections run under, in order; the first places the other sections.
        self.pins = pins
        #: Whether the Go original router is measured next to ours.
        self.go = go
        self.proxy_runs = runs or (1 if quick else 3)
        # wrk takes whole seconds; a quick run's 1 s windows still hold thousands of requests.
        self.small_seconds = 1 if quick else 5
        self.large_seconds = 1 if quick else 3
        self.warmup_seconds = 1
        #: PyPy's JIT needs longer than CPython's caches before its figures settle.
        #: (Measured: PyPy's CPU per request was still falling after 5 s, some 2,000 requests, of warm-up.)
        self.pypy_warmup_seconds = 8 if quick else 20
        self.sse_counts = (1000,) if quick else (100, 1000)
        self.sse_idle_seconds = 5 if quick else 10
        self.sse_emits = 10 if quick else 20
        self.discovery_samples = 3 if quick else 7
        self.idle_seconds = 10 if quick else 60
        self.idle_backends = (0, 10, 50)
        self.startup_samples = 3 if quick else 7
        self.scan_repeat = 2 if quick else 5
        #: Samples of bench/agents_latency.py: prompts per "asked -> shown" figure, restarts per restart figure.
        self.agents_prompts = 3 if quick else 5
        self.agents_restarts = 1 if quick else 3
        self.place(pins[0])

    def place(self, pin: bool) -> None:
        """Pin (or not) every process this run starts.

        Two cores: the router gets core 0 to itself; backend, load generator and clients share
        core 1, identically in the direct baseline and through every router.
        """
        self.pin = pin
        self.router_cpus = "0" if pin else None
        self.backend_cpus = "1" if pin else None
        self.client_cpus = "1" if pin else None

    def placed(self, pin: bool) -> Settings:
        """A copy of these settings with processes pinned (or not)."""
        other = copy.copy(self)
        other.place(pin)
        return other


# -- wrk ----------------------------------------------------------------------------------------------
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


def run_wrk(url: str, connections: int, seconds: float, host: str | None, cpus: str | None,
            watch: dict[str, int] | None = None) -> dict[str, Any]:
    """One wrk run (one thread, keep-alive): req/s, p50/p99 in ms, errors; CPU µs per request of ``watch`` pids."""
    before = {name: cpu_seconds(pid) for name, pid in (watch or {}).items()}
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout", "5s"]
    if host:
        command += ["-H", f"Host: {host}"]
    out = subprocess.run(pinned(command + [url], cpus), capture_output=True, text=True,
                         timeout=seconds + 30).stdout
    result: dict[str, Any] = {"rps": float("nan"), "p50_ms": float("nan"), "p99_ms": float("nan"), "errors": 0}
    if match := re.search(r"Requests/sec:\s+([\d.]+)", out):
        result["rps"] = float(match.group(1))
    if match := re.search(r"^\s+50%\s+(\S+)", out, re.M):
        result["p50_ms"] = _ms(match.group(1))
    if match := re.search(r"^\s+99%\s+(\S+)", out, re.M):
        result["p99_ms"] = _ms(match.group(1))
    if match := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out):
        result["errors"] += int(match.group(1))
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result["errors"] += sum(int(g) for g in match.groups())
    if match := re.search(r"(\d+) requests in", out):
        result["requests"] = int(match.group(1))
        for name, pid in (watch or {}).items():
            # CPU per request does not depend on how busy the rest of the machine is.
            result[f"{name}_cpu_us_per_req"] = 1e6 * (cpu_seconds(pid) - before[name]) / max(1, result["requests"])
    if result["rps"] != result["rps"]:
        result["raw"] = out[-2000:]
    return result


# -- sections -------------------------------------------------------------------------------------------
def bench_startup(s: Settings, work: Path) -> dict[str, Any]:
    """twistd start to the first /api/health answer."""
    block = free_block(4)
    times = []
    for _ in range(s.startup_samples):
        began = time.monotonic()
        router = Router(work, (block, block + 3), cpus=s.router_cpus, wait=False, preload=s.preload)
        try:
            wait_until(router.healthy, 20, 0.005, "first /api/health")
            times.append(time.monotonic() - began)
        finally:
            router.stop()
    return {"seconds": times, "summary": summary(times)}


def _large_path_of_real(port: int) -> tuple[str, int]:
    """The real server has no 1 MB endpoint: use its web UI's largest script bundle."""
    _, page = http_get(f"http://127.0.0.1:{port}/")
    candidates = re.findall(rb'src="(/assets/[^"]+\.js)"', page)
    best, size = "", 0
    for path in candidates:
        status, body = http_get(f"http://127.0.0.1:{port}{path.decode()}", timeout=5)
        if status == 200 and len(body) > size:
            best, size = path.decode(), len(body)
    return best, size


#: Routers a proxy or SSE section can put in front of the same backends.
#: ``ours``: this checkout on CPython; ``go``: the Go original; ``pypy``: this checkout on PyPy.
ROUTERS = ("ours", "go", "pypy")


def mode_names(router: str) -> tuple[str, str]:
    """The wrk modes of a router: ``path``/``host`` for ours, ``go_path``/``go_host`` for the Go router, ..."""
    prefix = "" if router == "ours" else f"{router}_"
    return f"{prefix}path", f"{prefix}host"


class PyPyRouter:
    """How to start this checkout's router under PyPy: the venv's interpreter and an optional typing shim."""

    def __init__(self, python: str, path_prefix: list[str] | None = None) -> None:
        self.python = python
        self.path_prefix = path_prefix


def start_router(name: str, s: Settings, work: Path, scan: tuple[int, int],
                 pypy: PyPyRouter | None = None) -> RouterAPI:
    """Start one router of ``ROUTERS`` in front of the ``scan`` ports, placed as ``s`` says."""
    if name == "go":
        return GoRouter(work, scan, cpus=s.router_cpus)
    if name == "pypy":
        if pypy is None:
            raise ValueError("the pypy router needs the PyPy venv (bench_pypy sets it up)")
        return Router(work, scan, cpus=s.router_cpus, preload=s.preload, python=pypy.python,
                      path_prefix=pypy.path_prefix)
    return Router(work, scan, cpus=s.router_cpus, preload=s.preload)


def start_routers(names: tuple[str, ...], s: Settings, work: Path, scan: tuple[int, int], result: dict[str, Any],
                  pypy: PyPyRouter | None = None) -> dict[str, RouterAPI]:
    """Start every router of ``names``; one that cannot start (other than ours) is reported in ``result``."""
    started: dict[str, RouterAPI] = {}
    for name in names:
        try:
            started[name] = start_router(name, s, work, scan, pypy)
        except Exception as error:
            if name == "ours":
                for router in started.values():
                    router.stop()
                raise
            result[f"{name}_error"] = f"{type(error).__name__}: {error}"
            print(f"  {name} router not measured: {result[f'{name}_error']}", flush=True)
    return started


def bench_proxy(s: Settings, work: Path, routers: tuple[str, ...] | None = None,
                sizes: tuple[str, ...] = ("small", "large"), pypy: PyPyRouter | None = None,
                backends: tuple[str, ...] = ("fake", "real")) -> dict[str, Any]:
    """wrk direct vs through each router (path and host mode), small JSON and ~1 MB, same backends, same wrk."""
    routers = routers or (("ours", "go") if s.go else ("ours",))
    block = free_block(4)
    measured: dict[str, dict[str, Any]] = {}
    children: list[Any] = []
    result: dict[str, Any] = {"pinning": {"router": s.router_cpus, "backend": s.backend_cpus, "wrk": s.client_cpus}}
    try:
        if "fake" in backends or not s.real:
            fake = Backend(work, [block], cpus=s.backend_cpus, name="benchfake", git=True)
            children.append(fake)
            measured["fake"] = {"port": block, "small": "/global/health", "large": "/bench/1mb",
                                "large_bytes": 1 << 20, "pid": fake.pid}
        if s.real and "real" in backends:
            try:
                from real_opencode import RealOpenCode

                real = RealOpenCode(block + 1, cpus=s.backend_cpus)
                children.append(real)
                wait_until(lambda: http_get(f"http://127.0.0.1:{block + 1}/global/health")[0] == 200, 15, 0.1,
                           "real opencode health")
                large, large_bytes = _large_path_of_real(block + 1)
                measured["real"] = {"port": block + 1, "small": "/global/health", "large": large,
                                    "large_bytes": large_bytes, "pid": real.process.pid}
            except Exception as error:  # report and carry on with the fake backend
                result["real_error"] = f"{type(error).__name__}: {error}"
        if not measured:
            raise RuntimeError(f"no backend to measure: {result.get('real_error')}")
        started = start_routers(routers, s, work, (block, block + 3), result, pypy)
        children.extend(started.values())
        for name, router in started.items():
            registered = router.wait_backends([b["port"] for b in measured.values()], timeout=30)
            for info in measured.values():
                entry = registered[info["port"]]
                info.setdefault("routes", {})[name] = {"slug": entry["slug"], "host": router.host_header(entry)}
        result["backends"] = measured
        result["routers"] = list(started)
        result["router_pids"] = {name: router.pid for name, router in started.items()}

        def urls(info: dict[str, Any], path: str) -> dict[str, tuple[str, str | None]]:
            found: dict[str, tuple[str, str | None]] = {"direct": (f"http://127.0.0.1:{info['port']}{path}", None)}
            for name, router in started.items():
                route = info["routes"][name]
                path_mode, host_mode = mode_names(name)
                found[path_mode] = (f"{router.url}/{route['slug']}{path}", None)
                found[host_mode] = (f"{router.url}{path}", route["host"])
            return found

        # Sanity: every URL answers 200 with the expected size before anything is timed.
        for info in measured.values():
            for size in sizes:
                for mode, (url, host) in urls(info, info[size]).items():
                    status, body = http_get(url, {"Host": host} if host else None, timeout=10)
                    if status != 200 or (size == "large" and len(body) != info["large_bytes"]):
                        raise RuntimeError(f"{mode} {url} (Host {host}) answered {status}, {len(body)} bytes")
            for mode, (url, host) in urls(info, info["small"]).items():  # warm-up (JITs, pools)
                if not mode.endswith("host"):  # host mode shares the path mode's router and pool
                    seconds = s.pypy_warmup_seconds if mode.startswith("pypy") else s.warmup_seconds
                    run_wrk(url, 16, seconds, host, s.client_cpus)

        # Each router's background work (scanner) while no request flows, subtracted from its CPU per request.
        idle = measure_cpus({name: router.pid for name, router in started.items()}, 2 if s.quick else 3)
        result["router_idle_cpu_percent"] = idle.get("ours", float("nan"))
        result["idle_cpu_percent"] = idle
        runs: list[dict[str, Any]] = []
        names = list(started)
        for run in range(s.proxy_runs):
            # Routers take turns going first, so drift within a cell favours none of them.
            order = names[run % len(names):] + names[:run % len(names)]
            modes = ["direct"] + [mode for name in order for mode in mode_names(name)]
            for name, info in measured.items():
                for size in sizes:
                    seconds = s.small_seconds if size == "small" else s.large_seconds
                    for connections in CONNECTIONS:
                        cell: dict[str, Any] = {"run": run, "backend": name, "size": size, "connections": connections}
                        targets = urls(info, info[size])
                        for mode in modes:
                            url, host = targets[mode]
                            router_name = next((r for r in started if mode in mode_names(r)), None)
                            watch = ({"backend": info["pid"]} if router_name is None
                                     else {"router": started[router_name].pid})
                            cell[mode] = figures = run_wrk(url, connections, seconds, host, s.client_cpus, watch)
                            if router_name is not None and "router_cpu_us_per_req" in figures:
                                figures["router_net_cpu_us_per_req"] = figures["router_cpu_us_per_req"] - (
                                    1e4 * idle[router_name] * seconds / max(1, figures["requests"]))
                        runs.append(cell)
                        direct = cell["direct"]
                        print(f"  proxy run {run} {name:4} {size:5} c={connections:<2} direct {direct['rps']:7.0f}/s "
                              f"p50 {direct['p50_ms']:.3f}ms | " + "  ".join(
                                  f"{m} x{_ratio(cell[m]['rps'], direct['rps']):.2f} "
                                  f"+{cell[m]['p50_ms'] - direct['p50_ms']:.3f}ms" for m in modes[1:]), flush=True)
        result["runs"] = runs
        result["cells"] = _proxy_cells(runs, names)
    finally:
        for child in reversed(children):
            child.stop()
    return result


def _ratio(part: float, whole: float) -> float:
    """``part / whole``; NaN (left out of the medians) when a wrk run completed no request."""
    return part / whole if whole and whole == whole else float("nan")


def _proxy_cells(runs: list[dict[str, Any]], routers: list[str]) -> list[dict[str, Any]]:
    """Per (backend, size, connections): medians and spreads over runs of each figure and ratio.

    ``MODE_ratio`` = through router / direct; ``path_vs_go`` = ours ÷ Go (our req/s over the Go router's,
    within each run); ``pypy_path_vs_ours`` = PyPy ÷ CPython.
    """
    keys = sorted({(r["backend"], r["size"], r["connections"]) for r in runs},
                  key=lambda k: (k[0] != "real", k[1] != "small", k[2]))
    through = [mode for name in routers for mode in mode_names(name)]
    cells = []
    for key in keys:
        group = [r for r in runs if (r["backend"], r["size"], r["connections"]) == key]
        cell: dict[str, Any] = {"backend": key[0], "size": key[1], "connections": key[2],
                                "errors": sum(r[m]["errors"] for r in group for m in ["direct", *through])}
        for mode in ["direct", *through]:
            cell[f"{mode}_rps"] = summary(r[mode]["rps"] for r in group)
            cell[f"{mode}_p50_ms"] = summary(r[mode]["p50_ms"] for r in group)
            cell[f"{mode}_p99_ms"] = summary(r[mode]["p99_ms"] for r in group)
        for mode in through:
            cell[f"{mode}_ratio"] = summary(_ratio(r[mode]["rps"], r["direct"]["rps"]) for r in group)
            cell[f"{mode}_added_p50_ms"] = summary(r[mode]["p50_ms"] - r["direct"]["p50_ms"] for r in group)
            cell[f"{mode}_router_cpu_us"] = summary(r[mode].get("router_net_cpu_us_per_req", float("nan"))
                                                    for r in group)
        for other, key_of in (("go", "{}_vs_go"), ("pypy", "pypy_{}_vs_ours")):
            if other not in routers or "ours" not in routers:
                continue
            for addressing in ("path", "host"):
                mine, theirs = (addressing, f"{other}_{addressing}") if other == "go" else (
                    f"pypy_{addressing}", addressing)
                cell[key_of.format(addressing)] = summary(_ratio(r[mine]["rps"], r[theirs]["rps"]) for r in group)
        cell["direct_backend_cpu_us"] = summary(r["direct"].get("backend_cpu_us_per_req", float("nan"))
                                                for r in group)
        cells.append(cell)
    return cells


def bench_profile(s: Settings, work: Path) -> dict[str, Any]:
    """py-spy the router while wrk drives the fake backend's health through the path route."""
    block = free_block(2)
    backend = Backend(work, [block], cpus=s.backend_cpus, name="benchprof")
    router = None
    try:
        router = Router(work, (block, block + 1), cpus=s.router_cpus, preload=s.preload)
        slug = router.wait_backends([block])[block]["slug"]
        run_wrk(f"{router.url}/{slug}/global/health", 16, 1, None, s.client_cpus)  # warm-up
        return profile_router(router, f"{router.url}/{slug}/global/health", s)
    finally:
        if router:
            router.stop()
        backend.stop()


def profile_router(router: Router, url: str, s: Settings) -> dict[str, Any]:
    """py-spy the router during 10 s of wrk (16 connections); top functions by own and inclusive time."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (BENCH / "results").mkdir(exist_ok=True)
    raw = BENCH / "results" / f"profile-{stamp}.txt"
    svg = BENCH / "results" / f"profile-{stamp}.svg"
    recorders = [subprocess.Popen([spy, "record", "--pid", str(router.pid), "--duration", "8", "--rate", "200",
                                   "--format", fmt, "--output", str(out), "--nonblocking"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for fmt, out in (("raw", raw), ("flamegraph", svg))]
    time.sleep(0.5)
    load = run_wrk(url, 16, 10, None, s.client_cpus, {"router": router.pid})
    for recorder in recorders:
        recorder.wait(30)
    if not raw.exists():
        return {"error": "py-spy wrote no profile (ptrace not permitted?)"}
    return {"flamegraph": str(svg.relative_to(REPO)), "raw": str(raw.relative_to(REPO)), "load": load,
            **summarise_profile(raw.read_text())}


def summarise_profile(raw: str, top: int = 15) -> dict[str, Any]:
    """Own and inclusive time per function (line numbers dropped) from py-spy's raw stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count

    def ranked(table: dict[str, int], keep: Callable[[str], bool] = lambda f: True) -> list[dict[str, Any]]:
        items = sorted(((f, n) for f, n in table.items() if keep(f)), key=lambda item: -item[1])[:top]
        return [{"frame": f, "percent": round(100 * n / max(1, total), 1)} for f, n in items]

    return {"samples": total, "top_own": ranked(own),
            "top_inclusive_router_code": ranked(inclusive, lambda f: "opencoderouter/" in f)}


class SSEClient:
    """bench/sse_client.py in its own process."""

    def __init__(self, url: str, count: int, cpus: str | None, timeout: float = 90) -> None:
        command = [sys.executable, str(BENCH / "sse_client.py"), "--url", url, "--count", str(count)]
        self.process = subprocess.Popen(pinned(command, cpus), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=child_env(), start_new_session=True)
        self.ready = self._read(timeout)
        self.pid = self.process.pid

    def _read(self, timeout: float) -> dict[str, Any]:
        import select

        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if readable else ""
        if not line:
            raise RuntimeError(f"SSE client gave no answer in {timeout:g}s")
        return json.loads(line)

    def emit(self, emit_url: str, count: int, gap: float) -> dict[str, Any]:
        """Have the backend send ``count`` stamped events; their latencies in µs."""
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"emit": count, "gap": gap, "emit_url": emit_url}) + "\n")
        self.process.stdin.flush()
        return self._read(count * gap + 30)

    def stop(self) -> None:
        """Close every stream and reap the process."""
        try:
            if self.process.stdin:
                self.process.stdin.write(json.dumps({"quit": True}) + "\n")
                self.process.stdin.close()
            self.process.wait(20)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()


def bench_sse(s: Settings, work: Path) -> dict[str, Any]:
    """N open /event streams, direct and through each router: event latency, RSS per stream, idle CPU.

    Keys per stream count: ``direct``, ``router`` (ours), ``go``; ``added_p99_ms`` is ours minus direct,
    ``go_added_p99_ms`` the Go router's.
    """
    block = free_block(2)
    backend = Backend(work, [block], cpus=s.backend_cpus, name="benchsse", git=True)
    result: dict[str, Any] = {}
    started: dict[str, RouterAPI] = {}
    try:
        started = start_routers(("ours", "go") if s.go else ("ours",), s, work, (block, block + 1), result)
        slugs = {name: router.wait_backends([block], timeout=30)[block]["slug"] for name, router in started.items()}
        emit_url = f"http://127.0.0.1:{block}/bench/emit"
        for count in s.sse_counts:
            entry: dict[str, Any] = {}
            targets = [("direct", f"http://127.0.0.1:{block}/event", None)] + [
                ("router" if name == "ours" else name, f"{router.url}/{slugs[name]}/event", router)
                for name, router in started.items()]
            for target, url, router in targets:
                rss_before = rss_kib(router.pid) if router else 0
                client = SSEClient(url, count, s.client_cpus)
                try:
                    figures: dict[str, Any] = {"connected": client.ready["connected"],
                                               "failed": client.ready["failed"]}
                    if not figures["connected"]:
                        raise RuntimeError(f"no /event stream opened at {url} ({count} tried)")
                    if router:
                        time.sleep(1)  # let the last streams settle before reading memory
                        rss_open = rss_kib(router.pid)
                        figures["router_rss_before_kib"] = rss_before
                        figures["router_rss_open_kib"] = rss_open
                        figures["rss_per_stream_kib"] = (rss_open - rss_before) / max(1, client.ready["connected"])
                        figures["router_idle_cpu_percent"] = measure_cpu(router.pid, s.sse_idle_seconds)
                        figures["idle_window_s"] = s.sse_idle_seconds
                    answer = client.emit(emit_url, s.sse_emits, 0.25)
                    latencies = [v / 1000.0 for v in answer["latencies_us"]]
                    figures.update(events=len(latencies), expected=answer["expected"],
                                   p50_ms=percentile(latencies, 0.5), p99_ms=percentile(latencies, 0.99),
                                   max_ms=max(latencies) if latencies else float("nan"))
                finally:
                    client.stop()
                if router:
                    time.sleep(1)
                    figures["router_rss_after_close_kib"] = rss_kib(router.pid)
                entry[target] = figures
                print(f"  sse N={count} {target}: " + ", ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()), flush=True)
            for target, prefix in (("router", ""), ("go", "go_")):
                if target in entry:
                    entry[f"{prefix}added_p50_ms"] = entry[target]["p50_ms"] - entry["direct"]["p50_ms"]
                    entry[f"{prefix}added_p99_ms"] = entry[target]["p99_ms"] - entry["direct"]["p99_ms"]
            result[str(count)] = entry
    finally:
        for router in started.values():
            router.stop()
        backend.stop()
    return result


def _start_failure(work: Path, python: str, path_prefix: list[str] | None) -> str | None:
    """None when this checkout's router starts and answers under ``python``; else the reason it did not."""
    block = free_block(2)
    router = Router(work, (block, block + 1), python=python, path_prefix=path_prefix, wait=False)
    try:
        router.wait_healthy(30)
        return None
    except (RuntimeError, TimeoutError):
        return pypy_env.failure_reason(router.log())
    finally:
        router.stop()


def bench_pypy(s: Settings, work: Path) -> dict[str, Any]:
    """This checkout's router on Debian's pypy3 next to CPython: small JSON through/direct, same run.

    First the unchanged code. If it cannot start because Python 3.9 lacks a 3.10 feature (``typing`` names,
    dataclass slots), the reason is recorded and the measurement runs with a bench-side shim supplying
    it (the code is not changed).
    """
    pypy = shutil.which("pypy3")
    if pypy is None:
        return {"error": "pypy3 is not installed (Debian: apt-get install pypy3 pypy3-venv)"}
    python = str(pypy_env.ensure_venv(pypy))
    result: dict[str, Any] = {"interpreter": pypy_env.interpreter_version(Path(python)), "venv": python}
    failure = _start_failure(work, python, None)
    result["unchanged_code"] = "starts" if failure is None else f"does not start: {failure}"
    print(f"  {result['interpreter']}: unchanged code {result['unchanged_code']}", flush=True)
    shimmed: list[str] = []
    shim_dir = work / "pypy-typing-shim"
    for _ in range(5):  # bounded: each round adds one missing name
        name = pypy_env.missing_feature(failure or "")
        if name is None or name in shimmed:
            break
        shimmed.append(name)
        failure = _start_failure(work, python, [str(pypy_env.py310_shim(shim_dir, shimmed))])
    if failure is not None:
        result["error"] = f"the router does not start on {result['interpreter']}: {failure}"
        return result
    if shimmed:
        result["typing_shim"] = shimmed
        print(f"  measuring with a bench-side shim: {pypy_env.describe_shim(shimmed)}", flush=True)
    launcher = PyPyRouter(python, [str(shim_dir)] if shimmed else None)
    # PyPy is reported, not a target: one proxy run, and a quick run measures the real opencode only.
    once = copy.copy(s)
    once.proxy_runs = 1
    backends = ("real",) if s.quick and s.real else ("fake", "real")
    result["proxy"] = bench_proxy(once, work, routers=("ours", "pypy"), sizes=("small",), pypy=launcher,
                                  backends=backends)
    return result


def bench_discovery(s: Settings, work: Path) -> dict[str, Any]:
    """Time from a new server listening to its appearance in /api/backends."""
    result: dict[str, Any] = {}
    for label, extra in (("default", []), ("scan_interval_1s", ["--scan-interval", "1s"])):
        block = free_block(s.discovery_samples + 1)
        router = Router(work, (block, block + s.discovery_samples), cpus=s.router_cpus, extra=extra, preload=s.preload)
        times: list[float] = []
        try:
            for i in range(s.discovery_samples):
                time.sleep(random.uniform(0, 1.0))  # de-phase from the router's loops
                backend = Backend(work, [block + i], cpus=s.backend_cpus, name=f"disc{i}")
                try:
                    def seen(router: Any = router, port: int = block + i) -> bool:
                        return any(b.get("port") == port for b in router.backends())

                    wait_until(seen, 15, 0.01, "discovery")
                    times.append((time.monotonic_ns() - backend.listening_at_ns) / 1e9)
                finally:
                    backend.stop()
        finally:
            router.stop()
        result[label] = {"seconds": times, "median": percentile(times, 0.5), "p90": percentile(times, 0.9)}
        print(f"  discovery {label}: {result[label]}", flush=True)
    return result


def bench_idle(s: Settings, work: Path) -> dict[str, Any]:
    """Router CPU and RSS at default flags over a window, with 0, 10 and 50 backends (full 1,001-port range)."""
    result: dict[str, Any] = {}
    for count in s.idle_backends:
        block = free_block(1001)
        ports = [block + 7 + 20 * i for i in range(count)]
        backend = Backend(work, ports, cpus=s.backend_cpus, name="idle") if count else None
        router = None
        try:
            router = Router(work, (block, block + 1000), cpus=s.router_cpus, preload=s.preload)
            if ports:
                router.wait_backends(ports, timeout=30)
            time.sleep(2)
            cpu = measure_cpu(router.pid, s.idle_seconds)
            result[str(count)] = {"cpu_percent": cpu, "rss_kib": rss_kib(router.pid), "window_s": s.idle_seconds,
                                  "registered": len(router.backends())}
            print(f"  idle {count} backends: {result[str(count)]}", flush=True)
        finally:
            if router:
                router.stop()
            if backend:
                backend.stop()
    return result


def bench_scan(s: Settings, work: Path) -> dict[str, Any]:
    """One full scan of 1,001 ports with the router's Scanner, nothing listening and 50 listening."""
    result: dict[str, Any] = {}
    block = free_block(1001)
    for count in (0, 50):
        ports = [block + 7 + 20 * i for i in range(count)]
        backend = Backend(work, ports, cpus=s.backend_cpus, name="scan") if count else None
        try:
            command = [sys.executable, str(BENCH / "scan_cost.py"), "--start", str(block),
                       "--end", str(block + 1000), "--repeat", str(s.scan_repeat)]
            out = subprocess.run(pinned(command, s.router_cpus), capture_output=True, text=True,
                                 env=child_env(), timeout=120)
            lines = out.stdout.strip().splitlines()
            result[str(count)] = json.loads(lines[-1]) if lines else {"error": out.stderr[-2000:]}
            listing = subprocess.run(
                pinned([sys.executable, str(BENCH / "listeners_cost.py"), "--start", str(block),
                        "--end", str(block + 1000)], s.router_cpus),
                capture_output=True, text=True, env=child_env(), timeout=60).stdout.strip().splitlines()
            result[str(count)]["listing"] = json.loads(listing[-1]) if listing else {}
            print(f"  scan with {count} listening: {result[str(count)]}", flush=True)
        finally:
            if backend:
                backend.stop()
    return result


def bench_agents(s: Settings, work: Path) -> dict[str, Any]:
    """How soon /api/agents shows a request or a restart's state, on the real opencode (bench/agents_latency.py)."""
    if not s.real:
        return {"skipped": "--no-real (the scene runs the real opencode serve)"}
    import agents_latency

    return agents_latency.measure(work, prompts=s.agents_prompts, restarts=s.agents_restarts)


# -- report ----------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, dict):
        if value.get("n", 1) > 1:
            return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}-{value['max']:.{digits}f}]"
        value = value.get("median")
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def _proxy_table(proxy: dict[str, Any], label: str) -> list[str]:
    """The proxy figures of one pinning: ours and the Go router side by side (and PyPy when measured)."""
    routers = proxy.get("routers", ["ours"])
    others = [name for name in routers if name != "ours"]
    where = ("router core 0; backend, wrk core 1" if proxy.get("pinning", {}).get("router") else "no pinning")
    lines = [f"Proxy overhead, {label} ({where}; wrk -t1 keep-alive; ratio = through router / direct req/s; "
             "median [min-max] over runs)"]
    head = f"{'backend':7} {'size':5} {'conns':>5} {'direct/s':>8} | {'ours path':>9}"
    for other in others:
        head += f" {other + ' path':>9} {'÷ ' + other:>7}"
    head += f" | {'ours host':>9}"
    for other in others:
        head += f" {other + ' host':>9} {'÷ ' + other:>7}"
    head += " | +p50 ms ours" + "".join(f"/{o}" for o in others) + " path | CPU us/req backend/ours" + "".join(
        f"/{o}" for o in others) + " path"
    lines.append(head)
    for c in proxy["cells"]:
        line = f"{c['backend']:7} {c['size']:5} {c['connections']:>5} {_fmt(c['direct_rps'], 0):>8} |"
        for addressing in ("path", "host"):
            line += f" {_fmt(c[f'{addressing}_ratio']['median']):>9}"
            for other in others:
                vs = (c.get(f"{addressing}_vs_go") if other == "go" else c.get(f"pypy_{addressing}_vs_ours"))
                line += f" {_fmt(c[f'{other}_{addressing}_ratio']['median']):>9} {_fmt(vs):>7}"
            line += " |"
        line += " " + "/".join(_fmt(c[f"{m}_added_p50_ms"]['median'], 3)
                               for m in ["path", *(f"{o}_path" for o in others)])
        line += " | " + "/".join(_fmt(c[key]["median"], 0) for key in
                                 ["direct_backend_cpu_us", "path_router_cpu_us",
                                  *(f"{o}_path_router_cpu_us" for o in others)])
        if c["errors"]:
            line += f"  ERRORS {c['errors']}"
        lines.append(line)
    real_large = proxy.get("backends", {}).get("real", {}).get("large_bytes")
    idle = ", ".join(f"{name} {value:.1f}%" for name, value in proxy.get("idle_cpu_percent", {}).items())
    lines.append("  (÷ go = ours ÷ Go router req/s, ÷ pypy = PyPy ÷ CPython, within each run; CPU us/req from /proc, "
                 f"each router's idle CPU ({idle} of a core) subtracted; +p50 = added median latency)")
    if any(c["size"] == "large" for c in proxy["cells"]):
        lines.append("  (large = fake: 1 MiB" + (f", real: its {real_large / 1e6:.1f} MB web UI script bundle)"
                                                 if real_large else ")"))
    for key in ("real_error", "go_error", "pypy_error"):
        if proxy.get(key):
            lines.append(f"  {key.split('_')[0]} not measured: {proxy[key]}")
    return lines


def _sse_table(sse: dict[str, Any], label: str) -> list[str]:
    """The SSE figures of one pinning: direct, ours and the Go router."""
    lines = [f"SSE fan-out, {label} (/event through the path route vs direct; backend write -> client read, ms)",
             f"{'streams':>7} {'router':>6} {'p50':>7} {'p99':>7} {'+p50':>7} {'+p99':>7} {'RSS/stream':>10} "
             f"{'idle CPU':>8} {'events':>12}"]
    for count, entry in sse_counts(sse).items():
        for target, prefix in (("direct", None), ("router", ""), ("go", "go_")):
            figures = entry.get(target)
            if figures is None:
                continue
            name = {"router": "ours"}.get(target, target)
            added = ("", "") if prefix is None else (_fmt(entry.get(f"{prefix}added_p50_ms")),
                                                     _fmt(entry.get(f"{prefix}added_p99_ms")))
            rss = _fmt(figures.get("rss_per_stream_kib"), 1) + " KiB" if prefix is not None else ""
            cpu = _fmt(figures.get("router_idle_cpu_percent")) + "%" if prefix is not None else ""
            lines.append(f"{count:>7} {name:>6} {_fmt(figures['p50_ms']):>7} {_fmt(figures['p99_ms']):>7} "
                         f"{added[0]:>7} {added[1]:>7} {rss:>10} {cpu:>8} "
                         f"{str(figures['events']) + '/' + str(figures['expected']):>12}")
    lines.append("  (RSS/stream from VmRSS before/after opening; idle CPU = % of a core while the streams are quiet)")
    if sse.get("go_error"):
        lines.append(f"  go not measured: {sse['go_error']}")
    return lines


def report(results: dict[str, Any]) -> str:
    """The human table."""
    lines: list[str] = []
    for label, proxy in by_pinning(results, "proxy").items():
        if proxy.get("cells"):
            lines += [*_proxy_table(proxy, label), ""]
    for label, sse in by_pinning(results, "sse").items():
        lines += [*_sse_table(sse, label), ""]
    pypy = results.get("pypy")
    if pypy:
        lines.append(f"PyPy ({pypy.get('interpreter', 'pypy3')}): unchanged code "
                     f"{pypy.get('unchanged_code', 'not tried')}")
        if pypy.get("typing_shim"):
            lines.append(f"  measured with a bench-side shim: {pypy_env.describe_shim(pypy['typing_shim'])}"
                         " (the router's code unchanged)")
        if pypy.get("error"):
            lines.append(f"  not measured: {pypy['error']}")
        if pypy.get("proxy", {}).get("cells"):
            lines += _proxy_table(pypy["proxy"], pin_label(bool(pypy["proxy"]["pinning"].get("router"))))
        lines.append("")
    disc = results.get("discovery")
    if disc:
        lines.append("Discovery (server listening -> listed in /api/backends)")
        for label, d in disc.items():
            lines.append(f"  {label:18} median {_fmt(d['median'])} s  p90 {_fmt(d['p90'])} s  "
                         f"({', '.join(f'{t:.2f}' for t in d['seconds'])})")
        lines.append("")
    idle = results.get("idle")
    if idle:
        lines.append("Idle cost at default flags (1,001-port range)")
        for count, d in idle.items():
            lines.append(f"  {count:>3} backends: CPU {_fmt(d['cpu_percent'])}% of a core over {d['window_s']} s, "
                         f"RSS {d['rss_kib'] / 1024:.1f} MiB (registered {d['registered']})")
        lines.append("")
    scan = results.get("scan")
    if scan:
        lines.append("One full scan of 1,001 ports (router's Scanner in-process; median)")
        for count, d in scan.items():
            for mode in ("proc_listing", "probe_every_port"):
                m = d.get(mode, {})
                if "wall_s" in m:
                    lines.append(f"  {count:>3} listening, {mode:16}: {m['wall_s'] * 1000:7.1f} ms wall, "
                                 f"{m['cpu_s'] * 1000:7.1f} ms CPU, found {m['found']}")
                else:
                    lines.append(f"  {count:>3} listening, {mode:16}: {m.get('error', d.get('error', 'n/a'))}")
            listing = d.get("listing", {})
            if "proc_parse_cpu_ms" in listing and "sock_diag_cpu_ms" in listing:
                lines.append(f"  {count:>3} listening, one look at the listening sockets (quick check, every 0.5 s): "
                             f"/proc/net/tcp parse {listing['proc_parse_cpu_ms']:.2f} ms CPU vs netlink sock_diag "
                             f"{listing['sock_diag_cpu_ms']:.3f} ms, with {listing['tcp_sockets_on_machine']} TCP "
                             "sockets on the machine")
        lines.append("")
    prof = results.get("profile")
    if prof:
        if "error" in prof:
            lines.append(f"Router profile: {prof['error']}")
        else:
            lines.append(f"Router profile (py-spy, wrk c=16 path mode, {prof['load']['rps']:.0f} req/s, "
                         f"{prof['load'].get('router_cpu_us_per_req', float('nan')):.0f} us router CPU per request; "
                         f"{prof['flamegraph']})")
            lines.append("  own time:  " + ", ".join(f"{f['frame']} {f['percent']}%" for f in prof["top_own"][:8]))
            lines.append("  inclusive: " + ", ".join(f"{f['frame']} {f['percent']}%"
                                                     for f in prof["top_inclusive_router_code"][:8]))
        lines.append("")
    agents = results.get("agents")
    if agents:
        import agents_latency

        lines += ([f"Agents: skipped, {agents['skipped']}"] if "skipped" in agents
                  else agents_latency.table(agents))
        lines.append("")
    start = results.get("startup")
    if start:
        lines.append(f"Start-up to first /api/health: {_fmt(start['summary'])} s "
                     f"({', '.join(f'{t:.2f}' for t in start['seconds'])})")
        lines.append("")
    lines.append("Targets (the Go router measured in this run is the bar for throughput)")
    for row in targets(results):
        name = (f"[{row.pin}] " if row.pin else "") + row.name
        lines.append(f"  {row.verdict:4}  {name:90} {row.measured}")
    for name, error in results.get("errors", {}).items():
        lines.append(f"  ERROR in {name}: {error.strip().splitlines()[-1] if error.strip() else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description="OpenCodeRouter benchmarks")
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer runs (~5 min)")
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--no-real", action="store_true", help="skip the real opencode serve")
    parser.add_argument("--pin", choices=("both", "on", "off"), default="both",
                        help="pin processes to cores with taskset: the proxy and SSE sections under both "
                             "pinnings (default), or only pinned / only not pinned")
    parser.add_argument("--no-pin", action="store_true", help="the same as --pin off")
    parser.add_argument("--no-go", action="store_true", help="leave the Go router out of the proxy and SSE sections")
    parser.add_argument("--profile", action="store_true", help="py-spy the router during an extra proxy run")
    parser.add_argument("--pypy", action="store_true",
                        help="also run the router on Debian's pypy3 (a venv in ~/.cache/opencoderouter) next to CPython")
    parser.add_argument("--no-pypy", action="store_true", help="leave PyPy out even when --pypy is given (make bench)")
    parser.add_argument("--runs", type=int, help="proxy runs per figure (default 3, quick 1)")
    parser.add_argument("--stock-proxy", action="store_true",
                        help="baseline: routers forward with Twisted's stock ReverseProxyResource (bench/stock_proxy.py)")
    parser.add_argument("--code", type=Path,
                        help="benchmark the opencoderouter of another checkout (default: this one)")
    args = parser.parse_args(argv)
    if args.code:
        if not (args.code / "opencoderouter" / "tap.py").exists():
            parser.error(f"--code: {args.code} has no opencoderouter/tap.py")
        os.environ["OCR_BENCH_CODE"] = str(args.code.resolve())
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    for flag, section in ((args.profile, "profile"), (args.pypy, "pypy")):
        if flag and section not in chosen:
            chosen.append(section)
    if args.no_pypy and "pypy" in chosen:
        chosen.remove("pypy")
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if {"proxy", "pypy"} & set(chosen) and not shutil.which("wrk"):
        parser.error("wrk is not installed (Debian: apt-get install wrk, or `make system-deps`)")
    can_pin = (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    wanted = "off" if args.no_pin else args.pin
    pins = {"both": (True, False), "on": (True,), "off": (False,)}[wanted] if can_pin else (False,)
    settings = Settings(args.quick, pins, not args.no_real, args.profile, args.runs, args.stock_proxy,
                        go=not args.no_go)

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if args.quick else "full",
        "proxy_under_test": "stock ReverseProxyResource (bench/stock_proxy.py)" if args.stock_proxy
        else "opencoderouter.proxy",
        # The other sections run under the first pinning.
        "pinned": pins[0],
        "pinnings": [pin_label(pin) for pin in pins],
        "go_router": str(GO_ROUTER) if settings.go else None,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg(),
                    "kernel": platform.release()},
        "code": str(code_under_test()),
        "commit": subprocess.run(["git", "-C", str(code_under_test()), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "errors": {},
    }
    sections: dict[str, Callable[[Settings, Path], dict[str, Any]]] = {
        "startup": bench_startup, "proxy": bench_proxy, "sse": bench_sse,
        "discovery": bench_discovery, "idle": bench_idle, "scan": bench_scan, "agents": bench_agents,
        "profile": bench_profile, "pypy": bench_pypy,
    }
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ocr-bench-"))
    try:
        for name in SECTIONS:
            if name not in chosen:
                continue
            for pin in (pins if name in PER_PINNING else pins[:1]):
                label = f"{name} ({pin_label(pin)})" if name in PER_PINNING else name
                print(f"== {label}", flush=True)
                t0 = time.monotonic()
                try:
                    figures = sections[name](settings.placed(pin), work)
                    if name in PER_PINNING:
                        results.setdefault(name, {})[pin_label(pin)] = figures
                    else:
                        results[name] = figures
                except Exception:
                    results["errors"][label] = traceback.format_exc()
                    print(results["errors"][label], file=sys.stderr, flush=True)
                print(f"   ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        results["duration_s"] = time.monotonic() - began
        results["machine"]["load_at_end"] = os.getloadavg()
        out_dir = BENCH / "results"
        out_dir.mkdir(exist_ok=True)
        out = out_dir / (f"bench-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if args.quick else ''}"
                          f"{'-stockproxy' if args.stock_proxy else ''}.json")
        out.write_text(json.dumps(results, indent=1, default=str))
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(report(results))
    print(f"\nJSON: {out.relative_to(REPO)}  ({results['duration_s']:.0f} s)")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
