"""Start the real ``opencode serve`` for a benchmark: isolated seeded HOME, offline, own process group.

Uses the test suite's ``tests/real_opencode.py`` (``OpenCodeInstance``) when the checkout has it,
and a minimal equivalent otherwise. Pinning is applied to the running process and all its threads
(``taskset -a -p``), so it works with either.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VERSION = "1.18.33"
LISTENING = re.compile(rb"opencode server listening on http://([^:\s]+):(\d+)")
#: Nothing listens on the loopback's discard port: the benchmark sends no prompt, and nothing can leave the machine.
NO_MODEL_URL = "http://127.0.0.1:9"
OFFLINE_ENV = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1", "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1", "OPENCODE_DISABLE_CLAUDE_CODE": "1", "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
}

_SuiteInstance: Any
try:
    from tests.real_opencode import OpenCodeInstance as _SuiteInstance
except ImportError:  # a checkout without the suite's helper: use the small one below
    _SuiteInstance = None


def git_init(directory: Path) -> None:
    """Make ``directory`` a git project with one commit: what opencode (and the Go router's slug) needs.

    The Go router slugs every non-git project ``global``; a git project gets its own slug there.
    """
    git = shutil.which("git")
    if git is None:
        raise RuntimeError("git is not installed (the Go router needs git projects to tell backends apart)")
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@example.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@example.invalid")
    subprocess.run([git, "init", "-q", str(directory)], check=True, env=env)
    (directory / "README.md").write_text("benchmark project\n")
    subprocess.run([git, "-C", str(directory), "add", "README.md"], check=True, env=env)
    subprocess.run([git, "-C", str(directory), "commit", "-q", "-m", "init"], check=True, env=env)


def _binary() -> Path:
    cache = os.environ.get("OPENCODE_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "opencoderouter" / f"opencode-ai-{VERSION}")
    return Path(cache) / "bin" / "opencode"


class _SmallInstance:
    """The fallback: ``opencode serve`` with a seeded HOME, offline variables, its own process group."""

    def __init__(self, directory: Path, home: Path, port: int, timeout: float = 30.0) -> None:
        config = home / ".config" / "opencode"
        (config / "node_modules").mkdir(parents=True, exist_ok=True)
        deps = {"@opencode-ai/plugin": VERSION}
        (config / "package.json").write_text(json.dumps({"dependencies": deps}))
        (config / "package-lock.json").write_text(
            json.dumps({"lockfileVersion": 3, "packages": {"": {"dependencies": deps}}}))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENCODE_", "XDG_"))}
        env.update(OFFLINE_ENV, HOME=str(home), OPENCODE_CONFIG_CONTENT=json.dumps({
            "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                                  "options": {"baseURL": NO_MODEL_URL + "/v1", "apiKey": "sk-fake"},
                                  "models": {"fake-model": {"name": "Fake Model"}}}},
            "model": "fake/fake-model", "small_model": "fake/fake-model"}))
        self.process = subprocess.Popen([str(_binary()), "serve", "--port", str(port), "--hostname", "127.0.0.1"],
                                        cwd=directory, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"opencode exited with {self.process.wait()}")
            if match := LISTENING.search(line):
                self.port = int(match.group(2))
                # Keep draining its output so a chatty server never blocks on a full pipe.
                self._drain = subprocess.Popen(["cat"], stdin=self.process.stdout, stdout=subprocess.DEVNULL)
                return
        self.stop()
        raise RuntimeError(f"opencode did not say it was listening within {timeout:g}s")

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL what is left, reap."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                if sig == signal.SIGTERM:
                    os.killpg(self.process.pid, signal.SIGKILL)  # grandchildren that outlived it
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        self.process.wait()


class RealOpenCode:
    """``opencode serve --port PORT`` in a fresh project folder with its own HOME, optionally pinned."""

    def __init__(self, port: int, cpus: str | None = None) -> None:
        if not _binary().exists():
            raise FileNotFoundError(f"{_binary()} is missing: run `make opencode` (tests/setup/install-opencode.sh)")
        self.root = Path(tempfile.mkdtemp(prefix="ocr-bench-opencode-"))
        project, home = self.root / "benchproject", self.root / "home"
        project.mkdir()
        home.mkdir()
        git_init(project)
        self.instance: Any = (_SuiteInstance(project, home, NO_MODEL_URL, port=port) if _SuiteInstance is not None
                              else _SmallInstance(project, home, port))
        self.process = self.instance.process
        self.port = self.instance.port
        if cpus and shutil.which("taskset"):
            subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(self.process.pid)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)

    def stop(self) -> None:
        """Stop the whole process group and delete the folder."""
        try:
            self.instance.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
