"""`ember bench gateway --json OUT` as users run it: its own `ember up`, warm requests through the
gateway and straight to the worker, the fields scripts read, and each process's CPU per request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_gateway_writes_every_step_and_the_cpu_of_each_process(tmp_path: Path) -> None:
    out = tmp_path / "gw.json"
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_REDIS_URL", "EMBER_STORE_URL")}
    done = subprocess.run([sys.executable, "-m", "ember", "bench", "gateway", "--json", str(out), "--rates", "20,60",
                           "--step-s", "1.5", "--clients", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert [s["rate_rps"] for s in summary["steps"]] == [20.0, 60.0]
    for step in summary["steps"]:
        for field in ("rps", "requests", "errors", "p50_overhead_ms", "p99_overhead_ms"):
            assert field in step, (field, step)
        assert step["errors"] == 0 and step["direct"]["errors"] == 0
        assert step["requests"] == step["direct"]["requests"] == int(step["rate_rps"] * 1.5)
        assert step["p50_overhead_ms"] == pytest.approx(step["p50_ms"] - step["direct"]["p50_ms"], abs=0.011)
        assert set(step["cpu_ms_per_request"]) == {"gateway", "redis"} and step["cpu_ms_per_request"]["gateway"] > 0
    closed = summary["closed_loop"]
    assert closed["clients"] == 4 and closed["gateway"]["errors"] == 0 and closed["direct"]["errors"] == 0
    through, direct = closed["gateway"]["cpu_ms_per_request"], closed["direct"]["cpu_ms_per_request"]
    assert set(through) == set(direct) == {"gateway", "worker", "redis", "client"}
    assert through["gateway"] > 0 and through["worker"] > 0 and direct["worker"] > 0
    assert direct["gateway"] < through["gateway"] / 5  # straight to the worker: the gateway idles
    assert summary["serial"]["errors"] == 0 and summary["highest_sustained_rps"] == 60.0
    holds = [s["rate_rps"] for s in summary["steps"] if s["p99_overhead_ms"] < 5.0]
    expected = 60.0 if holds == [20.0, 60.0] else 20.0 if holds[:1] == [20.0] else 0.0
    assert summary["p99_overhead_under_5ms_up_to_rps"] == expected
    assert "p99 overhead under 5 ms at every rate up to" in done.stdout
