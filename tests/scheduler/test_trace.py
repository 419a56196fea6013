"""Synthetic and Azure Functions 2019 traces."""

from __future__ import annotations

import numpy as np
import pytest

from ember.errors import ConfigError
from ember.scheduler.trace import read_azure_csv, synthetic_trace


def _azure(path, rows, minutes=3):
    header = "HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(i) for i in range(1, minutes + 1))
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_synthetic_trace_is_seeded_sorted_and_heavy_tailed() -> None:
    a = synthetic_trace(200, 600.0, seed=3)
    b = synthetic_trace(200, 600.0, seed=3)
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.function_idx, b.function_idx)
    assert len(a) == pytest.approx(200 * 0.03 * 600, rel=0.25)
    assert np.all(np.diff(a.arrival_s) >= 0) and a.arrival_s.max() < 600.0
    counts = np.sort(np.bincount(a.function_idx, minlength=200))[::-1]
    assert counts[:10].sum() > 0.3 * counts.sum()  # a few functions dominate
    first, last = (a.arrival_s < 150).sum(), ((a.arrival_s > 225) & (a.arrival_s < 375)).sum()
    assert last > first  # diurnal: the middle of the compressed day is busier than its start
    assert len(synthetic_trace(200, 600.0, seed=4)) != len(a)


def test_azure_csv_reads_counts_per_minute(tmp_path) -> None:
    path = _azure(tmp_path / "t.csv", ["o,a,f1,http,2,0,1", "o,a,f2,timer,0,3,0"])
    tr = read_azure_csv(path)
    assert tr.functions == ["f1", "f2"] and len(tr) == 6 and tr.duration_s == 180.0
    f1 = tr.arrival_s[tr.function_idx == 0]
    assert ((f1 < 60).sum(), ((f1 >= 120) & (f1 < 180)).sum()) == (2, 1)
    assert len(read_azure_csv(path, duration_s=60)) == 2


@pytest.mark.parametrize("rows, match", [
    (["o,a,f1,http,2,0,1", "o,a,f2,http,1,x,0"], r"t\.csv:3: minute 2: 'x' is not an integer"),
    (["o,a,f1,http,2,0"], r"t\.csv:2: expected 7 fields, got 6"),
    (["o,a,f1,http,2,-1,0"], r"t\.csv:2: minute 2: negative count"),
    (["o,a,,http,2,0,0"], r"t\.csv:2: field HashFunction is empty"),
    (["o,a,f,http,1,0,0", "o,a,f,http,1,0,0"], r"t\.csv:3: function 'f' appears twice"),
])
def test_azure_csv_bad_lines_name_the_line(tmp_path, rows, match) -> None:
    with pytest.raises(ConfigError, match=match):
        read_azure_csv(_azure(tmp_path / "t.csv", rows))


def test_azure_csv_bad_header_and_missing_file(tmp_path) -> None:
    bad = tmp_path / "t.csv"
    bad.write_text("Owner,App,Function,Trigger,1\n")
    with pytest.raises(ConfigError, match=r"t\.csv:1: header"):
        read_azure_csv(bad)
    with pytest.raises(ConfigError, match="cannot read trace"):
        read_azure_csv(tmp_path / "missing.csv")
