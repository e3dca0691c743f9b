"""How soon the router shows an agent's state, on the real ``opencode serve`` 1.18.33 (issue 15's targets).

The scene of tests/test_agents_real_opencode.py (tests/agents_real.py): the test suite's fake model, two
real servers (``alpha``, ``beta``; own seeded HOMEs, offline) and a real router (``twistd -n
opencoderouter`` child) following both. Measured, each from the moment named to the first
``/api/agents/{slug}`` answer (polled every 10 ms) that shows the state:

a. ``permission.asked`` read on alpha's own ``/global/event`` → alpha ``needs_you`` with that permission;
b. ``question.asked`` read on beta's own ``/global/event`` → beta ``needs_you`` with that question;
c. a router restart mid-turn (a permission waiting on alpha, a turn streaming on beta, a failed one on
   beta): the new router's first ``/api/health`` answer → all three shown as they are;
d. a backend restart mid-turn (beta killed while streaming): the new server's "listening" line → beta
   known again, nothing working, the lost turn idle.

Targets: a and b ≤ 1 s, c and d ≤ 2 s, judged on the largest sample.

    python bench/agents_latency.py [--prompts 5] [--restarts 3] [--budget 240]

Prints a table and writes bench/results/agents-latency-<time>.json; ``bench/run.py`` runs it as its
``agents`` section. Only 127.0.0.1 is used; every child (router, servers, model) is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import BENCH, REPO, child_env, code_under_test, percentile

from tests.agents_real import HANG_GUARD, Agents, EventTap
from tests.real_opencode import MODE_BASH, MODE_QUESTION, opencode_binary
from tests.support import wait_for

#: How often /api/agents is asked while waiting for a state (the figures' resolution, plus one request).
POLL = 0.01
#: (key, what is timed, target in seconds)
FIGURES = (
    ("permission", "a. permission.asked on the backend -> needs you with it on /api/agents", 1.0),
    ("question", "b. question.asked on the backend -> needs you with it on /api/agents", 1.0),
    ("router_restart", "c. router restart mid-turn: healthy -> needs you, working, error right", 2.0),
    ("backend_restart", "d. backend restart mid-turn: listening -> known, the lost turn idle", 2.0),
)


# -- one sample of each figure ----------------------------------------------------------------------
def permission_sample(scene: Agents, tap: EventTap, n: int) -> float:
    """Seconds from alpha's ``permission.asked`` to alpha needing you with that permission; then rejected."""
    session_id = scene.prompt("alpha", f"{MODE_BASH} sample {n}", f"latency sample {n}")
    asked_at, frame = tap.wait("permission.asked", lambda p: p.get("sessionID") == session_id)
    wanted = frame["payload"]["properties"]["id"]
    shown_at, _ = scene.until(
        "alpha", session_id,
        lambda e, s: e["agents"]["state"] == "needs_you" and any(p["id"] == wanted for p in s["permissions"]),
        interval=POLL, what="needs you with the permission")
    scene.reject("alpha", wanted)
    scene.until("alpha", session_id, lambda e, s: s["status"] == "idle", what="idle after the reject")
    return shown_at - asked_at


def question_sample(scene: Agents, tap: EventTap, n: int) -> float:
    """Seconds from beta's ``question.asked`` to beta needing you with that question; then answered."""
    session_id = scene.prompt("beta", f"{MODE_QUESTION} sample {n}", f"latency sample {n}")
    asked_at, frame = tap.wait("question.asked", lambda p: p.get("sessionID") == session_id)
    wanted = frame["payload"]["properties"]["id"]
    shown_at, _ = scene.until(
        "beta", session_id,
        lambda e, s: e["agents"]["state"] == "needs_you" and any(q["id"] == wanted for q in s["questions"]),
        interval=POLL, what="needs you with the question")
    code, body = scene.request("POST", f"/beta/question/{wanted}/reply", {"answers": [["Blue"]]},
                               headers=scene.browser_origin())
    assert (code, body) == (200, True), (code, body)
    scene.until("beta", session_id, lambda e, s: s["status"] == "idle", what="idle once answered")
    return shown_at - asked_at


def router_restart_sample(scene: Agents, n: int) -> float:
    """Seconds from the new router's first health answer to the mid-turn state shown right; then tidied up."""
    turn = scene.start_mid_turn(slow=30)  # streams well past the restart
    back = scene.restart_router()
    right_at = wait_for(lambda: scene.shows_mid_turn(turn) and time.monotonic(), timeout=HANG_GUARD,
                        interval=POLL, what="the mid-turn state after the router restart")
    waiting = scene.session_of("alpha", turn.waiting)
    assert waiting is not None
    scene.reject("alpha", waiting["permissions"][0]["id"])
    scene.abort("beta", turn.busy)
    scene.until("alpha", turn.waiting, lambda e, s: s["status"] == "idle", what="idle after the reject")
    scene.until("beta", turn.busy, lambda e, s: s["status"] == "idle", what="idle after the abort")
    return right_at - back


def backend_restart_sample(scene: Agents, n: int) -> float:
    """Seconds from the restarted beta listening to the router showing its lost turn idle."""
    busy = scene.prompt("beta", "[fake-model:slow=30] the server will die", f"dies mid-turn {n}")
    scene.until("beta", busy, lambda e, s: s["status"] == "working", what="working before the kill")
    old = scene.servers["beta"]
    old.kill()
    old.stop()  # the process group is gone already: this reaps and closes its log
    wait_for(lambda: scene.agent("beta")["agents"]["state"] == "unknown", timeout=HANG_GUARD, interval=POLL,
             what="unknown once the server is gone")
    scene.servers["beta"] = scene.start_server("beta")
    back = time.monotonic()
    right_at = wait_for(lambda: scene.shows_lost_turn("beta", busy) and time.monotonic(), timeout=HANG_GUARD,
                        interval=POLL, what="the lost turn idle after the backend restart")
    return right_at - back


