"""The /console page in a real headless Chromium (Debian's chromium + chromedriver via selenium)
against a real gateway and worker: sign in, see `tiny` after a cold start with its tier and the
node's devices, set a budget as operator, see it refused as invoker, keep a screenshot."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.platform.conftest import ADMIN_KEY
from tests.platform.operators.conftest import OpsPlatform

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,1100")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
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
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, condition: Any, timeout_s: float = 20) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(condition)


def _text(driver: Any, selector: str) -> str:
    from selenium.webdriver.common.by import By

    els = driver.find_elements(By.CSS_SELECTOR, selector)
    return els[0].text if els else ""


def _sign_in(driver: Any, url: str, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{url}/console")
    _wait(driver, lambda d: d.find_element(By.ID, "login-key").is_displayed())
    driver.find_element(By.ID, "login-key").send_keys(key)
    driver.find_element(By.ID, "login-button").click()
    _wait(driver, lambda d: d.find_element(By.ID, "app").is_displayed())


def _not_blank(png: Path) -> None:
    from PIL import Image

    img = Image.open(png).convert("RGB")
    assert img.width >= 800 and img.height >= 600
    small = img.resize((200, 150))
    colors = len(set(small.getdata()))
    lo, hi = small.convert("L").getextrema()
    assert colors > 40, f"the screenshot has only {colors} colours: blank?"
    assert hi - lo > 100, "no contrast: blank?"


def test_admin_sees_tiny_after_cold_start_and_the_node(ops: OpsPlatform, browser: Any, tmp_path: Path) -> None:
    ops.deploy("tiny")
    cold = ops.chat("tiny")
    assert cold.status_code == 200 and cold.headers["x-ember-cold-start"] == "true", cold.text
    tier = cold.headers["x-ember-load-tier"]
    _sign_in(browser, ops.url, ADMIN_KEY)
    row = 'tr[data-function="tiny"]'
    _wait(browser, lambda d: tier in _text(d, f"{row} td.tier") and "ready" in _text(d, f"{row} td.instances"))
    assert f"{tier} 1" in _text(browser, f"{row} td.cold")  # cold starts by tier
    assert "ms" in _text(browser, row) and "%" in _text(browser, row)  # TTFT/TPOT and SLO attainment
    assert "admin" in _text(browser, "#whoami")
    node = '[data-node="ops-node"]'
    _wait(browser, lambda d: "sim:0" in _text(d, f'{node} [data-energy-device="sim:0"]'))
    assert "tiny" in _text(browser, f'{node} [data-device="cpu:0"]')  # the instance on its device
    assert " W" in _text(browser, f'{node} [data-energy-device="sim:0"]')  # power vs limit
    assert "tiny" in _text(browser, f"{node} .tiers")  # what each tier holds
    # the key was held by the page only
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0
    assert browser.execute_script("return document.cookie") == ""
    shot = tmp_path / "console.png"
    browser.save_screenshot(str(shot))
    _not_blank(shot)
    if os.environ.get("EMBER_CONSOLE_SCREENSHOT"):  # e.g. docs/console.png, to refresh the committed example
        shutil.copyfile(shot, os.environ["EMBER_CONSOLE_SCREENSHOT"])


def test_operator_sets_budget_invoker_is_refused(ops: OpsPlatform, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    _sign_in(browser, ops.url, ops.keys["operator"])
    _wait(browser, lambda d: "no limit" in _text(d, "#budget-view") or " W" in _text(d, "#budget-view"))
    field = browser.find_element(By.ID, "budget-cluster-watts")
    assert field.is_enabled()
    field.clear()
    field.send_keys("1234")
    browser.find_element(By.ID, "budget-save").click()
    _wait(browser, lambda d: "Budget set" in _text(d, "#budget-status"))
    _wait(browser, lambda d: "1234 W" in _text(d, "#budget-cluster-value"))
    got = httpx.get(f"{ops.url}/v1/energy", headers=ops.headers("operator")).json()["budget"]
    assert got["cluster_watts"] == 1234

    browser.find_element(By.ID, "logout").click()
    _sign_in(browser, ops.url, ops.keys["invoker"])
    _wait(browser, lambda d: "invoker" in _text(d, "#budget-note"))
    assert not browser.find_element(By.ID, "budget-save").is_enabled()
    assert "visible to admin and operator" in _text(browser, "#budget-view")
    _wait(browser, lambda d: "need an admin" in _text(d, 'tr[data-function="tiny"]'))  # names only
    # send the form anyway: the gateway refuses, and the page says so
    browser.execute_script("document.getElementById('budget-cluster-watts').value = '1';"
                           "window.emberConsole.setBudget();")
    _wait(browser, lambda d: "Refused (403)" in _text(d, "#budget-status"))
    got = httpx.get(f"{ops.url}/v1/energy", headers=ops.headers("operator")).json()["budget"]
    assert got["cluster_watts"] == 1234


def test_console_page_holds_no_data_and_the_api_needs_a_key(ops: OpsPlatform) -> None:
    page = httpx.get(f"{ops.url}/console")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert ADMIN_KEY not in page.text and "tiny" not in page.text
    js = httpx.get(f"{ops.url}/console/static/console.js")
    assert js.status_code == 200 and "localStorage.setItem" not in js.text and "document.cookie" not in js.text
    assert httpx.get(f"{ops.url}/console/static/../app.py").status_code == 404
    for path in ("/v1/me", "/v1/nodes", "/v1/stats/functions", "/v1/energy"):
        assert httpx.get(f"{ops.url}{path}").status_code == 401, path
    assert httpx.get(f"{ops.url}/v1/nodes", headers=ops.headers("invoker")).status_code == 403
    assert httpx.get(f"{ops.url}/v1/stats/functions", headers=ops.headers("invoker")).status_code == 403
    me = httpx.get(f"{ops.url}/v1/me", headers=ops.headers("operator")).json()
    assert me["role"] == "operator" and me["name"] == "operator-ops"
