"""Start the real ``opencode serve`` for a benchmark: isolated seeded HOME, offline, own process group."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

VERSION = "1.18.33"
BINARY = Path(os.environ.get("OPENCODE_BIN", Path.home() / f".cache/opencoderouter/opencode-ai-{VERSION}/bin/opencode"))
LISTENING = re.compile(rb"opencode server listening on http://([^:\s]+):(\d+)")

#: Environment that keeps opencode off the internet (see /work/shared/opencode-notes.md).
OFFLINE_ENV = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
}


def seed_home(home: Path) -> None:
    """Create a HOME where opencode starts no background ``npm install`` of its plugin."""
    config = home / ".config" / "opencode"
    (config / "node_modules").mkdir(parents=True, exist_ok=True)
    deps = {"@opencode-ai/plugin": VERSION}
    (config / "package.json").write_text(json.dumps({"dependencies": deps}))
    (config / "package-lock.json").write_text(
        json.dumps({"lockfileVersion": 3, "packages": {"": {"dependencies": deps}}})
    )


def local_model_config(model_port: int) -> str:
    """An OPENCODE_CONFIG_CONTENT pointing the model at 127.0.0.1 (never a hosted service)."""
    return json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                              "options": {"baseURL": f"http://127.0.0.1:{model_port}/v1", "apiKey": "sk-fake"},
                              "models": {"fake-model": {"name": "Fake Model"}}}},
        "model": "fake/fake-model", "small_model": "fake/fake-model",
    })


class RealOpenCode:
    """``opencode serve --port PORT`` in a fresh project folder with its own HOME."""

    def __init__(self, port: int, cpus: str | None = None, startup_timeout: float = 30.0) -> None:
        if not BINARY.exists():
            raise FileNotFoundError(f"{BINARY} is missing: run `make opencode` (tests/setup/install-opencode.sh)")
        self.root = Path(tempfile.mkdtemp(prefix="ocr-bench-opencode-"))
        home, self.project = self.root / "home", self.root / "benchproject"
        seed_home(home)
        self.project.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCODE_")}
        env.update(OFFLINE_ENV, HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
                   XDG_DATA_HOME=str(home / ".local/share"), XDG_CACHE_HOME=str(home / ".cache"),
                   XDG_STATE_HOME=str(home / ".local/state"),
                   # Port 9 (discard) on the loopback: nothing answers, nothing leaves the machine.
                   OPENCODE_CONFIG_CONTENT=local_model_config(9))
        command = [str(BINARY), "serve", "--port", str(port), "--hostname", "127.0.0.1"]
        if cpus:
            command = ["taskset", "-c", cpus, *command]
        self.process = subprocess.Popen(command, cwd=self.project, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.port = self._wait_listening(startup_timeout)

    def _wait_listening(self, timeout: float) -> int:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"opencode exited with {self.process.wait()}: {seen.decode(errors='replace')}")
            seen += line
            match = LISTENING.search(line)
            if match:
                # Drain further output in the background so a chatty server never blocks on a full pipe.
                subprocess.Popen(["cat"], stdin=self.process.stdout, stdout=subprocess.DEVNULL)
                return int(match.group(2))
        raise RuntimeError(f"opencode did not say it was listening within {timeout}s")

    def stop(self) -> None:
        """Terminate the whole process group (opencode may spawn helpers) and delete its folder."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        if self.process.stdout:
            self.process.stdout.close()
        shutil.rmtree(self.root, ignore_errors=True)
