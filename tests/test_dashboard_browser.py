"""The dashboard in real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .chromium import headless_chromium, needs_chromium, rows_wait, severe_console_entries
from .support import (
    REPO,
    dashboard_stub,
    free_port_block,
    http_json,
    wait_for,
)

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ARTIFACTS = REPO / "test-artifacts"
#: The fake's web UI answers this title; it proves a click landed on the backend, not the router.
BACKEND_TITLE = "OpenCode"
# Markup in a folder name: were it ever parsed as HTML, it would leave an <img>/<script> in the table.
HOSTILE_NAME = '<img src=x onerror="window.__xss=1"><script>window.__xss=2<'
#: How long a wait for the page may take before the test fails: a guard against a hang, not a bound
#: on how fast the page is (Chromium on a busy 2-core machine can take seconds to render).
GUARD = 30

pytestmark = [pytest.mark.slow, needs_chromium]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A fresh headless Chromium that resolves no name but the loopback's."""
    with headless_chromium(tmp_path / "chromium") as driver:
        yield driver


def row(driver: Any, slug: str) -> Any:
    """The table row of ``slug``, or None."""
    rows = [r for r in driver.find_elements(By.CSS_SELECTOR, "#rows tr[data-slug]") if r.get_attribute("data-slug") == slug]
    return rows[0] if rows else None


def status_of(driver: Any, slug: str) -> str | None:
    """The liveness pill's text in ``slug``'s row, or None without a row (read atomically in the page)."""
    return driver.execute_script(
        "const r = [...document.querySelectorAll('#rows tr[data-slug]')]"
        ".find((r) => r.getAttribute('data-slug') === arguments[0]);"
        "return r ? r.querySelector('.pill.liveness').textContent : null;",
        slug,
    )


def badge_of(driver: Any, slug: str) -> str | None:
    """The agent state badge's text in ``slug``'s row, or None without a row."""
    return driver.execute_script(
        "const r = [...document.querySelectorAll('#rows tr[data-slug]')]"
        ".find((r) => r.getAttribute('data-slug') === arguments[0]);"
        "return r ? r.querySelector('.badge').textContent : null;",
        slug,
    )


def test_dashboard_is_live_escapes_backend_data_and_links_to_backends(
    tmp_path, browser, fake_opencode_factory, router_factory
):
    base = free_port_block(3)
    stale_after = 3.0
    fake_opencode_factory(tmp_path / "alpha", port=base)
    router = router_factory("--scan-start", str(base), "--scan-end", str(base + 2),
                            "--scan-interval", "1s", "--stale-after", f"{stale_after:g}s")
    wait_for(lambda: [b["slug"] for b in http_json(router.url + "/api/backends")] == ["alpha"], what="alpha")

    browser.get(router.url + "/")
    wait = WebDriverWait(browser, GUARD, poll_frequency=0.05)
    wait.until(lambda d: status_of(d, "alpha") == "up")
    wait.until(lambda d: d.find_element(By.ID, "connection").text == "live")
    header = " ".join(browser.find_element(By.TAG_NAME, "header").text.split())
    assert f"ports {base}–{base + 2}" in header and "mDNS off" in header
    assert "1 backend: 1 up, 0 down" in header
    browser.execute_script("window.__not_reloaded = true")

    # A second backend appears without a reload (pushed over the event stream at the next scan).
    hostile_dir = tmp_path / HOSTILE_NAME
    hostile_server = fake_opencode_factory(hostile_dir, port=base + 1)
    WebDriverWait(browser, GUARD, poll_frequency=0.05).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tr")) == 2)
    assert browser.execute_script("return window.__not_reloaded") is True
    hostile_slug = http_json(router.url + "/api/backends")[1]["slug"]
    # Its agents are followed too (the row is rebuilt once, when their state arrives).
    WebDriverWait(browser, 5, poll_frequency=0.05).until(lambda d: badge_of(d, hostile_slug) == "idle")
    hostile_row = row(browser, hostile_slug)

    # Its hostile folder name is shown as text, never parsed as markup.
    assert hostile_row.find_element(By.CSS_SELECTOR, ".project-name").text == HOSTILE_NAME
    assert hostile_row.find_element(By.CSS_SELECTOR, ".project-path").text == str(hostile_dir)
    assert browser.find_elements(By.CSS_SELECTOR, "#rows img, #rows script") == []
    assert browser.execute_script("return window.__xss") is None

    # Links carry the router's real port; a loopback router with mDNS off offers no .local link
    # (no other machine could use it), only the .localhost one and the path.
    alpha = row(browser, "alpha")
    hrefs = {a.get_attribute("class"): a.get_attribute("href") for a in alpha.find_elements(By.CSS_SELECTOR, "a")}
    user = http_json(router.url + "/api/health")["username"]
    assert hrefs == {
        "link-tunnel": f"http://alpha-{user}.localhost:{router.port}/",
        "link-path": f"{router.url}/alpha/",
    }
    assert len(alpha.find_elements(By.CSS_SELECTOR, "button.copy")) == 2
    assert alpha.find_element(By.CSS_SELECTOR, ".ago").text.endswith("s ago")

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    browser.set_window_size(400, 900)
    browser.save_screenshot(str(ARTIFACTS / "dashboard-phone.png"))
    browser.set_window_size(1280, 800)

    # Stop it: the row turns down (next scan), then goes (stale-after), with no reload.
    hostile_server.stop()
    WebDriverWait(browser, GUARD, poll_frequency=0.05).until(lambda d: status_of(d, hostile_slug) in (None, "down"))
    WebDriverWait(browser, GUARD, poll_frequency=0.1).until(lambda d: status_of(d, hostile_slug) is None)
    assert browser.execute_script("return window.__not_reloaded") is True

    assert severe_console_entries(browser) == []


