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
from tests.platform.operators.browser import assert_not_blank, chromium, page_errors, sign_in, text, wait
from tests.platform.operators.conftest import OpsPlatform


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def test_admin_sees_tiny_after_cold_start_and_the_node(ops: OpsPlatform, browser: Any, tmp_path: Path) -> None:
    ops.deploy("tiny")
    cold = ops.chat("tiny")
    assert cold.status_code == 200 and cold.headers["x-ember-cold-start"] == "true", cold.text
    tier = cold.headers["x-ember-load-tier"]
    sign_in(browser, ops.url, ADMIN_KEY)
    row = 'tr[data-function="tiny"]'
    wait(browser, lambda d: tier in text(d, f"{row} td.tier") and "ready" in text(d, f"{row} td.instances"))
    assert f"{tier} 1" in text(browser, f"{row} td.cold")  # cold starts by tier
    assert "ms" in text(browser, row) and "%" in text(browser, row)  # TTFT/TPOT and SLO attainment
    assert "admin" in text(browser, "#whoami")
    node = '[data-node="ops-node"]'
    wait(browser, lambda d: "sim:0" in text(d, f'{node} [data-energy-device="sim:0"]'))
    assert "tiny" in text(browser, f'{node} [data-device="cpu:0"]')  # the instance on its device
    assert " W" in text(browser, f'{node} [data-energy-device="sim:0"]')  # power vs limit
    assert "tiny" in text(browser, f"{node} .tiers")  # what each tier holds
    assert page_errors(browser) == []
    # the key was held by the page only
    assert browser.execute_script("return localStorage.length + sessionStorage.length") == 0
    assert browser.execute_script("return document.cookie") == ""
    shot = tmp_path / "console.png"
    browser.save_screenshot(str(shot))
    assert_not_blank(shot)
    if os.environ.get("EMBER_SCREENSHOT_DIR"):  # to refresh the examples in docs/
        shutil.copyfile(shot, Path(os.environ["EMBER_SCREENSHOT_DIR"]) / "console-simulated-gpu.png")


def test_operator_sets_budget_invoker_is_refused(ops: OpsPlatform, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    sign_in(browser, ops.url, ops.keys["operator"])
    wait(browser, lambda d: "no limit" in text(d, "#budget-view") or " W" in text(d, "#budget-view"))
    field = browser.find_element(By.ID, "budget-cluster-watts")
    assert field.is_enabled()
    field.clear()
    field.send_keys("1234")
    browser.find_element(By.ID, "budget-save").click()
    wait(browser, lambda d: "Budget set" in text(d, "#budget-status"))
    wait(browser, lambda d: "1234 W" in text(d, "#budget-cluster-value"))
    got = httpx.get(f"{ops.url}/v1/energy", headers=ops.headers("operator")).json()["budget"]
    assert got["cluster_watts"] == 1234
    # per-node entries that are not node=decimal are refused on the page, not half-read (before:
    # "node-0=400=9000" sent 400, "0x64" sent 100, "1e400" reached the API as null)
    nodes = browser.find_element(By.ID, "budget-node-watts")
    for bad in ("node-0=400=9000", "node-1=0x64", "node-0=1e400", "node-0=", "=300"):
        nodes.clear()
        nodes.send_keys(bad)
        browser.find_element(By.ID, "budget-save").click()
        wait(browser, lambda d: "is not node=watts" in text(d, "#budget-status"))
        browser.execute_script("document.getElementById('budget-status').textContent = '';")
    got = httpx.get(f"{ops.url}/v1/energy", headers=ops.headers("operator")).json()["budget"]
    assert got["cluster_watts"] == 1234 and not got.get("node_watts"), got
    nodes.clear()

    browser.find_element(By.ID, "logout").click()
    sign_in(browser, ops.url, ops.keys["invoker"])
    wait(browser, lambda d: "invoker" in text(d, "#budget-note"))
    assert not browser.find_element(By.ID, "budget-save").is_enabled()
    wait(browser, lambda d: "visible to admin and operator" in text(d, "#budget-view"))  # after its first refresh
    wait(browser, lambda d: "need an admin" in text(d, 'tr[data-function="tiny"]'))  # names only
    # send the form anyway: the gateway refuses, and the page says so
    browser.execute_script("document.getElementById('budget-cluster-watts').value = '1';"
                           "window.emberConsole.setBudget();")
    wait(browser, lambda d: "Refused (403)" in text(d, "#budget-status"))
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


def test_nodes_and_function_stats_routes(ops: OpsPlatform) -> None:
    ops.deploy("tiny")
    assert ops.chat("tiny").status_code == 200
    nodes = httpx.get(f"{ops.url}/v1/nodes", headers=ops.headers("operator")).json()["nodes"]
    node = next(n for n in nodes if n["node"] == "ops-node")
    assert node["up"] is True and [d["device"] for d in node["devices"]] == ["cpu:0"]
    dev = node["devices"][0]
    assert dev["claimed_bytes"] > 0 and dev["claimed_bytes"] + dev["free_bytes"] == dev["memory_bytes"]
    assert [i["function"] for i in dev["instances"]] == ["tiny"]
    assert node["tiers"]["device"] == ["tiny"] and "tiny" in node["tiers"]["dram"] + node["tiers"]["ssd"]
    assert node["energy"][0]["device"] == "sim:0" and node["energy"][0]["limit_w"] > 0
    assert httpx.get(f"{ops.url}/v1/stats/functions", headers=ops.headers("developer")).json()["functions"] == []
    fns = httpx.get(f"{ops.url}/v1/stats/functions", headers=ops.headers("operator")).json()["functions"]
    tiny = next(f for f in fns if f["name"] == "tiny")
    assert tiny["instance_states"] == {"ready": 1} and tiny["instances"][0]["node"] == "ops-node"
    assert tiny["requests"] >= 1 and tiny["ttft_ms"]["p50"] > 0 and 0 <= tiny["slo_attainment"] <= 1
    assert sum(tiny["cold_starts"].values()) == 1
