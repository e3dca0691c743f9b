"""``make run``, the README's first set-up command: which opencode the router is given (``make -n``: nothing runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .support import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def planned_run(path: str, *extra: str) -> list[str]:
    """The lines ``make -n run`` would execute, with ``PATH`` as given."""
    env = {**os.environ, "PATH": path, "XDG_CACHE_HOME": "/cache-of-the-test"}
    for inherited in ("OPENCODE_CACHE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # e.g. from the `make test` running us
        env.pop(inherited, None)
    planned = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(REPO), "run", 'ARGS=--port 31000 /tmp/proj-a', *extra],
                             env=env, capture_output=True, text=True, timeout=30, check=True)
    return planned.stdout.splitlines()


def router_line(lines: list[str]) -> str:
    """The line that starts the router."""
    [line] = [line for line in lines if "twistd" in line]
    return line


def test_without_opencode_on_path_the_pinned_one_is_installed_and_used(tmp_path: Path) -> None:
    bare = f"{tmp_path}:/usr/bin:/bin"  # make and sh, no opencode
    lines = planned_run(bare)
    assert "sh tests/setup/install-opencode.sh" in lines
    assert router_line(lines).endswith("opencoderouter --opencode-bin /cache-of-the-test/opencoderouter/opencode-ai-1.18.33"
                              "/bin/opencode --port 31000 /tmp/proj-a")


def test_the_opencode_on_path_is_used_as_it_is(tmp_path: Path) -> None:
    fake = tmp_path / "opencode"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    lines = planned_run(f"{tmp_path}:/usr/bin:/bin")
    assert "sh tests/setup/install-opencode.sh" not in lines
    assert router_line(lines).endswith("opencoderouter --port 31000 /tmp/proj-a")
