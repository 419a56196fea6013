"""Recent invocations per function as one gateway saw them: TTFT/TPOT percentiles, SLO
attainment and cold starts by tier, for GET /v1/stats/functions and the console.

A bounded window per function (the last `window` finished requests) in this gateway's memory;
Prometheus (`ember_time_to_first_token_seconds`, `ember_slo_requests_total`, ...) is the place to
aggregate over many gateways and long periods. With several gateway processes on one port
(EMBER_GATEWAY_PROCESSES) each writes its windows into their shared directory about once a second
(`share`) and a summary merges them, so every process answers for all of them (the others' part
up to a second old).

A window belongs to one generation of its function (the spec's `created` time): a function deleted
and created again under the same name, by its owner or another tenant, starts from nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.platform.http_common import ticks

log = logging.getLogger(__name__)


@dataclass
class _FunctionWindow:
    samples: deque[tuple[float, float | None, bool]]  # (ttft_s, tpot_s or None, met the SLO)
    requests: int = 0
    errors: int = 0
    cold_starts: Counter[str] = field(default_factory=Counter)
    last_s: float = 0.0
    generation: float = 0.0  # the function's `created` time: a new function of the same name starts anew


class InvocationStats:
    """Per-function latency and SLO statistics over the last `window` requests."""

    def __init__(self, window: int = 1000, share_dir: str | Path | None = None) -> None:
        """share_dir: the directory the processes of one gateway share (None: a process of its own)."""
        self.window = window
        self._fns: dict[str, _FunctionWindow] = {}
        self._lock = threading.Lock()
        self.share_dir = Path(share_dir) if share_dir else None
        self._changes = 0  # bumped by every record and failure: `share` writes only after a change
        self._shared = 0

    def _fn(self, function: str, generation: float) -> _FunctionWindow | None:
        """The window of `function`'s `generation`: a newer one starts anew; None for a record of an
        older generation (a request that began before the function was deleted and created again
        must not wipe the new one's window)."""
        fn = self._fns.get(function)
        if fn is not None and generation < fn.generation:
            return None
        if fn is None or fn.generation != generation:
            fn = self._fns[function] = _FunctionWindow(deque(maxlen=self.window), generation=generation)
        return fn

    def record(self, function: str, ttft_s: float, tpot_s: float | None, met_slo: bool,
               cold_tier: str | None = None, *, generation: float = 0.0) -> None:
        """A finished request: TTFT as the client saw it, TPOT (None for one token), SLO met or
        not, and the tier of the cold start it paid for (None when warm). `generation`: the
        function's `created` time."""
        with self._lock:
            fn = self._fn(function, generation)
            if fn is None:
                return
            fn.samples.append((ttft_s, tpot_s, met_slo))
            fn.requests += 1
            fn.last_s = time.time()
            if cold_tier:
                fn.cold_starts[cold_tier] += 1
            self._changes += 1

    def failed(self, function: str, *, generation: float = 0.0) -> None:
        with self._lock:
            fn = self._fn(function, generation)
            if fn is None:
                return
            fn.errors += 1
            fn.last_s = time.time()
            self._changes += 1

    def _own(self, only: str | None = None) -> dict[str, dict[str, Any]]:
        """This process's windows (of function `only`, if given) as plain data."""
        with self._lock:
            return {name: {"samples": list(fn.samples), "requests": fn.requests, "errors": fn.errors,
                           "cold_starts": dict(fn.cold_starts), "last_s": fn.last_s, "generation": fn.generation}
                    for name, fn in self._fns.items() if only is None or name == only}

    def share(self) -> bool:
        """Write this process's windows for the other processes of its gateway (a whole file
        replaced at once), if anything changed since the last write; True if written."""
        if self.share_dir is None or self._changes == self._shared:
            return False
        changes = self._changes
        path = self.share_dir / f"stats_{os.getpid()}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(self._own(), separators=(",", ":")))
            os.replace(tmp, path)
        except OSError as e:  # the others answer without this process's latest part
            log.warning("could not share this process's invocation stats: %s", e)
            return False
        self._shared = changes
        return True

    def others(self) -> list[dict[str, dict[str, Any]]]:
        """What the other processes of this gateway last shared (nothing without a shared directory;
        a process that died is still counted, like its Prometheus counters)."""
        if self.share_dir is None:
            return []
        mine = f"stats_{os.getpid()}.json"
        out = []
        for f in sorted(self.share_dir.glob("stats_*.json")):
            if f.name == mine:
                continue
            try:
                out.append(json.loads(f.read_text()))
            except (OSError, ValueError) as e:  # replaced while read, or gone: skipped this time
                log.debug("skipped shared stats %s: %s", f.name, e)
        return out

    def summary(self, function: str, others: list[dict[str, dict[str, Any]]] | None = None, *,
                generation: float | None = None) -> dict[str, Any]:
        """requests, errors, ttft_ms/tpot_ms {p50, p99}, slo_attainment (None before any request),
        cold_starts {tier: n}, last_request_s; counts are since this gateway started. `others`:
        the other processes' windows (`others()`), merged in. `generation`: only the windows of
        the function created then (None: any)."""
        parts = [p[function] for p in [self._own(function), *(others or [])] if function in p
                 and (generation is None or p[function].get("generation", 0.0) == generation)]
        samples = [tuple(x) for p in parts for x in p["samples"]]
        cold: Counter[str] = Counter()
        for p in parts:
            cold.update(p["cold_starts"])
        ttft = sorted(s[0] for s in samples)
        tpot = sorted(s[1] for s in samples if s[1] is not None)
        return {
            "requests": sum(p["requests"] for p in parts),
            "errors": sum(p["errors"] for p in parts),
            "window": len(samples),
            "ttft_ms": {"p50": _pct_ms(ttft, 0.50), "p99": _pct_ms(ttft, 0.99)},
            "tpot_ms": {"p50": _pct_ms(tpot, 0.50), "p99": _pct_ms(tpot, 0.99)},
            "slo_attainment": (sum(1 for s in samples if s[2]) / len(samples)) if samples else None,
            "cold_starts": dict(cold),
            "last_request_s": max(p["last_s"] for p in parts) if parts else None,
        }


def _pct_ms(sorted_s: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) in milliseconds, None for no samples."""
    if not sorted_s:
        return None
    i = min(len(sorted_s) - 1, max(0, math.ceil(q * len(sorted_s)) - 1))
    return round(sorted_s[i] * 1000, 3)


async def share_stats(stats: InvocationStats, every_s: float, stop: asyncio.Event) -> None:
    """`stats.share()` every `every_s` seconds until `stop` (several gateway processes)."""
    async for _ in ticks(every_s, stop):
        stats.share()
