"""Invocation traces for the simulator: a synthetic Azure-Functions-like trace, a CSV in the
public Azure Functions 2019 invocation format, or a CSV in the Azure LLM inference trace format
(2023/2024, token-level).

Azure LLM inference trace (`AzureLLMInferenceTrace_{code,conv}.csv`, the data of DynamoLLM and
Splitwise): a header `TIMESTAMP,ContextTokens,GeneratedTokens` and one row per request, e.g.
`2023-11-16 18:15:46.6805900,4808,10`. Requests carry no function, so each is given one of
`functions` functions by a seeded heavy-tailed popularity (as the synthetic trace draws them);
their prompt and output lengths vary per request. `write_llm_trace_csv` writes a synthetic
trace in this format (for tests and examples). A request may generate 0 tokens (it is charged
its prefill alone) and may have 0 context tokens (no prefill); counts are kept as read.

Azure Functions 2019 (`invocations_per_function_md.anon.dNN.csv`): a header
`HashOwner,HashApp,HashFunction,Trigger,1,2,...,1440` and one row per function with its
invocation count in each minute of the day. Counts become arrivals spread uniformly (seeded)
within their minute.

Both readers take counts as plain ASCII digits (no sign, space, underscore or other digits) of
at most 9 digits, a UTF-8 file with or without a byte order mark, and raise ConfigError naming
the line for anything else.

The synthetic trace follows what that dataset shows: popularity spans orders of magnitude
(log-normal rates), arrivals come in bursts, and load follows a day (compressed into the trace's
duration so a short run still sees a peak and a trough).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from ember.errors import ConfigError

__all__ = ["Trace", "read_azure_csv", "read_azure_llm_csv", "read_trace_csv", "synthetic_trace",
           "write_llm_trace_csv"]

AZURE_KEY_COLUMNS = ("HashOwner", "HashApp", "HashFunction", "Trigger")
LLM_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
MAX_COUNT_DIGITS = 9  # a count (invocations in a minute, tokens) above 999,999,999 is a corrupt cell
_COUNT = re.compile(f"[0-9]{{1,{MAX_COUNT_DIGITS}}}")
_COUNTS = re.compile(f"[0-9]{{1,{MAX_COUNT_DIGITS}}}(?:,[0-9]{{1,{MAX_COUNT_DIGITS}}})*")
_TIMESTAMP = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2}) ([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?")


@dataclass
class Trace:
    """Arrivals sorted by time: `arrival_s[i]` of function `functions[function_idx[i]]`."""

    functions: list[str]
    arrival_s: np.ndarray  # float64, seconds from the start, sorted
    function_idx: np.ndarray  # int32 indexes into `functions`
    duration_s: float
    prompt_tokens: np.ndarray | None = None  # per request (token-level traces), else the config's
    output_tokens: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])


def synthetic_trace(functions: int, duration_s: float, *, seed: int = 0, rate_per_function_s: float = 0.03,
                    popularity_sigma: float = 2.0, mean_burst: float = 3.0, burst_gap_s: float = 2.0,
                    diurnal_amplitude: float = 0.5) -> Trace:
    """Heavy-tailed popularity (log-normal rates, mean `rate_per_function_s`), bursty arrivals
    (geometric bursts of mean `mean_burst` invocations, `burst_gap_s` apart on average) and a
    diurnal swing of +-`diurnal_amplitude` compressed into `duration_s`."""
    if functions < 1:
        raise ConfigError(f"functions must be >= 1, got {functions}")
    if duration_s <= 0:
        raise ConfigError(f"duration_s must be > 0, got {duration_s}")
    if rate_per_function_s <= 0:
        raise ConfigError(f"rate_per_function_s must be > 0, got {rate_per_function_s}")
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, popularity_sigma, functions)
    weights /= weights.sum()
    expected = functions * rate_per_function_s * duration_s
    n_bursts = int(rng.poisson(expected / mean_burst))
    burst_fn = rng.choice(functions, size=n_bursts, p=weights).astype(np.int32)
    # Diurnal density 1 + a*sin(...) sampled by inverting its CDF on a grid.
    grid = np.linspace(0.0, duration_s, 4097)
    dens = 1.0 + diurnal_amplitude * np.sin(2 * math.pi * grid / duration_s - math.pi / 2)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2)])
    cdf /= cdf[-1]
    burst_start = np.interp(rng.random(n_bursts), cdf, grid)
    sizes = rng.geometric(1.0 / mean_burst, n_bursts)
    total = int(sizes.sum())
    fn = np.repeat(burst_fn, sizes)
    start = np.repeat(burst_start, sizes)
    # Offsets within each burst: cumulative exponential gaps, restarting at every burst.
    gaps = rng.exponential(burst_gap_s, total)
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    gaps[first] = 0.0
    csum = np.cumsum(gaps)
    offsets = csum - np.repeat(csum[first], sizes)
    t = start + offsets
    keep = t < duration_s
    t, fn = t[keep], fn[keep]
    order = np.argsort(t, kind="stable")
    names = [f"fn-{i:05d}" for i in range(functions)]
    return Trace(names, t[order].astype(np.float64), fn[order].astype(np.int32), float(duration_s))


def read_azure_csv(path: Path | str, *, duration_s: float | None = None, seed: int = 0) -> Trace:
    """Read an Azure Functions 2019 invocation CSV. Bad input raises ConfigError naming the line
    and field. `duration_s` keeps only the first minutes of the day."""
    path = Path(path)
    fh = _open(path)
    rng = np.random.default_rng(seed)
    names: list[str] = []
    times: list[np.ndarray] = []
    fns: list[np.ndarray] = []
    with fh:
        reader = csv.reader(_decoded(fh, path))
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"{path}: empty trace file")
        header = [h.strip() for h in header]
        if tuple(header[:4]) != AZURE_KEY_COLUMNS:
            raise ConfigError(f"{path}:1: header must start with {','.join(AZURE_KEY_COLUMNS)}, got {header[:4]}")
        minute_cols = header[4:]
        for j, col in enumerate(minute_cols, start=1):
            if col != str(j):
                raise ConfigError(f"{path}:1: minute column {j + 4} should be named {j!r}, got {col!r}")
        if not minute_cols:
            raise ConfigError(f"{path}:1: no minute columns")
        minutes = len(minute_cols)
        if duration_s is not None:
            minutes = min(minutes, max(1, math.ceil(duration_s / 60.0)))
        seen: set[str] = set()
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise ConfigError(f"{path}:{line}: expected {len(header)} fields, got {len(row)}")
            name = row[2].strip()
            if not name:
                raise ConfigError(f"{path}:{line}: field HashFunction is empty")
            if name in seen:
                raise ConfigError(f"{path}:{line}: function {name!r} appears twice")
            seen.add(name)
            cells = row[4:4 + minutes]
            joined = ",".join(cells)  # one C-speed check for the common, valid row (a quoted "1,2" is one cell)
            if joined.count(",") != len(cells) - 1 or not _COUNTS.fullmatch(joined):
                for j, cell in enumerate(cells, start=1):
                    _check_count(cell, f"{path}:{line}: minute {j}")
            counts = np.array(cells, dtype=np.int64)
            idx = len(names)
            names.append(name)
            total = int(counts.sum())
            if total:
                minute_of = np.repeat(np.arange(minutes, dtype=np.float64), counts)
                times.append((minute_of + rng.random(total)) * 60.0)
                fns.append(np.full(total, idx, dtype=np.int32))
    if not names:
        raise ConfigError(f"{path}: no functions in trace")
    end_s = float(minutes * 60) if duration_s is None else min(float(duration_s), minutes * 60.0)
    t = np.concatenate(times) if times else np.zeros(0)
    f = np.concatenate(fns) if fns else np.zeros(0, dtype=np.int32)
    keep = t < end_s
    t, f = t[keep], f[keep]
    order = np.argsort(t, kind="stable")
    return Trace(names, t[order], f[order].astype(np.int32), end_s)


def read_trace_csv(path: Path | str, *, duration_s: float | None = None, seed: int = 0,
                   functions: int = 1000) -> Trace:
    """Either format, told apart by the header."""
    path = Path(path)
    with _open(path) as fh:
        first = next(_decoded(fh, path), "")
    if first.strip().startswith(LLM_COLUMNS[0]):
        return read_azure_llm_csv(path, duration_s=duration_s, seed=seed, functions=functions)
    return read_azure_csv(path, duration_s=duration_s, seed=seed)


def _parse_timestamp(text: str) -> float:
    """Seconds since the epoch of "YYYY-MM-DD HH:MM:SS[.fffffff]" (ASCII digits, any number of
    fraction digits, at least one after a dot); ValueError otherwise."""
    from datetime import datetime, timezone

    m = _TIMESTAMP.fullmatch(text)
    if m is None:
        raise ValueError(text)
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    stamp = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()
    frac = m.group(7)
    return stamp + int(frac) / 10 ** len(frac) if frac else stamp


def _check_count(cell: str, where: str) -> int:
    """`cell` as a count, or ConfigError saying where and why."""
    if _COUNT.fullmatch(cell):
        return int(cell)
    if cell.startswith("-") and _COUNT.fullmatch(cell[1:]):
        raise ConfigError(f"{where}: negative count {cell}")
    raise ConfigError(f"{where}: {cell!r} is not an integer count (plain ASCII digits, at most {MAX_COUNT_DIGITS})")


def _open(path: Path) -> TextIO:
    """`path` for reading as UTF-8, a byte order mark dropped (spreadsheet exports write one)."""
    try:
        return path.open(newline="", encoding="utf-8-sig")
    except OSError as e:
        raise ConfigError(f"cannot read trace {path}: {e}") from e


def _decoded(fh: TextIO, path: Path) -> Iterator[str]:
    """The file's lines; bytes that are not UTF-8 become a ConfigError (near the line: decoding reads ahead)."""
    read = 0
    try:
        for text in fh:
            read += 1
            yield text
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text near line {read + 1} ({e.reason})") from None


