"""Attack tests against a running router (real sockets): each attack fails, the legitimate path works.

One section per item of the security issue (#8). Every router scans only the ports of the fake
OpenCode servers this module starts, and listens on 127.0.0.1. The defences that are about time (the
failure throttle, the request-head bound) are tested on a clock in test_security_router.py.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import LISTENING, FakeOpenCodeProcess, free_port, free_port_block, http_json, wait_for


# -- helpers ---------------------------------------------------------------------------------------
class Fake(FakeOpenCodeProcess):
    """A fake OpenCode subprocess on a chosen port (optionally as another user, with a password)."""

    def __init__(self, directory: Path, port: int, **kwargs: Any) -> None:
        super().__init__(directory, port, **kwargs)
        self.directory = directory


@pytest.fixture
def fakes() -> Iterator:
    """Start Fake servers; all stopped afterwards."""
    started: list[Fake] = []

    def start(directory: Path, port: int, **kwargs: Any) -> Fake:
        directory.mkdir(parents=True, exist_ok=True)
        fake = Fake(directory, port, **kwargs)
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


def call(port: int, method: str, path: str, headers: dict[str, str] | None = None, body: bytes | None = None,
         timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these headers (Host included when given); returns (status, headers, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes; return everything the router answers until it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    return b"".join(chunks)


def backends(router: Any, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """``/api/backends`` as JSON."""
    return http_json(router.url + "/api/backends", headers=headers)


def wait_backends(router: Any, count: int, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Wait until the router lists ``count`` backends."""
    return wait_for(lambda: len(backends(router, headers)) == count and backends(router, headers),
                    timeout=15, what=f"{count} backends")


def scan_args(low: int, high: int) -> tuple[str, ...]:
    """Flags for a narrow, quick scan."""
    return ("--scan-start", str(low), "--scan-end", str(high), "--scan-interval", "1s")


def write_secret(path: Path, text: str) -> str:
    """Write a 0600 file; return its path."""
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


TOKEN = "s3cret-token-for-tests-0123456789"


# -- 1. whose instances ----------------------------------------------------------------------------
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run a server as nobody"
)


@needs_root
def test_owners_self_hides_another_users_instance_and_all_shows_it(tmp_path, fakes, router_factory,
                                                                   other_users_reach_checkout):
    port = free_port_block(2)
    fakes(tmp_path / "mine", port)
    theirs = fakes(Path("/tmp") / f"ocr-sec-{os.getpid()}-theirs", port + 1, as_user="nobody")
    try:
        own_only = router_factory(*scan_args(port, port + 1))
        listed = wait_backends(own_only, 1)
        assert [b["slug"] for b in listed] == ["mine"]
        wait_for(lambda: http_json(own_only.url + "/api/health")["ignored_other_owners"] == 1, what="ignored count")
        status, _, _ = call(own_only.port, "GET", f"/ocr-sec-{os.getpid()}-theirs/global/health")
        assert status == 404
        assert call(own_only.port, "GET", "/mine/global/health")[0] == 200

        everyone = router_factory(*scan_args(port, port + 1), "--owners", "all")
        listed = wait_backends(everyone, 2)
        by_owner = {b["owner"]: b for b in listed}
        assert set(by_owner) == {"root", "nobody"}
        status, _, body = call(everyone.port, "GET", f"/{by_owner['nobody']['slug']}/global/health")
        assert status == 200 and json.loads(body)["healthy"] is True
        assert http_json(everyone.url + "/api/health")["ignored_other_owners"] == 0

        only_nobody = router_factory(*scan_args(port, port + 1), "--owners", "nobody")
        assert [b["owner"] for b in wait_backends(only_nobody, 1)] == ["nobody"]
    finally:
        theirs.stop()
        shutil.rmtree(theirs.directory, ignore_errors=True)


def test_owners_naming_an_unknown_user_stops_startup(router_factory):
    router = router_factory("--owners", "no-such-user-xyz", wait=False)
    assert router.process.wait(15) == 1
    assert "--owners" in router.log() and "no-such-user-xyz" in router.log()


