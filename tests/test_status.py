"""``opencoderouter-status``: the table, ``--json``, ``--watch``, errors; against a stub and a real router."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from opencoderouter.status import Router, main, render, watch

from .support import REPO, free_port_block, subprocess_env, wait_for

NOW = 1_796_168_100.0  # 2026-12-01T23:35:00Z


def session(**fields: Any) -> dict[str, Any]:
    body = {"id": "ses_1", "title": "Fix the login", "status": "idle", "needs_you": 0, "permissions": [],
            "questions": [], "retry": None, "last_error": None, "todo": None,
            "last_activity": "2026-12-01T23:34:48Z", "web_url": None}
    body.update(fields)
    return body


def entry(slug: str, state: str, sessions: list[dict[str, Any]] | None = None, **summary: Any) -> dict[str, Any]:
    agents = {"state": state, "label": summary.pop("label", state), "working": 0, "needs_you": 0, "errors": 0,
              "sessions": len(sessions or []), "reason": None}
    agents.update(summary)
    return {"slug": slug, "project_name": slug, "project_path": f"/srv/{slug}", "up": True,
            "url": f"http://127.0.0.1:8080/{slug}/", "agents": agents, "sessions": sessions or []}


AGENTS = [
    entry("docs", "idle", [session()]),
    entry("api", "working", [session(id="ses_2", title="Refactor", status="working", todo={"done": 2, "total": 5})],
          label="working (1)", working=1),
    entry("webapp", "needs_you", [session(
        id="ses_3", title="Clean \x1b[31mup", status="working", needs_you=1,
        permissions=[{"id": "per_1", "asking": "bash: rm -rf build/"}],
        web_url="http://webapp-alice.localhost:8080/L3NydmVy/session/ses_3")],
        label="needs you (1)", needs_you=1),
    entry("broken", "error", [session(id="ses_4", title="Deploy", status="error",
                                      last_error={"name": "APIError", "message": "fake model refuses"})],
          label="error", errors=1),
    entry("locked-30012", "unknown", reason="locked: the router follows a password-protected server only with "
                                            "--opencode-password-file"),
]


def test_the_table_puts_who_needs_you_first_and_says_what_is_asked():
    lines = render(AGENTS, NOW).splitlines()
    assert [line.split()[0] for line in lines[1:] if not line.startswith("  ")] == \
        ["webapp", "broken", "api", "docs", "locked-30012", "5"]
    assert lines[0].split() == ["AGENT", "STATE", "SESSIONS", "PROJECT"]
    webapp = lines.index(next(line for line in lines if line.startswith("webapp")))
    assert "needs you (1)" in lines[webapp] and "/srv/webapp" in lines[webapp]
    assert lines[webapp + 1] == ('  ! "Clean  [31mup"  needs you: bash: rm -rf build/  12 s ago  '
                                 "http://webapp-alice.localhost:8080/L3NydmVy/session/ses_3")
    text = "\n".join(lines)
    assert "\x1b" not in text, "a backend's text never reaches the terminal as an escape sequence"
    assert '  x "Deploy"  error: APIError: fake model refuses' in text
    assert '  > "Refactor"  working · todo 2/5' in text
    assert "Fix the login" not in text, "idle sessions are left out"
    assert "(locked: the router follows a password-protected server only with --opencode-password-file)" in text
    assert lines[-1] == "5 backends: 1 waiting for you, 1 working, 1 failed"


def test_all_lists_idle_sessions_too_and_an_empty_router_says_so():
    assert '"Fix the login"  idle  12 s ago' in render(AGENTS, NOW, all_sessions=True)
    assert render([], NOW) == "No OpenCode servers found by the router.\n"


class StubRouter:
    """/api/agents and /api/events of a pretend router, on 127.0.0.1."""

    def __init__(self) -> None:
        self.agents: list[dict[str, Any]] = AGENTS
        self.status = 200
        self.events: list[bytes] = [b"retry: 1000\n\nevent: snapshot\ndata: {}\n\n",
                                    b": heartbeat\n\nevent: seen\ndata: {}\n\nevent: agents\ndata: {}\n\n"]
        self.seen_headers: list[dict[str, str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner.seen_headers.append(dict(self.headers))
                if owner.status != 200:
                    self.send_response(owner.status)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                if self.path == "/api/events":
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.end_headers()
                    for chunk in owner.events:
                        self.wfile.write(chunk)
                        self.wfile.flush()
                    return  # then the stream ends: the watcher reconnects
                body = json.dumps(owner.agents).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub() -> Iterator[StubRouter]:
    router = StubRouter()
    try:
        yield router
    finally:
        router.close()


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_it_prints_the_table_and_json(stub):
    code, out, err = run("--router", stub.url)
    assert code == 0 and err == ""
    assert out.splitlines()[1].startswith("webapp") and "needs you: bash: rm -rf build/" in out
    code, out, _ = run("--router", stub.url, "--json")
    assert code == 0 and json.loads(out) == AGENTS


def test_credentials_go_to_the_router_and_a_refusal_is_exit_3(stub, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    assert run("--router", stub.url, "--token-file", str(token))[0] == 0
    assert stub.seen_headers[-1]["Authorization"] == "Bearer s3cret-token-0123456789"
    monkeypatch.setenv("OPENCODEROUTER_TOKEN", "from-the-env-0123456789")
    assert run("--router", stub.url.replace("http://", "http://al:pw@"))[0] == 0
    assert stub.seen_headers[-1]["Authorization"] == "Basic YWw6cHc="
    stub.status = 401
    code, out, err = run("--router", stub.url)
    assert code == 3 and out == "" and "refused the credentials (401)" in err and "--token-file" in err


def test_an_unreachable_router_is_exit_4_with_a_sentence():
    port = free_port_block(1)
    code, out, err = run("--router", f"http://127.0.0.1:{port}")
    assert code == 4 and out == "" and err.startswith(f"opencoderouter-status: cannot ask the router at http://127.0.0.1:{port}")


def test_bad_input_is_exit_2(tmp_path):
    with pytest.raises(SystemExit) as exited:
        main(["--router", "ftp://x"], out=io.StringIO(), err=io.StringIO())
    assert exited.value.code == 2
    assert run("--router", "http://127.0.0.1:1", "--token-file", str(tmp_path / "missing"))[0] == 2


def test_watch_shows_the_table_at_every_change_and_reconnects(stub):
    shown: list[list[dict[str, Any]]] = []
    err = io.StringIO()
    slept: list[float] = []
    watch(Router(stub.url, None), shown.append, err, sleep=slept.append, rounds=2)
    # snapshot and agents each time (seen and comments are no change); two rounds: the stream ended once.
    assert len(shown) == 4 and shown[0] == AGENTS
    assert slept == [1.0, 1.0] and err.getvalue() == ""


def test_watch_says_once_that_the_router_is_away_and_backs_off():
    port = free_port_block(1)
    err = io.StringIO()
    slept: list[float] = []
    watch(Router(f"http://127.0.0.1:{port}", None), lambda entries: None, err, sleep=slept.append, rounds=5)
    assert slept == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert err.getvalue().count("retrying") == 1


def test_the_command_against_a_real_router_and_fake_backend(tmp_path, fake_opencode_factory, router_factory):
    base = free_port_block(2)
    fake_opencode_factory(tmp_path / "alpha", port=base)
    router = router_factory("--scan-start", str(base), "--scan-end", str(base + 1), "--scan-interval", "1s")

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "opencoderouter.status", "--router", router.url, *args],
                              capture_output=True, text=True, timeout=30, env=subprocess_env(), cwd=REPO)

    done = wait_for(lambda: (lambda d: "idle" in d.stdout and d)(status()), timeout=15, what="alpha idle")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split()[:3] == ["alpha", "idle", "0"] and lines[1].endswith(str(tmp_path / "alpha"))
    assert lines[-1] == "1 backend: 0 waiting for you, 0 working, 0 failed"
    as_json = json.loads(status("--json").stdout)
    assert [e["slug"] for e in as_json] == ["alpha"] and as_json[0]["agents"]["state"] == "idle"

    # --watch prints the table, then again when a backend appears.
    watcher = subprocess.Popen([sys.executable, "-m", "opencoderouter.status", "--router", router.url, "--watch"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(),
                               cwd=REPO)
    try:
        assert watcher.stdout is not None
        first = [watcher.stdout.readline() for _ in range(3)]
        assert first[1].startswith("alpha")
        fake_opencode_factory(tmp_path / "beta", port=base + 1)
        seen = ""
        while "beta" not in seen:
            seen += watcher.stdout.readline()
        assert watcher.poll() is None
    finally:
        watcher.terminate()
        watcher.wait(10)
        watcher.stdout.close()
        watcher.stderr.close()
