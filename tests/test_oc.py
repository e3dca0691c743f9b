"""``oc`` and ``oc-kill`` end to end with the fake ``opencode`` executable (real processes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted

from opencoderouter.oc import is_opencode_serve

from .launcher_support import alive, install_fake_opencode, kill_leftovers, project, recorded_pids, wait_gone
from .support import free_port_block, http_json, subprocess_env

BLOCK = 10


def run(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``oc`` or ``oc-kill`` console-script entry point as its own process."""
    function = {"oc": "oc_main", "oc-kill": "oc_kill_main"}[script]
    return subprocess.run(
        [sys.executable, "-c", f"import sys; from opencoderouter.oc import {function}; sys.exit({function}())", *args],
        env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Iterator[Path]:
    """Project root, fake executable and log folder; every fake process left there is killed afterwards."""
    root = tmp_path / "projects"
    root.mkdir()
    install_fake_opencode(tmp_path / "bin")
    yield root
    kill_leftovers(*[p for p in root.iterdir() if p.is_dir()])


def oc_args(root: Path, start: int) -> list[str]:
    return ["--scan-start", str(start), "--scan-end", str(start + BLOCK - 1),
            "--opencode-bin", str(root.parent / "bin" / "opencode"), "--log-dir", str(root.parent / "logs")]


def test_opencode_serve_command_lines_are_recognised() -> None:
    assert is_opencode_serve(["opencode", "serve", "--port", "1"])
    assert is_opencode_serve(["/home/a/.cache/x/bin/opencode", "serve"])
    assert is_opencode_serve(["/usr/bin/python3", "/t/bin/opencode", "serve", "--port", "2"])
    assert not is_opencode_serve(["opencode", "run", "hello"])
    assert not is_opencode_serve(["opencode"])
    assert not is_opencode_serve(["python", "-m", "opencoderouter.testing", "serve"])
    assert not is_opencode_serve(["vim", "notes/opencode", "serve"][:1])


def test_oc_starts_detached_servers_skips_running_ones_and_oc_kill_stops_them(workspace: Path) -> None:
    alpha, beta, gamma = (project(workspace, name, grandchild=True) for name in ("alpha", "beta", "gamma"))
    start = free_port_block(BLOCK)
    result = run("oc", *oc_args(workspace, start), str(alpha), str(beta), str(workspace / "missing"))
    assert result.returncode == 1, "a non-directory argument fails the run"
    alpha_pid, beta_pid = recorded_pids(alpha)["leader"][0], recorded_pids(beta)["leader"][0]
    lines = result.stdout.splitlines()
    # One line per argument, in order (each start is waited for before the next).
    assert lines == [
        f"started {alpha} on :{start} (pid {alpha_pid})",
        f"started {beta} on :{start + 1} (pid {beta_pid})",
        f"error: {workspace / 'missing'} is not a directory",
    ]
    assert "Traceback" not in result.stderr
    # Detached: they outlive oc, each in its own session, and serve their directory.
    assert alive(alpha_pid) and alive(beta_pid)
    assert os.getsid(alpha_pid) == alpha_pid
    assert http_json(f"http://127.0.0.1:{start}/path")["directory"] == str(alpha)
    assert "opencode server listening on" in (workspace.parent / "logs" / "alpha.log").read_text()

    result = run("oc", *oc_args(workspace, start), str(alpha), str(gamma))
    gamma_pid = recorded_pids(gamma)["leader"][0]
    assert result.returncode == 0
    assert result.stdout.splitlines() == [
        f"skipped {alpha}: already running on :{start} (pid {alpha_pid})",
        f"started {gamma} on :{start + 2} (pid {gamma_pid})",
    ]
    assert len(recorded_pids(alpha)["leader"]) == 1, "no second server for alpha"

    listing = run("oc-kill", "--dry-run", str(workspace))
    assert listing.returncode == 0
    assert listing.stdout.splitlines() == [
        f"would stop pid {pid} ({directory} on :{port})"
        for pid, directory, port in sorted([(alpha_pid, alpha, start), (beta_pid, beta, start + 1),
                                            (gamma_pid, gamma, start + 2)])
    ]
    assert all(alive(pid) for pid in (alpha_pid, beta_pid, gamma_pid)), "--dry-run kills nothing"

    everything = [pid for d in (alpha, beta, gamma) for pids in recorded_pids(d).values() for pid in pids]
    stopped = run("oc-kill", "--grace", "5s", str(workspace))
    assert stopped.returncode == 0
    assert sorted(stopped.stdout.splitlines()) == sorted([
        f"stopped pid {alpha_pid} ({alpha} on :{start})",
        f"stopped pid {beta_pid} ({beta} on :{start + 1})",
        f"stopped pid {gamma_pid} ({gamma} on :{start + 2})",
    ])
    assert wait_gone(everything, 5) == [], "the servers and their grandchildren are gone"
    assert run("oc-kill", str(workspace)).stdout.startswith("no opencode serve process of yours is running")


def test_oc_kill_sigkills_a_server_that_ignores_sigterm(workspace: Path) -> None:
    stubborn = project(workspace, "stubborn", ignore_sigterm=True)
    start = free_port_block(BLOCK)
    assert run("oc", *oc_args(workspace, start), str(stubborn)).returncode == 0
    pid = recorded_pids(stubborn)["leader"][0]
    result = run("oc-kill", "--grace", "1s", str(stubborn))
    assert result.stdout.splitlines() == [
        f"killed pid {pid} ({stubborn} on :{start}): it did not exit within 1s of SIGTERM"
    ]
    assert wait_gone([pid], 5) == []


def test_oc_reports_a_server_that_fails_to_start(workspace: Path) -> None:
    broken = project(workspace, "broken", fail=True)
    start = free_port_block(BLOCK)
    result = run("oc", *oc_args(workspace, start), str(broken))
    assert result.returncode == 1
    assert result.stdout.startswith(f"failed {broken}: exited with status 2 (Error: fake start-up failure)")


def test_oc_without_opencode_says_what_to_do(workspace: Path) -> None:
    result = run("oc", "--opencode-bin", str(workspace / "nope"), str(workspace))
    assert result.returncode == 2 and "is not an executable file or a command on PATH" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def public_root() -> Iterator[Path]:
    """A folder another user can enter (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="ocr-oc-uid-"))
    root.chmod(0o755)
    yield root
    kill_leftovers(*[p for p in root.iterdir() if p.is_dir()])
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_oc_kill_never_touches_another_users_server(public_root: Path, other_users_reach_checkout: None) -> None:
    fake = install_fake_opencode(public_root / "bin")
    (public_root / "bin").chmod(0o755)
    theirs = project(public_root, "theirs")
    theirs.chmod(0o777)  # the fake writes its pid file there
    mine = project(public_root, "mine")
    start = free_port_block(BLOCK)
    other = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", str(fake), "serve", "--port",
         str(start + 5)],
        cwd=theirs, env=subprocess_env(HOME=str(theirs)), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert b"opencode server listening on" in other.stdout.readline() + other.stdout.readline()
        their_pid = recorded_pids(theirs)["leader"][0]
        assert Path(f"/proc/{their_pid}/status").read_text().count("Uid:\t65534") == 1
        result = run("oc", "--scan-start", str(start), "--scan-end", str(start + BLOCK - 1),
                     "--opencode-bin", str(fake), "--log-dir", str(public_root / "logs"), str(mine), str(theirs))
        # Another user's server in a directory does not count as ours: oc starts one of our own there.
        assert result.returncode == 0, result.stdout + result.stderr
        my_pids = recorded_pids(mine)["leader"] + [p for p in recorded_pids(theirs)["leader"] if p != their_pid]
        assert len(my_pids) == 2

        listing = run("oc-kill", "--dry-run")
        assert f"pid {their_pid} " not in listing.stdout
        assert all(f"pid {pid} " in listing.stdout for pid in my_pids)

        result = run("oc-kill", "--grace", "5s", str(public_root))
        assert sorted(int(line.split()[2]) for line in result.stdout.splitlines()) == sorted(my_pids)
        assert wait_gone(my_pids, 5) == []
        assert alive(their_pid) and other.poll() is None, "another user's server is never signalled"
    finally:
        other.kill()
        other.wait()
        other.stdout.close()


@pytest_twisted.ensureDeferred
async def test_oc_retries_the_next_port_when_it_loses_the_race(workspace: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    from twisted.internet import reactor

    from opencoderouter import oc

    alpha = project(workspace, "alpha")
    start = free_port_block(BLOCK)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", start))
        holder.listen()
        # The check says the held port is free, as if it was taken right after: the real child then
        # fails with ServeError and oc moves to the next port. (oc_main is task.react(oc_run): here the
        # test's reactor runs it.)
        status = await oc.oc_run(reactor, oc_args(workspace, start) + [str(alpha)],
                                 port_is_free=lambda port: port == start or oc.port_is_free(port))
    leaders = recorded_pids(alpha)["leader"]
    assert status == 0
    assert capsys.readouterr().out.splitlines() == [f"started {alpha} on :{start + 1} (pid {leaders[1]})"]
    assert len(leaders) == 2 and not alive(leaders[0])
    assert "ServeError" in (workspace.parent / "logs" / "alpha.log").read_text()


def test_oc_stops_a_server_that_is_not_ready_in_time_and_fails(workspace: Path) -> None:
    # The hung start ignores SIGTERM and has a grandchild: oc must SIGKILL the whole group.
    hung = project(workspace, "hung", never_ready=True, ignore_sigterm=True, grandchild=True)
    fine = project(workspace, "fine")
    start = free_port_block(BLOCK)
    # 3 s: long enough for the fake that does start, on a busy machine.
    result = run("oc", *oc_args(workspace, start), "--startup-timeout", "3s", str(hung), str(fine))
    assert result.returncode == 1, "a start that timed out fails the run"
    hung_pids = recorded_pids(hung)
    fine_pid = recorded_pids(fine)["leader"][0]
    log_path = workspace.parent / "logs" / "hung.log"
    assert result.stdout.splitlines() == [
        f"failed {hung}: not ready within 3s; stopped it; log {log_path}",
        f"started {fine} on :{start + 1} (pid {fine_pid})",
    ]
    assert "Traceback" not in result.stderr
    assert "never be ready" in log_path.read_text()
    # Stopped before oc returned: the leader and its grandchild are gone, not left running detached.
    # oc reaped the leader before returning; the grandchild may take a moment to be gone.
    assert wait_gone(hung_pids["leader"] + hung_pids["grandchild"], 2) == []
    assert alive(fine_pid), "the server that did start is left running"


def test_oc_starts_one_directory_at_a_time_in_the_given_order(workspace: Path) -> None:
    # Started together, beta would be ready first; one at a time, beta starts only once alpha is ready.
    slow, quick = project(workspace, "slow", delay_ready=1.5), project(workspace, "quick")
    start = free_port_block(BLOCK)
    result = run("oc", *oc_args(workspace, start), str(slow), str(quick))
    assert result.returncode == 0, result.stdout + result.stderr
    slow_pid, quick_pid = recorded_pids(slow)["leader"][0], recorded_pids(quick)["leader"][0]
    assert result.stdout.splitlines() == [
        f"started {slow} on :{start} (pid {slow_pid})",
        f"started {quick} on :{start + 1} (pid {quick_pid})",
    ]
