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


def test_azure_llm_trace_round_trip_and_token_costs(tmp_path) -> None:
    from ember.scheduler.autoscaler import Autoscaler
    from ember.scheduler.policies import get_policy
    from ember.scheduler.sim import SimConfig, _Simulation
    from ember.scheduler.trace import read_trace_csv, write_llm_trace_csv

    path = write_llm_trace_csv(tmp_path / "llm.csv", requests=400, duration_s=120.0, seed=3)
    assert path.read_text().splitlines()[0] == "TIMESTAMP,ContextTokens,GeneratedTokens"
    tr = read_trace_csv(path, duration_s=200.0, functions=20, seed=1)
    assert len(tr) == 400 and tr.prompt_tokens is not None and tr.output_tokens is not None
    assert (tr.arrival_s[1:] >= tr.arrival_s[:-1]).all() and tr.arrival_s[0] == 0.0
    assert len(set(tr.prompt_tokens.tolist())) > 50 and len(set(tr.output_tokens.tolist())) > 50
    short = read_trace_csv(path, duration_s=30.0, functions=20, seed=1)
    assert 0 < len(short) < 400 and (short.arrival_s < 30.0).all()
    # the simulator charges each request its own prefill and decode
    cfg = SimConfig(nodes=2, gpus_per_node=2, functions=20, duration_s=200.0).check()
    sim = _Simulation(cfg, tr, get_policy("ember"), Autoscaler())
    prefill, held = sim._request_costs()
    longest = int(tr.prompt_tokens.argmax())
    same_fn = [i for i in range(len(tr)) if tr.function_idx[i] == tr.function_idx[longest]]
    assert prefill[longest] == max(prefill[i] for i in same_fn)
    assert all(h > p > 0 for p, h in zip(prefill, held, strict=True))
    assert len(sim.run(None).startup_s) == 400


def test_azure_llm_trace_bad_lines_name_line_and_field(tmp_path) -> None:
    from ember.scheduler.trace import read_azure_llm_csv

    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,4808,10\n"
                   "2023-11-16 18:15:50.1,12,x\n")
    with pytest.raises(ConfigError, match=r"bad.csv:3: GeneratedTokens 'x'"):
        read_azure_llm_csv(bad)
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(ConfigError, match=r"bad.csv:2: TIMESTAMP"):
        read_azure_llm_csv(bad)


@pytest.mark.parametrize("cell", ["1_0", " 3 ", "3 ", "\u00b2", "\u0663", "1.5", "", "+1", "99999999999999999999999", '"1,2"'])
def test_azure_csv_counts_are_plain_ascii_digits(tmp_path, cell) -> None:
    """Anything but plain ASCII digits (what int() or isdigit() would take, too large for int64)
    is a ConfigError naming the line and minute, never a traceback or a different count."""
    with pytest.raises(ConfigError, match=r"t\.csv:3: minute 2: .* is not an integer count"):
        read_azure_csv(_azure(tmp_path / "t.csv", ["o,a,f1,http,2,0,1", f"o,a,f2,http,1,{cell},0"]))


@pytest.mark.parametrize("row, match", [
    ("2023-11-16 18:15:47.0,\u00b2,10", r"ContextTokens '\u00b2'"),
    ("2023-11-16 18:15:47.0,99999999999999999999999,10", "ContextTokens '9+'"),
    ("2023-11-16 18:15:47.0,12, 10", "GeneratedTokens ' 10'"),
    ("2023-11-16 18:15:47.0,1_2,10", "ContextTokens '1_2'"),
    ("2023-11-16 18:15:46.,5,10", "TIMESTAMP"),
    ("2023-11-16 18:15:4\u0666.1,5,10", "TIMESTAMP"),
    ("2023-13-16 18:15:46.1,5,10", "TIMESTAMP"),
])
def test_azure_llm_trace_malformed_cells_are_config_errors(tmp_path, row, match) -> None:
    from ember.scheduler.trace import read_trace_csv

    bad = tmp_path / "bad.csv"
    bad.write_text(f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,4808,10\n{row}\n",
                   encoding="utf-8")
    with pytest.raises(ConfigError, match=rf"bad\.csv:3: {match}"):
        read_trace_csv(bad)


def test_traces_with_a_bom_zero_tokens_and_bad_bytes(tmp_path) -> None:
    """A byte order mark does not hide the format; 0 generated (or context) tokens are kept as
    0, not raised to 1; bytes that are not UTF-8 are a ConfigError."""
    from ember.scheduler.trace import read_trace_csv

    llm = tmp_path / "llm.csv"
    llm.write_text("\ufeffTIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.68,4808,0\n"
                   "2023-11-16 18:15:47.5,0,7\n", encoding="utf-8")
    tr = read_trace_csv(llm)
    assert tr.prompt_tokens is not None and tr.output_tokens is not None
    assert tr.prompt_tokens.tolist() == [4808, 0] and tr.output_tokens.tolist() == [0, 7]
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 0.82])
    az = tmp_path / "az.csv"
    az.write_text("\ufeffHashOwner,HashApp,HashFunction,Trigger,1,2\no,a,f,http,1,1\n", encoding="utf-8")
    assert len(read_trace_csv(az)) == 2
    az.write_bytes(b"HashOwner,HashApp,HashFunction,Trigger,1,2\no,a,\xff,http,1,1\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        read_trace_csv(az)
