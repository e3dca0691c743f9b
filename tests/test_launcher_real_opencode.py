"""The launcher with the real ``opencode serve`` (npm opencode-ai, pinned; offline settings)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from opencoderouter.oc import serve_processes

from .launcher_support import REAL_OPENCODE, alive, opencode_env, wait_gone
from .support import free_port, free_port_block, http_json, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.real_opencode,
    pytest.mark.skipif(not REAL_OPENCODE.exists(), reason="the real opencode is not installed (make opencode)"),
]


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry))
    return members


def test_router_runs_the_real_opencode_for_a_directory_and_leaves_nothing(tmp_path: Path, router_factory: Any) -> None:
    directory = tmp_path / "realproj"
    directory.mkdir()
    start = free_port_block(10)
    # A provider on a port nobody listens on: no prompt is sent, nothing leaves 127.0.0.1.
    env = opencode_env(tmp_path / "home", model_port=free_port())
    router = router_factory(
        "--opencode-bin", str(REAL_OPENCODE), "--scan-start", str(start), "--scan-end", str(start + 9),
        "--scan-interval", "1s", str(directory), env=env,
    )
    backend = wait_for(lambda: (b := http_json(router.url + "/api/backends")) and b[0], 30, what="real backend")
    assert backend["project_path"] == str(directory)
    assert backend["slug"] == "realproj" and start <= backend["port"] < start + 10
    assert backend["version"] == "1.18.33"
    (instance,) = http_json(router.url + "/api/instances")
    assert instance["state"] == "running" and instance["port"] == backend["port"]
    assert any(f"opencode server listening on http://127.0.0.1:{backend['port']}" in line for line in instance["log"])
    pid = instance["pid"]
    assert [p.pid for p in serve_processes(os.getuid()) if p.cwd == str(directory)] == [pid]
    assert os.getpgid(pid) == pid, "it leads its own process group"
    members = group_members(pid)

    assert router.stop() in (0, -15)
    assert "Server Shut Down." in router.log()
    assert not alive(pid)
    assert group_members(pid) == [] and wait_gone(members, 1) == []
    assert [p for p in serve_processes(os.getuid()) if p.cwd == str(directory)] == []


def test_real_servers_on_one_fresh_home_all_start_first_time(tmp_path: Path, router_factory: Any) -> None:
    # Started together, real servers race on the SQLite migration of the shared HOME and one exits 1;
    # the launcher starts them one at a time, so none needs a restart.
    directories = [tmp_path / name for name in ("one", "two", "three")]
    for directory in directories:
        directory.mkdir()
    start = free_port_block(10)
    env = opencode_env(tmp_path / "home", model_port=free_port())
    router = router_factory(
        "--opencode-bin", str(REAL_OPENCODE), "--scan-start", str(start), "--scan-end", str(start + 9),
        "--scan-interval", "1s", *map(str, directories), env=env,
    )

    def all_running() -> list[dict[str, Any]] | None:
        instances = http_json(router.url + "/api/instances")
        return instances if instances and all(i["state"] == "running" for i in instances) else None

    instances = wait_for(all_running, 90, what="three running real instances")
    assert [i["directory"] for i in instances] == [str(d) for d in directories]
    assert [i["restarts"] for i in instances] == [0, 0, 0], [i["log"] for i in instances]
    started = sorted(i["started_at"] for i in instances)
    assert started[0] < started[1] < started[2]
    assert router.stop() in (0, -15)
    assert [p for p in serve_processes(os.getuid()) if p.cwd in map(str, directories)] == []