# -- 2. DNS rebinding --------------------------------------------------------------------------------
def test_rebinding_host_gets_421_and_own_names_work(tmp_path, fakes, router_factory):
    port = free_port()
    fakes(tmp_path / "proj", port)
    router = router_factory(*scan_args(port, port), "--allowed-host", "router.example.org")
    wait_backends(router, 1)
    for evil in ("attacker.example", f"attacker.example:{router.port}", "evil.local", "127.0.0.1.evil.example"):
        status, headers, body = call(router.port, "POST", "/proj/session", {"Host": evil, "Content-Type": "application/json"}, b"{}")
        assert status == 421, evil
        assert headers["content-type"] == "application/json"
        assert json.loads(body)["error"] == "misdirected_request"
        assert call(router.port, "GET", "/api/health", {"Host": evil})[0] == 421
    own_names = ["localhost", "127.0.0.1", "[::1]", "router.example.org", socket.gethostname(),
                 f"proj-{os.environ.get('USER', 'root')}.localhost"]
    for name in own_names[:5]:
        status, _, body = call(router.port, "GET", "/proj/global/health", {"Host": f"{name}:{router.port}"})
        assert status == 200 and json.loads(body)["healthy"] is True, name
    domain = backends(router)[0]["domain"].replace(".local", ".localhost")
    status, _, body = call(router.port, "GET", "/global/health", {"Host": f"{domain}:{router.port}"})
    assert status == 200 and json.loads(body)["healthy"] is True
    status, _, body = call(router.port, "GET", "/global/health", {"Host": backends(router)[0]["domain"]})
    assert status == 200 and json.loads(body)["healthy"] is True


# -- 3. cross-site requests --------------------------------------------------------------------------
WEBSOCKET_HEADERS = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
    "Sec-WebSocket-Version": "13",
}


def test_foreign_origin_post_and_websocket_get_403_while_own_origin_works(tmp_path, fakes, router_factory):
    port = free_port()
    fakes(tmp_path / "proj", port)
    router = router_factory(*scan_args(port, port), "--cors-origin", "https://trusted.example")
    wait_backends(router, 1)
    own = f"http://127.0.0.1:{router.port}"
    json_body = {"Content-Type": "text/plain"}  # what fetch(..., {mode: "no-cors"}) may send

    for foreign in ("https://evil.example", "null", f"http://127.0.0.1:{router.port + 1}", "http://evil.localhost.example"):
        status, headers, body = call(router.port, "POST", "/proj/session", {"Origin": foreign, **json_body}, b"{}")
        assert status == 403, foreign
        assert json.loads(body)["error"] == "forbidden_origin"
        status, _, body = call(router.port, "GET", "/proj/pty/abc/connect", {"Origin": foreign, **WEBSOCKET_HEADERS})
        assert status == 403 and json.loads(body)["error"] == "forbidden_origin", foreign

    for allowed in (own, f"http://localhost:{router.port}", "https://trusted.example"):
        status, _, body = call(router.port, "POST", "/proj/session", {"Origin": allowed, **json_body}, b"{}")
        assert status == 200 and json.loads(body)["id"].startswith("ses_"), allowed
    status, _, body = call(router.port, "POST", "/proj/session", json_body, b"{}")  # curl: no Origin
    assert status == 200
    # A same-origin upgrade passes the guard and reaches the backend (the fake has no WebSocket: 200 page).
    status, _, body = call(router.port, "GET", "/proj/pty/abc/connect", {"Origin": own, **WEBSOCKET_HEADERS})
    assert status != 403 and b"forbidden_origin" not in body
    # Reading is not refused: a cross-origin GET cannot read the answer anyway (no CORS headers).
    assert call(router.port, "GET", "/proj/global/health", {"Origin": "https://evil.example"})[0] == 200


# -- 4. authentication ------------------------------------------------------------------------------
def test_without_auth_loopback_router_is_open_and_does_not_warn(tmp_path, fakes, router_factory):
    port = free_port()
    fakes(tmp_path / "proj", port)
    router = router_factory(*scan_args(port, port))
    wait_backends(router, 1)
    assert call(router.port, "GET", "/proj/global/health")[0] == 200
    assert call(router.port, "GET", "/")[0] == 200
    assert "SECURITY WARNING" not in router.log()


