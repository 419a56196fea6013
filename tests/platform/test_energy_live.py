"""The energy loop on the live platform: a real gateway and worker (processes, real Redis) with an
emulated GPU in actuate mode, set only through EMBER_* settings (no --energy-mode option: the
setting must reach the worker). Load moves the energy counter, J/token and the Prometheus series;
the controller lowers the clock under slack and raises it when the SLO is tightened; a budget set
by an operator lowers the cap within a few heartbeats; an invoker cannot set one; `ember energy
watch` shows it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.platform.conftest import Proc, admin_headers, base_env, start_gateway, start_worker

pytestmark = pytest.mark.slow


class Live:
    def __init__(self, gateway: Proc) -> None:
        self.url = gateway.url

    def chat(self, n: int = 1, max_tokens: int = 4) -> None:
        """`n` requests at once."""

        def one(i: int) -> None:
            r = httpx.post(f"{self.url}/v1/chat/completions", headers=admin_headers(), timeout=120,
                           json={"model": "chat", "max_tokens": max_tokens, "temperature": 0,
                                 "messages": [{"role": "user", "content": f"hello {i}"}]})
            assert r.status_code == 200, r.text

        with ThreadPoolExecutor(n) as pool:
            list(pool.map(one, range(n)))

    def device(self) -> dict[str, Any]:
        body = httpx.get(f"{self.url}/v1/energy", headers=admin_headers(), timeout=30).json()
        (dev,) = body["devices"]
        return dev

    def deploy(self, tpot_ms: float) -> None:
        r = httpx.put(f"{self.url}/v1/functions/chat", headers=admin_headers(), timeout=60, json={
            "checkpoint": "tiny", "slo": {"ttft_ms": 2000, "tpot_ms": tpot_ms},
            "scaling": {"min_instances": 0, "keep_alive_s": 600}})
        assert r.status_code in (200, 201), r.text

    def until(self, check: Callable[[dict[str, Any]], bool], load: bool = True, rounds: int = 40) -> dict[str, Any]:
        """Send a few requests per round until the device snapshot passes `check`."""
        for _ in range(rounds):
            if load:
                self.chat(4)
            else:
                time.sleep(0.3)
            dev = self.device()
            if check(dev):
                return dev
        raise AssertionError(f"never happened; last snapshot: {dev}")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_server: str, tiny_model_dir: Path) -> Iterator[Live]:
    import redis

    from ember.loader import open_store

    redis.Redis.from_url(redis_server).flushall()
    tmp = tmp_path_factory.mktemp("energy-live")
    store_url = f"file://{tmp / 'store'}"
    open_store(store_url).push(tiny_model_dir, "tiny")
    env = base_env(redis_server, store_url, EMBER_SIMULATED_GPUS="1", EMBER_ENERGY_MODE="actuate",
                   EMBER_SIMULATED_PARAMS_B="7", EMBER_CPU_SLOTS="1")
    worker = start_worker(tmp, env, "w0")
    try:
        gateway = start_gateway(tmp, env)
        try:
            live = Live(gateway)
            live.deploy(tpot_ms=1000)
            yield live
        finally:
            gateway.stop()
    finally:
        worker.stop()


def _prom(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", headers=admin_headers(), timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_load_moves_power_energy_and_j_per_token(live: Live) -> None:
    idle = live.device()
    assert idle["mode"] == "actuate"  # EMBER_ENERGY_MODE reached the worker
    assert idle["power_w"] > 0
    live.chat(3)
    dev = live.until(lambda d: d["j_per_token"] is not None and d["energy_j"] > idle["energy_j"], load=False)
    assert dev["j_per_token"] > 0 and dev["clock_switches"] is not None
    assert _prom(live.url, "ember_energy_joules_total") > 0
    assert _prom(live.url, "ember_gpu_power_watts") > 0
    before = live.device()["energy_j"]
    live.chat(4)
    assert live.until(lambda d: d["energy_j"] > before, load=False)["energy_j"] > before


def test_actuate_lowers_the_clock_under_slack_and_raises_it_under_a_tight_slo(live: Live) -> None:
    lowered = live.until(lambda d: d["sm_clock_mhz"] < 1980)
    last = lowered["last_decision"]
    assert last["applied"] is True and "lowering" in last["reason"]
    switches = lowered["clock_switches"]
    live.chat(2)  # prefill at the top clock, decode at the lowered one: the clock switches per phase
    assert live.until(lambda d: d["clock_switches"] > switches, load=False)["clock_switches"] >= switches + 2
    live.deploy(tpot_ms=0.001)  # an SLO nothing meets
    raised = live.until(lambda d: d["sm_clock_mhz"] > lowered["sm_clock_mhz"])
    assert raised["last_decision"]["applied"] is True and "SLO" in raised["last_decision"]["reason"]
    assert any(d["applied"] and "lowering" in d["reason"] for d in raised["decisions"])
    live.deploy(tpot_ms=1000)


def test_operator_budget_lowers_the_cap_and_an_invoker_cannot_set_it(live: Live,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from ember.cli import app as cli

    keys = {}
    for role in ("operator", "invoker"):
        r = httpx.post(f"{live.url}/v1/keys", headers=admin_headers(), json={"role": role, "name": role}, timeout=30)
        assert r.status_code in (200, 201), r.text
        keys[role] = {"Authorization": f"Bearer {r.json()['key']}"}
    r = httpx.put(f"{live.url}/v1/energy/budget", headers=keys["invoker"], json={"cluster_watts": 250}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    assert live.device()["limit_w"] == 700
    r = httpx.put(f"{live.url}/v1/energy/budget", headers=keys["operator"], json={"cluster_watts": 250}, timeout=30)
    assert r.status_code == 200, r.text
    capped = live.until(lambda d: d["limit_w"] <= 250, load=False)
    assert capped["cap_w"] <= 250 and "budget cap" in capped["last_decision"]["reason"]
    assert capped["last_decision"]["applied"] is True
    monkeypatch.setenv("EMBER_URL", live.url)
    monkeypatch.setenv("EMBER_API_KEY", keys["operator"]["Authorization"].split()[1])
    res = CliRunner().invoke(cli, ["energy", "watch", "--iterations", "2", "--interval", "0.2"])
    assert res.exit_code == 0, res.output
    assert "sim:0" in res.output and "applied: budget cap 250" in res.output, res.output
    r = httpx.put(f"{live.url}/v1/energy/budget", headers=keys["operator"], json={"cluster_watts": None}, timeout=30)
    assert r.status_code == 200
