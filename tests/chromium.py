"""Headless Chromium for the agent dashboard tests (Debian's chromium + chromium-driver, via Selenium)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def available() -> bool:
    """True when Chromium, its driver and Selenium are all installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


needs_chromium = pytest.mark.skipif(not available(), reason="needs selenium and Debian's chromium and chromium-driver "
                                                            "(tests/setup/install-system-deps.sh)")


@contextmanager
def headless_chromium(profile: Path, width: int = 1280, height: int = 800, *, loopback_names_only: bool = True,
                      performance_log: bool = False, names_of_this_machine: tuple[str, ...] = ()) -> Iterator[Any]:
    """A fresh headless Chromium; quit afterwards.

    ``loopback_names_only``: it resolves no name but the loopback's. ``performance_log``: the DevTools
    network events are kept (``driver.get_log("performance")``), to see every request the page made.
    ``names_of_this_machine``: names that resolve to 127.0.0.1 without being loopback names, as a LAN
    name of the dev box does for a laptop (the page then takes itself to be reached from the network).
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    if loopback_names_only:
        mapped = "".join(f"MAP {name} 127.0.0.1, " for name in names_of_this_machine)
        options.add_argument(f"--host-resolver-rules={mapped}MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE *.localhost")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", **({"performance": "ALL"} if performance_log else {})})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def severe_console_entries(driver: Any) -> list[dict[str, Any]]:
    """The page's console errors."""
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def rows_wait(driver: Any, timeout: float, poll: float = 0.05) -> Any:
    """A ``WebDriverWait`` that looks elements up again when the page rebuilt them mid-read.

    The dashboard rebuilds a row whenever what it shows changes (a session's title or time, say): a
    lookup that raced a rebuild is retried, as a real pointer would land on the new node.
    """
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=poll, ignored_exceptions=(StaleElementReferenceException,))


def click_fresh(driver: Any, css: str, timeout: float = 10.0) -> None:
    """Click the element ``css`` selects, looked up again if the page rebuilt it between lookup and click."""
    def click(d: Any) -> bool:
        d.find_element("css selector", css).click()
        return True

    rows_wait(driver, timeout).until(click)
