"""The performance issue's targets, judged from one run's results (``run.py``'s JSON): PASS / FAIL / n/a.

The Go router measured in the same run is the bar for throughput; the other targets are fixed figures.
Proxy and SSE figures are judged once per pinning (``pinned``, ``unpinned``); the rest once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

CONNECTIONS = (1, 16, 64)
#: Today's figures (README, run f449b95) that "nothing else gets worse" refers to; shown next to the targets.
TODAY = {"discovery_s": 0.21, "idle_cpu_10_percent": 0.3, "startup_s": 0.51}
#: Where one connection cannot reach the Go router's ratio, the floor (router CPU, added p50 at c=1).
FLOOR_CPU_US = 200.0
FLOOR_ADDED_P50_MS = 0.35
LARGE_FLOOR = 0.9
SSE_ADDED_P99_MS = 5.0
SSE_RSS_KIB = 30.0
SSE_IDLE_CPU_PERCENT = 1.0


class Target(NamedTuple):
    """One judged target: ``key`` groups rows of a table line, ``pin`` is ``pinned``/``unpinned``/``""``."""

    key: str
    pin: str
    name: str
    measured: str
    verdict: str


def by_pinning(results: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    """A per-pinning section's results by pinning (older files hold one pinning without the level)."""
    value = results.get(section) or {}
    if section == "proxy" and "cells" in value or section == "sse" and any(k.isdigit() for k in value):
        return {"pinned" if results.get("pinned") else "unpinned": value}
    return {pin: v for pin, v in value.items() if isinstance(v, dict)}


def cell(proxy: dict[str, Any], backend: str, size: str, connections: int) -> dict[str, Any] | None:
    """The proxy figures of one (backend, size, connections), or None."""
    return next((c for c in proxy.get("cells", []) if c["backend"] == backend and c["size"] == size
                 and c["connections"] == connections), None)


def median(c: dict[str, Any] | None, key: str) -> float | None:
    """The median of ``key`` in a cell; None when it was not measured."""
    value = (c or {}).get(key, {}).get("median")
    return None if value is None or value != value else float(value)


def judged_backend(proxy: dict[str, Any]) -> str:
    """``real`` when the real opencode was measured (the targets are about it), else ``fake``."""
    return "real" if any(c["backend"] == "real" for c in proxy.get("cells", [])) else "fake"


