"""Recent invocations per function as one gateway saw them: TTFT/TPOT percentiles, SLO
attainment and cold starts by tier, for GET /v1/stats/functions and the console.

A bounded window per function (the last `window` finished requests) in this gateway's memory;
Prometheus (`ember_time_to_first_token_seconds`, `ember_slo_requests_total`, ...) is the place to
aggregate over many gateways and long periods.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class _FunctionWindow:
    samples: deque[tuple[float, float | None, bool]]  # (ttft_s, tpot_s or None, met the SLO)
    requests: int = 0
    errors: int = 0
    cold_starts: Counter[str] = field(default_factory=Counter)
    last_s: float = 0.0


class InvocationStats:
    """Per-function latency and SLO statistics over the last `window` requests."""

    def __init__(self, window: int = 1000) -> None:
        self.window = window
        self._fns: dict[str, _FunctionWindow] = {}
        self._lock = threading.Lock()

    def _fn(self, function: str) -> _FunctionWindow:
        fn = self._fns.get(function)
        if fn is None:
            fn = self._fns[function] = _FunctionWindow(deque(maxlen=self.window))
        return fn

    def record(self, function: str, ttft_s: float, tpot_s: float | None, met_slo: bool,
               cold_tier: str | None = None) -> None:
        """A finished request: TTFT as the client saw it, TPOT (None for one token), SLO met or
        not, and the tier of the cold start it paid for (None when warm)."""
        with self._lock:
            fn = self._fn(function)
            fn.samples.append((ttft_s, tpot_s, met_slo))
            fn.requests += 1
            fn.last_s = time.time()
            if cold_tier:
                fn.cold_starts[cold_tier] += 1

    def failed(self, function: str) -> None:
        with self._lock:
            fn = self._fn(function)
            fn.errors += 1
            fn.last_s = time.time()

    def summary(self, function: str) -> dict[str, Any]:
        """requests, errors, ttft_ms/tpot_ms {p50, p99}, slo_attainment (None before any request),
        cold_starts {tier: n}, last_request_s; counts are since this gateway started."""
        with self._lock:
            fn = self._fns.get(function)
            if fn is None:
                samples: list[tuple[float, float | None, bool]] = []
                requests = errors = 0
                cold: dict[str, int] = {}
                last = None
            else:
                samples, requests, errors = list(fn.samples), fn.requests, fn.errors
                cold, last = dict(fn.cold_starts), fn.last_s
        ttft = sorted(s[0] for s in samples)
        tpot = sorted(s[1] for s in samples if s[1] is not None)
        return {
            "requests": requests,
            "errors": errors,
            "window": len(samples),
            "ttft_ms": {"p50": _pct_ms(ttft, 0.50), "p99": _pct_ms(ttft, 0.99)},
            "tpot_ms": {"p50": _pct_ms(tpot, 0.50), "p99": _pct_ms(tpot, 0.99)},
            "slo_attainment": (sum(1 for s in samples if s[2]) / len(samples)) if samples else None,
            "cold_starts": cold,
            "last_request_s": last,
        }


def _pct_ms(sorted_s: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) in milliseconds, None for no samples."""
    if not sorted_s:
        return None
    i = min(len(sorted_s) - 1, max(0, math.ceil(q * len(sorted_s)) - 1))
    return round(sorted_s[i] * 1000, 3)