def read_azure_llm_csv(path: Path | str, *, duration_s: float | None = None, seed: int = 0,
                       functions: int = 1000, popularity_sigma: float = 2.0) -> Trace:
    """Read an Azure LLM inference trace CSV; arrivals from the first request's timestamp, kept
    within `duration_s`. Bad input raises ConfigError naming the line and field."""
    path = Path(path)
    if functions < 1:
        raise ConfigError(f"functions must be >= 1, got {functions}")
    fh = _open(path)
    stamps: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    with fh:
        reader = csv.reader(_decoded(fh, path))
        header = [h.strip() for h in next(reader, [])]
        if tuple(header) != LLM_COLUMNS:
            raise ConfigError(f"{path}:1: header must be {','.join(LLM_COLUMNS)}, got {','.join(header)}")
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 3:
                raise ConfigError(f"{path}:{line}: expected 3 fields, got {len(row)}")
            try:
                stamps.append(_parse_timestamp(row[0]))
            except ValueError:
                raise ConfigError(f"{path}:{line}: TIMESTAMP {row[0]!r} is not 'YYYY-MM-DD HH:MM:SS.fff'") from None
            for name, cell, out in (("ContextTokens", row[1], prompt), ("GeneratedTokens", row[2], output)):
                if not _COUNT.fullmatch(cell):
                    raise ConfigError(f"{path}:{line}: {name} {cell!r} is not a non-negative integer "
                                      f"(plain ASCII digits, at most {MAX_COUNT_DIGITS})")
                out.append(int(cell))
    if not stamps:
        raise ConfigError(f"{path}: no requests in trace")
    t = np.array(stamps, dtype=np.float64)
    t -= t.min()
    order = np.argsort(t, kind="stable")
    t = t[order]
    p = np.array(prompt, dtype=np.int64)[order]  # 0 kept: no prefill
    o = np.array(output, dtype=np.int64)[order]  # 0 kept: the request is charged its prefill alone
    end_s = float(duration_s) if duration_s is not None else float(t[-1]) + 1.0
    keep = t < end_s
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, popularity_sigma, functions)
    fn = rng.choice(functions, size=int(keep.sum()), p=weights / weights.sum()).astype(np.int32)
    names = [f"fn-{i:05d}" for i in range(functions)]
    return Trace(names, t[keep], fn, end_s, prompt_tokens=p[keep], output_tokens=o[keep])


def write_llm_trace_csv(path: Path | str, *, requests: int, duration_s: float, seed: int = 0,
                        start: str = "2023-11-16 18:00:00", median_context: float = 1000.0,
                        median_generated: float = 200.0) -> Path:
    """A synthetic trace in the Azure LLM inference format: Poisson arrivals over `duration_s`,
    log-normal context and generated lengths (sigma 1.0 and 0.8)."""
    from datetime import datetime, timedelta, timezone

    path = Path(path)
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0.0, duration_s, requests))
    ctx = np.maximum(1, rng.lognormal(math.log(median_context), 1.0, requests)).astype(np.int64)
    gen = np.maximum(1, rng.lognormal(math.log(median_generated), 0.8, requests)).astype(np.int64)
    t0 = datetime.strptime(start, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
    with path.open("w", newline="") as fh:
        fh.write(",".join(LLM_COLUMNS) + "\n")
        for s, c, g in zip(t.tolist(), ctx.tolist(), gen.tolist(), strict=True):
            stamp = t0 + timedelta(seconds=s)
            fh.write(f"{stamp:%Y-%m-%d %H:%M:%S}.{stamp.microsecond:06d}0,{c},{g}\n")
    return path
