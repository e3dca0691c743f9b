"""The agent watcher in a real router process with fake backends: hostile streams, authentication."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from typing import Any

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

    garbage = "its event stream sent a line that is not server-sent events"
    huge = "its event stream sent an event larger than 4194304 bytes"
    wanted = {"good": ("idle", None), "garbage": ("unknown", garbage), "huge": ("unknown", huge)}
    seen: list[Any] = []
    try:
        wait_for(lambda: seen.append(states()) or seen[-1] == wanted, timeout=20, what="the three states")
    except AssertionError as error:
        raise AssertionError(f"{error}; last: {seen[-1:]}") from None
    before = rss_kib(router.process.pid)
    time.sleep(6)  # several reconnects (1 s, 2 s, ...), each refused again
    assert http_get(router.url + "/api/health")[0] == 200
    assert states()["good"] == ("idle", None)
    log = router.log()
    for mode, reason in (("garbage", garbage), ("huge", huge)):
        lines = [line for line in log.splitlines() if f"agent watcher: backend {mode} on port" in line]
        assert sum(reason in line for line in lines) == 1, f"logged once, not at every retry: {lines}"
    assert "Traceback" not in log and "Unhandled" not in log
    # The 10 MB event was never held: the router grew by far less than it.
    assert rss_kib(router.process.pid) - before < 8 * 1024


def test_agents_and_the_answers_are_behind_the_routers_authentication(tmp_path, fake_opencode_factory, router_factory):
    token = "agents-test-token-0123456789"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    os.chmod(token_file, 0o600)
    base = free_port_block(1)
    fake_opencode_factory(tmp_path / "alpha", port=base)
    router = router_factory("--scan-start", str(base), "--scan-end", str(base), "--scan-interval", "1s",
                            "--auth-token-file", str(token_file))
    bearer = {"Authorization": f"Bearer {token}"}
    wait_for(lambda: http_json(router.url + "/api/agents", headers=bearer)[0]["agents"]["state"] == "idle",
             timeout=15, what="alpha followed")
    assert http_get(router.url + "/api/agents")[0] == 401
    assert http_get(router.url + "/api/agents/alpha")[0] == 401
    assert http_get(router.url + "/api/agents/alpha", headers=bearer)[0] == 200

    def post(headers: dict[str, str]) -> int:
        request = urllib.request.Request(f"{router.url}/alpha/permission/per_nope/reply", method="POST",
                                         data=json.dumps({"reply": "once"}).encode(),
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert post({}) == 401
    assert post({**bearer, "Origin": "http://evil.example"}) == 403
    # Through, to the backend, which does not know that request.
    assert post({**bearer, "Origin": router.url}) == 404
