"""Agent awareness against the real ``opencode serve`` 1.18.33, through a real router.

The scene of tests/agents_real.py (one router and two real servers, ``alpha`` and ``beta``, each its
own HOME; the fake model) is shared by the module. The restart tests come last: they restart the
router and ``beta``. Everything talks to 127.0.0.1 only.

These tests check which state the router shows, never how soon: their waits are hang guards
(``HANG_GUARD``). How soon (issue 15: 1 s after a request is asked, 2 s after a restart) is measured
by bench/agents_latency.py on the same scene.
"""

from __future__ import annotations

import base64
import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from .agents_real import HANG_GUARD, Agents, EventTap
from .chromium import click_fresh, headless_chromium, needs_chromium, rows_wait, severe_console_entries
from .real_opencode import BASH_COMMAND, MODE_BASH, MODE_ERROR, MODE_QUESTION, opencode_binary
from .support import REPO, subprocess_env, wait_for

pytestmark = [
    pytest.mark.real_opencode,
    pytest.mark.slow,
    pytest.mark.skipif(opencode_binary() is None, reason="real opencode not installed (run tests/setup/install-opencode.sh)"),
]

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="module")
def agents(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    made = Agents(tmp_path_factory.mktemp("agents-real"))
    try:
        yield made
    finally:
        made.close()


# -- the real server's shapes ----------------------------------------------------------------------
def test_the_real_servers_stream_and_snapshots_have_the_shapes_the_watcher_reads(agents):
    tap = EventTap(agents.servers["alpha"].port)
    try:
        _, connected = tap.wait("server.connected")
        assert set(connected) == {"payload"}, "server-level events carry no directory"
    finally:
        tap.close()
    port = agents.servers["alpha"].port
    for path, kind in (("/session/status", dict), ("/permission", list), ("/question", list),
                       (f"/session?directory={quote(str(agents.dirs['alpha']))}&roots=true&limit=20", list)):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200 and response.getheader("content-type", "").startswith("application/json")
        assert isinstance(json.loads(response.read()), kind), path
        connection.close()
    entry = agents.agent("alpha")
    assert entry["agents"]["state"] == "idle" and entry["project_path"] == str(agents.dirs["alpha"])


# -- permission ------------------------------------------------------------------------------------
def test_a_permission_shows_needs_you_with_the_command_and_a_reply_through_the_router_resumes_the_turn(agents):
    tap = EventTap(agents.servers["alpha"].port)
    try:
        session_id = agents.prompt("alpha", f"{MODE_BASH} [fake-model:slow=1.5] write the proof", "permission test")
        _, frame = tap.wait("permission.asked", lambda p: p.get("sessionID") == session_id)
        asked = frame["payload"]["properties"]
        # The real event's shape, as the notes and the state model have it.
        assert asked["permission"] == "bash" and asked["patterns"] == [BASH_COMMAND]
        assert asked["metadata"]["command"] == BASH_COMMAND and asked["id"].startswith("per")
        assert frame["directory"] == str(agents.dirs["alpha"])
        _, session = agents.until(
            "alpha", session_id, lambda e, s: e["agents"]["state"] == "needs_you" and s["permissions"],
            what="needs you on /api/agents")
        assert session["status"] == "working" and session["title"] == "permission test"
        [permission] = session["permissions"]
        assert permission["id"] == asked["id"] and permission["asking"] == f"bash: {BASH_COMMAND}"
        assert agents.agent("alpha")["agents"]["label"] == "needs you (1)"

        # Answered through the router as the dashboard does: path mode, the router's Origin, JSON.
        directory = quote(session["directory"], safe="")
        code, body = agents.request("POST", f"/alpha/permission/{permission['id']}/reply?directory={directory}",
                                    {"reply": "once"}, headers=agents.browser_origin())
        assert (code, body) == (200, True)
        tap.wait("permission.replied", lambda p: p.get("requestID") == permission["id"])
        agents.until("alpha", session_id, lambda e, s: s["status"] == "working" and not s["permissions"],
                     what="working again after the reply")
        agents.until("alpha", session_id, lambda e, s: s["status"] == "idle", what="idle at the end")
        assert (agents.dirs["alpha"] / "proof.txt").read_text() == "permitted\n"
        assert agents.agent("alpha")["agents"]["state"] == "idle"
    finally:
        tap.close()


def test_a_reply_from_another_sites_page_is_refused_by_the_router(agents):
    code, body = agents.request("POST", "/alpha/permission/per_nope/reply", {"reply": "once"},
                                headers={"Origin": "http://evil.example", "Host": f"127.0.0.1:{agents.router.port}"})
    assert code == 403 and body["error"] == "forbidden_origin"


# -- question --------------------------------------------------------------------------------------
def test_a_question_needs_you_and_an_answer_through_the_router_ends_it(agents):
    tap = EventTap(agents.servers["beta"].port)
    try:
        session_id = agents.prompt("beta", f"{MODE_QUESTION} ask me", "question test")
        _, frame = tap.wait("question.asked", lambda p: p.get("sessionID") == session_id)
        _, session = agents.until("beta", session_id, lambda e, s: bool(s["questions"]),
                                  what="the question on /api/agents")
        [question] = session["questions"]
        assert question["id"] == frame["payload"]["properties"]["id"]
        assert question["asking"] == "question: Which colour do you prefer?"
        assert question["questions"] == [{"header": "Colour", "question": "Which colour do you prefer?",
                                          "options": ["Red", "Blue"], "multiple": False}]
        assert agents.agent("beta")["agents"]["state"] == "needs_you"
        code, body = agents.request("POST", f"/beta/question/{question['id']}/reply", {"answers": [["Blue"]]},
                                    headers=agents.browser_origin())
        assert (code, body) == (200, True)
        tap.wait("question.replied", lambda p: p.get("requestID") == question["id"])
        agents.until("beta", session_id, lambda e, s: s["status"] == "idle" and not s["questions"],
                     what="idle once answered")
    finally:
        tap.close()


# -- a failing model -------------------------------------------------------------------------------------
def test_a_failing_model_shows_error_with_its_message(agents):
    session_id = agents.prompt("beta", f"{MODE_ERROR} please fail", "failing test")
    _, session = agents.until("beta", session_id, lambda e, s: s["status"] == "error", what="error")
    assert session["last_error"] == {"name": "APIError", "message": "fake model refuses this request"}
    assert agents.agent("beta")["agents"]["state"] == "error"
    # The idles that follow an error do not hide it. The server's own stream shows the idle; a title
    # change sent after it, once the router shows it, proves the router has read past that idle too.
    tap = EventTap(agents.servers["beta"].port)
    try:
        tap.wait("server.connected")
        wait_for(lambda: session_id not in agents.request("GET", "/beta/session/status")[1], timeout=HANG_GUARD,
                 what="the server to consider the failed turn over (idle)")
        code, _ = agents.request("PATCH", f"/beta/session/{session_id}", {"title": "failing test, seen"})
        assert code == 200
        tap.wait("session.updated", lambda p: p.get("info", {}).get("title") == "failing test, seen")
        _, session = agents.until("beta", session_id, lambda e, s: s["title"] == "failing test, seen",
                                  what="the new title on /api/agents")
    finally:
        tap.close()
    assert session["status"] == "error"


# -- the terminal view -----------------------------------------------------------------------------------
def test_opencoderouter_status_shows_who_needs_you_with_the_command_and_the_link(agents):
    session_id = agents.prompt("alpha", f"{MODE_BASH} for the terminal", "seen from ssh")
    _, session = agents.until("alpha", session_id, lambda e, s: bool(s["permissions"]), what="the permission")
    done = subprocess.run([sys.executable, "-m", "opencoderouter.status", "--router", agents.router.url],
                          capture_output=True, text=True, timeout=30, env=subprocess_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].startswith("alpha") and "needs you (1)" in lines[1]
    assert lines[2].startswith('  ! "seen from ssh"  needs you: bash: echo permitted > proof.txt')
    assert lines[2].endswith(session["web_url"]) and ".localhost:" in session["web_url"]
    permission = session["permissions"][0]["id"]
    agents.request("POST", f"/alpha/permission/{permission}/reply", {"reply": "reject"}, headers=agents.browser_origin())
    agents.until("alpha", session_id, lambda e, s: s["status"] == "idle", what="idle after the reject")


# -- the dashboard, in Chromium -------------------------------------------------------------------------
@needs_chromium
def test_the_dashboard_shows_the_change_live_first_and_the_link_opens_the_session_in_the_web_ui(agents, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    def state_of(driver: Any, slug: str) -> tuple[str, list[str]]:
        return driver.execute_script(
            "const rows = [...document.querySelectorAll('#rows tr[data-slug]')];"
            "const r = rows.find((r) => r.getAttribute('data-slug') === arguments[0]);"
            "return [r ? r.querySelector('.badge').textContent : null, rows.map((r) => r.getAttribute('data-slug'))];",
            slug)

    router = agents.router
    with headless_chromium(tmp_path / "chromium", 1440, 900) as browser:
        browser.get(router.url + "/")
        wait = WebDriverWait(browser, HANG_GUARD, poll_frequency=0.05)
        wait.until(lambda d: state_of(d, "alpha")[0] not in (None, "unknown"))
        browser.execute_script("window.__not_reloaded = true")
        session_id = agents.prompt("alpha", f"{MODE_BASH} for the browser", "seen in the browser")
        wait.until(lambda d: state_of(d, "alpha")[0] == "needs you (1)")
        assert state_of(browser, "alpha")[1][0] == "alpha", "the row that needs you comes first"
        assert browser.execute_script("return window.__not_reloaded") is True
        assert browser.title == "(1) OpenCodeRouter"
        # Read in one go, again if a session update rebuilt the row in between.
        fresh = rows_wait(browser, HANG_GUARD)
        asking, link_text, href = fresh.until(lambda d: (lambda row: (
            row.find_element("css selector", ".ask .asking").text,
            row.find_element("css selector", "a.session-link").text,
            row.find_element("css selector", "a.session-link").get_attribute("href")))(
                d.find_element("css selector", "#rows tr[data-slug='alpha']")))
        assert asking == f"bash: {BASH_COMMAND}"
        assert link_text == "seen in the browser"
        encoded = base64.urlsafe_b64encode(str(agents.dirs["alpha"]).encode()).rstrip(b"=").decode()
        label = agents.request("GET", "/api/backends")[1][0]["domain"].removesuffix(".local")
        assert href == f"http://{label}.localhost:{router.port}/{encoded}/session/{session_id}"
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "dashboard-agents-real.png"))
        assert severe_console_entries(browser) == []

        # One click: the real OpenCode web UI, through the router's host mode, on that session.
        dashboard = browser.current_window_handle
        click_fresh(browser, "#rows tr[data-slug='alpha'] a.session-link", HANG_GUARD)
        wait.until(lambda d: len(d.window_handles) == 2)
        browser.switch_to.window([h for h in browser.window_handles if h != dashboard][0])
        WebDriverWait(browser, 2 * HANG_GUARD, poll_frequency=0.2).until(
            lambda d: "seen in the browser" in d.find_element("tag name", "body").text)
        assert browser.title == "OpenCode" and session_id in browser.current_url
        browser.save_screenshot(str(ARTIFACTS / "web-ui-session-real.png"))
        browser.close()
        browser.switch_to.window(dashboard)

        # Answered from the row: the badge moves on without a reload.
        click_fresh(browser, "#rows tr[data-slug='alpha'] button.reply-reject", HANG_GUARD)
        wait.until(lambda d: state_of(d, "alpha")[0] not in ("needs you (1)",))
        agents.until("alpha", session_id, lambda e, s: s["status"] == "idle", what="idle after the reject")
        wait.until(lambda d: state_of(d, "alpha")[0] in ("idle", "error"))
        assert browser.title == "OpenCodeRouter"
        assert [e for e in severe_console_entries(browser) if router.url in e["message"]] == []


