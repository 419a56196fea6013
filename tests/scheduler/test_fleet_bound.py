"""`ember sim --fleet-bound`: the most node-hours any node scaler could save, from fixed fleets."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from ember.errors import ConfigError
from ember.scheduler.fleetbound import best_schedule


def _brute(misses: dict[int, list[int]], cap: int) -> int | None:
    nbins = len(next(iter(misses.values())))
    best = None
    for sched in itertools.product(sorted(misses), repeat=nbins):
        if sum(sched) <= cap:
            m = sum(misses[s][b] for b, s in enumerate(sched))
            best = m if best is None else min(best, m)
    return best


def test_the_schedule_is_the_fewest_misses_under_the_mean_size() -> None:
    rng = random.Random(3)
    for _ in range(60):
        sizes = rng.sample(range(1, 9), rng.randint(1, 4))
        nbins = rng.randint(1, 4)
        # a larger fleet misses less, bin by bin (as fixed fleets do), but not always by much
        base = [rng.randint(0, 50) for _ in range(nbins)]
        misses = {s: [max(0, b - s * rng.randint(0, 6)) for b in base] for s in sizes}
        cap = rng.randint(0, max(sizes) * nbins + 2)
        got = best_schedule(misses, cap)
        want = _brute(misses, cap)
        if want is None:
            assert got is None
            continue
        assert got is not None and got[0] == want, (misses, cap, got, want)
        assert sum(got[1]) <= cap and len(got[1]) == nbins
        assert sum(misses[s][b] for b, s in enumerate(got[1])) == got[0]


def test_bins_of_different_lengths_are_refused() -> None:
    with pytest.raises(ConfigError):
        best_schedule({1: [1, 2], 2: [1]}, 10)


def test_sim_fleet_bound_reports_fixed_fleets_and_what_a_scaler_could_reach(tmp_path) -> None:
    from ember.commands.scheduler_cmds import run_sim_command

    common = {"gpus_per_node": 4, "functions": 300, "duration_s": 600, "seed": 1}
    doc = run_sim_command(tmp_path / "bound.json", fleet_bound="2,4,3", bin_s=120, **common)
    assert json.loads((tmp_path / "bound.json").read_text()) == doc
    b = doc["fleet_bound"]
    assert b["reference_nodes"] == 4 and b["bins"] == 5 and sum(b["invocations_per_bin"]) == b["invocations"]
    for size, f in b["fixed"].items():
        assert f["nodes"] == int(size) and len(f["misses_per_bin"]) == 5
        assert f["slo_attainment"] == pytest.approx(1 - sum(f["misses_per_bin"]) / b["invocations"], abs=1e-6)
    # the reference is the fixed fleet `ember sim --fleet` runs on the same trace: same code, same result
    fleet = run_sim_command(tmp_path / "fleet.json", nodes=4, fleet=True, **common)["fleet"]["fixed"]
    assert b["fixed"]["4"]["slo_attainment"] == fleet["slo_attainment"]
    assert b["slo_attainment_floor"] == pytest.approx(fleet["slo_attainment"] - 0.005, abs=1e-6)
    at = b["at_target_cut"]
    assert at["mean_nodes"] <= 4 * 0.6 + 1e-9 and set(at["nodes_per_bin"]) <= {2, 3, 4}
    assert b["target_reachable"] == (at["slo_attainment"] >= b["slo_attainment_floor"])
    # no schedule with fewer node-bins holds the floor than the one reported
    largest = b["largest_cut_within_floor"]
    assert largest is not None and largest["slo_attainment"] >= b["slo_attainment_floor"]
    misses = {int(s): f["misses_per_bin"] for s, f in b["fixed"].items()}
    fewer = best_schedule(misses, sum(largest["nodes_per_bin"]) - 1)
    assert fewer is None or 1 - fewer[0] / b["invocations"] < b["slo_attainment_floor"]


def test_sim_fleet_bound_refuses_bad_sizes(tmp_path) -> None:
    from ember.commands.scheduler_cmds import run_sim_command

    for bad in ("two", "0,2"):
        with pytest.raises(ConfigError):
            run_sim_command(tmp_path / "x.json", fleet_bound=bad, functions=20, duration_s=60)
