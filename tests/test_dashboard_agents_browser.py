"""The dashboard's agent view in headless Chromium: 30 agents on one laptop screen, who needs you first,
answering from the row, the filter, the title count, notifications, hostile text (tests/dashboard_stub.py)."""

from __future__ import annotations

import base64
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .chromium import click_fresh, headless_chromium, needs_chromium, rows_wait, severe_console_entries
from .support import REPO, dashboard_stub, http_json

pytest.importorskip("selenium", reason="selenium is not installed")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

pytestmark = [pytest.mark.slow, needs_chromium]
ARTIFACTS = REPO / "test-artifacts"

HOSTILE_COMMAND = 'rm -rf "<b>build</b>" && echo <img src=x onerror="window.__xss=3">'
HOSTILE_TITLE = "Deploy <script>window.__xss=4</script>"

#: Records what the page would hand to the Notification API (headless Chromium shows none).
FAKE_NOTIFICATIONS = """
window.__notes = [];
window.Notification = class {
  static permission = "default";
  static requestPermission() { window.Notification.permission = "granted"; return Promise.resolve("granted"); }
  constructor(title, options) { window.__notes.push([title, options.body]); }
};
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium in a 1440x900 window, the screen of a common laptop."""
    with headless_chromium(tmp_path / "chromium", 1440, 900) as driver:
        yield driver


@pytest.fixture
def agents_stub() -> Iterator[str]:
    with dashboard_stub("--agents", "30") as url:
        yield url


def post(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=5).read()


def order(driver: Any) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#rows tr[data-slug]')].filter((r) => !r.hidden)"
        ".map((r) => r.getAttribute('data-slug'));")


def badge(driver: Any, slug: str) -> str | None:
    return driver.execute_script(
        "const r = document.querySelector(`#rows tr[data-slug='${arguments[0]}']`);"
        "return r ? r.querySelector('.badge').textContent : null;", slug)


def test_thirty_agents_fit_a_laptop_screen_with_who_needs_you_first(browser, agents_stub):
    browser.get(agents_stub + "/")
    wait = WebDriverWait(browser, 5, poll_frequency=0.05)
    wait.until(lambda d: len(order(d)) == 30)
    rows = order(browser)
    assert rows[:5] == ["project-07", "project-12", "project-20", "project-03", "project-04"]
    assert rows[5:] == sorted(rows[5:])
    assert browser.title == "(2) OpenCodeRouter"
    assert badge(browser, "project-07") == "needs you (1)"
    assert badge(browser, "project-20") == "error" and badge(browser, "project-00") == "idle"
    # Every row is on the first screen of a 1440x900 window, without scrolling.
    bottom = browser.execute_script("return document.querySelector('#rows tr:last-child').getBoundingClientRect().bottom")
    height = browser.execute_script("return window.innerHeight")
    assert bottom <= height, f"30 rows end at {bottom}px on a {height}px screen"
    header = " ".join(browser.find_element("tag name", "header").text.split())
    assert "30 backends: 30 up, 0 down · agents: 2 waiting for you, 2 working, 1 failed" in header

    # What is asked is shown as text; the session link opens the web UI through host mode.
    row = browser.find_element("css selector", "#rows tr[data-slug='project-07']")
    assert row.find_element("css selector", ".ask .asking").text == f"bash: {HOSTILE_COMMAND}"
    link = row.find_element("css selector", "a.session-link")
    assert link.text == HOSTILE_TITLE
    encoded = base64.urlsafe_b64encode(b"/home/alice/work/project-07").rstrip(b"=").decode()
    port = agents_stub.rsplit(":", 1)[1]
    assert link.get_attribute("href") == f"http://project-07-alice.localhost:{port}/{encoded}/session/ses_07"
    assert browser.find_elements("css selector", "#rows img, #rows script, #rows b") == []
    assert browser.execute_script("return window.__xss") is None
    failed = browser.find_element("css selector", "#rows tr[data-slug='project-20']")
    assert "APIError: the model refused" in failed.text
    working = browser.find_element("css selector", "#rows tr[data-slug='project-03']")
    assert "todo 1/2" in working.text
    # Idle sessions fold behind their row; links too.
    idle = browser.find_element("css selector", "#rows tr[data-slug='project-00']")
    assert idle.find_element("css selector", "details.idle-sessions summary").text == "1 idle session"
    assert not idle.find_element("css selector", "a.link-path").is_displayed()

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-agents.png"))
    browser.set_window_size(400, 900)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-agents-phone.png"))
    browser.set_window_size(1280, 800)
    assert severe_console_entries(browser) == []