# -- restarts (these come last) ----------------------------------------------------------------------------
def test_a_router_restart_mid_turn_shows_the_state_from_the_servers_snapshots(agents):
    turn = agents.start_mid_turn(slow=12)
    agents.restart_router()
    # The new router remembers nothing: what it shows comes from the servers' snapshots.
    wait_for(lambda: agents.shows_mid_turn(turn), timeout=HANG_GUARD, interval=0.05,
             what="the state from the snapshots after the restart")
    session = agents.session_of("alpha", turn.waiting)
    assert session["title"] == "waits across a restart" and session["permissions"][0]["asking"] == \
        f"bash: {BASH_COMMAND}"
    assert agents.session_of("beta", turn.failed)["last_error"]["message"] == "fake model refuses this request"
    # Clean up: reject the waiting permission (the turn ends), let the slow one finish.
    agents.reject("alpha", session["permissions"][0]["id"])
    agents.until("alpha", turn.waiting, lambda e, s: s["status"] == "idle", what="idle after the reject")
    agents.until("beta", turn.busy, lambda e, s: s["status"] == "idle", what="the slow turn's end")


def test_a_backend_restart_mid_turn_shows_the_lost_turn_idle_once_the_server_is_back(agents):
    busy = agents.prompt("beta", "[fake-model:slow=20] the server will die", "dies mid-turn")
    agents.until("beta", busy, lambda e, s: s["status"] == "working", what="working before the kill")
    agents.servers["beta"].kill()
    wait_for(lambda: agents.agent("beta")["agents"]["state"] == "unknown", timeout=HANG_GUARD, interval=0.05,
             what="unknown once the server is gone")
    agents.servers["beta"] = agents.start_server("beta")

    # The restarted server lost the turn: the session is idle now, and the router says so.
    seen: list[Any] = []
    try:
        wait_for(lambda: agents.shows_lost_turn("beta", busy, seen), timeout=HANG_GUARD, interval=0.05,
                 what="the state after the backend restart")
    except AssertionError as error:
        raise AssertionError(f"{error}; last seen: {seen}") from None
