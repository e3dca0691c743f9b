"""The OpenCode clients through the router, as a person uses them: the web UI in Chromium, the TUI
(`opencode attach`) under tmux, the OpenCode `/api/*` family, all against the real `opencode serve`.

One router (loopback, `--opencode-password-file`) in front of two real servers: `webapp` (open)
and `vault` (OPENCODE_SERVER_PASSWORD set, opened by the router with the password). The model is
the suite's fake OpenAI-compatible server on 127.0.0.1. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .chromium import available as chromium_available
from .chromium import headless_chromium
from .real_opencode import REPLY_TEXT, FakeModelServer, OpenCodeInstance, opencode_binary, opencode_env, seed_home
from .support import REPO, RouterProcess, free_port_block, http_get, http_json, wait_for

USERNAME = "tester"
PASSWORD = "vault-password-123"
ARTIFACTS = REPO / "test-artifacts"

pytestmark = [
    pytest.mark.real_opencode,
    pytest.mark.slow,
    pytest.mark.skipif(opencode_binary() is None, reason="real opencode not installed (run tests/setup/install-opencode.sh)"),
]


class Clients:
    """The router, the two servers and what the tests need to reach them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = FakeModelServer().start()
        block = free_port_block(3)
        self.webapp = root / "projects" / "webapp"
        self.vault = root / "projects" / "vault"
        self.webapp.mkdir(parents=True)
        self.vault.mkdir(parents=True)
        self.servers = [OpenCodeInstance(self.webapp, root / "home-webapp", self.model.url, port=block)]
        vault_home = seed_home(root / "home-vault")
        self.servers.append(OpenCodeInstance(
            self.vault, vault_home, self.model.url, port=block + 1,
            env=opencode_env(vault_home, self.model.url, OPENCODE_SERVER_PASSWORD=PASSWORD)))
        password_file = root / "oc-password"
        password_file.write_text(PASSWORD + "\n")
        password_file.chmod(0o600)
        self.router = RouterProcess("--scan-start", str(block), "--scan-end", str(block + 2), "--username", USERNAME,
                                    "--scan-interval", "2s", "--opencode-password-file", str(password_file))
        wait_for(lambda: {b["slug"] for b in http_json(self.router.url + "/api/backends")} == {"webapp", "vault"},
                 timeout=60, interval=0.3, what="the router to list webapp and vault")
        self.port = self.router.port

    def host_mode(self, slug: str) -> str:
        return f"http://{slug}-{USERNAME}.localhost:{self.port}"

    def stop(self) -> None:
        self.router.stop()
        for server in self.servers:
            server.stop()
        self.model.stop()


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clients]:
    setup = Clients(tmp_path_factory.mktemp("clients"))
    try:
        yield setup
    finally:
        setup.stop()


# -- the OpenCode /api/* family ---------------------------------------------------------------------
def test_opencode_api_family_reaches_the_backend_in_both_modes_never_the_routers_own_api(clients):
    own = http_json(clients.router.url + "/api/health")
    assert own["username"] == USERNAME  # the router's own API answers /api/health at the root
    by_path = http_json(clients.router.url + "/webapp/api/health")
    by_host = http_json(clients.router.url + "/api/health", headers={"Host": f"webapp-{USERNAME}.localhost:{clients.port}"})
    assert by_path == by_host == {"healthy": True}  # OpenCode's: no username, no backends count
    for url, headers in ((clients.router.url + "/webapp/api/session", {}),
                         (clients.router.url + "/api/session", {"Host": f"webapp-{USERNAME}.localhost"})):
        status, response_headers, body = http_get(url, headers=headers)
        assert status == 200 and "data" in json.loads(body), (url, body[:200])
    location = http_json(clients.router.url + "/webapp/api/location")
    assert location["directory"] == str(clients.webapp)