@pytest.mark.parametrize("kind", ["path", "tunnel"])
def test_dashboard_link_lands_on_the_backend(tmp_path, browser, fake_opencode_factory, router_factory, kind):
    base = free_port_block(1)
    fake_opencode_factory(tmp_path / "alpha", port=base)
    router = router_factory("--scan-start", str(base), "--scan-end", str(base), "--scan-interval", "1s")
    browser.get(router.url + "/")
    WebDriverWait(browser, GUARD, poll_frequency=0.05).until(lambda d: status_of(d, "alpha") == "up")
    assert severe_console_entries(browser) == []
    # The links fold behind the row: open it, then click.
    row(browser, "alpha").find_element(By.CSS_SELECTOR, "details.open-links summary").click()
    link = row(browser, "alpha").find_element(By.CSS_SELECTOR, f"a.link-{kind}")
    target = link.get_attribute("href")
    if kind == "path":
        # A browser opening a project's path-mode root is sent to its host-mode name (the web UI
        # needs its own origin); API clients keep the path.
        target = row(browser, "alpha").find_element(By.CSS_SELECTOR, "a.link-tunnel").get_attribute("href")
    link.click()
    WebDriverWait(browser, GUARD).until(lambda d: d.current_url == target)
    WebDriverWait(browser, GUARD).until(lambda d: d.title == BACKEND_TITLE)



@pytest.fixture
def stub_router() -> Iterator[str]:
    """tests/dashboard_stub.py as a child process: the page with launcher instances and mDNS names."""
    with dashboard_stub() as url:
        yield url


