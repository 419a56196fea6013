"""A cold start teaches its node's tier bandwidth once: real Redis, worker and gateway. The test
reads the load's answer as the gateway got it (tests/platform/recorded_loads.py) and checks the
bandwidth the placement estimator then reads: one EWMA fold of the transfer the worker measured,
into the tier the bytes came from; not two folds, not the startup time (building the instance)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.scheduler.estimator import ewma_bandwidth_bps
from tests.platform.recorded_loads import RecordedPlatform, recorded_platform

pytestmark = pytest.mark.slow


@pytest.fixture
def platform(redis_url: str, tmp_path: Path, tiny_model_dir: Path) -> Iterator[RecordedPlatform]:
    with recorded_platform(redis_url, tmp_path, tiny_model_dir) as p:
        yield p


def test_a_cold_start_folds_its_transfer_into_the_tier_bandwidth_once(platform: RecordedPlatform) -> None:
    before = platform.bandwidths()
    load = platform.cold_start("f", "ck")
    tier, nbytes, transfer_s, startup_s = load["tier"], load["nbytes"], load["transfer_s"], load["startup_ms"] / 1000
    assert nbytes > 0 and 0 < transfer_s < startup_s  # building the instance is no transfer

    after = platform.bandwidths()
    expected = ewma_bandwidth_bps(before.get(tier), nbytes, transfer_s)
    assert after[tier] == pytest.approx(expected, rel=1e-9), (
        f"bw:{tier} was {before.get(tier)}; one fold of {nbytes} B in {transfer_s} s gives {expected}, "
        f"published {after[tier]} (folded twice: {ewma_bandwidth_bps(expected, nbytes, transfer_s)}; "
        f"with the startup time: {ewma_bandwidth_bps(before.get(tier), nbytes, startup_s)})")
    assert {t: bw for t, bw in after.items() if t != tier} == {t: bw for t, bw in before.items() if t != tier}
