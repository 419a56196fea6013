"""`ember loadtest`: the CI smoke run of the `cold` scenario against the tiny model (a private
`ember up`, real locust in its own process), streams that break counted as failures, and the
report's arithmetic and bounds."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ember.errors import BadRequest
from ember.platform.loadtest import LoadTestOptions, parse_duration_s, validate
from ember.platform.loadtest_report import percentile, summarize

pytestmark = pytest.mark.slow
SUMMARY_KEYS = {"scenario", "requests", "failures", "ttft_s", "tpot_s", "e2e_s", "cold", "warm"}


def test_cold_smoke_run_has_cold_starts_from_two_tiers_and_no_failures(tmp_path: Path) -> None:
    out = tmp_path / "cold"
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_REDIS_URL", "EMBER_STORE_URL", "EMBER_URL")}
    proc = subprocess.run([sys.executable, "-m", "ember", "loadtest", "cold", "--users", "3", "--duration", "8s",
                           "--workers", "1", "--checkpoints", "5", "--max-tokens", "8", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=170, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS and summary["scenario"] == "cold"
    assert summary["requests"] > 0 and summary["failures"] == 0
    tiers = {tier for tier, entry in summary["cold"].items() if entry["count"] > 0}
    assert len(tiers) >= 2 and tiers <= {"remote", "ssd", "dram"}, summary["cold"]
    for entry in summary["cold"].values():
        assert 0 < entry["p50_s"] <= entry["p99_s"]
    for measure in ("ttft_s", "e2e_s"):
        assert set(summary[measure]) == {"p50", "p90", "p99"}
        assert 0 < summary[measure]["p50"] <= summary[measure]["p90"] <= summary[measure]["p99"]
    # locust's totals and the per-state events are in its own reports too
    stats = json.loads((out / "locust.json").read_text())
    names = {s["name"] for s in stats}
    assert "chat (headers)" in names and any(n.startswith("cold/") and n.endswith("/ttft") for n in names)
    assert (out / "ttft.png").stat().st_size > 0 and (out / "locust.html").exists()
    assert (out / "locust_stats.csv").read_text().startswith("Type,Name")
    assert "requests" in proc.stdout  # it showed progress / the summary


class BreakingGateway(BaseHTTPRequestHandler):
    """A loopback stand-in for a gateway whose streams break: deploys, deletes and the warm-up call
    succeed; every stream sends a chunk and then either ends without `data: [DONE]` (the connection
    closes: HTTP/1.0) or gets the gateway's mid-stream error event."""

    streams = itertools.count()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._json(201, {"name": self.path.rsplit("/", 1)[-1]})

    def do_DELETE(self) -> None:
        self._json(200, {"deleted": True})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
        if not body.get("stream"):
            self._json(200, {"choices": [{"message": {"role": "assistant", "content": "hi"}}]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("x-ember-cold-start", "false")
        self.end_headers()
        self.wfile.write(b'data: {"choices": [{"delta": {"content": "Once"}}]}\n\n')
        if next(self.streams) % 2:
            self.wfile.write(b'data: {"error": {"message": "worker w0 died", "code": "worker_error"}}\n\n')
        self.wfile.flush()  # and the connection closes: no [DONE]


@pytest.fixture
def breaking_gateway() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BreakingGateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_broken_streams_are_counted_as_failures(tmp_path: Path, breaking_gateway: str) -> None:
    """`ember loadtest steady --url` against a gateway whose streams break mid-way (no final
    [DONE], or an error event): every request is a failure. They used to be successes, with
    latencies, in the summary."""
    out = tmp_path / "broken"
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_REDIS_URL", "EMBER_STORE_URL", "EMBER_URL")}
    proc = subprocess.run([sys.executable, "-m", "ember", "loadtest", "steady", "--url", breaking_gateway,
                           "--api-key", "test-key", "--users", "1", "--rate", "4", "--duration", "3s",
                           "--max-requests", "4", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["requests"] >= 2 and summary["failures"] == summary["requests"], summary
    assert summary["warm"]["count"] == 0 and summary["ttft_s"]["p50"] is None  # no latency from a broken stream
    failures = (out / "locust_failures.csv").read_text()
    assert "stream ended without [DONE]" in failures and "stream error: worker_error" in failures, failures


def test_summary_counts_requests_from_locust_rows_and_splits_ttft_by_tier() -> None:
    stats = [{"name": "chat (headers)", "method": "POST", "num_requests": 5, "num_failures": 1},
             {"name": "cold/ssd/ttft", "method": "LLM", "num_requests": 2, "num_failures": 0},
             {"name": "warm/ttft", "method": "LLM", "num_requests": 2, "num_failures": 0}]
    samples = [{"tenant": "default", "cold": True, "tier": "ssd", "ttft_s": t, "tpot_s": None, "e2e_s": t + 1}
               for t in (0.2, 0.4)] + \
              [{"tenant": "default", "cold": False, "tier": "warm", "ttft_s": t, "tpot_s": 0.01, "e2e_s": t}
               for t in (0.01, 0.03)]
    s = summarize("cold", stats, samples)
    assert set(s) == SUMMARY_KEYS
    assert (s["requests"], s["failures"]) == (5, 1)
    assert s["cold"] == {"ssd": {"count": 2, "p50_s": pytest.approx(0.3), "p99_s": pytest.approx(0.398)}}
    assert s["warm"]["count"] == 2 and s["warm"]["p50_s"] == pytest.approx(0.02)
    assert s["tpot_s"]["p50"] == pytest.approx(0.01)
    assert summarize("cold", [], [])["ttft_s"] == {"p50": None, "p90": None, "p99": None}
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_bounds_and_durations_are_checked() -> None:
    assert parse_duration_s("60s") == 60 and parse_duration_s("2m") == 120 and parse_duration_s("1m30s") == 90
    assert parse_duration_s("45") == 45
    for bad in ("", "soon", "5x"):
        with pytest.raises(BadRequest):
            parse_duration_s(bad)
    for opts in (LoadTestOptions("nope", Path("x")), LoadTestOptions("cold", Path("x"), users=0),
                 LoadTestOptions("cold", Path("x"), users=1000), LoadTestOptions("cold", Path("x"), duration_s=3600),
                 LoadTestOptions("cold", Path("x"), url="ftp://host"), LoadTestOptions("tenants", Path("x"), users=1)):
        with pytest.raises(BadRequest):
            validate(opts)
    proc = subprocess.run([sys.executable, "-m", "ember", "loadtest", "nope", "--out", "x"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "unknown scenario" in proc.stderr