# -- the web UI in Chromium ---------------------------------------------------------------------------
@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not chromium_available():
        pytest.skip("needs selenium and Debian's chromium and chromium-driver")
    # Every request the page makes is kept, to show that nothing leaves 127.0.0.1 (so no resolver rules).
    with headless_chromium(tmp_path / "chromium", 1400, 900, loopback_names_only=False, performance_log=True) as driver:
        yield driver


def network_events(driver: Any) -> list[dict[str, Any]]:
    return [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]


def body_text(driver: Any) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.TAG_NAME, "body").text)


def test_web_ui_through_the_host_mode_name_runs_a_session_and_its_terminal(clients, browser):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    ARTIFACTS.mkdir(exist_ok=True)
    encoded = base64.urlsafe_b64encode(str(clients.webapp).encode()).rstrip(b"=").decode()
    browser.get(f"{clients.host_mode('webapp')}/{encoded}")
    wait = WebDriverWait(browser, 30, poll_frequency=0.2)
    # The project's directory opens a new session with its prompt box: the app loaded under the router.
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-component=prompt-input]"))
    # The app fills in its providers and agents after the first paint: submit once the model shows, into
    # the prompt box as it is then (the first paint's may have been replaced).
    wait.until(lambda d: "Fake Model" in body_text(d))
    prompt = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "[data-component=prompt-input]"))[0]
    browser.save_screenshot(str(ARTIFACTS / "web-ui-new-session.png"))
    prompt.click()
    prompt.send_keys("say hello through the router")
    time.sleep(0.5)  # the editor takes the text in before a key that submits it
    prompt.send_keys(Keys.ENTER)
    try:
        wait.until(lambda d: REPLY_TEXT in body_text(d))
    finally:
        browser.save_screenshot(str(ARTIFACTS / "web-ui-answer.png"))
    assert "/session/ses_" in browser.current_url
    sessions = http_json(clients.router.url + "/webapp/session")
    assert any(s["directory"] == str(clients.webapp) for s in sessions)

    # The terminal tab: a PTY, a connect token (Origin checked against Host) and its WebSocket.
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("`").key_up(Keys.CONTROL).perform()
    seen: list[dict[str, Any]] = []

    def terminal_connected(driver: Any) -> bool:
        seen.extend(network_events(driver))
        return any(e["method"] == "Network.webSocketHandshakeResponseReceived"
                   and e["params"]["response"]["status"] == 101 for e in seen)

    WebDriverWait(browser, 30, poll_frequency=0.3).until(terminal_connected)
    tokens = [e["params"]["response"]["status"] for e in seen
              if e["method"] == "Network.responseReceived" and "/connect-token" in e["params"]["response"]["url"]]
    assert tokens and set(tokens) == {200}, tokens
    sockets = [e["params"]["url"] for e in seen if e["method"] == "Network.webSocketCreated"]
    assert sockets and all(url.startswith(f"ws://webapp-{USERNAME}.localhost:{clients.port}/pty/") for url in sockets)
    browser.save_screenshot(str(ARTIFACTS / "web-ui-terminal.png"))

    # Nothing came from anywhere but the router's host-mode name (which is the loopback).
    hosts = {e["params"]["request"]["url"].split("/")[2] for e in seen + network_events(browser)
             if e["method"] == "Network.requestWillBeSent" and e["params"]["request"]["url"].startswith(("http:", "https:"))}
    assert hosts == {f"webapp-{USERNAME}.localhost:{clients.port}"}, hosts


def test_a_browser_at_the_path_mode_root_lands_on_the_working_web_ui(clients, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"http://localhost:{clients.port}/webapp/")
    WebDriverWait(browser, 30, poll_frequency=0.2).until(lambda d: d.current_url.startswith(clients.host_mode("webapp")))
    # Not the blank page the web UI renders under a path prefix: its own UI, with its own text.
    WebDriverWait(browser, 30, poll_frequency=0.2).until(lambda d: "session" in body_text(d).lower())
    assert browser.title == "OpenCode"
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "web-ui-from-path-mode.png"))
    # API clients at the same URL still get the backend through path mode.
    status, headers, _ = http_get(f"http://localhost:{clients.port}/webapp/", headers={"Accept": "*/*"})
    assert status == 200


