"""Run the real ``opencode serve`` offline in tests: binary lookup, isolated HOMEs, a fake model server.

Reusable by any test or benchmark::

    model = FakeModelServer().start()                  # OpenAI-compatible, on 127.0.0.1
    home = seed_home(tmp_path / "home")                 # plugin seed: no background npm install
    server = OpenCodeInstance(project_dir, home, model.url, port=free_port())
    ...
    server.stop(); model.stop()

Facts used here come from /work/shared/opencode-notes.md (offline variables, the plugin seed, the
"listening" line as the readiness signal, process groups).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

OPENCODE_VERSION = "1.18.33"
LISTENING = re.compile(rb"opencode server listening on http://(\S+):(\d+)")

#: Environment that keeps opencode off the internet (from the notes).
OFFLINE_ENV = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1",
    "OPENCODE_DISABLE_AUTOUPDATE": "1",
    "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
    "OPENCODE_DISABLE_SHARE": "1",
    "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
}

#: Put one of these in a prompt to pick the fake model's behaviour for that turn.
MODE_ERROR = "[fake-model:error400]"
MODE_SLOW = "[fake-model:slow]"
#: ``[fake-model:slow=8]``: a slow stream lasting 8 s instead of ``slow_duration``.
_SLOW_FOR = re.compile(r"\[fake-model:slow=(\d+(?:\.\d+)?)\]")
#: The model calls the bash tool with BASH_COMMAND first (a permission request when bash is "ask").
MODE_BASH = "[fake-model:bash]"
BASH_COMMAND = "echo permitted > proof.txt"
#: The model calls the question tool with QUESTION first (a ``question.asked``), then answers with text.
MODE_QUESTION = "[fake-model:question]"
QUESTION: dict[str, Any] = {"question": "Which colour do you prefer?", "header": "Colour",
            "options": [{"label": "Red", "description": "A warm colour"},
                        {"label": "Blue", "description": "A cool colour"}]}
#: What the fake model answers in the normal mode.
REPLY_TEXT = "Hello from the fake model."


def opencode_cache_dir(version: str = OPENCODE_VERSION) -> Path:
    """Where tests/setup/install-opencode.sh installs opencode (honours OPENCODE_CACHE, XDG_CACHE_HOME)."""
    explicit = os.environ.get("OPENCODE_CACHE")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "opencoderouter" / f"opencode-ai-{version}"


def opencode_binary(version: str = OPENCODE_VERSION) -> Path | None:
    """The installed real opencode executable, or None when it is not installed."""
    candidate = opencode_cache_dir(version) / "bin" / "opencode"
    if candidate.exists() and os.access(candidate, os.X_OK):
        return candidate
    return None


def seed_home(home: Path, version: str = OPENCODE_VERSION) -> Path:
    """Create an isolated HOME whose plugin folder is pre-seeded (stops the background npm install)."""
    config = home / ".config" / "opencode"
    (config / "node_modules").mkdir(parents=True, exist_ok=True)
    (config / "package.json").write_text(json.dumps({"dependencies": {"@opencode-ai/plugin": version}}))
    (config / "package-lock.json").write_text(
        json.dumps({"lockfileVersion": 3, "packages": {"": {"dependencies": {"@opencode-ai/plugin": version}}}})
    )
    return home


def model_config(model_url: str, extra: dict[str, Any] | None = None) -> str:
    """OPENCODE_CONFIG_CONTENT that makes the fake model the only (and default) model."""
    config: dict[str, Any] = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "fake": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Fake",
                "options": {"baseURL": model_url.rstrip("/") + "/v1", "apiKey": "sk-fake"},
                "models": {"fake-model": {"name": "Fake Model"}},
            }
        },
        "model": "fake/fake-model",
        "small_model": "fake/fake-model",
        "autoupdate": False,
        "share": "disabled",
        # Tools that change things ask first, so that dispatch's --permissions is exercised.
        "permission": {"bash": "ask", "edit": "ask"},
    }
    config.update(extra or {})
    return json.dumps(config)


def opencode_env(home: Path, model_url: str, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """The environment for one offline opencode: its own HOME and XDG folders, the fake model."""
    env = dict(os.environ if base is None else base)
    env.update(OFFLINE_ENV)
    env["HOME"] = str(home)
    # XDG variables inherited from the caller would point every instance at the same state.
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    env["XDG_DATA_HOME"] = str(home / ".local" / "share")
    env["XDG_STATE_HOME"] = str(home / ".local" / "state")
    env["XDG_CACHE_HOME"] = str(home / ".cache")
    env["OPENCODE_CONFIG_CONTENT"] = model_config(model_url)
    env.pop("OPENCODE_SERVER_PASSWORD", None)
    env.update(extra)
    return env


class OpenCodeInstance:
    """One real ``opencode serve`` in ``directory``, in its own process group, ready when constructed."""

    def __init__(self, directory: Path, home: Path, model_url: str, port: int, binary: Path | None = None,
                 start_timeout: float = 30.0, env: dict[str, str] | None = None) -> None:
        binary = binary or opencode_binary()
        if binary is None:
            raise RuntimeError(f"opencode is not installed in {opencode_cache_dir()} (run tests/setup/install-opencode.sh)")
        self.directory = Path(directory)
        self.home = seed_home(Path(home))
        self.log_path = self.home / "opencode-serve.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [str(binary), "serve", "--hostname", "127.0.0.1", "--port", str(port)],
            cwd=self.directory, env=env or opencode_env(self.home, model_url),
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stop() kills grandchildren too
        )
        self.port = self._wait_listening(start_timeout)
        self.url = f"http://127.0.0.1:{self.port}"
        # Keep draining stdout so a chatty server never blocks on a full pipe.
        self._drain = threading.Thread(target=self._copy_stdout, daemon=True)
        self._drain.start()

    def _wait_listening(self, timeout: float) -> int:
        assert self.process.stdout is not None
        timer = threading.Timer(timeout, self._kill_group)
        timer.start()
        try:
            for line in self.process.stdout:
                self._log.write(line)
                match = LISTENING.search(line)
                if match:
                    return int(match.group(2))
        finally:
            timer.cancel()
        self._log.flush()
        raise RuntimeError(f"opencode serve in {self.directory} did not start:\n{self.log()}")

    def _copy_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()

    def log(self) -> str:
        """What the server printed so far."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _kill_group(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash) and reap."""
        self._kill_group(signal.SIGKILL)
        self.process.wait()

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace``, reap, close the log."""
        if self.process.poll() is None:
            self._kill_group(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group(signal.SIGKILL)  # grandchildren that outlived the leader
        self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()
        self._log.close()


class FakeModelServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 that streams canned answers.

    Modes (per request, from a marker in the last user message, else ``default_mode``):
    ``text`` streams :data:`REPLY_TEXT`; ``error400`` answers 400; ``slow`` streams a word every
    ``slow_interval`` seconds for ``slow_duration`` seconds; ``bash`` calls the bash tool with
    :data:`BASH_COMMAND`, then answers with text; ``question`` calls the question tool with
    :data:`QUESTION`, then answers with text (slowly when the prompt also has a slow marker).
    Title requests are always answered fast.
    """

    def __init__(self, default_mode: str = "text", slow_duration: float = 130.0, slow_interval: float = 5.0,
                 reply_text: str = REPLY_TEXT) -> None:
        self.default_mode = default_mode
        self.slow_duration = slow_duration
        self.slow_interval = slow_interval
        self.reply_text = reply_text
        self.requests: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL (``http://127.0.0.1:PORT``); opencode's baseURL is this plus ``/v1``."""
        assert self._server is not None, "start() the server first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self, port: int = 0) -> FakeModelServer:
        """Listen on 127.0.0.1 in a daemon thread."""
        owner = self

        class Handler(_ModelHandler):
            server_owner = owner

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and end slow streams."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def slow_duration_for(self, body: dict[str, Any]) -> float:
        """How long a slow answer streams: ``[fake-model:slow=N]`` in the prompt, else ``slow_duration``."""
        users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        match = _SLOW_FOR.search(_content_text(users[-1])) if users else None
        return float(match.group(1)) if match else self.slow_duration

    def mode_for(self, body: dict[str, Any]) -> str:
        """Which behaviour answers this request."""
        messages = body.get("messages") or []
        system = " ".join(_content_text(m) for m in messages if m.get("role") == "system").lower()
        if "title" in system and "generat" in system:
            return "title"
        users = [m for m in messages if m.get("role") == "user"]
        last_user = _content_text(users[-1]) if users else ""
        if MODE_ERROR in last_user:
            return "error400"
        slow = MODE_SLOW in last_user or _SLOW_FOR.search(last_user) is not None
        for marker, tool_mode in ((MODE_BASH, "bash"), (MODE_QUESTION, "question")):
            if marker in last_user:
                # After the tool ran, its result is the last message: then answer with text (slowly with
                # a slow marker too).
                if messages and messages[-1].get("role") == "tool":
                    return "slow" if slow else "text"
                return tool_mode
        return "slow" if slow else self.default_mode


def _content_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


class _ModelHandler(BaseHTTPRequestHandler):
    """One chat-completions request."""

    server_owner: FakeModelServer
    protocol_version = "HTTP/1.0"  # close-delimited streams: the simplest valid SSE framing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        """Stay quiet (pytest captures nothing useful from it)."""

    def do_GET(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
        """``/v1/models``: the one fake model."""
        self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model", "owned_by": "fake"}]})

    def do_POST(self) -> None:  # noqa: N802 - BaseHTTPRequestHandler's name
        """``/v1/chat/completions``: stream an answer, or fail, by mode."""
        length = int(self.headers.get("content-length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            self._json(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
            return
        owner = self.server_owner
        mode = owner.mode_for(body)
        owner.requests.append({"path": self.path, "mode": mode, "body": body})
        if mode == "error400":
            self._json(400, {"error": {"message": "fake model refuses this request", "type": "invalid_request_error",
                                       "code": "fake_error"}})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        try:
            if mode == "title":
                self._chunk("Fake task title")
            elif mode in ("bash", "question"):
                arguments: dict[str, Any]
                if mode == "bash":
                    call_id, arguments = "call_fake_1", {"command": BASH_COMMAND, "description": "Write proof.txt"}
                else:
                    call_id, arguments = "call_fake_question", {"questions": [QUESTION]}
                self._chunk(None, tool_call={"index": 0, "id": call_id, "type": "function",
                                             "function": {"name": mode, "arguments": json.dumps(arguments)}})
                self._chunk(None, finish="tool_calls")
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
                return
            elif mode == "slow":
                deadline = time.monotonic() + owner.slow_duration_for(body)
                step = 0
                while time.monotonic() < deadline and not owner._stopping.is_set():
                    self._chunk(f"tick{step} ")
                    step += 1
                    owner._stopping.wait(min(owner.slow_interval, max(0.0, deadline - time.monotonic())))
                self._chunk("slow done.")
            else:
                self._chunk(owner.reply_text)
            self._chunk(None, finish="stop")
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # opencode aborted the request (session aborted or killed)

    def _chunk(self, text: str | None, finish: str | None = None, tool_call: dict[str, Any] | None = None) -> None:
        delta: dict[str, Any] = {"content": text} if text is not None else {}
        if tool_call is not None:
            delta = {"role": "assistant", "tool_calls": [tool_call]}
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": "fake-model", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if finish:
            chunk["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def run_dispatch(workdir: Path, router_url: str, task: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Write ``task`` to a file in ``workdir`` and run ``opencoderouter-dispatch`` on it against ``router_url``."""
    from .support import REPO, subprocess_env

    path = workdir / f"task-{time.monotonic_ns()}.md"
    path.write_text(task)
    return subprocess.run([sys.executable, "-m", "opencoderouter.dispatch", str(path), "--router", router_url, *args],
                          capture_output=True, text=True, timeout=timeout, env=subprocess_env(), cwd=REPO)


def git_init(directory: Path) -> None:
    """Make ``directory`` a git repository with one commit (what opencode sees as a git project)."""
    git = shutil.which("git")
    if git is None:
        raise RuntimeError("git is not installed")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    subprocess.run([git, "init", "-q", str(directory)], check=True, env=env)
    (directory / "README.md").write_text("test project\n")
    subprocess.run([git, "-C", str(directory), "add", "README.md"], check=True, env=env)
    subprocess.run([git, "-C", str(directory), "commit", "-q", "-m", "init"], check=True, env=env)
