#!/usr/bin/env python3
"""OpenCodeRouter benchmarks: proxy overhead, SSE fan-out, discovery, idle cost, scans, start-up.

    python bench/run.py            # full run (~15 min)
    python bench/run.py --quick    # shorter windows and fewer runs (~4 min)
    python bench/run.py --only proxy,startup --no-real

Every figure is measured against a baseline in the same run. Prints a table with PASS/FAIL per
target and writes everything (raw runs included) to bench/results/bench-<time>.json.
Only 127.0.0.1 is used; every child process is stopped at the end.
"""

from __future__ import annotations

import argparse
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

from common import (  # noqa: E402
    BENCH,
    REPO,
    Backend,
    Router,
    child_env,
    code_under_test,
    cpu_seconds,
    free_block,
    http_get,
    measure_cpu,
    percentile,
    pinned,
    rss_kib,
    summary,
    wait_until,
)

SECTIONS = ("startup", "proxy", "sse", "discovery", "idle", "scan", "profile")
DEFAULT_SECTIONS = SECTIONS[:-1]  # the profile runs with --profile or --only profile
CONNECTIONS = (1, 16, 64)


class Settings:
    """Sizes of every loop, for a full or a quick run."""

    def __init__(self, quick: bool, pin: bool, real: bool, profile: bool, runs: int | None,
                 stock_proxy: bool = False) -> None:
        self.quick = quick
        #: Module imported into every router before twistd runs (a baseline's proxy swap).
        self.preload = "stock_proxy" if stock_proxy else None
        self.real = real
        self.profile = profile
        self.proxy_runs = runs or (1 if quick else 3)
        self.small_seconds = 2 if quick else 5
        self.large_seconds = 2 if quick else 3
        self.sse_counts = (100, 1000)
        self.sse_idle_seconds = 5 if quick else 10
        self.sse_emits = 10 if quick else 20
        self.discovery_samples = 3 if quick else 7
        self.idle_seconds = 15 if quick else 60
        self.idle_backends = (0, 10, 50)
        self.startup_samples = 3 if quick else 7
        self.scan_repeat = 2 if quick else 5
        # Two cores: the router gets core 0 to itself; backend, load generator and clients share
        # core 1, identically in the direct baseline and through the router.
        self.router_cpus = "0" if pin else None
        self.backend_cpus = "1" if pin else None
        self.client_cpus = "1" if pin else None


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