def test_token_auth_matrix(tmp_path, fakes, router_factory):
    port = free_port()
    fakes(tmp_path / "proj", port)
    router = router_factory(*scan_args(port, port), "--auth-token-file", write_secret(tmp_path / "token", TOKEN))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    wait_backends(router, 1, headers=bearer)

    # /api/health stays open; everything else needs the token.
    assert call(router.port, "GET", "/api/health")[0] == 200
    refused = {}
    for path in ("/api/backends", "/", "/proj/global/health", "/proj/session"):
        status, headers, body = call(router.port, "GET", path)
        assert status == 401, path
        assert json.loads(body) == {"error": "unauthorized"}
        assert headers["www-authenticate"].startswith("Bearer")
        refused[path] = body
    status, _, wrong_body = call(router.port, "GET", "/api/backends", {"Authorization": "Bearer wrong-token-123456"})
    assert status == 401 and wrong_body == refused["/api/backends"]  # no detail on what was wrong

    assert call(router.port, "GET", "/api/backends", bearer)[0] == 200
    status, _, body = call(router.port, "GET", "/proj/global/health", bearer)
    assert status == 200 and json.loads(body)["healthy"] is True
    status, _, body = call(router.port, "POST", "/proj/session", {**bearer, "Content-Type": "application/json"}, b"{}")
    assert status == 200 and json.loads(body)["id"].startswith("ses_")

    # A browser gets the login form; posting the token sets an HttpOnly, SameSite cookie.
    status, headers, page = call(router.port, "GET", "/", {"Accept": "text/html"})
    assert status == 401 and b"<form" in page and headers["content-type"].startswith("text/html")
    status, headers, _ = call(
        router.port, "POST", "/_router/login",
        {"Content-Type": "application/x-www-form-urlencoded", "Origin": router.url},
        f"token={TOKEN}&next=/api/backends".encode(),
    )
    assert status == 303 and headers["location"] == "/api/backends"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    session = {"Cookie": cookie.split(";")[0]}
    assert call(router.port, "GET", "/api/backends", session)[0] == 200
    assert call(router.port, "GET", "/proj/global/health", session)[0] == 200
    assert call(router.port, "GET", "/api/backends", {"Cookie": "ocr_session=99999999999.forged"})[0] == 401
    status, headers, _ = call(
        router.port, "POST", "/_router/login", {"Content-Type": "application/x-www-form-urlencoded"},
        b"token=wrong&next=https://evil.example/",
    )
    assert status == 401 and "set-cookie" not in headers


# The failure throttle (slowed-down wrong tokens) is test_security_router.py's, on a clock.


