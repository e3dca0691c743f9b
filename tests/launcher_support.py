"""Helpers for the launcher and ``oc`` tests: the fake ``opencode`` executable and process checks."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

FAKE_BIN_SOURCE = Path(__file__).resolve().parent / "fake_bin" / "opencode"
REAL_OPENCODE = Path(os.path.expanduser("~/.cache/opencoderouter/opencode-ai-1.18.33/bin/opencode"))


def install_fake_opencode(bin_dir: Path) -> Path:
    """Copy the fake ``opencode`` into ``bin_dir`` with this interpreter in its shebang (it needs Twisted)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    target = bin_dir / "opencode"
    body = FAKE_BIN_SOURCE.read_text().split("\n", 1)[1]
    target.write_text(f"#!{sys.executable}\n" + body.replace(
        "sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))",
        f"sys.path.insert(0, {str(FAKE_BIN_SOURCE.parent.parent.parent)!r})",
    ))
    target.chmod(0o755)
    return target


def project(root: Path, name: str, **behaviour: object) -> Path:
    """A project directory; ``behaviour`` goes to ``.fake-opencode.json`` (see tests/fake_bin/opencode)."""
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    if behaviour:
        (directory / ".fake-opencode.json").write_text(json.dumps(behaviour))
    return directory


def recorded_pids(directory: Path) -> dict[str, list[int]]:
    """The pids the fake recorded in ``directory``, by role (``leader``, ``grandchild``)."""
    pids: dict[str, list[int]] = {}
    try:
        lines = (directory / ".fake-opencode-pids").read_text().splitlines()
    except FileNotFoundError:
        return pids
    for line in lines:
        role, _, pid = line.partition(" ")
        pids.setdefault(role, []).append(int(pid))
    return pids


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an exited process nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [pid for pid in pids if alive(pid)]
        if not left:
            return []
        time.sleep(0.05)
    return [pid for pid in pids if alive(pid)]


def kill_leftovers(*directories: Path) -> None:
    """SIGKILL whatever the fake recorded in these directories (test clean-up after a failure)."""
    for directory in directories:
        for pids in recorded_pids(directory).values():
            for pid in pids:
                if alive(pid) and _is_ours(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def _is_ours(pid: int) -> bool:
    # Guard against a recycled pid: only kill a process of this checkout's fake or python.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"opencode" in cmdline or b"time.sleep(600)" in cmdline


def opencode_env(home: Path, model_port: int) -> dict[str, str]:
    """Offline settings for the real OpenCode with its own seeded HOME (see shared opencode-notes)."""
    config_dir = home / ".config" / "opencode"
    (config_dir / "node_modules").mkdir(parents=True, exist_ok=True)
    (config_dir / "package.json").write_text(json.dumps({"dependencies": {"@opencode-ai/plugin": "1.18.33"}}))
    (config_dir / "package-lock.json").write_text(json.dumps(
        {"lockfileVersion": 3, "packages": {"": {"dependencies": {"@opencode-ai/plugin": "1.18.33"}}}}))
    provider = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                              "options": {"baseURL": f"http://127.0.0.1:{model_port}/v1", "apiKey": "sk-fake"},
                              "models": {"fake-model": {"name": "Fake Model"}}}},
        "model": "fake/fake-model",
        "small_model": "fake/fake-model",
    }
    env = {name: "1" for name in (
        "OPENCODE_DISABLE_MODELS_FETCH", "OPENCODE_DISABLE_AUTOUPDATE", "OPENCODE_DISABLE_DEFAULT_PLUGINS",
        "OPENCODE_DISABLE_LSP_DOWNLOAD", "OPENCODE_DISABLE_SHARE", "OPENCODE_DISABLE_CLAUDE_CODE",
        "OPENCODE_DISABLE_EXTERNAL_SKILLS")}
    env.update(HOME=str(home), OPENCODE_CONFIG_CONTENT=json.dumps(provider), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_DATA_HOME=str(home / ".local" / "share"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_STATE_HOME=str(home / ".local" / "state"))
    return env
