"""The dashboard's Tasks section in headless Chromium: live, and task text stays text."""

from __future__ import annotations

from typing import Any

import pytest

from .support import free_port_block, http_json, wait_for

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from .chromium import severe_console_entries
from .test_dashboard_browser import browser, pytestmark  # noqa: F401 - the fixture and marks

HOSTILE = '<img src=x onerror="window.__xss=1">'


def task_states(driver: Any) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#tasks-rows tr')].map((r) => r.querySelector('.pill').textContent);")


def test_the_tasks_section_follows_tasks_live_and_shows_their_text_as_text(
    tmp_path, browser, fake_opencode_factory, router_factory  # noqa: F811 - the browser fixture
):
    base = free_port_block(2)
    tasks = tmp_path / "tasks"
    router = router_factory("--scan-start", str(base), "--scan-end", str(base + 1), "--scan-interval", "1s",
                            "--tasks-dir", str(tasks), "--state-dir", str(tmp_path / "state"))
    browser.get(router.url + "/")
    wait = WebDriverWait(browser, 10, poll_frequency=0.1)
    wait.until(lambda d: d.find_element(By.ID, "tasks").is_displayed())
    assert "No tasks yet" in browser.find_element(By.ID, "tasks").text

    (tasks / "hostile.md").write_text(f"---\nproject: alpha\ntitle: '{HOSTILE}'\n---\nSay hello {HOSTILE}\n")
    wait.until(lambda d: task_states(d) == ["queued"])
    row = browser.find_element(By.CSS_SELECTOR, "#tasks-rows tr")
    assert "project 'alpha' is not running yet" in row.text
    fake_opencode_factory(tmp_path / "alpha", port=base)
    wait_for(lambda: http_json(router.url + "/api/backends"), what="alpha")
    WebDriverWait(browser, 15, poll_frequency=0.1).until(lambda d: task_states(d) == ["done"])
    row = browser.find_element(By.CSS_SELECTOR, "#tasks-rows tr")
    assert row.find_element(By.CSS_SELECTOR, ".tasks-title").text == HOSTILE
    assert row.find_element(By.CSS_SELECTOR, "summary").text == "Hello from the fake model."
    link = row.find_element(By.CSS_SELECTOR, "a").get_attribute("href")
    assert link.startswith("http://alpha-") and f".localhost:{router.port}/" in link and "/session/ses_" in link
    assert browser.find_elements(By.CSS_SELECTOR, "#tasks img, #tasks script") == []
    assert browser.execute_script("return window.__xss") is None
    assert "1 done" in browser.find_element(By.ID, "tasks-counts").text
    assert severe_console_entries(browser) == []