def test_basic_auth_file_with_bcrypt_hashes(tmp_path, fakes, router_factory):
    import bcrypt

    port = free_port()
    fakes(tmp_path / "proj", port)
    hashed = bcrypt.hashpw(b"correct horse", bcrypt.gensalt(rounds=4)).decode()
    users = write_secret(tmp_path / "users", f"# router users\nalice:{hashed}\n")
    router = router_factory(*scan_args(port, port), "--basic-auth-file", users)

    def basic(user: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    wait_backends(router, 1, headers=basic("alice", "correct horse"))
    status, headers, _ = call(router.port, "GET", "/api/backends")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    assert call(router.port, "GET", "/api/backends", basic("alice", "wrong"))[0] == 401
    assert call(router.port, "GET", "/api/backends", basic("mallory", "correct horse"))[0] == 401
    status, _, body = call(router.port, "GET", "/proj/global/health", basic("alice", "correct horse"))
    assert status == 200 and json.loads(body)["healthy"] is True


def test_unreadable_or_malformed_credential_files_stop_startup(tmp_path, router_factory):
    short = write_secret(tmp_path / "short", "abc")
    router = router_factory("--auth-token-file", short, wait=False)
    assert router.process.wait(15) == 1 and "--auth-token-file" in router.log()
    plain = write_secret(tmp_path / "plain", "alice:password")
    router = router_factory("--basic-auth-file", plain, wait=False)
    assert router.process.wait(15) == 1 and "line 1" in router.log()


# -- 5. password-protected backends -----------------------------------------------------------------
def test_locked_backend_is_listed_and_routable_with_the_password_file(tmp_path, fakes, router_factory):
    port = free_port()
    fakes(tmp_path / "secret-project", port, env={"OPENCODE_SERVER_PASSWORD": "hunter2hunter2"})

    blind = router_factory(*scan_args(port, port))
    [listed] = wait_backends(blind, 1)
    assert listed["locked"] is True and listed["slug"] == f"locked-{port}"
    # Its project is unknown: null, not a made-up string a client could take for a path.
    assert listed["project_path"] is None and listed["project_name"] is None
    # Without the password file the client's own credentials pass through untouched.
    status, headers, _ = call(blind.port, "GET", f"/locked-{port}/global/health")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    own = {"Authorization": "Basic " + base64.b64encode(b"opencode:hunter2hunter2").decode()}
    status, _, body = call(blind.port, "GET", f"/locked-{port}/global/health", own)
    assert status == 200 and json.loads(body)["healthy"] is True

    password = write_secret(tmp_path / "oc-password", "hunter2hunter2")
    opened = router_factory(*scan_args(port, port), "--opencode-password-file", password)
    [listed] = wait_backends(opened, 1)
    assert listed["locked"] is True
    assert listed["slug"] == "secret-project" and listed["project_path"] == str(tmp_path / "secret-project")
    status, _, body = call(opened.port, "GET", "/secret-project/global/health")
    assert status == 200 and json.loads(body)["healthy"] is True
    status, _, body = call(opened.port, "POST", "/secret-project/session", {"Content-Type": "application/json"}, b"{}")
    assert status == 200 and json.loads(body)["id"].startswith("ses_")

    wrong = write_secret(tmp_path / "wrong", "not-the-password")
    refused = router_factory(*scan_args(port, port), "--opencode-password-file", wrong)
    [listed] = wait_backends(refused, 1)
    assert listed["locked"] is True and listed["slug"] == f"locked-{port}"


# -- 6. hostile data and oversized or slow requests ---------------------------------------------------
PAYLOAD = "<script>alert(1)</script>"


def test_backend_data_and_request_paths_are_escaped_in_html(tmp_path, fakes, router_factory):
    port = free_port()
    # A directory name cannot hold "/": split the payload over two folders, and put one in the version.
    directory = tmp_path / "<script>alert(1)<" / "script>\"'&"
    fakes(directory, port, extra=("--version-string", "<img src=x onerror=alert(2)>"))
    router = router_factory(*scan_args(port, port))
    [listed] = wait_backends(router, 1)
    assert PAYLOAD in listed["project_path"]  # the JSON keeps the data as it is
    status, _, page = call(router.port, "GET", "/", {"Accept": "text/html"})
    assert status == 200
    assert b"<script>alert(1)" not in page and b"<img src=x" not in page and b"script>\"'" not in page
    if b"alert(1)" in page:  # a dashboard that renders rows on the server must show them escaped
        assert b"&lt;script&gt;alert(1)&lt;" in page and b"&lt;img src=x onerror=alert(2)&gt;" in page
    status, _, page = call(router.port, "GET", "/%3Cscript%3Ealert(1)%3C%2Fscript%3E/", {"Accept": "text/html"})
    assert status == 404 and b"<script>" not in page and b"&lt;script&gt;" in page
    status, _, page = call(router.port, "GET", "/", {"Accept": "text/html", "Host": f"x{PAYLOAD}.localhost"})
    assert b"<script>" not in page


def test_oversized_url_headers_and_body_get_414_431_413(tmp_path, fakes, router_factory):
    port = free_port()
    fakes(tmp_path / "proj", port)
    router = router_factory(*scan_args(port, port), "--max-body-bytes", "4096")
    wait_backends(router, 1)

    answer = raw(router.port, b"GET /proj/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414 ") and b"uri_too_long" in answer
    answer = raw(router.port, b"GET /" + b"a" * 70000)  # no line end at all
    assert answer.startswith(b"HTTP/1.1 414 ")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    answer = raw(router.port, b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ") and b"request_header_fields_too_large" in answer
    answer = raw(router.port, b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    answer = raw(router.port, b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"b" * 70000)
    assert answer.startswith(b"HTTP/1.1 431 ")

    big = b"x" * 10000
    status, _, body = call(router.port, "POST", "/api/backends", {"Content-Type": "application/json"}, big)
    assert status == 413 and json.loads(body)["error"] == "content_too_large"
    answer = raw(router.port, b"POST /_router/login HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"".join(b"400\r\n" + b"y" * 1024 + b"\r\n" for _ in range(8)) + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    # The router keeps serving, and requests at the limits pass.
    assert call(router.port, "GET", "/proj/" + "a" * 7000)[0] == 200
    assert call(router.port, "GET", "/api/health", {f"X-H{i}": "v" for i in range(60)})[0] == 200
    # Bodies bound for a backend are the backend's business (a long prompt is fine).
    title = json.dumps({"title": "t" * 20000}).encode()
    status, _, body = call(router.port, "POST", "/proj/session", {"Content-Type": "application/json"}, title)
    assert status == 200 and json.loads(body)["title"] == "t" * 20000


# Slowloris and idle connections against the --header-timeout bound: test_security_router.py, on a clock.


# -- 5, against the real OpenCode ---------------------------------------------------------------------
OPENCODE = Path.home() / ".cache/opencoderouter/opencode-ai-1.18.33/bin/opencode"
_OFFLINE = {
    "OPENCODE_DISABLE_MODELS_FETCH": "1", "OPENCODE_DISABLE_AUTOUPDATE": "1", "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
    "OPENCODE_DISABLE_LSP_DOWNLOAD": "1", "OPENCODE_DISABLE_SHARE": "1", "OPENCODE_DISABLE_CLAUDE_CODE": "1",
    "OPENCODE_DISABLE_EXTERNAL_SKILLS": "1",
}


def _start_real_opencode(tmp_path: Path, project: Path, port: int, password: str) -> subprocess.Popen:
    home = tmp_path / "home"
    plugin_dir = home / ".config/opencode"
    (plugin_dir / "node_modules").mkdir(parents=True)
    # Seeding the plugin install keeps opencode from running npm (network) on the first request.
    (plugin_dir / "package.json").write_text('{"dependencies":{"@opencode-ai/plugin":"1.18.33"}}')
    (plugin_dir / "package-lock.json").write_text(
        '{"lockfileVersion":3,"packages":{"":{"dependencies":{"@opencode-ai/plugin":"1.18.33"}}}}')
    config = {"$schema": "https://opencode.ai/config.json",
              "provider": {"fake": {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                                    "options": {"baseURL": f"http://127.0.0.1:{free_port()}/v1", "apiKey": "sk-fake"},
                                    "models": {"fake-model": {"name": "Fake Model"}}}},
              "model": "fake/fake-model", "small_model": "fake/fake-model"}
    env = dict(os.environ, HOME=str(home), OPENCODE_SERVER_PASSWORD=password,
               OPENCODE_CONFIG_CONTENT=json.dumps(config), **_OFFLINE)
    process = subprocess.Popen([str(OPENCODE), "serve", "--port", str(port), "--hostname", "127.0.0.1"],
                               cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"opencode exited with {process.wait()}")
        if LISTENING.search(line):
            return process
    raise RuntimeError("opencode did not start")


def _stop_process_group(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    if process.stdout:
        process.stdout.close()


@pytest.mark.slow
@pytest.mark.real_opencode
@pytest.mark.skipif(not OPENCODE.exists(), reason="the real opencode is not installed (make opencode)")
def test_real_locked_opencode_is_listed_and_opened_with_the_password(tmp_path, router_factory):
    project = tmp_path / "real-locked"
    project.mkdir()
    port = free_port()
    opencode = _start_real_opencode(tmp_path, project, port, "real-password-123")
    try:
        blind = router_factory(*scan_args(port, port), "--probe-timeout", "3s")
        [listed] = wait_backends(blind, 1)
        assert listed["locked"] is True and listed["slug"] == f"locked-{port}" and listed["project_path"] is None
        status, headers, _ = call(blind.port, "GET", f"/locked-{port}/global/health")
        assert status == 401 and headers["www-authenticate"].startswith("Basic")

        password = write_secret(tmp_path / "oc-password", "real-password-123")
        opened = router_factory(*scan_args(port, port), "--probe-timeout", "3s", "--opencode-password-file", password)
        [listed] = wait_backends(opened, 1)
        assert listed["locked"] is True and listed["slug"] == "real-locked"
        assert listed["version"] == "1.18.33"
        status, _, body = call(opened.port, "GET", "/real-locked/global/health")
        assert status == 200 and json.loads(body) == {"healthy": True, "version": "1.18.33"}
        status, _, body = call(opened.port, "GET", "/real-locked/path")
        assert status == 200 and json.loads(body)["directory"] == str(project)
    finally:
        _stop_process_group(opencode)