def bench_proxy(s: Settings, work: Path) -> dict[str, Any]:
    """wrk direct vs through the router (path and host mode), small JSON and ~1 MB."""
    block = free_block(4)
    backends: dict[str, dict[str, Any]] = {}
    fake = Backend(work, [block], cpus=s.backend_cpus, name="benchfake")
    real = None
    children: list[Any] = [fake]
    result: dict[str, Any] = {"pinning": {"router": s.router_cpus, "backend": s.backend_cpus, "wrk": s.client_cpus}}
    try:
        backends["fake"] = {"port": block, "small": "/global/health", "large": "/bench/1mb", "large_bytes": 1 << 20,
                            "pid": fake.pid}
        if s.real:
            try:
                from real_opencode import RealOpenCode

                real = RealOpenCode(block + 1, cpus=s.backend_cpus)
                children.append(real)
                wait_until(lambda: http_get(f"http://127.0.0.1:{block + 1}/global/health")[0] == 200, 15, 0.1,
                           "real opencode health")
                large, size = _large_path_of_real(block + 1)
                backends["real"] = {"port": block + 1, "small": "/global/health", "large": large, "large_bytes": size,
                                    "pid": real.process.pid}
            except Exception as error:  # report and carry on with the fake backend
                result["real_error"] = f"{type(error).__name__}: {error}"
        router = Router(work, (block, block + 3), cpus=s.router_cpus, preload=s.preload)
        children.append(router)
        registered = router.wait_backends([b["port"] for b in backends.values()])
        for info in backends.values():
            entry = registered[info["port"]]
            info["slug"] = entry["slug"]
            info["host"] = re.sub(r"\.local$", ".localhost", entry["domain"]) + f":{router.port}"
        result["backends"] = backends

        def urls(info: dict[str, Any], path: str) -> dict[str, tuple[str, str | None]]:
            return {
                "direct": (f"http://127.0.0.1:{info['port']}{path}", None),
                "path": (f"{router.url}/{info['slug']}{path}", None),
                "host": (f"{router.url}{path}", info["host"]),
            }

        # Sanity: every URL answers 200 with the expected size before anything is timed.
        for info in backends.values():
            for size in ("small", "large"):
                for mode, (url, host) in urls(info, info[size]).items():
                    status, body = http_get(url, {"Host": host} if host else None, timeout=10)
                    if status != 200 or (size == "large" and len(body) != info["large_bytes"]):
                        raise RuntimeError(f"{mode} {url} (Host {host}) answered {status}, {len(body)} bytes")
            for url, host in urls(info, info["small"]).values():  # warm-up (JIT, pools)
                run_wrk(url, 16, 1, host, s.client_cpus)

        # The router's background work (scanner) while no request flows, subtracted from CPU per request.
        idle_cpu_fraction = measure_cpu(router.pid, 3) / 100.0
        result["router_idle_cpu_percent"] = idle_cpu_fraction * 100
        runs: list[dict[str, Any]] = []
        for run in range(s.proxy_runs):
            for name, info in backends.items():
                for size in ("small", "large"):
                    seconds = s.small_seconds if size == "small" else s.large_seconds
                    for connections in CONNECTIONS:
                        cell = {"run": run, "backend": name, "size": size, "connections": connections}
                        for mode, (url, host) in urls(info, info[size]).items():
                            watch = {"backend": info["pid"]} if mode == "direct" else {"router": router.pid}
                            cell[mode] = figures = run_wrk(url, connections, seconds, host, s.client_cpus, watch)
                            if "router_cpu_us_per_req" in figures:
                                figures["router_net_cpu_us_per_req"] = figures["router_cpu_us_per_req"] - (
                                    1e6 * idle_cpu_fraction * seconds / max(1, figures["requests"]))
                        runs.append(cell)
                        print(f"  proxy run {run} {name:4} {size:5} c={connections:<2} "
                              + "  ".join(f"{m} {cell[m]['rps']:8.0f}/s p50 {cell[m]['p50_ms']:.3f}ms"
                                          for m in ("direct", "path", "host")), flush=True)
        result["runs"] = runs
        result["cells"] = _proxy_cells(runs)
    finally:
        for child in reversed(children):
            child.stop()
    return result


