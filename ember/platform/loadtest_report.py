"""Reports of an `ember loadtest` run: `summary.json` and `ttft.png` (plus `tenants.json` for the
tenants scenario) from locust's JSON totals and the per-request samples the locustfile writes.

Totals (requests, failures) come from locust's `--json-file` output, which the CSV lags. Latency
percentiles come from the samples (seconds, unrounded; locust rounds its response times above
100 ms to two significant digits); a request that failed has no sample.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

TIER_ORDER = ("gpu", "dram", "ssd", "remote")


def write_reports(scenario: str, out_dir: Path) -> dict[str, Any]:
    """Write summary.json (and tenants.json, ttft.png) into out_dir; returns the summary."""
    stats = json.loads((out_dir / "locust.json").read_text())
    samples = read_samples(out_dir / "samples.jsonl")
    summary = summarize(scenario, stats, samples)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if scenario == "tenants":
        tenants = {t: summarize(scenario, [], [s for s in samples if s["tenant"] == t])
                   for t in sorted({s["tenant"] for s in samples})}
        for t, entry in tenants.items():
            entry.pop("scenario")
            entry["requests"], entry["failures"] = _totals([s for s in stats if _tenant_of(s) == t])
            entry["throttled"] = sum(s["num_requests"] for s in stats if s["method"] == f"LLM:{t}"
                                     and s["name"] == "throttled/e2e")
        (out_dir / "tenants.json").write_text(json.dumps(tenants, indent=2) + "\n")
    plot_ttft(samples, out_dir / "ttft.png", title=f"ember loadtest {scenario}")
    return summary


def summarize(scenario: str, stats: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary.json object: totals from locust's stats, percentiles from the samples."""
    requests, failures = _totals(stats)
    cold: dict[str, dict[str, Any]] = {}
    tiers = sorted({s["tier"] for s in samples if s["cold"]},
                   key=lambda t: (TIER_ORDER.index(t) if t in TIER_ORDER else len(TIER_ORDER), t))
    for tier in tiers:
        ttft = [s["ttft_s"] for s in samples if s["cold"] and s["tier"] == tier]
        cold[tier] = {"count": len(ttft), "p50_s": percentile(ttft, 50), "p99_s": percentile(ttft, 99)}
    warm = [s["ttft_s"] for s in samples if not s["cold"]]
    return {
        "scenario": scenario,
        "requests": requests,
        "failures": failures,
        "ttft_s": _percentiles([s["ttft_s"] for s in samples]),
        "tpot_s": _percentiles([s["tpot_s"] for s in samples if s["tpot_s"] is not None]),
        "e2e_s": _percentiles([s["e2e_s"] for s in samples]),
        "cold": cold,
        "warm": {"count": len(warm), "p50_s": percentile(warm, 50), "p99_s": percentile(warm, 99)},
    }


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The locustfile's per-request JSON lines (a torn last line from a killed run is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0-100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}


def _tenant_of(entry: dict[str, Any]) -> str:
    method = entry.get("method") or ""
    if method.startswith("LLM:"):
        return method[4:]
    name = entry.get("name") or ""
    return name.split(" ", 1)[0] if name.endswith(" chat (headers)") else "default"


def _totals(stats: list[dict[str, Any]]) -> tuple[int, int]:
    """HTTP requests (the rows that are not custom LLM events) and failures of every row."""
    http = [s for s in stats if not str(s.get("method") or "").startswith("LLM")]
    return sum(s["num_requests"] for s in http), sum(s["num_failures"] for s in stats)


def plot_ttft(samples: list[dict[str, Any]], path: Path, title: str) -> None:
    """TTFT distribution (empirical CDF, log time axis) per cold-start tier and warm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = {}
    for s in samples:
        groups.setdefault(f"cold/{s['tier']}" if s["cold"] else "warm", []).append(s["ttft_s"])
    colors = {"warm": "#3a3", "cold/dram": "#e93", "cold/ssd": "#c44", "cold/remote": "#749", "cold/gpu": "#39c"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    order = ["warm"] + [f"cold/{t}" for t in TIER_ORDER] + sorted(groups)
    for name in dict.fromkeys(order):
        xs = sorted(groups.get(name, []))
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        p50 = percentile(xs, 50) or 0.0
        ax.step([x * 1000 for x in xs], ys, where="post", color=colors.get(name),
                label=f"{name} (n={len(xs)}, p50 {p50 * 1000:.0f} ms)")
    if groups:
        ax.set_xscale("log")
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("time to first token (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