# -- the TUI: opencode attach under tmux ---------------------------------------------------------------
class Tmux:
    """A private tmux server (its own socket) running one command in a 200x50 window."""

    def __init__(self, name: str, command: list[str], env: dict[str, str]) -> None:
        self.socket = f"ocr-test-{os.getpid()}-{name}"
        self.session = name
        script = " ".join(_quote(part) for part in command)
        subprocess.run(["tmux", "-L", self.socket, "new-session", "-d", "-s", name, "-x", "200", "-y", "50", script],
                       check=True, env=env)

    def screen(self) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, "capture-pane", "-p", "-t", self.session],
                                capture_output=True, text=True, check=False)
        return result.stdout

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "-L", self.socket, "send-keys", "-t", self.session, "-l", text], check=True)
        time.sleep(0.3)  # a TUI that gets Enter in the same read as the text may take it as part of it
        subprocess.run(["tmux", "-L", self.socket, "send-keys", "-t", self.session, "Enter"], check=True)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], check=False, capture_output=True)


def _quote(part: str) -> str:
    return "'" + part.replace("'", "'\\''") + "'"


@pytest.fixture
def tmux_available() -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")


def attach_env(clients: Clients, tag: str) -> dict[str, str]:
    home = seed_home(clients.root / f"home-attach-{tag}")
    env = opencode_env(home, clients.model.url)
    env["TERM"] = "xterm-256color"
    return env


def run_attach(clients: Clients, tag: str, url: str, *extra: str, wrap: list[str] | None = None) -> Tmux:
    binary = str(opencode_binary())
    return Tmux(tag, [*(wrap or []), binary, "attach", url, *extra], attach_env(clients, tag))


def assert_tui_round_trip(tui: Tmux, directory: Path, prompt: str) -> None:
    try:
        wait_for(lambda: str(directory) in tui.screen() and "1.18.33" in tui.screen(), timeout=60, interval=0.3,
                 what="the TUI to show the project's directory and version")
        tui.type(prompt)
        wait_for(lambda: REPLY_TEXT in tui.screen(), timeout=60, interval=0.3, what="the fake model's answer in the TUI")
    except AssertionError:
        print(tui.screen())
        raise
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / f"tui-{tui.session}.txt").write_text(tui.screen())
        tui.close()


def test_attach_through_path_mode_shows_the_project_and_gets_the_answer(clients, tmux_available):
    tui = run_attach(clients, "path", f"http://localhost:{clients.port}/webapp/")
    assert_tui_round_trip(tui, clients.webapp, "hello from attach through path mode")


def test_attach_through_the_host_mode_name_works_too(clients, tmux_available):
    # attach (Bun) resolves *.localhost through the system resolver, which here has no such name:
    # give attach alone a hosts file with it (a private mount namespace; the machine's is untouched).
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private /etc/hosts")
    hosts = clients.root / "hosts"
    hosts.write_text(f"127.0.0.1 localhost webapp-{USERNAME}.localhost\n::1 localhost\n")
    wrap = ["unshare", "--mount", "sh", "-c", f'mount --bind {hosts} /etc/hosts && exec "$0" "$@"']
    tui = run_attach(clients, "host", clients.host_mode("webapp") + "/", wrap=wrap)
    assert_tui_round_trip(tui, clients.webapp, "hello from attach through host mode")


def test_attach_with_a_password_reaches_a_locked_server_behind_the_routers_password_file(clients, tmux_available):
    listed = {b["slug"]: b for b in http_json(clients.router.url + "/api/backends")}
    assert listed["vault"]["locked"] is True and listed["vault"]["project_path"] == str(clients.vault)
    tui = run_attach(clients, "vault", f"http://localhost:{clients.port}/vault/", "--password", PASSWORD)
    assert_tui_round_trip(tui, clients.vault, "hello to the locked server")
