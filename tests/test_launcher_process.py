"""The launcher with real child processes: a router subprocess and the fake ``opencode`` executable."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .launcher_support import (
    alive,
    install_fake_opencode,
    kill_leftovers,
    project,
    recorded_pids,
    wait_gone,
)
from .support import free_port_block, http_get, http_json, wait_for

BLOCK = 10


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    """The fake ``opencode`` executable in a fresh bin directory."""
    return install_fake_opencode(tmp_path / "bin")


@pytest.fixture
def projects(tmp_path: Path) -> Iterator[Path]:
    """A root for project directories; anything the fake left running there is killed afterwards."""
    root = tmp_path / "projects"
    root.mkdir()
    yield root
    kill_leftovers(*[p for p in root.iterdir() if p.is_dir()])


def router_args(fake_bin: Path, start: int, *extra: str) -> list[str]:
    return ["--opencode-bin", str(fake_bin), "--scan-start", str(start), "--scan-end", str(start + BLOCK - 1),
            "--scan-interval", "1s", *extra]


def instances(router: Any) -> dict[str, dict[str, Any]]:
    return {i["directory"]: i for i in http_json(router.url + "/api/instances")}


def send(url: str, method: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def stop_and_check_clean(router: Any) -> None:
    """SIGTERM the router and check that it shut down through stopService (Twisted 26 exits -SIGTERM)."""
    assert router.stop() in (0, -signal.SIGTERM)
    assert "Server Shut Down." in router.log()


@pytest.mark.slow
def test_router_starts_two_projects_routes_both_and_leaves_no_process_on_stop(
    fake_bin: Path, projects: Path, router_factory: Any
) -> None:
    # alpha has a grandchild; beta ignores SIGTERM and so does its grandchild: only SIGKILL ends them.
    alpha = project(projects, "alpha", grandchild=True)
    beta = project(projects, "Beta", grandchild=True, ignore_sigterm=True)
    start = free_port_block(BLOCK)
    router = router_factory(*router_args(fake_bin, start, "--stop-timeout", "1s", str(alpha), str(beta)))

    backends = wait_for(lambda: len(b := http_json(router.url + "/api/backends")) == 2 and b, 15, what="2 backends")
    assert {b["slug"]: b["project_path"] for b in backends} == {"alpha": str(alpha), "beta": str(beta)}
    assert all(start <= b["port"] < start + BLOCK for b in backends)
    for backend in backends:
        # Routable: the router resolves the name, and the port it routes to is that project's server.
        resolved = http_json(f"{router.url}/api/resolve?name={backend['project_name']}")
        assert resolved["url"] == f"{router.url}/{backend['slug']}/"
        status, headers, body = http_get(f"http://127.0.0.1:{backend['port']}/path")
        assert status == 200 and json.loads(body)["directory"] == backend["project_path"]
    def all_running() -> dict[str, dict[str, Any]] | None:
        listed = instances(router)
        return listed if all(i["state"] == "running" for i in listed.values()) else None

    listed = wait_for(all_running, 10, what="both running")
    assert set(listed) == {str(alpha), str(beta)}
    assert listed[str(alpha)]["pid"] == recorded_pids(alpha)["leader"][0]
    assert any("opencode server listening on" in line for line in listed[str(alpha)]["log"])
    pids = [pid for d in (alpha, beta) for role in ("leader", "grandchild") for pid in recorded_pids(d)[role]]
    assert len(pids) == 4 and all(alive(pid) for pid in pids)

    stop_and_check_clean(router)
    # stopService waited for every child: nothing may be left the moment the router has exited.
    assert [pid for pid in pids if alive(pid)] == []
    log = router.log()
    assert "alpha: opencode server listening on" in log
    assert "did not exit within 1s of SIGTERM; sending SIGKILL" in log
    # beta ignores SIGTERM: only the SIGKILL after --stop-timeout ends it (the timing itself is on a
    # Clock in test_launcher_unit).
    beta_pid = listed[str(beta)]["pid"]
    sigkill = log.index(f"beta: pid {beta_pid} did not exit within 1s of SIGTERM; sending SIGKILL")
    assert log.index(f"beta: opencode (pid {beta_pid}) killed by SIGKILL") > sigkill


@pytest.mark.slow
def test_sigkill_of_the_router_kills_its_children_and_grandchildren(
    fake_bin: Path, projects: Path, router_factory: Any
) -> None:
    alpha = project(projects, "alpha", ignore_sigterm=True, grandchild=True)
    beta = project(projects, "beta", grandchild=True)
    start = free_port_block(BLOCK)
    router = router_factory(*router_args(fake_bin, start, "--stop-timeout", "1s", str(alpha), str(beta)))
    for directory in (alpha, beta):
        wait_for(lambda d=directory: instances(router)[str(d)]["state"] == "running", 15, what=f"{directory} running")
    leaders = [recorded_pids(d)["leader"][0] for d in (alpha, beta)]
    grandchildren = [recorded_pids(d)["grandchild"][0] for d in (alpha, beta)]
    reapers = [p for p in children_of(router.process.pid) if p not in leaders]
    assert len(reapers) == 1, "one reaper per launcher"
    router.stop(signal.SIGKILL)
    # The leaders die at once (parent-death signal); the reaper takes their whole groups down,
    # SIGTERM first, SIGKILL after --stop-timeout for alpha's grandchild, which ignores SIGTERM.
    assert wait_gone(leaders, 3) == [], "the parent-death signal kills the children with the router"
    assert wait_gone(grandchildren, 5) == [], "the reaper kills the grandchildren too"
    assert wait_gone(reapers, 3) == [], "and then exits"


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_crashing_child_is_restarted_then_marked_failed(fake_bin: Path, projects: Path, router_factory: Any) -> None:
    # Crashes 0.2 s after it listens: restarts after 1 s, 2 s, 4 s, 8 s, then the 5th fast failure.
    crashy = project(projects, "crashy", crash_after=0.2)
    start = free_port_block(BLOCK)
    router = router_factory(*router_args(fake_bin, start, str(crashy)))
    restarted = wait_for(lambda: (i := instances(router)[str(crashy)])["restarts"] >= 1 and i, 10, what="a restart")
    assert restarted["last_exit"] == "exited with status 3"
    # 1 + 2 + 4 + 8 s of backoff plus five start-ups: well within 60 s even on a loaded machine.
    failed = wait_for(lambda: (i := instances(router)[str(crashy)])["state"] == "failed" and i, 50, what="failed")
    assert failed["restarts"] == 4 and failed["pid"] is None
    assert "5 failures within 60s" in failed["reason"]
    assert len(recorded_pids(crashy)["leader"]) == 5
    assert "restarting in 1s" in router.log() and "restarting in 8s" in router.log()


def test_a_port_in_use_in_the_range_is_skipped(fake_bin: Path, projects: Path, router_factory: Any) -> None:
    alpha = project(projects, "alpha")
    start = free_port_block(BLOCK)
    # Something that is not OpenCode holds the first port of the range; the launcher moves on.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", start))
        holder.listen()
        router = router_factory(*router_args(fake_bin, start, str(alpha)))
        running = wait_for(lambda: (i := instances(router)[str(alpha)])["state"] == "running" and i, 15)
        assert running["port"] == start + 1


def test_already_running_directory_is_adopted_not_started(
    fake_bin: Path, projects: Path, router_factory: Any, fake_opencode_factory: Any
) -> None:
    alpha = project(projects, "alpha")
    start = free_port_block(BLOCK)
    existing = fake_opencode_factory(alpha, port=start + 3)
    router = router_factory(*router_args(fake_bin, start, str(alpha)))
    adopted = wait_for(lambda: instances(router).get(str(alpha)), 10, what="alpha listed")
    assert (adopted["state"], adopted["port"], adopted["pid"]) == ("adopted", start + 3, None)
    assert recorded_pids(alpha) == {}, "no second opencode was started"
    backends = wait_for(lambda: http_json(router.url + "/api/backends"), 10)
    assert [(b["slug"], b["port"]) for b in backends] == [("alpha", start + 3)]
    stop_and_check_clean(router)
    assert existing.process.poll() is None, "an adopted server is not the router's to stop"


def test_instances_api_starts_and_stops_one_at_run_time(fake_bin: Path, projects: Path, router_factory: Any) -> None:
    gamma = project(projects, "gamma", grandchild=True)
    start = free_port_block(BLOCK)
    router = router_factory(*router_args(fake_bin, start))
    assert http_json(router.url + "/api/instances") == []

    status, body = send(router.url + "/api/instances", "POST", {"directory": str(gamma)})
    assert status == 201 and body["state"] == "starting" and body["slug"] == "gamma"
    wait_for(lambda: instances(router)[str(gamma)]["state"] == "running", 15, what="gamma running")
    wait_for(lambda: http_json(router.url + "/api/resolve?name=gamma")["slug"] == "gamma", 10, what="gamma routable")
    status, body = send(router.url + "/api/instances", "POST", {"directory": str(gamma)})
    assert status == 200 and body["state"] == "running", "posting a running directory again changes nothing"
    pids = recorded_pids(gamma)["leader"] + recorded_pids(gamma)["grandchild"]

    status, body = send(router.url + "/api/instances/gamma", "DELETE")
    assert status == 200 and body["state"] == "stopped"
    assert [pid for pid in pids if alive(pid)] == [], "DELETE answers once the whole group has exited"

    status, body = send(router.url + "/api/instances/gamma", "DELETE")
    assert status == 200 and body["state"] == "stopped"
    status, body = send(router.url + "/api/instances/nope", "DELETE")
    assert status == 404 and body["error"] == "not_found"
    status, body = send(router.url + "/api/instances", "POST", {"directory": str(projects / "missing")})
    assert status == 400 and "does not exist" in body["message"]
    status, body = send(router.url + "/api/instances", "POST", {"dir": "x"})
    assert status == 400 and "directory" in body["message"]
    status, body = send(router.url + "/api/instances", "POST", {"directory": str(gamma)}, content_type="text/plain")
    assert status == 415


def test_missing_opencode_binary_is_a_clear_startup_error(projects: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from .support import subprocess_env

    alpha = project(projects, "alpha")
    result = subprocess.run(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "opencoderouter", "--port", "0", "--mdns=false", "--opencode-bin", str(tmp_path / "nope"), str(alpha)],
        env=subprocess_env(), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert f"--opencode-bin: {tmp_path / 'nope'} is not an executable file or a command on PATH" in result.stderr


def test_crash_with_a_grandchild_holding_the_pipes_is_still_restarted(
    fake_bin: Path, projects: Path, router_factory: Any
) -> None:
    # The grandchild inherits stdout, so the pipes stay open after the leader dies.
    crashy = project(projects, "crashy", crash_after=0.5, grandchild=True)
    start = free_port_block(BLOCK)
    router = router_factory(*router_args(fake_bin, start, str(crashy)))
    wait_for(lambda: instances(router)[str(crashy)]["restarts"] >= 1, 10, what="a restart")
    first_grandchild = recorded_pids(crashy)["grandchild"][0]
    assert wait_gone([first_grandchild], 7) == [], "the crashed leader's grandchild is cleaned up"
