"""`ember energy sim`: the comparison's JSON, the plot, and (slow) the issue's targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ember.energy.sim import SimConfig, run_energy_sim


def test_short_sim_has_the_documented_fields() -> None:
    result = run_energy_sim(SimConfig(hours=0.25, seed=3))
    controllers = result["controllers"]
    assert set(controllers) == {"max_power", "zeus_static", "ember"}
    for c in controllers.values():
        assert {"energy_j", "slo_attainment", "p99_ttft_s", "p99_tpot_s"} <= set(c)
        assert 0.0 <= c["slo_attainment"] <= 1.0 and c["energy_j"] > 0
    # same arrivals for everyone
    assert len({c["requests"] for c in controllers.values()}) == 1
    assert controllers["ember"]["decisions"] > 0


def test_cli_writes_json_and_plot(tmp_path: Path) -> None:
    from ember.cli import app

    out, png = tmp_path / "sim.json", tmp_path / "sim.png"
    res = CliRunner().invoke(
        app, ["energy", "sim", "--json", str(out), "--plot", str(png), "--hours", "0.2", "--seed", "1"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["controllers"]) == {"max_power", "zeus_static", "ember"}
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "savings vs max_power" in res.output


@pytest.mark.slow
def test_targets_over_a_day() -> None:
    c = run_energy_sim(SimConfig(hours=24, seed=0))["controllers"]
    ember, top, zeus = c["ember"], c["max_power"], c["zeus_static"]
    assert ember["energy_j"] < top["energy_j"]
    assert ember["energy_j"] < zeus["energy_j"]
    assert ember["slo_attainment"] >= 0.99
    assert ember["slo_attainment"] >= top["slo_attainment"] - 0.005
