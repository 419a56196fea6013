"""`ember bench scheduler`: live placement decisions against a real Redis."""

from __future__ import annotations

import json

import redis
from typer.testing import CliRunner

from ember.cli import app
from ember.commands.scheduler_cmds import run_bench_scheduler


def test_bench_against_given_redis_cleans_up(redis_url: str) -> None:
    doc = run_bench_scheduler(redis_url=redis_url, workers=5, decisions=20)
    assert doc["workers"] == 5 and doc["decisions"] == 20
    assert 0 < doc["p50_ms"] <= doc["p99_ms"]
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    assert client.smembers("ember:nodes") == set() and client.smembers("ember:instances") == set()


def test_bench_command_starts_its_own_redis(tmp_path) -> None:
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(app, ["bench", "scheduler", "--json", str(out), "--workers", "3", "--decisions", "5"])
    assert res.exit_code == 0, res.output
    assert set(json.loads(out.read_text())) >= {"workers", "decisions", "p50_ms", "p99_ms"}
