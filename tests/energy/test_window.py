"""The controller's rolling horizon: statistics merged from each window's parts equal those of
all the horizon's records taken together (the controller no longer walks every record again)."""

from __future__ import annotations

import random

from ember.energy.monitor import RequestRecord
from ember.energy.window import merged_stats, window_parts, window_stats


def _record(rng: random.Random) -> RequestRecord:
    return RequestRecord(rng.choice("abc"), "gpu0", rng.randint(0, 40), rng.uniform(0.01, 2.0),
                         rng.uniform(0.005, 0.2), rng.choice([0.5, 1.0]), rng.choice([0.05, 0.1]),
                         eta=rng.choice([0.2, 0.5, 0.8]))


def test_merged_parts_are_the_stats_of_the_records_together() -> None:
    rng = random.Random(7)
    for _ in range(200):
        windows = [[_record(rng) for _ in range(rng.randint(0, 12))] for _ in range(rng.randint(1, 6))]
        together = [r for w in windows for r in w]
        for q in (0.95, 0.99):
            merged = merged_stats([window_parts(w) for w in windows], q)
            assert merged == window_stats(together, q)
            if together:  # and what they are, straight from the records
                assert merged.requests == len(together) and merged.tokens == sum(r.tokens for r in together)
                assert merged.attainment == sum(r.meets_slo for r in together) / len(together)
                assert merged.eta == min(r.eta for r in together)
                assert list(merged.mix) == list(dict.fromkeys(r.function for r in together))
                for f in merged.mix:
                    ratios = sorted(r.ttft_s / r.ttft_slo_s for r in together if r.function == f)
                    assert merged.ttft_ratio_p95 >= ratios[round(q * (len(ratios) - 1))]


def test_empty_windows_are_full_attainment_and_no_function() -> None:
    stats = merged_stats([window_parts([]), window_parts([])])
    assert (stats.requests, stats.attainment, stats.worst_function, stats.mix) == (0, 1.0, None, {})