def test_managed_instances_show_state_restarts_logs_and_controls(browser, stub_router):
    browser.get(stub_router + "/")
    # Rows are rebuilt when the data changes; a lookup that raced a rebuild is retried.
    wait = rows_wait(browser, GUARD)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows .managed")) == 2)
    header = " ".join(browser.find_element(By.TAG_NAME, "header").text.split())
    assert "mDNS on: alpha-alice-2.local" in header
    assert "1 backend: 1 up, 0 down · 2 managed" in header

    def alpha_facts(d: Any) -> tuple[str | None, str, str]:
        alpha = row(d, "alpha")
        return (status_of(d, "alpha"), alpha.find_element(By.CSS_SELECTOR, ".managed").text,
                alpha.find_element(By.CSS_SELECTOR, "a.link-LAN").get_attribute("href"))

    # Read in one go, again if the polled instance list rebuilt the rows in between.
    alpha_status, managed, lan_link = wait.until(alpha_facts)
    assert alpha_status == "up"
    assert "managed: running" in managed and "2 restarts" in managed
    # The advertised mDNS name (renamed after a conflict) is the LAN link.
    assert lan_link == \
        f"http://alpha-alice-2.local:{stub_router.rsplit(':', 1)[1]}/"

    # The logs expander shows the lines as text and stays open across the page's refreshes.
    wait.until(lambda d: row(d, "alpha").find_element(By.CSS_SELECTOR, "details.logs summary").click() or True)
    wait.until(lambda d: row(d, "alpha").find_element(By.CSS_SELECTOR, "details.logs pre").is_displayed())
    first_text = wait.until(lambda d: [row(d, "alpha").find_element(By.CSS_SELECTOR, "details.logs pre").text])[0]
    # The instance list is polled every 3 s; the stub's logs grow, so the rows are rebuilt.
    wait = rows_wait(browser, GUARD, poll=0.1)
    wait.until(lambda d: row(d, "alpha").find_element(By.CSS_SELECTOR, "details.logs pre").text != first_text)
    logs_shown, logs_text = wait.until(
        lambda d: (lambda logs: (logs.is_displayed(), logs.text))(row(d, "alpha").find_element(By.CSS_SELECTOR, "details.logs pre")))
    assert logs_shown and "\n<b>not bold</b>\npoll " in logs_text
    assert browser.find_elements(By.CSS_SELECTOR, "#rows pre b, #rows i, #rows script") == []

    # An instance that is not answering gets its own row: failed, with the reason and a Start button.
    def failed_facts(d: Any) -> tuple[str, str, str, str, list[str]]:
        failed = d.find_element(By.CSS_SELECTOR, "#rows tr[data-instance]")
        return (failed.find_element(By.CSS_SELECTOR, ".pill").text,
                failed.find_element(By.CSS_SELECTOR, ".project-path").text,
                failed.find_element(By.CSS_SELECTOR, ".project-name").text, failed.text,
                [b.text for b in failed.find_elements(By.CSS_SELECTOR, ".controls button")])

    pill, path, name, failed_text, buttons = wait.until(failed_facts)  # one read, retried after a rebuild
    assert pill == "failed"
    assert path == "/home/alice/broken <i>x"
    assert name == "broken <i>x"
    assert "exited 5 times within 60 s" in failed_text
    assert buttons == ["Start"]

    # Stop sends DELETE /api/instances/{slug}; a refusal is shown as a sentence.
    wait.until(lambda d: row(d, "alpha").find_element(By.CSS_SELECTOR, ".controls button").click() or True)
    wait.until(lambda d: "You may not stop instances from here (HTTP 403)." in row(d, "alpha").text)
    assert "Only loopback clients may manage instances." in row(browser, "alpha").text
    assert http_json(stub_router + "/api/instances/calls") == [["DELETE", "alpha"]]
    browser.save_screenshot(str(ARTIFACTS / "dashboard-managed.png"))
    # The refused DELETE is the only console error (Chromium logs every failed fetch).
    errors = severe_console_entries(browser)
    assert [e for e in errors if "api/instances/alpha" not in e["message"]] == [], errors


def test_empty_dashboard_explains_itself_and_reconnects_after_a_router_restart(
    tmp_path, browser, fake_opencode_factory, router_factory
):
    base = free_port_block(1)
    router = router_factory("--scan-start", str(base), "--scan-end", str(base), "--scan-interval", "1s")
    browser.get(router.url + "/")
    wait = WebDriverWait(browser, GUARD, poll_frequency=0.05)
    wait.until(lambda d: d.find_element(By.ID, "empty").is_displayed())
    empty = " ".join(browser.find_element(By.ID, "empty").text.split())
    assert f"scans 127.0.0.1 ports {base}–{base} every 1 s" in empty
    assert "oc ~/my-project" in empty and f"opencode serve --port {base}" in empty
    assert severe_console_entries(browser) == []
    browser.execute_script("window.__not_reloaded = true")

    router.stop()
    wait.until(lambda d: d.find_element(By.ID, "notice").is_displayed())
    assert "Reconnecting by itself" in browser.find_element(By.ID, "notice").text
    fake_opencode_factory(tmp_path / "alpha", port=base)
    router_factory("--scan-start", str(base), "--scan-end", str(base), "--scan-interval", "1s", port=router.port)
    WebDriverWait(browser, GUARD, poll_frequency=0.1).until(lambda d: status_of(d, "alpha") == "up")
    assert browser.find_element(By.ID, "connection").text == "live"
    assert not browser.find_element(By.ID, "notice").is_displayed()
    assert browser.execute_script("return window.__not_reloaded") is True
