"""What following agents costs the router: CPU with 50 streaming and 50 idle backends, memory per backend.

The router runs as a real ``twistd -n opencoderouter`` child (pinned to core 0) in front of 50 fake
OpenCode servers in one process (pinned to core 1; ``--serve`` mode of this script). Each server
lists 20 sessions, and its ``/global/event`` carries what the real OpenCode 1.18.33 sends:
heartbeats every 10 s, and while "streaming" a turn's text deltas (``message.part.delta``, in the
real server's compact JSON, ~330 bytes each) at ``--rate`` per second per backend, plus once a
second a ``message.part.updated`` and its ``sync`` frame. Each figure is measured with the
watcher on (``--agents=true``, the default) and off (``--agents=false``), so the difference is the
watcher's cost; the memory figure is the RSS difference divided by the number of backends, and the
state model alone is measured with tracemalloc.

    python bench/agents_cost.py [--backends 50] [--rate 30] [--window 20] [--runs 3] [--no-pin]

Prints a table and writes bench/results/agents-<time>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import (
    BENCH,
    Child,
    Router,
    child_env,
    free_block,
    http_get,
    measure_cpu,
    pinned,
    rss_kib,
    summary,
    wait_until,
)

SESSIONS = 20
TITLE = "Fix the flaky login test in the auth module"


# -- the backends (--serve) ----------------------------------------------------------------------------
def serve(root: str, ports: list[int], rate: float, streaming: bool) -> int:
    """Serve ``ports`` (one project each) until killed; stream deltas when ``streaming``."""
    from twisted.internet import reactor, task

    from opencoderouter.testing import FakeOpenCode

    servers: list[FakeOpenCode] = []
    now = int(time.time() * 1000)
    for index, port in enumerate(ports):
        directory = os.path.join(root, f"project{index:02d}")
        os.makedirs(directory, exist_ok=True)
        server = FakeOpenCode(directory, heartbeat=10.0)
        for n in range(SESSIONS):
            sid = f"ses_{index:02d}{n:02d}aaaaaaaaaaaaaaaaaaaaaa"
            server.sessions[sid] = {
                "id": sid, "slug": "gentle-comet", "version": "1.18.33", "projectID": "global", "directory": directory,
                "path": directory.lstrip("/"), "title": f"{TITLE} #{n}", "cost": 0,
                "tokens": {"input": 0, "output": 0, "reasoning": 0, "cache": {"read": 0, "write": 0}},
                "time": {"created": now - n * 60_000, "updated": now - n * 60_000},
            }
        server.busy.add(f"ses_{index:02d}00aaaaaaaaaaaaaaaaaaaaaa")
        server.listen(reactor, port, "127.0.0.1")
        servers.append(server)
        print(f"opencode server listening on http://127.0.0.1:{port}", flush=True)

    counter = [0]

    def deltas() -> None:
        for index, server in enumerate(servers):
            counter[0] += 1
            sid = f"ses_{index:02d}00aaaaaaaaaaaaaaaaaaaaaa"
            frame = (b'data: {"directory":"%s","project":"global","payload":{"id":"evt_233f4a888001QV9XGP%08d",'
                     b'"type":"message.part.delta","properties":{"sessionID":"%s","messageID":'
                     b'"msg_233f4a57a001958fwsIFikE9ZK","partID":"prt_233f4a886001L5fx7g7z4vkkzt","field":"text",'
                     b'"delta":"the next few words "}}}\n\n' % (server.directory.encode(), counter[0], sid.encode()))
            for request, wrapped in list(server.streams):
                if wrapped:
                    request.write(frame)

    def part_updates() -> None:
        for index, server in enumerate(servers):
            sid = f"ses_{index:02d}00aaaaaaaaaaaaaaaaaaaaaa"
            part = {"id": "prt_233f4a886001L5fx7g7z4vkkzt", "messageID": "msg_233f4a57a001958fwsIFikE9ZK",
                    "sessionID": sid, "type": "text", "text": "the next few words " * 12, "time": {"start": now}}
            update: dict[str, Any] = {"directory": server.directory, "project": "global", "payload": {
                "id": "evt_x", "type": "message.part.updated", "properties": {"sessionID": sid, "part": part,
                                                                              "time": now}}}
            sync = {"directory": server.directory, "project": "global", "payload": {
                "type": "sync", "syncEvent": {"id": "evt_x", "type": "message.part.updated.1", "seq": 1,
                                              "aggregateID": sid, "data": update["payload"]["properties"]},
                "id": "evt_x"}}
            chunk = b"".join(b"data: " + json.dumps(f, separators=(",", ":")).encode() + b"\n\n" for f in (update, sync))
            for request, wrapped in list(server.streams):
                if wrapped:
                    request.write(chunk)

    if streaming:
        task.LoopingCall(deltas).start(1.0 / rate, now=False)
        task.LoopingCall(part_updates).start(1.0, now=False)
    print("READY", flush=True)
    reactor.run()
    return 0


# -- the measurements -------------------------------------------------------------------------------------
def followed(router: Router, count: int) -> bool:
    status, body = http_get(router.url + "/api/agents", timeout=5)
    if status != 200:
        return False
    entries = json.loads(body)
    return len(entries) == count and all(e["agents"]["state"] != "unknown" for e in entries)


def one_run(workdir: Path, count: int, rate: float, streaming: bool, agents: bool, window: float,
            pin: bool) -> dict[str, float]:
    block = free_block(count)
    ports = list(range(block, block + count))
    root = Path(tempfile.mkdtemp(prefix="agents-", dir=workdir))
    backend = Child(pinned([sys.executable, str(BENCH / "agents_cost.py"), "--serve", str(root),
                            "--ports", ",".join(map(str, ports)), "--rate", str(rate),
                            *(["--streaming"] if streaming else [])], "1" if pin else None),
                    root / "backends.log", env=child_env())
    router = None
    try:
        wait_until(lambda: "READY" in backend.log(), 30, 0.05, "the backends")
        router = Router(workdir, (block, block + count - 1), cpus="0" if pin else None,
                        extra=["--scan-interval", "5s", f"--agents={'true' if agents else 'false'}"])
        router.wait_backends(ports, timeout=30)
        listed = time.monotonic()
        known_after = float("nan")
        if agents:
            wait_until(lambda: followed(router, count), 60, 0.05, "every backend followed")
            known_after = time.monotonic() - listed
        time.sleep(3.0)  # past the snapshots and the first heartbeats
        cpu = measure_cpu(router.pid, window)
        return {"cpu_percent": cpu, "rss_kib": float(rss_kib(router.pid)), "followed_after_s": known_after}
    finally:
        if router is not None:
            router.stop()
        backend.stop()


def state_memory(count: int) -> float:
    """KiB per backend of the agent state model alone (20 sessions, 2 pending requests), by tracemalloc."""
    from opencoderouter.agent_state import AgentState, Snapshot

    now = time.time()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    states = []
    for index in range(count):
        directory = f"/home/alice/work/project{index:02d}"
        state = AgentState(directory)
        sessions: list[dict[str, Any]] = [{"id": f"ses_{index:02d}{n:02d}aaaaaaaaaaaaaaaaaaaaaa", "title": f"{TITLE} #{n}",
                     "directory": directory, "time": {"created": (now - 600) * 1000, "updated": now * 1000}}
                    for n in range(SESSIONS)]
        busy = sessions[0]["id"]
        state.load(Snapshot(statuses={busy: {"type": "busy"}}, sessions=sessions, permissions=[
            {"id": f"per_{index}{k}", "sessionID": busy, "permission": "bash", "patterns": ["make test -j4"],
             "metadata": {"command": "make test -j4"}, "always": ["make *"]} for k in range(2)]), now)
        states.append(state)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return grown / 1024 / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--streaming", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backends", type=int, default=50)
    parser.add_argument("--rate", type=float, default=30.0, help="text deltas per second per streaming backend")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of CPU measured per run")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-pin", action="store_true", help="do not pin router and backends to cores 0 and 1")
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, [int(p) for p in args.ports.split(",")], args.rate, args.streaming)

    results: dict[str, Any] = {"backends": args.backends, "rate_per_backend": args.rate, "window_s": args.window,
                               "runs": args.runs, "pinned": not args.no_pin, "load": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="agents-cost-") as work:
        workdir = Path(work)
        for streaming in (True, False):
            for agents in (True, False):
                key = f"{'streaming' if streaming else 'idle'}_{'on' if agents else 'off'}"
                runs = [one_run(workdir, args.backends, args.rate, streaming, agents, args.window, not args.no_pin)
                        for _ in range(args.runs)]
                results[key] = {"cpu_percent": summary(r["cpu_percent"] for r in runs),
                                "rss_kib": summary(r["rss_kib"] for r in runs),
                                "followed_after_s": summary(r["followed_after_s"] for r in runs), "all": runs}
                print(f"{key:15s} cpu {results[key]['cpu_percent']['median']:6.2f} % "
                      f"[{results[key]['cpu_percent']['min']:.2f}-{results[key]['cpu_percent']['max']:.2f}]  "
                      f"rss {results[key]['rss_kib']['median']:8.0f} KiB", flush=True)
    results["state_kib_per_backend"] = state_memory(args.backends)
    n = args.backends
    on_rss = results["idle_on"]["rss_kib"]["median"]
    off_rss = results["idle_off"]["rss_kib"]["median"]
    results["rss_kib_per_backend"] = (on_rss - off_rss) / n
    streaming_extra = results["streaming_on"]["cpu_percent"]["median"] - results["streaming_off"]["cpu_percent"]["median"]
    idle_extra = results["idle_on"]["cpu_percent"]["median"] - results["idle_off"]["cpu_percent"]["median"]
    print()
    print(f"| Figure ({n} backends) | Target | Watcher on | Watcher off | Watcher's share |")
    print("|---|---|---|---|---|")
    print(f"| Router CPU, every backend streaming {args.rate:g} deltas/s | ≤ 5 % of a core | "
          f"{results['streaming_on']['cpu_percent']['median']:.2f} % | "
          f"{results['streaming_off']['cpu_percent']['median']:.2f} % | {streaming_extra:.2f} % |")
    print(f"| Router CPU, every backend idle (heartbeats) | ≤ 0.5 % of a core | "
          f"{results['idle_on']['cpu_percent']['median']:.2f} % | {results['idle_off']['cpu_percent']['median']:.2f} % | "
          f"{idle_extra:.2f} % |")
    print(f"| Every backend followed (snapshot read), after the router listed them | | "
          f"{results['idle_on']['followed_after_s']['median']:.2f} s (idle), "
          f"{results['streaming_on']['followed_after_s']['median']:.2f} s (streaming) | | |")
    print(f"| Router RSS per followed backend ({SESSIONS} sessions each) | ≤ 100 KiB | "
          f"{results['rss_kib_per_backend']:.1f} KiB | | state model alone: "
          f"{results['state_kib_per_backend']:.1f} KiB |")
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    path = out / f"agents-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
