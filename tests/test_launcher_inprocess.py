"""The Launcher in this process on the real reactor, with real children (the fake ``opencode``)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet import reactor, task

from opencoderouter.launcher import Launcher, LauncherSettings, LauncherState, port_is_free

from .launcher_support import alive, install_fake_opencode, kill_leftovers, project, recorded_pids
from .support import free_port_block, subprocess_env


async def until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Wait on the reactor (no sleeping) until ``predicate()`` is truthy."""
    waited = 0.0
    while waited < timeout:
        value = predicate()
        if value:
            return value
        await task.deferLater(reactor, 0.05, lambda: None)
        waited += 0.05
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest_twisted.ensureDeferred
async def test_losing_the_race_for_a_port_retries_on_the_next_one(tmp_path: Path) -> None:
    fake = install_fake_opencode(tmp_path / "bin")
    alpha = project(tmp_path, "alpha")
    start = free_port_block(5)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", start))
        holder.listen()
        # The free-port check says yes for the held port, as it would if the port was taken just after
        # the check: the real child then fails with OpenCode's ServeError and exit 1.
        launcher = Launcher(
            [str(alpha)],
            LauncherSettings(opencode_bin=str(fake), port_range=(start, start + 4)),
            reactor,
            port_is_free=lambda port: port == start or port_is_free(port),
            environ=subprocess_env(),
        )
        launcher.startService()
        try:
            (instance,) = launcher.instances()
            await until(lambda: instance.state is LauncherState.RUNNING, what="alpha running")
            assert instance.port == start + 1 and instance.restarts == 0
            assert any("ServeError" in line for line in instance.lines)
            assert len(recorded_pids(alpha)["leader"]) == 2
        finally:
            await launcher.stopService()
            kill_leftovers(alpha)
    assert not any(alive(pid) for pid in recorded_pids(alpha)["leader"])
