"""The real OpenCode server through the router: web UI by host name, API, SSE and terminal by path."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import websocket

from .proxy_stack import USERNAME, SSEReader, make_stack
from .support import LISTENING, http_get, http_json, wait_for

pytestmark = pytest.mark.real_opencode

OPENCODE = Path(os.environ.get("OPENCODE_BIN", Path.home() / ".cache/opencoderouter/opencode-ai-1.18.33/bin/opencode"))
OFFLINE_ENV = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1", "OPENCODE_DISABLE_SHARE": "1", "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
    # A local (unreachable) model: the default one would call a hosted service.
    "OPENCODE_CONFIG_CONTENT": json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                              "options": {"baseURL": "http://127.0.0.1:9/v1", "apiKey": "sk-fake"},
                              "models": {"fake-model": {"name": "Fake Model"}}}},
        "model": "fake/fake-model", "small_model": "fake/fake-model",
    }),
}


def seeded_home(home: Path) -> None:
    """A HOME in which opencode does not start its background ``npm install``."""
    config = home / ".config/opencode"
    (config / "node_modules").mkdir(parents=True)
    (config / "package.json").write_text('{"dependencies":{"@opencode-ai/plugin":"1.18.33"}}')
    (config / "package-lock.json").write_text(
        '{"lockfileVersion":3,"packages":{"":{"dependencies":{"@opencode-ai/plugin":"1.18.33"}}}}'
    )


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real ``opencode serve`` for project ``webproj`` behind a router."""
    if not OPENCODE.exists():
        pytest.skip(f"the real opencode is not installed at {OPENCODE} (make opencode)")
    root = tmp_path_factory.mktemp("real")
    seeded_home(root / "home")
    project = root / "webproj"
    project.mkdir()
    # A generous probe timeout: a busy opencode on a loaded 2-core machine answers its first probe late.
    stack = make_stack(root, "--probe-timeout", "3s")
    port = stack.block
    stack.next_index = 1
    process = subprocess.Popen(
        [str(OPENCODE), "serve", "--port", str(port), "--hostname", "127.0.0.1"],
        cwd=project, env={**os.environ, "HOME": str(root / "home"), **OFFLINE_ENV},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line or LISTENING.search(line):
                break
        assert process.poll() is None, "opencode serve exited"
        wait_for(lambda: any(b["slug"] == "webproj" for b in http_json(stack.router.url + "/api/backends")),
                 timeout=60, what="router to find the real opencode")  # more than one 20 s scan interval
        yield stack, port
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        process.stdout.close()
        stack.close()


def test_web_ui_by_host_name_is_byte_identical_to_direct(real):
    stack, port = real
    host = f"webproj-{USERNAME}.localhost:{stack.router.port}"
    direct = http_get(f"http://127.0.0.1:{port}/")
    status, headers, page = stack.request("GET", "/", headers={"Host": host, "Accept": "text/html"})
    assert status == 200 and direct[0] == 200
    assert page == direct[2]
    assets = [part.split('"')[0] for part in page.decode().split('src="/assets/')[1:]]
    assert assets, "the web UI page references no /assets/ script"
    for asset in assets[:3]:
        status, headers, body = stack.request("GET", "/assets/" + asset, headers={"Host": host, "Accept-Encoding": "gzip"})
        direct_status, _, direct_body = http_get(f"http://127.0.0.1:{port}/assets/{asset}", headers={"Accept-Encoding": "gzip"})
        assert status == direct_status == 200 and body == direct_body


def test_session_and_events_through_path_mode(real):
    stack, _ = real
    sock = socket.create_connection(("127.0.0.1", stack.router.port), timeout=10)
    try:
        sock.sendall(b"GET /webproj/event HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        reader = SSEReader(sock)
        assert reader.next_event()["type"] == "server.connected"
        status, _, body = stack.request("POST", "/webproj/session", body=json.dumps({"title": "via router"}).encode(),
                                        headers={"Content-Type": "application/json"})
        assert status == 200
        session = json.loads(body)
        assert session["title"] == "via router" and session["id"].startswith("ses_")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            event = reader.next_event()
            if event["type"].startswith("session.") and json.dumps(event).find(session["id"]) >= 0:
                break
        else:
            raise AssertionError("no session event for the new session arrived through the router")
        status, _, body = stack.request("GET", "/webproj/session/status")
        assert status == 200 and isinstance(json.loads(body), dict)
    finally:
        sock.close()


@pytest.mark.parametrize("mode", ["host", "path"])
def test_terminal_websocket_runs_a_command(real, mode):
    stack, _ = real
    status, _, body = stack.request("POST", "/webproj/pty", body=b"{}", headers={"Content-Type": "application/json"})
    assert status == 200
    pty = json.loads(body)["id"]
    if mode == "host":
        ws = websocket.create_connection(f"ws://127.0.0.1:{stack.router.port}/pty/{pty}/connect", timeout=10,
                                         host=f"webproj-{USERNAME}.localhost:{stack.router.port}")
    else:
        ws = websocket.create_connection(f"ws://127.0.0.1:{stack.router.port}/webproj/pty/{pty}/connect", timeout=10)
    try:
        ws.send("echo rou''ted-$((6*7))\r")
        output = ""
        deadline = time.monotonic() + 10
        while "routed-42" not in output and time.monotonic() < deadline:
            frame = ws.recv_data_frame(True)[1]
            output += frame.data.decode("utf-8", "replace") if isinstance(frame.data, (bytes, bytearray)) else frame.data
        assert "routed-42" in output
    finally:
        ws.close()


def rendered_text(url: str, profile: Path) -> str:
    """The visible text of ``url`` after headless Chromium ran its scripts."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make system-deps)")
    result = subprocess.run(
        [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
         "--virtual-time-budget=8000", "--dump-dom", url],
        capture_output=True, timeout=90,
    )
    dom = result.stdout.decode("utf-8", "replace")
    body = dom[dom.find("<body"):]
    body = re.sub(r"<script.*?</script>|<style.*?</style>", "", body, flags=re.S)
    return " ".join(re.sub(r"<[^>]+>", " ", body).split())


@pytest.mark.slow
def test_web_ui_renders_through_host_route_as_it_does_directly(real, tmp_path):
    stack, port = real
    # Chromium resolves every *.localhost name to the loopback by itself (no DNS, as through an SSH tunnel).
    via_router = rendered_text(f"http://webproj-{USERNAME}.localhost:{stack.router.port}/", tmp_path / "a")
    direct = rendered_text(f"http://127.0.0.1:{port}/", tmp_path / "b")
    assert "Add project" in direct, direct[:300]
    assert via_router == direct