# -- the run ----------------------------------------------------------------------------------------
def _samples(take: Callable[[int], float], count: int, deadline: float) -> dict[str, Any]:
    """Up to ``count`` samples of ``take`` before ``deadline``; the first failure ends the figure."""
    seconds: list[float] = []
    entry: dict[str, Any] = {"seconds": seconds}
    for n in range(count):
        if time.monotonic() > deadline:
            entry["stopped"] = f"time budget spent after {n} of {count} samples"
            break
        try:
            seconds.append(take(n))
        except (AssertionError, RuntimeError, OSError, ValueError, KeyError, TypeError) as error:
            entry["error"] = f"sample {n}: {type(error).__name__}: {error}"
            break
    entry.update(n=len(seconds), p50_s=percentile(seconds, 0.5),
                 max_s=max(seconds) if seconds else float("nan"))
    print(f"  {' '.join(f'{v:.3f}' for v in seconds) or 'no samples'} s"
          + (f"  ({entry.get('error') or entry.get('stopped')})" if "error" in entry or "stopped" in entry else ""),
          flush=True)
    return entry


def measure(work: Path, prompts: int = 5, restarts: int = 3, budget: float = 240.0) -> dict[str, Any]:
    """Run the scene in ``work`` and take every figure: ``{key: {"seconds", "n", "p50_s", "max_s", "verdict"}}``.

    ``budget``: seconds after which no new sample starts (each wait is bounded by ``HANG_GUARD`` too).
    """
    if opencode_binary() is None:
        raise RuntimeError("the real opencode is not installed: run tests/setup/install-opencode.sh")
    results: dict[str, Any] = {"prompts": prompts, "restarts": restarts, "poll_s": POLL,
                               "load_at_start": os.getloadavg()}
    began = time.monotonic()
    deadline = began + budget
    # The router runs the code under test (``run.py --code``), like every router of the benchmark.
    scene = Agents(Path(tempfile.mkdtemp(prefix="agents-latency-", dir=work)),
                   router_env={"PYTHONPATH": child_env()["PYTHONPATH"]})
    try:
        for key, slug, take in (("permission", "alpha", permission_sample), ("question", "beta", question_sample)):
            print(f"  {key} ({prompts} prompts)", flush=True)
            tap = EventTap(scene.servers[slug].port)
            try:
                results[key] = _samples(partial(take, scene, tap), prompts, deadline)
            finally:
                tap.close()
        for key, restart in (("router_restart", router_restart_sample),
                             ("backend_restart", backend_restart_sample)):
            print(f"  {key} ({restarts} restarts)", flush=True)
            results[key] = _samples(partial(restart, scene), restarts, deadline)
    finally:
        scene.close()
    for key, _, target in FIGURES:
        entry = results[key]
        entry["target_s"] = target
        entry["verdict"] = ("FAIL" if "error" in entry else "n/a" if not entry["n"]
                            else "PASS" if entry["max_s"] <= target else "FAIL")
    results["duration_s"] = time.monotonic() - began
    results["load_at_end"] = os.getloadavg()
    return results


def table(results: dict[str, Any]) -> list[str]:
    """The figures as a markdown table with PASS/FAIL against each target."""
    load = ", ".join(f"{v:.2f}" for v in results.get("load_at_start", ()))
    lines = [f"Agents on the real opencode: asked/restarted -> shown on /api/agents (polled every "
             f"{results.get('poll_s', POLL) * 1000:.0f} ms; load average {load} at the start)",
             "| Figure | Target | Samples | p50 | max | Verdict |", "|---|---|---|---|---|---|"]
    for key, name, target in FIGURES:
        entry = results.get(key) or {"n": 0}
        figures = (f"{entry['p50_s']:.3f} s | {entry['max_s']:.3f} s" if entry.get("n") else "n/a | n/a")
        lines.append(f"| {name} | ≤ {target:g} s | {entry.get('n', 0)} | {figures} | {entry.get('verdict', 'n/a')} |")
        if entry.get("error") or entry.get("stopped"):
            lines.append(f"|   {entry.get('error') or entry.get('stopped')} | | | | | |")
    return lines


def main() -> int:
    """Run the scene once, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--prompts", type=int, default=5, help="samples of a and b")
    parser.add_argument("--restarts", type=int, default=3, help="samples of c and d")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds after which no new sample starts (default 240)")
    args = parser.parse_args()
    # A SIGTERM unwinds like Ctrl-C, so that every child is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()},
        "code": str(code_under_test()),
        "commit": subprocess.run(["git", "-C", str(code_under_test()), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip(),
    }
    with tempfile.TemporaryDirectory(prefix="ocr-bench-agents-") as work:
        results.update(measure(Path(work), args.prompts, args.restarts, args.budget))
    print()
    print("\n".join(table(results)))
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    path = out / f"agents-latency-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {path.relative_to(REPO)} ({results['duration_s']:.0f} s)")
    return 0 if all(results[key]["verdict"] != "FAIL" for key, _, _ in FIGURES) else 1


if __name__ == "__main__":
    sys.exit(main())
