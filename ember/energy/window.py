"""SLO statistics of a window of finished requests on one device: what the power-limit controller
decides on (attainment, per-function tail ratios, time per token, the function mix)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ember.energy.monitor import RequestRecord


@dataclass(frozen=True)
class WindowStats:
    """SLO outcome of one window on one device, over all its functions."""

    requests: int
    tokens: int
    attainment: float  # fraction of requests meeting both SLOs (1.0 when empty)
    ttft_ratio_p95: float  # highest per-function p95 (or p99) of ttft / ttft_slo
    tpot_ratio_p95: float
    worst_function: str | None  # the function with the highest ratio
    s_per_token: float  # mean latency per generated token
    eta: float  # min eta over the window's functions (the most time-sensitive decides)
    mix: dict[str, float]  # function -> share of requests


def window_stats(window: Sequence[RequestRecord], q: float = 0.95) -> WindowStats:
    """The window's SLO statistics (each function's own tail at quantile `q`)."""
    if not window:
        return WindowStats(0, 0, 1.0, 0.0, 0.0, None, 0.0, 1.0, {})
    met = sum(r.meets_slo for r in window)
    # each function's own tail: a busy function's p95 must not hide a quieter one's
    by_fn: dict[str, list[RequestRecord]] = {}
    for r in window:
        by_fn.setdefault(r.function, []).append(r)
    ttft_q = {f: quantile(sorted(r.ttft_s / r.ttft_slo_s for r in rs), q) for f, rs in by_fn.items()}
    tpot_q = {f: quantile(sorted(r.tpot_s / r.tpot_slo_s for r in rs), q) for f, rs in by_fn.items()}
    worst_fn = max(by_fn, key=lambda f: max(ttft_q[f], tpot_q[f]))
    tokens = sum(max(r.tokens, 0) for r in window)
    latency = sum(r.ttft_s + r.tpot_s * max(r.tokens - 1, 0) for r in window)
    counts: dict[str, int] = {}
    for r in window:
        counts[r.function] = counts.get(r.function, 0) + 1
    return WindowStats(
        requests=len(window),
        tokens=tokens,
        attainment=met / len(window),
        ttft_ratio_p95=max(ttft_q.values()),
        tpot_ratio_p95=max(tpot_q.values()),
        worst_function=worst_fn,
        s_per_token=latency / tokens if tokens else 0.0,
        eta=min(r.eta for r in window),
        mix={f: c / len(window) for f, c in counts.items()},
    )


def quantile(sorted_values: Sequence[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]