def sse_counts(sse: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The SSE entries by stream count (leaving out notes such as ``go_error``)."""
    return {k: v for k, v in sse.items() if k.isdigit()}


def verdict(ok: bool | None) -> str:
    """PASS, FAIL, or n/a when there is nothing to judge."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def _num(value: float | None, digits: int = 2, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{unit}"


def proxy_targets(proxy: dict[str, Any], pin: str) -> list[Target]:
    """Throughput against the Go router, the one-connection floor, and large responses."""
    rows: list[Target] = []
    backend = judged_backend(proxy)
    for mode in ("path", "host"):
        for connections in CONNECTIONS:
            c = cell(proxy, backend, "small", connections)
            ours, go = median(c, f"{mode}_ratio"), median(c, f"go_{mode}_ratio")
            vs = median(c, f"{mode}_vs_go")
            rows.append(Target(
                f"throughput-{mode}", pin,
                f"throughput {mode} c={connections} ({backend}, small): through/direct >= the Go router's",
                f"{_num(ours)} vs Go {_num(go)} (ours ÷ Go {_num(vs)})",
                verdict(None if ours is None or go is None else ours >= go)))
        c = cell(proxy, backend, "small", 1)
        cpu, added = median(c, f"{mode}_router_cpu_us"), median(c, f"{mode}_added_p50_ms")
        rows.append(Target(
            f"floor-{mode}", pin,
            f"c=1 floor {mode} ({backend}): router CPU <= {FLOOR_CPU_US:.0f} us/request, "
            f"added p50 <= {FLOOR_ADDED_P50_MS} ms",
            f"{_num(cpu, 0)} us, +{_num(added, 3)} ms",
            verdict(None if cpu is None or added is None else cpu <= FLOOR_CPU_US and added <= FLOOR_ADDED_P50_MS)))
    for backend, what in (("fake", "1 MiB"), ("real", "web UI bundle")):
        for mode in ("path", "host"):
            c = cell(proxy, backend, "large", 16)
            if c is None:
                continue
            ratio = median(c, f"{mode}_ratio")
            rows.append(Target(f"large-{backend}-{mode}", pin,
                               f"{what} ({backend}) {mode} c=16: through/direct >= {LARGE_FLOOR}",
                               f"{_num(ratio)} (Go {_num(median(c, f'go_{mode}_ratio'))})",
                               verdict(None if ratio is None else ratio >= LARGE_FLOOR)))
    return rows


def sse_targets(sse: dict[str, Any], pin: str) -> list[Target]:
    """Added event latency, memory per stream and idle CPU with 1,000 streams."""
    entry = sse_counts(sse).get("1000")
    if entry is None:
        return []
    ours, go = entry.get("router", {}), entry.get("go", {})
    added, go_added = entry.get("added_p99_ms"), entry.get("go_added_p99_ms")
    rss, cpu = ours.get("rss_per_stream_kib"), ours.get("router_idle_cpu_percent")
    return [
        Target("sse-p99", pin, f"SSE added p99 with 1,000 streams < {SSE_ADDED_P99_MS:.0f} ms",
               f"{_num(added, 1)} ms (Go {_num(go_added, 1)} ms)",
               verdict(None if added is None else added < SSE_ADDED_P99_MS)),
        Target("sse-rss", pin, f"router RSS per open stream (1,000) <= {SSE_RSS_KIB:.0f} KiB",
               f"{_num(rss, 1)} KiB (Go {_num(go.get('rss_per_stream_kib'), 1)} KiB)",
               verdict(None if rss is None else rss <= SSE_RSS_KIB)),
        Target("sse-cpu", pin, f"router CPU with 1,000 idle streams <= {SSE_IDLE_CPU_PERCENT:.0f} % of a core",
               f"{_num(cpu, 1)} % (Go {_num(go.get('router_idle_cpu_percent'), 1)} %)",
               verdict(None if cpu is None else cpu <= SSE_IDLE_CPU_PERCENT)),
    ]


def other_targets(results: dict[str, Any]) -> list[Target]:
    """Discovery, idle CPU and start-up: the earlier targets, with today's figures beside them."""
    disc = (results.get("discovery") or {}).get("default")
    idle = (results.get("idle") or {}).get("10")
    start = results.get("startup")
    return [
        Target("discovery", "", f"discovery median at default flags <= 1 s (today {TODAY['discovery_s']} s)",
               f"{_num(disc['median'])} s" if disc else "n/a", verdict(None if not disc else disc["median"] <= 1.0)),
        Target("idle-cpu", "", f"idle CPU with 10 backends <= 1 % of a core (today {TODAY['idle_cpu_10_percent']} %)",
               f"{_num(idle['cpu_percent'])} %" if idle else "n/a",
               verdict(None if not idle else idle["cpu_percent"] <= 1.0)),
        Target("startup", "", f"start-up to first /api/health < 1 s (today {TODAY['startup_s']} s)",
               f"{_num(start['summary']['median'])} s" if start else "n/a",
               verdict(None if not start else start["summary"]["median"] < 1.0)),
    ]


def targets(results: dict[str, Any]) -> list[Target]:
    """Every target of the issue, per pinning where the figure is measured per pinning."""
    rows: list[Target] = []
    for pin, proxy in by_pinning(results, "proxy").items():
        rows += proxy_targets(proxy, pin)
    for pin, sse in by_pinning(results, "sse").items():
        rows += sse_targets(sse, pin)
    return rows + other_targets(results)


def combined(rows: list[Target], key: str, pin: str) -> str:
    """FAIL if any row of ``key`` under ``pin`` fails, PASS if all judged rows pass, else empty."""
    marks = {r.verdict for r in rows if r.key == key and r.pin == pin} - {"n/a"}
    return ("FAIL" if "FAIL" in marks else "PASS") if marks else ""
