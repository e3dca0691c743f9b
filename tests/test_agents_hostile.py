"""Hostile backend streams against a real router process: it stays up, shows them unknown, logs each once."""

from __future__ import annotations

import time

import pytest

from .support import free_port_block, http_get, http_json, wait_for

pytestmark = pytest.mark.slow


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_garbage_and_a_10_mb_event_never_crash_the_router_and_are_shown_unknown(
    tmp_path, fake_opencode_factory, router_factory
):
    base = free_port_block(3)
    fake_opencode_factory(tmp_path / "good", port=base)
    for offset, mode in ((1, "garbage"), (2, "huge")):
        fake_opencode_factory(tmp_path / mode, port=base + offset, module="tests.hostile_opencode",
                              extra=("--hostile", mode))
    router = router_factory("--scan-start", str(base), "--scan-end", str(base + 2), "--scan-interval", "1s")

    def states() -> dict[str, tuple[str, str | None]]:
        return {a["slug"]: (a["agents"]["state"], a["agents"]["reason"]) for a in http_json(router.url + "/api/agents")}

    seen = wait_for(lambda: (lambda s: len(s) == 3 and s["good"][0] == "idle" and s["garbage"][0] == "unknown"
                             and s["huge"][0] == "unknown" and s)(states()), timeout=20, what="the three states")
    assert seen["garbage"][1] == "its event stream sent a line that is not server-sent events"
    assert seen["huge"][1] == "its event stream sent an event larger than 4194304 bytes"
    before = rss_kib(router.process.pid)
    time.sleep(6)  # several reconnects (1 s, 2 s, ...), each refused again
    assert http_get(router.url + "/api/health")[0] == 200
    assert states()["good"] == ("idle", None)
    log = router.log()
    for mode in ("garbage", "huge"):
        assert log.count(f"agent watcher: backend {mode} on port") == 1, "logged once, not at every retry"
    assert "Traceback" not in log and "Unhandled" not in log
    # The 10 MB event was never held: the router grew by far less than it.
    assert rss_kib(router.process.pid) - before < 8 * 1024