def _proxy_cells(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (backend, size, connections): medians and spreads over runs of each figure and ratio."""
    keys = sorted({(r["backend"], r["size"], r["connections"]) for r in runs},
                  key=lambda k: (k[0] != "real", k[1] != "small", k[2]))
    cells = []
    for key in keys:
        group = [r for r in runs if (r["backend"], r["size"], r["connections"]) == key]
        cell: dict[str, Any] = {"backend": key[0], "size": key[1], "connections": key[2],
                                "errors": sum(r[m]["errors"] for r in group for m in ("direct", "path", "host"))}
        for mode in ("direct", "path", "host"):
            cell[f"{mode}_rps"] = summary(r[mode]["rps"] for r in group)
            cell[f"{mode}_p50_ms"] = summary(r[mode]["p50_ms"] for r in group)
            cell[f"{mode}_p99_ms"] = summary(r[mode]["p99_ms"] for r in group)
        for mode in ("path", "host"):
            cell[f"{mode}_ratio"] = summary(r[mode]["rps"] / r["direct"]["rps"] for r in group)
            cell[f"{mode}_added_p50_ms"] = summary(r[mode]["p50_ms"] - r["direct"]["p50_ms"] for r in group)
            cell[f"{mode}_router_cpu_us"] = summary(r[mode].get("router_net_cpu_us_per_req", float("nan"))
                                                    for r in group)
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
    """N open /event streams, direct and through the router: event latency, RSS per stream, idle CPU."""
    block = free_block(2)
    backend = Backend(work, [block], cpus=s.backend_cpus, name="benchsse")
    router = None
    result: dict[str, Any] = {}
    try:
        router = Router(work, (block, block + 1), cpus=s.router_cpus, preload=s.preload)
        slug = router.wait_backends([block])[block]["slug"]
        emit_url = f"http://127.0.0.1:{block}/bench/emit"
        for count in s.sse_counts:
            entry: dict[str, Any] = {}
            for target, url in (("direct", f"http://127.0.0.1:{block}/event"),
                                ("router", f"{router.url}/{slug}/event")):
                rss_before = rss_kib(router.pid)
                client = SSEClient(url, count, s.client_cpus)
                try:
                    figures: dict[str, Any] = {"connected": client.ready["connected"],
                                               "failed": client.ready["failed"]}
                    if not figures["connected"]:
                        raise RuntimeError(f"no /event stream opened at {url} ({count} tried)")
                    if target == "router":
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
                if target == "router":
                    time.sleep(1)
                    figures["router_rss_after_close_kib"] = rss_kib(router.pid)
                entry[target] = figures
                print(f"  sse N={count} {target}: {figures}", flush=True)
            entry["added_p50_ms"] = entry["router"]["p50_ms"] - entry["direct"]["p50_ms"]
            entry["added_p99_ms"] = entry["router"]["p99_ms"] - entry["direct"]["p99_ms"]
            result[str(count)] = entry
    finally:
        if router:
            router.stop()
        backend.stop()
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


# -- report ----------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 2) -> str:
    if isinstance(value, dict):
        if value.get("n", 1) > 1:
            return f"{value['median']:.{digits}f} [{value['min']:.{digits}f}-{value['max']:.{digits}f}]"
        value = value.get("median")
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, PASS/FAIL/n/a) for every target of the issue."""
    rows: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    proxy = results.get("proxy", {})
    cells = proxy.get("cells", [])
    judged = "real" if any(c["backend"] == "real" for c in cells) else "fake"
    for connections, floor in ((1, 0.50), (16, 0.65), (64, 0.70)):
        for mode in ("path", "host"):
            cell = next((c for c in cells if c["backend"] == judged and c["size"] == "small"
                         and c["connections"] == connections), None)
            ratio = cell[f"{mode}_ratio"]["median"] if cell else None
            rows.append((f"throughput {mode} c={connections} ({judged}, small) >= {floor:.2f} x direct",
                         _fmt(cell[f"{mode}_ratio"]) if cell else "n/a",
                         verdict(None if ratio is None else ratio >= floor)))
    for mode in ("path", "host"):
        cell = next((c for c in cells if c["backend"] == judged and c["size"] == "small"
                     and c["connections"] == 1), None)
        added = cell[f"{mode}_added_p50_ms"]["median"] if cell else None
        rows.append((f"added p50 latency {mode} c=1 ({judged}) <= 0.300 ms",
                     _fmt(cell[f"{mode}_added_p50_ms"], 3) + " ms" if cell else "n/a",
                     verdict(None if added is None else added <= 0.3)))
    sse = results.get("sse", {}).get("1000")
    rows.append(("SSE added p99 with 1,000 streams < 5 ms",
                 f"{_fmt(sse['added_p99_ms'])} ms" if sse else "n/a",
                 verdict(None if not sse else sse["added_p99_ms"] < 5)))
    rows.append(("router RSS per open stream (1,000) <= 30 KiB",
                 f"{_fmt(sse['router']['rss_per_stream_kib'], 1)} KiB" if sse else "n/a",
                 verdict(None if not sse else sse["router"]["rss_per_stream_kib"] <= 30)))
    disc = results.get("discovery", {}).get("default")
    rows.append(("discovery median at default flags <= 1 s",
                 f"{_fmt(disc['median'])} s" if disc else "n/a",
                 verdict(None if not disc else disc["median"] <= 1.0)))
    idle = results.get("idle", {}).get("10")
    rows.append(("idle CPU with 10 backends <= 1% of a core",
                 f"{_fmt(idle['cpu_percent'])} %" if idle else "n/a",
                 verdict(None if not idle else idle["cpu_percent"] <= 1.0)))
    start = results.get("startup")
    rows.append(("start-up to first /api/health < 1 s",
                 f"{_fmt(start['summary'])} s" if start else "n/a",
                 verdict(None if not start else start["summary"]["median"] < 1.0)))
    return rows


def report(results: dict[str, Any]) -> str:
    """The human table."""
    lines: list[str] = []
    proxy = results.get("proxy")
    if proxy and proxy.get("cells"):
        lines.append("Proxy overhead (wrk -t1 keep-alive; ratio = through router / direct req/s; "
                     "median [min-max] over runs)")
        lines.append(f"{'backend':7} {'size':5} {'conns':>5} {'direct req/s':>14} {'path ratio':>17} "
                     f"{'host ratio':>17} {'p50 direct':>10} {'+p50 path':>10} {'+p50 host':>10} "
                     f"{'p99 dir/path/host ms':>22} {'CPU us/req backend/router':>26}")
        for c in proxy["cells"]:
            lines.append(
                f"{c['backend']:7} {c['size']:5} {c['connections']:>5} {_fmt(c['direct_rps'], 0):>14} "
                f"{_fmt(c['path_ratio']):>17} {_fmt(c['host_ratio']):>17} "
                f"{_fmt(c['direct_p50_ms'], 3):>10} {_fmt(c['path_added_p50_ms'], 3):>10} "
                f"{_fmt(c['host_added_p50_ms'], 3):>10} "
                f"{_fmt(c['direct_p99_ms']['median'])}/{_fmt(c['path_p99_ms']['median'])}/"
                f"{_fmt(c['host_p99_ms']['median']):>6} "
                f"{_fmt(c['direct_backend_cpu_us']['median'], 0):>10}/{_fmt(c['path_router_cpu_us']['median'], 0)}/"
                f"{_fmt(c['host_router_cpu_us']['median'], 0)}"
                + (f"  ERRORS {c['errors']}" if c["errors"] else ""))
        real_large = proxy["backends"].get("real", {}).get("large_bytes")
        lines.append("  (CPU us/req: backend's CPU per request direct / router's CPU per request in path / host mode,"
                     " from /proc, the router's idle CPU "
                     f"({proxy.get('router_idle_cpu_percent', float('nan')):.1f}% of a core) subtracted:"
                     " the figure least disturbed by other work on the machine)")
        lines.append("  (+p50 = added median latency in ms; large = fake: 1 MiB"
                     + (f", real: its {real_large / 1e6:.1f} MB web UI script bundle)" if real_large else ")"))
        if proxy.get("real_error"):
            lines.append(f"  real opencode not measured: {proxy['real_error']}")
    sse = results.get("sse")
    if sse:
        lines.append("")
        lines.append("SSE fan-out (/event through path route vs direct; event latency backend write -> client read)")
        lines.append(f"{'streams':>7} {'p50 direct':>10} {'p50 router':>10} {'p99 direct':>10} {'p99 router':>10} "
                     f"{'+p99':>7} {'RSS/stream':>10} {'idle CPU':>8} {'events':>12}")
        for count, e in sse.items():
            r, d = e["router"], e["direct"]
            lines.append(f"{count:>7} {_fmt(d['p50_ms']):>10} {_fmt(r['p50_ms']):>10} {_fmt(d['p99_ms']):>10} "
                         f"{_fmt(r['p99_ms']):>10} {_fmt(e['added_p99_ms']):>7} "
                         f"{_fmt(r['rss_per_stream_kib'], 1) + ' KiB':>10} {_fmt(r['router_idle_cpu_percent']) + '%':>8} "
                         f"{str(r['events']) + '/' + str(r['expected']):>12}")
        lines.append("  (ms; RSS/stream from VmRSS before/after opening; idle CPU = % of a core while streams idle)")
    disc = results.get("discovery")
    if disc:
        lines.append("")
        lines.append("Discovery (server listening -> listed in /api/backends)")
        for label, d in disc.items():
            lines.append(f"  {label:18} median {_fmt(d['median'])} s  p90 {_fmt(d['p90'])} s  "
                         f"({', '.join(f'{t:.2f}' for t in d['seconds'])})")
    idle = results.get("idle")
    if idle:
        lines.append("")
        lines.append("Idle cost at default flags (1,001-port range)")
        for count, d in idle.items():
            lines.append(f"  {count:>3} backends: CPU {_fmt(d['cpu_percent'])}% of a core over {d['window_s']} s, "
                         f"RSS {d['rss_kib'] / 1024:.1f} MiB (registered {d['registered']})")
    scan = results.get("scan")
    if scan:
        lines.append("")
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
    prof = results.get("profile")
    if prof:
        lines.append("")
        if "error" in prof:
            lines.append(f"Router profile: {prof['error']}")
        else:
            lines.append(f"Router profile (py-spy, wrk c=16 path mode, {prof['load']['rps']:.0f} req/s, "
                         f"{prof['load'].get('router_cpu_us_per_req', float('nan')):.0f} us router CPU per request; "
                         f"{prof['flamegraph']})")
            lines.append("  own time:  " + ", ".join(f"{f['frame']} {f['percent']}%" for f in prof["top_own"][:8]))
            lines.append("  inclusive: " + ", ".join(f"{f['frame']} {f['percent']}%"
                                                     for f in prof["top_inclusive_router_code"][:8]))
    start = results.get("startup")
    if start:
        lines.append("")
        lines.append(f"Start-up to first /api/health: {_fmt(start['summary'])} s "
                     f"({', '.join(f'{t:.2f}' for t in start['seconds'])})")
    lines.append("")
    lines.append("Targets")
    for name, measured, verdict in targets(results):
        lines.append(f"  {verdict:4}  {name:58} {measured}")
    for name, error in results.get("errors", {}).items():
        lines.append(f"  ERROR in {name}: {error.strip().splitlines()[-1] if error.strip() else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen sections, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description="OpenCodeRouter benchmarks")
    parser.add_argument("--quick", action="store_true", help="shorter windows, fewer runs (~4 min)")
    parser.add_argument("--only", default=",".join(DEFAULT_SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--no-real", action="store_true", help="skip the real opencode serve")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores with taskset")
    parser.add_argument("--profile", action="store_true", help="py-spy the router during an extra proxy run")
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
    if args.profile and "profile" not in chosen:
        chosen.append("profile")
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if "proxy" in chosen and not shutil.which("wrk"):
        parser.error("wrk is not installed (Debian: apt-get install wrk, or `make system-deps`)")
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    settings = Settings(args.quick, pin, not args.no_real, args.profile, args.runs, args.stock_proxy)

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "quick" if args.quick else "full",
        "proxy_under_test": "stock ReverseProxyResource (bench/stock_proxy.py)" if args.stock_proxy
        else "opencoderouter.proxy",
        "pinned": pin,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg(),
                    "kernel": platform.release()},
        "code": str(code_under_test()),
        "commit": subprocess.run(["git", "-C", str(code_under_test()), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
        "errors": {},
    }
    sections: dict[str, Callable[[Settings, Path], dict[str, Any]]] = {
        "startup": bench_startup, "proxy": bench_proxy, "sse": bench_sse,
        "discovery": bench_discovery, "idle": bench_idle, "scan": bench_scan, "profile": bench_profile,
    }
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ocr-bench-"))
    try:
        for name in SECTIONS:
            if name not in chosen:
                continue
            print(f"== {name}", flush=True)
            t0 = time.monotonic()
            try:
                results[name] = sections[name](settings, work)
            except Exception:
                results["errors"][name] = traceback.format_exc()
                print(results["errors"][name], file=sys.stderr, flush=True)
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
