"""What one look at the listening sockets costs: the router's /proc/net/tcp parse vs a netlink query.

    python bench/listeners_cost.py --start 30000 --end 31000

The scanner's quick check lists listening sockets every 0.5 s. Parsing /proc/net/tcp costs time
in proportion to every TCP socket on the machine (established and TIME_WAIT included), so a busy
machine makes an idle router busy. The kernel's sock_diag netlink interface can return listening
sockets only; this script times both (median CPU ms per call) so the difference is measured, not
guessed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_TCPF_LISTEN = 1 << 10


def sock_diag_listeners(start: int, end: int) -> dict[int, tuple[int, int]]:
    """{port: (uid, inode)} of listening TCP sockets in start..end, asked from the kernel (Linux)."""
    found: dict[int, tuple[int, int]] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as sock:
            # struct inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid.
            request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _TCPF_LISTEN) + bytes(48)
            sock.send(struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY,
                                  _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0) + request)
            done = False
            for _ in range(10_000):  # bounded: one dump is a few messages
                data = sock.recv(65536)
                offset = 0
                while offset < len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == _NLMSG_DONE:
                        done = True
                        break
                    if kind == _NLMSG_ERROR:
                        raise OSError("sock_diag answered an error")
                    # struct inet_diag_msg after the 16-byte header: 4 bytes, then the sockid (sport first, big-endian).
                    port = struct.unpack_from("!H", data, offset + 20)[0]
                    uid, inode = struct.unpack_from("=II", data, offset + 16 + 4 + 48 + 12)
                    if start <= port <= end:
                        found.setdefault(port, (uid, inode))
                    offset += (length + 3) & ~3
                if done:
                    break
    return found


def _cpu_ms(call, repeat: int) -> float:
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
    try:
        from opencoderouter.scanner import list_listeners

        result["proc_parse_cpu_ms"] = _cpu_ms(lambda: list_listeners(args.start, args.end), args.repeat)
        result["proc_parse_found"] = len(list_listeners(args.start, args.end) or {})
    except Exception as error:  # the scanner's API may change; report rather than crash
        result["proc_parse_error"] = f"{type(error).__name__}: {error}"
    try:
        result["sock_diag_cpu_ms"] = _cpu_ms(lambda: sock_diag_listeners(args.start, args.end), args.repeat)
        result["sock_diag_found"] = len(sock_diag_listeners(args.start, args.end))
    except OSError as error:
        result["sock_diag_error"] = str(error)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