def test_the_filter_matches_name_path_and_state(browser, agents_stub):
    browser.get(agents_stub + "/")
    WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: len(order(d)) == 30)
    box = browser.find_element("id", "filter")
    box.send_keys("needs you")
    assert order(browser) == ["project-07", "project-12"]
    box.clear()
    box.send_keys("work/project-1")
    assert order(browser) == ["project-12"] + [f"project-{n}" for n in (10, 11, 13, 14, 15, 16, 17, 18, 19)]
    assert browser.find_element("id", "filtered").text == "20 of 30 hidden by the filter"
    box.clear()
    box.send_keys("error")
    assert order(browser) == ["project-20"]
    box.send_keys(Keys.ESCAPE)
    assert len(order(browser)) == 30
    box.send_keys("nothing-like-this")
    assert order(browser) == [] and "Nothing matches" in browser.find_element("id", "filtered").text


def test_session_links_use_the_lan_name_only_when_the_page_is_reached_from_the_network(tmp_path):
    # One router with mDNS on, listening beyond the loopback; "devbox.example" is this machine's LAN name.
    encoded = base64.urlsafe_b64encode(b"/home/alice/work/project-07").rstrip(b"=").decode()
    with dashboard_stub("--agents", "30", "--lan") as url, \
            headless_chromium(tmp_path / "chromium", 1440, 900, names_of_this_machine=("devbox.example",)) as lan_browser:
        port = int(url.rsplit(":", 1)[1])
        fresh = rows_wait(lan_browser, 5)

        def session_href(d: Any) -> str | None:
            return d.find_element(By.CSS_SELECTOR, "#rows tr[data-slug='project-07'] a.session-link").get_attribute("href")

        # Through a tunnel or on the box itself: the .localhost name, at this page's port.
        lan_browser.get(url + "/")
        assert fresh.until(session_href) == f"http://project-07-alice.localhost:{port}/{encoded}/session/ses_07"
        # From a laptop on the LAN: the advertised .local name, at the router's own port.
        lan_browser.get(f"http://devbox.example:{port}/")
        assert fresh.until(session_href) == f"http://project-07-alice.local:{port}/{encoded}/session/ses_07"
        assert severe_console_entries(lan_browser) == []


def test_a_permission_and_a_question_are_answered_from_the_row_through_the_router(browser, agents_stub):
    browser.get(agents_stub + "/")
    wait = WebDriverWait(browser, 5, poll_frequency=0.05)
    wait.until(lambda d: len(order(d)) == 30)
    click_fresh(browser, "#rows tr[data-slug='project-07'] button.reply-once")
    wait.until(lambda d: badge(d, "project-07") == "working (1)")
    [call] = http_json(agents_stub + "/api/stub/calls")
    assert call == {"slug": "project-07", "path": "/permission/per_07/reply",
                    "query": {"directory": "/home/alice/work/project-07"}, "body": {"reply": "once"},
                    "origin": agents_stub, "content_type": "application/json"}
    assert order(browser)[:2] == ["project-12", "project-20"], "no longer waiting: it sorts after those that are"
    click_fresh(browser, "#rows tr[data-slug='project-12'] .ask button.reply-option:nth-child(2)")
    wait.until(lambda d: badge(d, "project-12") == "working (1)")
    assert http_json(agents_stub + "/api/stub/calls")[1]["path"] == "/question/que_12/reply"
    assert http_json(agents_stub + "/api/stub/calls")[1]["body"] == {"answers": [["Blue"]]}
    assert browser.title == "OpenCodeRouter"
    assert severe_console_entries(browser) == []


def test_live_changes_move_rows_update_the_title_and_notify_once_opted_in(browser, agents_stub):
    browser.get(agents_stub + "/")
    wait = WebDriverWait(browser, 5, poll_frequency=0.05)
    wait.until(lambda d: len(order(d)) == 30)
    browser.execute_script(FAKE_NOTIFICATIONS)
    browser.execute_script("window.__not_reloaded = true")
    notify = browser.find_element("id", "notify")
    notify.click()
    wait.until(lambda d: d.find_element("id", "notify").text == "Notifications on")

    post(agents_stub + "/api/stub/ask?slug=project-15")
    wait.until(lambda d: order(d)[:3] == ["project-07", "project-12", "project-15"])
    assert badge(browser, "project-15") == "needs you (1)"
    assert browser.title == "(3) OpenCodeRouter"
    post(agents_stub + "/api/stub/finish?slug=project-03")
    wait.until(lambda d: badge(d, "project-03") == "idle")
    time.sleep(0.2)
    assert browser.execute_script("return window.__notes") == [
        ["Needs you: project-15", "edit: src/app.py"],
        ["Finished: project-03", "Task 3"],
    ]
    assert browser.execute_script("return window.__not_reloaded") is True
    # Turned off, nothing more is shown.
    notify.click()
    wait.until(lambda d: d.find_element("id", "notify").text == "Notify me")
    post(agents_stub + "/api/stub/finish?slug=project-04")
    wait.until(lambda d: badge(d, "project-04") == "idle")
    assert len(browser.execute_script("return window.__notes")) == 2
    assert severe_console_entries(browser) == []
