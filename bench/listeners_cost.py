"""What one look at the listening sockets costs: the router's /proc/net/tcp parse vs a netlink query.

    python bench/listeners_cost.py --start 30000 --end 31000

The scanner's quick check lists listening sockets every 0.5 s. Parsing /proc/net/tcp costs time
in proportion to every TCP socket on the machine (established and TIME_WAIT included), so a busy
machine makes an idle router busy. The scanner now asks the kernel's sock_diag netlink interface for listening
sockets only; this script times both (median CPU ms per call) so the difference is measured, not
guessed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path


def _cpu_ms(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.process_time()
        call()
        times.append((time.process_time() - began) * 1000)
    return statistics.median(times)


def main() -> int:
    """Time both listings over the same range."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=int, required=True)
    parser.add_argument("--end", type=int, required=True)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    sockets = sum(max(0, len(Path(p).read_text().splitlines()) - 1) for p in ("/proc/net/tcp", "/proc/net/tcp6"))
    result: dict[str, object] = {"tcp_sockets_on_machine": sockets}
    from opencoderouter.listeners import netlink_listeners, proc_listeners

    result["proc_parse_cpu_ms"] = _cpu_ms(lambda: proc_listeners(args.start, args.end), args.repeat)
    result["proc_parse_found"] = len(proc_listeners(args.start, args.end) or {})
    if netlink_listeners(args.start, args.end) is None:
        result["sock_diag_error"] = "netlink sock_diag is not available here"
    else:
        result["sock_diag_cpu_ms"] = _cpu_ms(lambda: netlink_listeners(args.start, args.end), args.repeat)
        result["sock_diag_found"] = len(netlink_listeners(args.start, args.end) or {})
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
