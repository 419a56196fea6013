"""`ember sim --energy`: placement, autoscaling, batching and the governor on one trace."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from ember.cli import app
from ember.scheduler.serving import ServingModel


def test_batching_and_governors() -> None:
    full, ember = ServingModel("max_power"), ServingModel("ember")
    alone = full.cost(0.2, 0.01, 100, batch=1, startup_s=0.0, ttft_slo_s=2.0)
    crowded = full.cost(0.2, 0.01, 100, batch=8, startup_s=0.0, ttft_slo_s=2.0)
    assert crowded.held_s > alone.held_s and crowded.prefill_s == alone.prefill_s
    # slack: the controller lowers the clock, the request takes a little longer and draws less
    slow = ember.cost(0.2, 0.01, 100, batch=1, startup_s=0.0, ttft_slo_s=2.0)
    assert slow.held_s > alone.held_s and slow.decode_w < alone.decode_w and slow.prefill_w < alone.prefill_w
    assert slow.prefill_s <= 0.8 * 2.0
    assert slow.prefill_w * slow.prefill_s + slow.decode_w * (slow.held_s - slow.prefill_s) < \
        alone.prefill_w * alone.prefill_s + alone.decode_w * (alone.held_s - alone.prefill_s)
    # no slack left (the request already waited): full clock, as the default governor
    late = ember.cost(0.2, 0.01, 100, batch=1, startup_s=1.9, ttft_slo_s=2.0)
    assert late == alone


def test_sim_energy_command_reports_the_three_entries(tmp_path) -> None:
    out = tmp_path / "energy.json"
    res = CliRunner().invoke(app, ["sim", "--energy", "--json", str(out), "--nodes", "3", "--gpus-per-node", "4",
                                   "--functions", "120", "--duration-s", "240", "--seed", "3"])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert list(doc["policies"]) == ["ember", "serverlessllm+max_power", "keepalive+max_power"]
    for r in doc["policies"].values():
        assert r["gpu_energy_kwh"] > 0 and r["joules_per_token"] > 0 and 0 <= r["slo_attainment"] <= 1
        assert r["output_tokens"] > 0
    p = doc["policies"]
    assert p["ember"]["joules_per_token"] < p["serverlessllm+max_power"]["joules_per_token"]
    assert p["serverlessllm+max_power"]["sm_clock_share"] == {"1.00": 1.0}
    res = CliRunner().invoke(app, ["sim", "--energy", "--json", str(out), "--policies", "ember,random"])
    assert res.exit_code == 2 and "random" in res.output
