"""SLO statistics of a window of finished requests on one device: what the power-limit controller
decides on (attainment, per-function tail ratios, time per token, the function mix)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

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


@dataclass(frozen=True)
class WindowParts:
    """What `window_stats` needs of one window, computed once: a rolling horizon of windows
    merges these instead of walking every record again each step."""

    met: int
    tokens: int
    latencies: list[float]  # per request: ttft + tpot x (tokens - 1), in arrival order
    eta: float
    ttft: dict[str, list[float]]  # function (first-seen order) -> ttft / ttft_slo per request
    tpot: dict[str, list[float]]

    @property
    def requests(self) -> int:
        return len(self.latencies)


def window_parts(window: Sequence[RequestRecord]) -> WindowParts:
    ttft: dict[str, list[float]] = {}
    tpot: dict[str, list[float]] = {}
    for r in window:
        if r.function not in ttft:
            ttft[r.function], tpot[r.function] = [], []
        ttft[r.function].append(r.ttft_s / r.ttft_slo_s)
        tpot[r.function].append(r.tpot_s / r.tpot_slo_s)
    return WindowParts(
        met=sum(r.meets_slo for r in window),
        tokens=sum(max(r.tokens, 0) for r in window),
        latencies=[r.ttft_s + r.tpot_s * max(r.tokens - 1, 0) for r in window],
        eta=min((r.eta for r in window), default=1.0),
        ttft=ttft,
        tpot=tpot,
    )


def window_stats(window: Sequence[RequestRecord], q: float = 0.95) -> WindowStats:
    """The window's SLO statistics (each function's own tail at quantile `q`)."""
    return merged_stats([window_parts(window)], q)


def merged_stats(parts: Sequence[WindowParts], q: float = 0.95) -> WindowStats:
    """`window_stats` of the windows' records taken together, from their parts."""
    requests = sum(p.requests for p in parts)
    if not requests:
        return WindowStats(0, 0, 1.0, 0.0, 0.0, None, 0.0, 1.0, {})
    # each function's own tail: a busy function's p95 must not hide a quieter one's
    ttft: dict[str, list[float]] = {}
    tpot: dict[str, list[float]] = {}
    for p in parts:
        for f, ratios in p.ttft.items():
            ttft.setdefault(f, []).extend(ratios)
            tpot.setdefault(f, []).extend(p.tpot[f])
    ttft_q = {f: quantile(sorted(v), q) for f, v in ttft.items()}
    tpot_q = {f: quantile(sorted(v), q) for f, v in tpot.items()}
    worst_fn = max(ttft, key=lambda f: max(ttft_q[f], tpot_q[f]))
    tokens = sum(p.tokens for p in parts)
    latency = sum(chain.from_iterable(p.latencies for p in parts))  # one order: the records'
    return WindowStats(
        requests=requests,
        tokens=tokens,
        attainment=sum(p.met for p in parts) / requests,
        ttft_ratio_p95=max(ttft_q.values()),
        tpot_ratio_p95=max(tpot_q.values()),
        worst_function=worst_fn,
        s_per_token=latency / tokens if tokens else 0.0,
        eta=min(p.eta for p in parts if p.requests),
        mix={f: len(v) / requests for f, v in ttft.items()},
    )


def quantile(sorted_values: Sequence[float], q: float) -> float:
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]
