"""`ember loadtest SCENARIO`: a headless locust run (loadtests/locustfile.py) in its own process,
bounded in users, time and request count, against a URL the user gives or a private `ember up`
started here on a free port (and stopped afterwards). Deploys what the scenario needs, runs it,
writes locust's CSV, HTML and JSON, `summary.json` and `ttft.png` (ember/platform/loadtest_report.py).

Scenarios (see the locustfile): `steady`, `cold`, `burst`, `tenants`. With its own platform, `cold`
pushes several checkpoints made with `ember model tiny` (one seed each, so each is its own
checkpoint) and deploys several functions over each, kept alive shorter than their gaps, on nodes
whose DRAM and SSD tiers hold fewer checkpoints than the scenario cycles through: cold starts come
from the store (`remote`), the SSD tier and the DRAM tier. Against a given URL the scenarios deploy
over an existing checkpoint (`--checkpoint`, default the demo `tiny`) and delete what they made.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import BadRequest, EmberError

SCENARIOS = {"steady": ["SteadyUser"], "cold": ["ColdUser"], "burst": ["BurstUser"],
             "tenants": ["FloodTenant", "SteadyTenant"]}
MAX_USERS = 256
MAX_DURATION_S = 600.0


@dataclass
class LoadTestOptions:
    """What one `ember loadtest` run does."""

    scenario: str
    out_dir: Path
    url: str | None = None  # None: start a private platform here
    api_key: str | None = None  # with url: an admin key (deploys functions, creates tenant keys)
    users: int = 8
    spawn_rate: float | None = None  # default: all at once for burst, else users/2 per s
    duration_s: float = 60.0
    max_requests: int = 10000
    max_tokens: int = 16
    prompt: str = "Tell me a story"
    rate_per_user: float = 1.0  # steady and the steady tenant: requests/s per user
    workers: int = 2  # own platform only
    hidden: int | None = None  # own platform: `ember model tiny --hidden/--layers`; None: the tiny defaults
    layers: int | None = None
    checkpoints: int = 6  # cold: distinct checkpoints made and pushed (own platform)
    functions_per_checkpoint: int = 2
    keep_alive_s: float = 0.5  # cold and burst functions
    burst_period_s: float = 8.0
    burst_functions: int = 4  # burst: functions the users spread over
    flood_rpm: int = 600  # tenants: the flooding tenant's key limit, requests/minute (0: none)
    checkpoint: str = "tiny"  # with url: the checkpoint every function uses
    baseline: bool = False  # own platform: time from_pretrained + the same prompt in this run
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass
class LoadTestResult:
    summary: dict[str, Any]
    out_dir: Path
    locust_exit_code: int


def parse_duration_s(text: str) -> float:
    """'60s', '2m', '1m30s', '90' -> seconds."""
    total, num, seen = 0.0, "", False
    for ch in text.strip().lower():
        if ch.isdigit() or ch == ".":
            num += ch
        elif ch in "hms" and num:
            total += float(num) * {"h": 3600, "m": 60, "s": 1}[ch]
            num, seen = "", True
        else:
            raise BadRequest(f"cannot read the duration {text!r} (e.g. 60s, 2m, 1m30s)", code="invalid_duration")
    if num:
        total += float(num)
    elif not seen:
        raise BadRequest(f"cannot read the duration {text!r} (e.g. 60s, 2m, 1m30s)", code="invalid_duration")
    return total


def locustfile_path() -> Path:
    """loadtests/locustfile.py of this source tree (or EMBER_LOADTESTS_DIR)."""
    root = Path(os.environ.get("EMBER_LOADTESTS_DIR") or Path(__file__).resolve().parents[2] / "loadtests")
    path = root / "locustfile.py"
    if not path.is_file():
        raise EmberError(f"no locustfile at {path}: run from a source checkout or set EMBER_LOADTESTS_DIR")
    return path


def validate(opts: LoadTestOptions) -> None:
    if opts.scenario not in SCENARIOS:
        raise BadRequest(f"unknown scenario {opts.scenario!r}; one of {', '.join(SCENARIOS)}", code="invalid_scenario")
    if not 1 <= opts.users <= MAX_USERS:
        raise BadRequest(f"users must be 1-{MAX_USERS}", code="invalid_users")
    if not 1 <= opts.duration_s <= MAX_DURATION_S:
        raise BadRequest(f"duration must be 1-{MAX_DURATION_S:.0f} s", code="invalid_duration")
    if opts.spawn_rate is not None and not 0 < opts.spawn_rate <= MAX_USERS:
        raise BadRequest(f"spawn rate must be in (0, {MAX_USERS}] users/s", code="invalid_spawn_rate")
    if not 1 <= opts.burst_functions <= 64 or not 1 <= opts.checkpoints <= 64:
        raise BadRequest("burst functions and checkpoints must be 1-64", code="invalid_bounds")
    if not 1 <= opts.max_requests <= 1_000_000 or not 1 <= opts.max_tokens <= 4096:
        raise BadRequest("max requests must be 1-1000000 and max tokens 1-4096", code="invalid_bounds")
    if opts.url is not None and not opts.url.startswith(("http://", "https://")):
        raise BadRequest(f"--url must be http:// or https://, not {opts.url!r}", code="invalid_url")
    if opts.scenario == "tenants" and opts.users < 2:
        raise BadRequest("tenants needs at least 2 users (one flooding, one steady)", code="invalid_users")


def run_loadtest(opts: LoadTestOptions, echo: Callable[[str], None] = print,
                 progress: Callable[[float, int, int], None] | None = None) -> LoadTestResult:
    """Run one scenario end to end; `progress(elapsed_s, requests, failures)` is called about once a second."""
    from ember.platform.loadtest_report import write_reports
    from ember.platform.loadtest_target import TargetPlatform

    validate(opts)
    locustfile = locustfile_path()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("samples.jsonl", "summary.json", "locust.json", "run.json", "baseline.json", "tenants.json"):
        (opts.out_dir / stale).unlink(missing_ok=True)
    conditions: dict[str, Any] = {"started": time.time(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="ember-loadtest-") as tmp:
        target = TargetPlatform.own(opts, Path(tmp), echo) if opts.url is None else TargetPlatform.given(opts)
        try:
            plan = target.prepare(opts, echo)
            conditions["loadavg_at_locust_start"] = os.getloadavg()
            code = _run_locust(opts, locustfile, target.url, plan, progress)
            conditions["loadavg_at_locust_end"] = os.getloadavg()
            conditions.update(target.facts)
            _write_run_facts(opts, plan, conditions)
            if opts.baseline and target.model_dir is not None:
                echo("timing from_pretrained + the same prompt (the usual way) while the platform idles")
                _write_baseline(target.model_dir, opts)
        finally:
            target.close(echo)
    summary = write_reports(opts.scenario, opts.out_dir)
    return LoadTestResult(summary, opts.out_dir, code)


def _write_run_facts(opts: LoadTestOptions, plan: dict[str, Any], conditions: dict[str, Any]) -> None:
    """run.json: what ran, on what, under which machine load (the summary stays exactly its fields)."""
    from ember.platform.loadtest_report import percentile, read_samples

    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items() if k != "api_key"}
    samples = read_samples(opts.out_dir / "samples.jsonl")
    startup = {}
    for tier in sorted({s["tier"] for s in samples if s["cold"]}):
        ms = [s["startup_ms"] for s in samples if s["cold"] and s["tier"] == tier]
        startup[tier] = {"count": len(ms), "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99)}
    facts = {"options": options, "functions": plan["functions"], "startup_ms_by_tier": startup, **conditions}
    (opts.out_dir / "run.json").write_text(json.dumps(facts, indent=2) + "\n")


# --- locust -----------------------------------------------------------------------------------------
def _run_locust(opts: LoadTestOptions, locustfile: Path, url: str, plan: dict[str, Any],
                progress: Callable[[float, int, int], None] | None) -> int:
    out = opts.out_dir
    prefix = out / "locust"
    spawn_rate = opts.spawn_rate or (opts.users if opts.scenario == "burst" else max(1.0, opts.users / 2))
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile), *SCENARIOS[opts.scenario], "--headless",
           "--host", url, "-u", str(opts.users), "-r", str(spawn_rate), "-t", f"{opts.duration_s:.0f}s",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--json-file", str(prefix), "--stop-timeout", "30",
           "--only-summary", "--loglevel", "WARNING"]
    env = {**os.environ, "EMBER_LOAD_PLAN": json.dumps(plan), "EMBER_LOAD_SAMPLES": str(out / "samples.jsonl")}
    with open(out / "locust.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    t0 = time.monotonic()
    hard_deadline = t0 + opts.duration_s + 90  # locust's own -t, its stop timeout, start and reports
    try:
        while proc.poll() is None:
            if time.monotonic() > hard_deadline:
                raise EmberError(f"locust ran past {opts.duration_s + 90:.0f}s; see {out / 'locust.log'}")
            if progress is not None:
                progress(time.monotonic() - t0, *_live_counts(prefix))
            time.sleep(1.0)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if progress is not None:
        progress(time.monotonic() - t0, *_live_counts(prefix))
    if proc.returncode not in (0, 1) or not (out / "locust.json").exists():
        tail = (out / "locust.log").read_text(errors="replace")[-2000:]
        raise EmberError(f"locust exited with {proc.returncode}:\n{tail}")
    return proc.returncode


def _live_counts(prefix: Path) -> tuple[int, int]:
    """Requests and failures so far, from locust's stats CSV (rewritten every couple of seconds)."""
    try:
        lines = (prefix.parent / f"{prefix.name}_stats.csv").read_text().splitlines()
    except OSError:
        return 0, 0
    requests = failures = 0
    for line in lines[1:]:
        cols = line.split(",")
        if len(cols) > 3 and cols[0] not in ("", "Aggregated") and not cols[0].startswith("LLM"):
            try:
                requests += int(cols[2])
                failures += int(cols[3])
            except ValueError:
                continue
    return requests, failures


# --- the usual way, for comparison --------------------------------------------------------------------
def _write_baseline(model_dir: Path, opts: LoadTestOptions, rounds: int = 5) -> None:
    """from_pretrained + the same prompt's first token, in a fresh process (imports excluded)."""
    out = opts.out_dir / "baseline.json"
    code = subprocess.run([sys.executable, "-m", "ember.platform.loadtest_baseline", str(model_dir), str(out),
                           opts.prompt, str(rounds)], timeout=900).returncode
    if code != 0:
        raise EmberError(f"the from_pretrained baseline failed with exit code {code}")
