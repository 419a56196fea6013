"""deploy/: the Prometheus alert rules pass promtool (syntax and unit tests, every alert tested)
and every metric the Grafana dashboard and the alerts query is one a running gateway or worker exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.platform.operators.conftest import OpsPlatform

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "ember.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install -y "
                                                               "prometheus; `make test` does it where it can)")
# Grafana's variables, replaced by values Prometheus accepts
GRAFANA_VARS = {"$__rate_interval": "5m", "$__range": "1h", "$function": ".*"}


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = []
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]
        exprs += [t["expr"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["definition"])
    return exprs


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bember_[a-z0-9_]+\b", expr))


@needs_promtool
def test_alert_rules_check_and_unit_tests_pass() -> None:
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        out = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert tested == {r["alert"] for r in alert_rules()}, "every alert has a unit test in which it fires"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"ember:dashboard_check_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_queried_metric_is_exported(ops: OpsPlatform) -> None:
    # the gateway's and the worker's (engine) metrics: a dashboard reads both
    text = httpx.get(f"{ops.url}/metrics", timeout=30).text + "\n" + \
        httpx.get(f"{ops.worker.url}/metrics", timeout=30).text
    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            exported.add(name)
            if kind == "histogram":
                exported |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
            if kind == "counter":
                exported.add(f"{name}_total")
        elif line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    queries = {f"alert {r['alert']}": r["expr"] for r in alert_rules()}
    queries.update({f"dashboard query {i}": e for i, e in enumerate(dashboard_exprs())})
    for where, expr in queries.items():
        names = metric_names(expr)
        assert names, f"{where} names no Ember metric: {expr}"
        assert names <= exported, f"{where} queries metrics neither gateway nor worker exports: {sorted(names - exported)}"


def test_slo_series_abandoned_streams_and_odd_tokens(ops: OpsPlatform) -> None:
    """A function that misses its SLO on every request exports `result="met"` at 0 (the series was
    missing, so met/total and the SLO alert were empty, never firing); a stream its client abandons
    counts as status 499, not 200; a worker given a non-ASCII cluster token answers 401, not 500."""
    import re

    r = httpx.put(f"{ops.url}/v1/functions/strictslo", headers=ops.headers(), timeout=60,
                  json={"checkpoint": "tiny", "slo": {"ttft_ms": 0.001, "tpot_ms": 0.001},
                        "scaling": {"keep_alive_s": 600}})
    assert r.status_code in (200, 201), r.text
    for _ in range(2):
        assert ops.chat("strictslo").status_code == 200
    body = {"model": "strictslo", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2000,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{ops.url}/v1/chat/completions", headers=ops.headers(), json=body,
                      timeout=60) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())  # the first chunk, then the client goes away

    def value(text: str, series: str) -> float | None:
        m = re.search(rf"^{re.escape(series)} ([0-9.e+]+)$", text, re.M)
        return float(m.group(1)) if m else None

    deadline = time.monotonic() + 15
    while True:
        text = httpx.get(f"{ops.url}/metrics", timeout=30).text
        abandoned = value(text, 'ember_requests_total{function="strictslo",status="499"}')
        if abandoned == 1.0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert value(text, 'ember_slo_requests_total{function="strictslo",result="met"}') == 0.0
    assert value(text, 'ember_slo_requests_total{function="strictslo",result="missed"}') == 2.0
    assert abandoned == 1.0 and value(text, 'ember_requests_total{function="strictslo",status="200"}') == 2.0
    for token in ("\xe9abc", "caf\u00e9"):
        raw = token.encode("latin-1", errors="ignore") if token.isascii() is False else token.encode()
        got = httpx.get(f"{ops.worker.url}/internal/healthz", headers=[(b"x-ember-cluster-token", raw)], timeout=10)
        assert got.status_code == 401, got.text
