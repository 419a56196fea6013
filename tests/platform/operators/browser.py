"""Headless Chromium for tests: Debian's chromium and chromedriver driven by selenium, with a
fresh profile, no network services of its own; skips with a message where they are missing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1100")


@contextmanager
def chromium(profile_dir: Path) -> Iterator[Any]:
    """A selenium driver for headless Chromium with `profile_dir` as its new, empty profile."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; it is in the dev extra)")
    if not CHROMIUM or not CHROMEDRIVER:
        pytest.skip("headless browser tests need Debian's chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver; `make test` does it where it can)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile_dir}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: Any, condition: Any, timeout_s: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)


def text(driver: Any, selector: str) -> str:
    """Rendered text of the first element matching a CSS selector ("" when none), read in one
    script call: the page re-renders every 2 s, so an element handle could go stale in between."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                                 selector)


def sign_in(driver: Any, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/console")
    wait(driver, lambda d: d.find_element(By.ID, "login-key").is_displayed())
    driver.find_element(By.ID, "login-key").send_keys(key)
    driver.find_element(By.ID, "login-button").click()
    wait(driver, lambda d: d.find_element(By.ID, "app").is_displayed())


def assert_not_blank(png: Path) -> None:
    """A screenshot with content: big enough, many colours, real contrast."""
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.width >= 800 and img.height >= 600
    small = img.resize((200, 150))
    colors = len(set(small.getdata()))
    lo, hi = small.convert("L").getextrema()
    assert colors > 40, f"the screenshot has only {colors} colours: blank?"
    assert hi - lo > 100, "no contrast: blank?"


def page_errors(driver: Any) -> list[str]:
    """Errors the page logged since the last call (script errors, failed requests)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
