"""Print the README's performance table (markdown) from one or more bench/results/*.json files.

    python bench/summary.py bench/results/bench-A.json [bench/results/bench-B.json ...]

One column per file, headed by the proxy it measured and the commit; PASS/FAIL where a target applies.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import targets  # noqa: E402

Row = tuple[str, str, Callable[[dict[str, Any]], str]]


def _cell(r: dict[str, Any], backend: str, size: str, connections: int) -> dict[str, Any] | None:
    return next((c for c in r.get("proxy", {}).get("cells", []) if c["backend"] == backend and c["size"] == size
                 and c["connections"] == connections), None)


def _each(r: dict[str, Any], backend: str, size: str, key: str, digits: int = 2, scale: float = 1.0) -> str:
    values = []
    for connections in (1, 16, 64):
        cell = _cell(r, backend, size, connections)
        value = cell[key]["median"] * scale if cell else float("nan")
        values.append("n/a" if value != value else f"{value:,.{digits}f}")
    return " / ".join(values)


def _verdicts(r: dict[str, Any], prefix: str) -> str:
    marks = {v for name, _, v in targets(r) if name.startswith(prefix)} - {"n/a"}
    return (" FAIL" if "FAIL" in marks else " PASS") if marks else ""


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


ROWS: list[Row] = [
    ("real, small JSON: through router / direct req/s, path, c=1 / 16 / 64", "≥ 0.50 / 0.65 / 0.70",
     lambda r: _each(r, "real", "small", "path_ratio") + _verdicts(r, "throughput path")),
    ("same, host mode", "≥ 0.50 / 0.65 / 0.70",
     lambda r: _each(r, "real", "small", "host_ratio") + _verdicts(r, "throughput host")),
    ("real, small: direct req/s, c=1 / 16 / 64 (the baseline)", "",
     lambda r: _each(r, "real", "small", "direct_rps", 0)),
    ("real, small: added p50 latency at c=1 / 16 / 64, path (ms)", "≤ 0.3 ms at c=1",
     lambda r: _each(r, "real", "small", "path_added_p50_ms", 3) + _verdicts(r, "added p50 latency path")),
    ("same, host mode (ms)", "≤ 0.3 ms at c=1",
     lambda r: _each(r, "real", "small", "host_added_p50_ms", 3) + _verdicts(r, "added p50 latency host")),
    ("fake, small: through router / direct, path, c=1 / 16 / 64", "",
     lambda r: _each(r, "fake", "small", "path_ratio")),
    ("fake, small: added p50 latency, path, c=1 / 16 / 64 (ms)", "",
     lambda r: _each(r, "fake", "small", "path_added_p50_ms", 3)),
    ("router CPU µs per small request, path, c=1 / 16 / 64 (fake)", "",
     lambda r: _each(r, "fake", "small", "path_router_cpu_us", 0)),
    ("the fake backend's own CPU µs per request, c=1 / 16 / 64", "",
     lambda r: _each(r, "fake", "small", "direct_backend_cpu_us", 0)),
    ("fake, 1 MiB: through router / direct, path, c=1 / 16 / 64", "",
     lambda r: _each(r, "fake", "large", "path_ratio")),
    ("real, 2.7 MB web UI bundle: through router / direct, host, c=1 / 16 / 64", "",
     lambda r: _each(r, "real", "large", "host_ratio")),
    ("SSE, 1,000 streams: event latency p50 / p99 direct (ms)", "",
     lambda r: _get(r, "sse", "1000", "direct", "p50_ms", fmt="{:.1f}") + " / "
     + _get(r, "sse", "1000", "direct", "p99_ms", fmt="{:.1f}")),
    ("same, through the router (ms)", "",
     lambda r: _get(r, "sse", "1000", "router", "p50_ms", fmt="{:.1f}") + " / "
     + _get(r, "sse", "1000", "router", "p99_ms", fmt="{:.1f}")),
    ("SSE: added p99 with 100 / 1,000 streams (ms)", "< 5 ms with 1,000",
     lambda r: _get(r, "sse", "100", "added_p99_ms", fmt="{:.1f}") + " / "
     + _get(r, "sse", "1000", "added_p99_ms", fmt="{:.1f}") + _verdicts(r, "SSE added")),
    ("SSE: router RSS per open stream (1,000)", "≤ 30 KiB",
     lambda r: _get(r, "sse", "1000", "router", "rss_per_stream_kib", fmt="{:.1f} KiB") + _verdicts(r, "router RSS")),
    ("SSE: router CPU with 1,000 idle streams", "",
     lambda r: _get(r, "sse", "1000", "router", "router_idle_cpu_percent", fmt="{:.1f} %")),
    ("Discovery, default flags: median / p90", "median ≤ 1 s",
     lambda r: _get(r, "discovery", "default", "median") + " / " + _get(r, "discovery", "default", "p90") + " s"
     + _verdicts(r, "discovery")),
    ("Discovery, `--scan-interval 1s`: median / p90", "",
     lambda r: _get(r, "discovery", "scan_interval_1s", "median") + " / "
     + _get(r, "discovery", "scan_interval_1s", "p90") + " s"),
    ("Idle router CPU with 0 / 10 / 50 backends (% of a core, default flags)", "≤ 1 % with 10",
     lambda r: " / ".join(_get(r, "idle", n, "cpu_percent", fmt="{:.1f}") for n in ("0", "10", "50"))
     + _verdicts(r, "idle CPU")),
    ("Idle router RSS with 0 / 10 / 50 backends", "",
     lambda r: " / ".join(_get(r, "idle", n, "rss_kib", fmt="{:.0f}") for n in ("0", "10", "50")) + " KiB"),
    ("One scan of 1,001 ports, 0 ; 50 listening: wall / CPU ms", "", lambda r: _scan(r, "proc_listing")),
    ("Same, probing every port (no /proc; the Go router's way)", "", lambda r: _scan(r, "probe_every_port")),
    ("One look at the listening sockets: /proc/net/tcp parse vs netlink sock_diag (ms CPU)", "",
     lambda r: _get(r, "scan", "50", "listing", "proc_parse_cpu_ms") + " vs "
     + _get(r, "scan", "50", "listing", "sock_diag_cpu_ms", fmt="{:.3f}") + " ("
     + _get(r, "scan", "50", "listing", "tcp_sockets_on_machine", fmt="{}") + " sockets)"),
    ("Start-up to first /api/health: median [min-max]", "< 1 s",
     lambda r: (f"{r['startup']['summary']['median']:.2f} [{r['startup']['summary']['min']:.2f}-"
                f"{r['startup']['summary']['max']:.2f}] s" if "startup" in r else "n/a") + _verdicts(r, "start-up")),
]


def main(paths: list[str]) -> int:
    """Print the markdown table."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    heads = [f"{'stock' if 'stock' in r.get('proxy_under_test', '') else 'router'} @ {r.get('commit', '?')}"
             f" ({r.get('mode')}, load {r['machine']['load'][0]:.1f})" for r in results]
    print("| Figure | Target | " + " | ".join(heads) + " |")
    print("|---|---|" + "---|" * len(results))
    for name, target, value in ROWS:
        print(f"| {name} | {target} | " + " | ".join(value(r) for r in results) + " |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1:]))
