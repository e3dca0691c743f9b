"""Print the README's performance table (markdown) from one or more bench/results/*.json files.

    python bench/summary.py bench/results/bench-A.json [bench/results/bench-B.json ...]

For every file and every pinning it measured (pinned, not pinned): three columns, ours, the Go router
measured in the same run, and ours ÷ Go; PASS/FAIL next to ours where a target applies. Figures measured
once per run (discovery, idle cost, scans, start-up) fill the first pinning's columns. When the run had
``--pypy``, a second table puts PyPy next to CPython.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pypy_env import describe_shim  # noqa: E402
from targets import CONNECTIONS, by_pinning, cell, combined, median, sse_counts, targets  # noqa: E402

#: What a row shows in one pinning's columns: ours, Go, ours ÷ Go.
Columns = tuple[str, str, str]
#: (results, pinning, whether it is the run's first pinning) -> the row's three columns.
Figure = Callable[[dict[str, Any], str, bool], Columns]
NONE: Columns = ("", "", "")


def _three(proxy: dict[str, Any], backend: str, size: str, key: str, digits: int = 2) -> str:
    """``key`` at 1 / 16 / 64 connections."""
    values = []
    for connections in CONNECTIONS:
        value = median(cell(proxy, backend, size, connections), key)
        values.append("n/a" if value is None else f"{value:,.{digits}f}")
    return " / ".join(values)


def _measured(proxy: dict[str, Any], backend: str, size: str, key: str) -> bool:
    return any(median(cell(proxy, backend, size, c), key) is not None for c in CONNECTIONS)


def _verdict(r: dict[str, Any], key: str, pin: str) -> str:
    mark = combined(targets(r), key, pin)
    return f" {mark}" if mark else ""


def ratio_row(backend: str, size: str, mode: str, verdict_key: str | None = None) -> Figure:
    """Through/direct for ours and Go, and ours ÷ Go."""
    def figure(r: dict[str, Any], pin: str, first: bool) -> Columns:
        proxy = by_pinning(r, "proxy").get(pin, {})
        if not _measured(proxy, backend, size, f"{mode}_ratio"):
            return ("n/a", "", "")
        ours = _three(proxy, backend, size, f"{mode}_ratio") + (_verdict(r, verdict_key, pin) if verdict_key else "")
        if not _measured(proxy, backend, size, f"go_{mode}_ratio"):
            return (ours, "n/a", "")
        return (ours, _three(proxy, backend, size, f"go_{mode}_ratio"), _three(proxy, backend, size, f"{mode}_vs_go"))
    return figure


def pair_row(backend: str, size: str, key: str, digits: int, verdict_key: str | None = None,
             with_ratio: bool = False) -> Figure:
    """A figure of ours (``key``) and of Go (``go_key``); ours ÷ Go only where a ratio means something."""
    def figure(r: dict[str, Any], pin: str, first: bool) -> Columns:
        proxy = by_pinning(r, "proxy").get(pin, {})
        if not _measured(proxy, backend, size, key):
            return ("n/a", "", "")
        ours = _three(proxy, backend, size, key, digits) + (_verdict(r, verdict_key, pin) if verdict_key else "")
        go_key = f"go_{key}"
        if not _measured(proxy, backend, size, go_key):
            return (ours, "n/a", "")
        vs = ""
        if with_ratio:
            parts = []
            for connections in CONNECTIONS:
                c = cell(proxy, backend, size, connections)
                mine, theirs = median(c, key), median(c, go_key)
                parts.append("n/a" if mine is None or not theirs else f"{mine / theirs:.2f}")
            vs = " / ".join(parts)
        return (ours, _three(proxy, backend, size, go_key, digits), vs)
    return figure


def shared_row(backend: str, size: str, key: str, digits: int) -> Figure:
    """A baseline both routers share (direct req/s, the backend's CPU): in the ours column."""
    def figure(r: dict[str, Any], pin: str, first: bool) -> Columns:
        proxy = by_pinning(r, "proxy").get(pin, {})
        return (_three(proxy, backend, size, key, digits) if _measured(proxy, backend, size, key) else "n/a", "", "")
    return figure


def _sse(r: dict[str, Any], pin: str, count: str = "1000") -> dict[str, Any]:
    return sse_counts(by_pinning(r, "sse").get(pin, {})).get(count, {})


def _fmt(value: Any, pattern: str) -> str:
    return "n/a" if not isinstance(value, (int, float)) or value != value else pattern.format(value)


def sse_latency_row(target: str) -> Figure:
    """p50 / p99 event latency with 1,000 streams (direct: in the ours column)."""
    def figure(r: dict[str, Any], pin: str, first: bool) -> Columns:
        entry = _sse(r, pin)
        def both(name: str) -> str:
            figures = entry.get(name)
            if not figures:
                return "n/a"
            return f"{_fmt(figures.get('p50_ms'), '{:.1f}')} / {_fmt(figures.get('p99_ms'), '{:.1f}')}"
        if not entry:
            return ("n/a", "", "")
        return (both("direct"), "", "") if target == "direct" else (both("router"), both("go"), "")
    return figure


def sse_added_row(r: dict[str, Any], pin: str, first: bool) -> Columns:
    """Added p99 with 100 / 1,000 streams."""
    entries = {count: _sse(r, pin, count) for count in ("100", "1000")}
    if not any(entries.values()):
        return ("n/a", "", "")
    ours = " / ".join(_fmt(e.get("added_p99_ms"), "{:.1f}") for e in entries.values())
    go = " / ".join(_fmt(e.get("go_added_p99_ms"), "{:.1f}") for e in entries.values())
    return (ours + _verdict(r, "sse-p99", pin), go, "")


def sse_router_row(key: str, pattern: str, verdict_key: str) -> Figure:
    """A figure of the routers with 1,000 open streams (RSS per stream, idle CPU)."""
    def figure(r: dict[str, Any], pin: str, first: bool) -> Columns:
        entry = _sse(r, pin)
        if not entry:
            return ("n/a", "", "")
        return (_fmt(entry.get("router", {}).get(key), pattern) + _verdict(r, verdict_key, pin),
                _fmt(entry.get("go", {}).get(key), pattern), "")
    return figure


def once(show: Callable[[dict[str, Any]], str]) -> Figure:
    """A figure measured once per run: in the first pinning's ours column."""
    def figure(r: dict[str, Any], pin: str, first: bool) -> Columns:
        return (show(r), "", "") if first else NONE
    return figure


def _get(r: dict[str, Any], *path: Any, fmt: str = "{:.2f}") -> str:
    value: Any = r
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return "n/a"
        value = value[key]
    return fmt.format(value) if isinstance(value, (int, float)) else str(value)


def _scan(r: dict[str, Any], mode: str) -> str:
    parts = []
    for n in ("0", "50"):
        figures = r.get("scan", {}).get(n, {}).get(mode, {})
        parts.append(f"{figures['wall_s'] * 1000:.0f} / {figures['cpu_s'] * 1000:.0f}" if "wall_s" in figures else "n/a")
    return " ; ".join(parts)


def _startup(r: dict[str, Any]) -> str:
    if "startup" not in r:
        return "n/a"
    s = r["startup"]["summary"]
    return f"{s['median']:.2f} [{s['min']:.2f}-{s['max']:.2f}] s" + _verdict(r, "startup", "")


ROWS: list[tuple[str, str, Figure]] = [
    ("real, small JSON: through router / direct req/s, path, c=1 / 16 / 64", "≥ the Go router's",
     ratio_row("real", "small", "path", "throughput-path")),
    ("same, host mode", "≥ the Go router's", ratio_row("real", "small", "host", "throughput-host")),
    ("real, small: direct req/s, c=1 / 16 / 64 (the baseline)", "", shared_row("real", "small", "direct_rps", 0)),
    ("real, small: added p50 latency at c=1 / 16 / 64, path (ms)", "≤ 0.35 ms at c=1 where c=1 misses Go",
     pair_row("real", "small", "path_added_p50_ms", 3)),
    ("same, host mode (ms)", "≤ 0.35 ms at c=1 where c=1 misses Go", pair_row("real", "small", "host_added_p50_ms", 3)),
    ("real, small: router CPU µs per request, path, c=1 / 16 / 64", "≤ 200 µs at c=1 where c=1 misses Go",
     pair_row("real", "small", "path_router_cpu_us", 0, "floor-path", with_ratio=True)),
    ("fake, small: through router / direct, path, c=1 / 16 / 64", "", ratio_row("fake", "small", "path")),
    ("fake, small: added p50 latency, path, c=1 / 16 / 64 (ms)", "", pair_row("fake", "small", "path_added_p50_ms", 3)),
    ("router CPU µs per small request, path, c=1 / 16 / 64 (fake)", "",
     pair_row("fake", "small", "path_router_cpu_us", 0, with_ratio=True)),
    ("the fake backend's own CPU µs per request, c=1 / 16 / 64", "",
     shared_row("fake", "small", "direct_backend_cpu_us", 0)),
    ("fake, 1 MiB: through router / direct, path, c=1 / 16 / 64", "≥ 0.9 at c=16",
     ratio_row("fake", "large", "path", "large-fake-path")),
    ("same, host mode", "≥ 0.9 at c=16", ratio_row("fake", "large", "host", "large-fake-host")),
    ("real, 2.7 MB web UI bundle: through router / direct, path, c=1 / 16 / 64", "≥ 0.9 at c=16",
     ratio_row("real", "large", "path", "large-real-path")),
    ("same, host mode", "≥ 0.9 at c=16", ratio_row("real", "large", "host", "large-real-host")),
    ("SSE, 1,000 streams: event latency p50 / p99 direct (ms)", "", sse_latency_row("direct")),
    ("same, through the router (ms)", "", sse_latency_row("router")),
    ("SSE: added p99 with 100 / 1,000 streams (ms)", "< 5 ms with 1,000", sse_added_row),
    ("SSE: router RSS per open stream (1,000)", "≤ 30 KiB", sse_router_row("rss_per_stream_kib", "{:.1f} KiB", "sse-rss")),
    ("SSE: router CPU with 1,000 idle streams", "≤ 1 % of a core",
     sse_router_row("router_idle_cpu_percent", "{:.1f} %", "sse-cpu")),
    ("Discovery, default flags: median / p90", "median ≤ 1 s; today 0.21 s",
     once(lambda r: _get(r, "discovery", "default", "median") + " / " + _get(r, "discovery", "default", "p90") + " s"
          + _verdict(r, "discovery", ""))),
    ("Discovery, `--scan-interval 1s`: median / p90", "",
     once(lambda r: _get(r, "discovery", "scan_interval_1s", "median") + " / "
          + _get(r, "discovery", "scan_interval_1s", "p90") + " s")),
    ("Idle router CPU with 0 / 10 / 50 backends (% of a core, default flags)", "≤ 1 % with 10; today 0.3 %",
     once(lambda r: " / ".join(_get(r, "idle", n, "cpu_percent", fmt="{:.1f}") for n in ("0", "10", "50"))
          + _verdict(r, "idle-cpu", ""))),
    ("Idle router RSS with 0 / 10 / 50 backends", "",
     once(lambda r: " / ".join(_get(r, "idle", n, "rss_kib", fmt="{:.0f}") for n in ("0", "10", "50")) + " KiB")),
    ("One scan of 1,001 ports, 0 ; 50 listening: wall / CPU ms", "", once(lambda r: _scan(r, "proc_listing"))),
    ("Same, probing every port (no /proc; the Go router's way)", "", once(lambda r: _scan(r, "probe_every_port"))),
    ("One look at the listening sockets: /proc/net/tcp parse vs netlink sock_diag (ms CPU)", "",
     once(lambda r: _get(r, "scan", "50", "listing", "proc_parse_cpu_ms") + " vs "
          + _get(r, "scan", "50", "listing", "sock_diag_cpu_ms", fmt="{:.3f}") + " ("
          + _get(r, "scan", "50", "listing", "tcp_sockets_on_machine", fmt="{}") + " sockets)")),
    ("Start-up to first /api/health: median [min-max]", "< 1 s; today 0.51 s", once(_startup)),
]


def _pinnings(r: dict[str, Any]) -> list[str]:
    found = list(by_pinning(r, "proxy")) + [p for p in by_pinning(r, "sse") if p not in by_pinning(r, "proxy")]
    return found or ["pinned" if r.get("pinned") else "unpinned"]


def _head(r: dict[str, Any]) -> str:
    who = "stock" if "stock" in r.get("proxy_under_test", "") else "ours"
    machine = r["machine"]
    load = f"{machine['load'][0]:.1f}" + (f"-{machine['load_at_end'][0]:.1f}" if "load_at_end" in machine else "")
    return f"{who} @ {r.get('commit', '?')} ({r.get('mode')}, load {load})"


def main_table(results: list[dict[str, Any]]) -> list[str]:
    """The figures × (run, pinning) × (ours, Go, ours ÷ Go) table."""
    columns: list[tuple[dict[str, Any], str, bool]] = []
    heads: list[str] = []
    for r in results:
        for index, pin in enumerate(_pinnings(r)):
            columns.append((r, pin, index == 0))
            heads += [f"{_head(r)}, {pin}", f"Go, {pin}", f"ours ÷ Go, {pin}"]
    lines = ["| Figure | Target | " + " | ".join(heads) + " |", "|---|---|" + "---|" * len(heads)]
    for name, target, figure in ROWS:
        values = [value for r, pin, first in columns for value in figure(r, pin, first)]
        lines.append(f"| {name} | {target} | " + " | ".join(values) + " |")
    return lines


def pypy_table(results: list[dict[str, Any]]) -> list[str]:
    """PyPy next to CPython, from the runs that had ``--pypy``."""
    lines: list[str] = []
    for r in results:
        pypy = r.get("pypy")
        if not pypy:
            continue
        lines += ["", f"PyPy @ {r.get('commit', '?')}: {pypy.get('interpreter', 'pypy3')}, unchanged code "
                      f"{pypy.get('unchanged_code', 'not tried')}"
                  + (f"; measured with a bench-side shim: {describe_shim(pypy['typing_shim'])}"
                     if pypy.get("typing_shim") else "")]
        proxy = pypy.get("proxy", {})
        if pypy.get("error") or not proxy.get("cells"):
            lines.append(f"not measured: {pypy.get('error', 'no figures')}")
            continue
        lines += ["", "| Figure | CPython | PyPy | PyPy ÷ CPython |", "|---|---|---|---|"]
        for backend in ("real", "fake"):
            for mode in ("path", "host"):
                if not _measured(proxy, backend, "small", f"{mode}_ratio"):
                    continue
                lines.append(f"| {backend}, small: through router / direct, {mode}, c=1 / 16 / 64 | "
                             f"{_three(proxy, backend, 'small', f'{mode}_ratio')} | "
                             f"{_three(proxy, backend, 'small', f'pypy_{mode}_ratio')} | "
                             f"{_three(proxy, backend, 'small', f'pypy_{mode}_vs_ours')} |")
            if _measured(proxy, backend, "small", "path_router_cpu_us"):
                lines.append(f"| {backend}, small: router CPU µs per request, path | "
                             f"{_three(proxy, backend, 'small', 'path_router_cpu_us', 0)} | "
                             f"{_three(proxy, backend, 'small', 'pypy_path_router_cpu_us', 0)} | |")
    return lines


def main(paths: list[str]) -> int:
    """Print the markdown tables."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    print("\n".join(main_table(results) + pypy_table(results)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
