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
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ember.errors import BadRequest, EmberError

SCENARIOS = {"steady": ["SteadyUser"], "cold": ["ColdUser"], "burst": ["BurstUser"],
             "tenants": ["FloodTenant", "SteadyTenant"]}
MAX_USERS = 256
MAX_DURATION_S = 600.0
DRAM_BLOCK_BYTES = 2 << 20  # the DRAM tier's block (ember/loader/dram.py)


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

    validate(opts)
    locustfile = locustfile_path()
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("samples.jsonl", "summary.json", "locust.json"):
        (opts.out_dir / stale).unlink(missing_ok=True)
    conditions: dict[str, Any] = {"started": time.time(), "cpus": os.cpu_count(), "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="ember-loadtest-") as tmp:
        target = _Target.own(opts, Path(tmp), echo) if opts.url is None else _Target.given(opts)
        try:
            plan = target.prepare(opts, echo)
            conditions["loadavg_at_locust_start"] = os.getloadavg()
            code = _run_locust(opts, locustfile, target.url, plan, progress)
            conditions["loadavg_at_locust_end"] = os.getloadavg()
            conditions.update(target.facts)
            _write_run_facts(opts, plan, conditions)
            if opts.baseline and target.model_dir is not None:
                echo("timing from_pretrained + the same prompt (the usual way) on the idle machine")
                _write_baseline(target.model_dir, opts)
        finally:
            target.close(echo)
    summary = write_reports(opts.scenario, opts.out_dir)
    return LoadTestResult(summary, opts.out_dir, code)


# --- the platform under test ----------------------------------------------------------------------
class _Target:
    """The gateway under test, what was deployed on it, and how to take it all down."""

    def __init__(self, url: str, admin_key: str, platform: Any = None) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=120)
        self.admin_key = admin_key
        self.platform = platform
        self.checkpoints: list[str] = []
        self.model_dir: Path | None = None
        self.functions: list[str] = []
        self.key_ids: list[str] = []
        self.facts: dict[str, Any] = {"url": url}

    @classmethod
    def given(cls, opts: LoadTestOptions) -> _Target:
        key = opts.api_key or os.environ.get("EMBER_API_KEY", "")
        if not key:
            raise BadRequest("--url needs an admin key: --api-key or EMBER_API_KEY", code="missing_api_key")
        target = cls(opts.url or "", key)
        target.checkpoints = [opts.checkpoint]
        return target

    @classmethod
    def own(cls, opts: LoadTestOptions, tmp: Path, echo: Callable[[str], None]) -> _Target:
        from ember.config import Settings
        from ember.loader import open_store
        from ember.platform.redis_server import free_port
        from ember.platform.supervisor import Platform, UpOptions

        data_dir = tmp / "data"
        store_url = f"file://{data_dir / 'store'}"
        count = opts.checkpoints if opts.scenario == "cold" else 1
        models = _make_models(tmp / "models", count, opts.hidden, opts.layers, echo)
        store = open_store(store_url)
        names = []
        for i, model_dir in enumerate(models):
            names.append(f"lt-ck-{i}")
            store.push(model_dir, names[-1])
        model_bytes = sum(f.stat().st_size for f in models[0].glob("*.safetensors"))
        disk_bytes = sum(f.stat().st_size for f in (data_dir / "store" / names[0]).rglob("*") if f.is_file())
        env = {"EMBER_STORE_URL": store_url, "EMBER_AUTOSCALER_INTERVAL_S": "0.2",
               "EMBER_HEARTBEAT_INTERVAL_S": "0.5", **_tier_env(opts, model_bytes, disk_bytes), **opts.extra_env}
        admin = "lt-" + secrets.token_urlsafe(18)
        port = free_port()
        platform = Platform(UpOptions(port=port, workers=opts.workers, data_dir=data_dir, demo=False,
                                      extra_env=env), Settings(admin_key=admin, store_url=store_url, data_dir=data_dir))
        echo(f"starting a private platform on {platform.url} ({opts.workers} workers; "
             f"{count} checkpoint(s) of {model_bytes / 1e6:.1f} MB)")
        target = cls(platform.url, admin, platform)
        target.checkpoints, target.model_dir = names, models[0]
        target.facts.update(workers=opts.workers, model_bytes=model_bytes, checkpoints=names, node_env=env)
        try:
            platform.start(echo=lambda s: None)
        except BaseException:
            target.close(echo)
            raise
        return target

    def prepare(self, opts: LoadTestOptions, echo: Callable[[str], None]) -> dict[str, Any]:
        """Deploy the scenario's functions (and keys); warm or idle them as it needs; the plan for locust."""
        plan: dict[str, Any] = {"scenario": opts.scenario, "max_tokens": opts.max_tokens, "prompt": opts.prompt,
                                "rate_per_user": opts.rate_per_user, "burst_period_s": opts.burst_period_s,
                                "max_requests": opts.max_requests, "keys": {"default": self.admin_key}}
        short = {"keep_alive_s": opts.keep_alive_s}
        if opts.scenario == "cold":
            fns = [(f"lt-cold-{i}-{j}", ck, {**short, "max_instances": 1, "target_concurrency": 1})
                   for i, ck in enumerate(self.checkpoints) for j in range(opts.functions_per_checkpoint)]
        elif opts.scenario == "burst":
            count = min(opts.burst_functions, opts.users)
            per_fn = -(-opts.users // count)
            fns = [(f"lt-burst-{i}", self.checkpoints[0], {**short, "max_instances": 2,
                                                             "target_concurrency": max(1, -(-per_fn // 2))})
                   for i in range(count)]
        else:
            fns = [(f"lt-{opts.scenario}", self.checkpoints[0], {"keep_alive_s": 600.0, "max_instances": 2,
                                                                  "target_concurrency": max(4, opts.users // 2)})]
        for name, ck, scaling in fns:
            self._deploy(name, ck, scaling)
        plan["functions"] = [name for name, _, _ in fns]
        echo(f"deployed {len(fns)} function(s): {', '.join(plan['functions'][:4])}{' ...' if len(fns) > 4 else ''}")
        if opts.scenario == "tenants":
            for tenant in ("flood", "steady"):
                r = self.http.post("/v1/keys", json={"role": "invoker", "name": f"lt-{tenant}"})
                _check(r, f"creating the {tenant} tenant's key")
                self.key_ids.append(r.json()["id"])
                plan["keys"][tenant] = r.json()["key"]
        if opts.scenario in ("steady", "tenants", "burst"):
            for name in plan["functions"]:
                self._call(name)  # steady and tenants start warm; burst starts with its checkpoint cached
        if opts.scenario == "burst":
            echo("waiting for every function to scale to zero")
            self._wait_scaled_to_zero(plan["functions"], timeout_s=opts.keep_alive_s + 60)
        return plan

    def _deploy(self, name: str, checkpoint: str, scaling: dict[str, Any]) -> None:
        r = self.http.put(f"/v1/functions/{name}", json={"checkpoint": checkpoint,
                                                          "scaling": {"min_instances": 0, **scaling}})
        _check(r, f"deploying {name}")
        self.functions.append(name)

    def _call(self, function: str) -> None:
        r = self.http.post("/v1/chat/completions", json={
            "model": function, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        _check(r, f"warming {function}")

    def _wait_scaled_to_zero(self, functions: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(not self.http.get(f"/v1/functions/{f}").json().get("instances") for f in functions):
                return
            time.sleep(0.2)
        raise EmberError(f"the functions did not scale to zero within {timeout_s:.0f}s (is keep_alive honoured?)")

    def close(self, echo: Callable[[str], None]) -> None:
        """Delete what this run made on a given platform, or stop the private one."""
        try:
            if self.platform is not None:
                echo("stopping the private platform")
                self.platform.stop()
                return
            for name in self.functions:
                self.http.delete(f"/v1/functions/{name}")
            for key_id in self.key_ids:
                self.http.delete(f"/v1/keys/{key_id}")
        except httpx.HTTPError as e:
            echo(f"cleanup incomplete: {e}")
        finally:
            self.http.close()


def _check(r: httpx.Response, what: str) -> None:
    if r.status_code >= 300:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        raise EmberError(f"{what} failed: HTTP {r.status_code}: {message}")


def _make_models(root: Path, count: int, hidden: int | None, layers: int | None,
                 echo: Callable[[str], None]) -> list[Path]:
    """`count` models like `ember model tiny [--hidden --layers]`, one seed each (distinct checkpoints)."""
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    base = TinyModelSpec()
    h = hidden or base.hidden
    kw: dict[str, Any] = {"hidden": h, "layers": layers or base.layers}
    if hidden:  # as `ember model tiny` sizes the heads
        kw.update(heads=max(1, h // 64) if h >= 256 else 4, kv_heads=max(1, h // 64) if h >= 256 else 2)
    echo(f"making {count} model(s) (ember model tiny, hidden {h}, layers {kw['layers']})")
    return [make_tiny_model(root / f"m{i}", TinyModelSpec(seed=i, **kw)) for i in range(count)]


def _tier_env(opts: LoadTestOptions, model_bytes: int, disk_bytes: int) -> dict[str, str]:
    """Node tier sizes. For `cold`: DRAM for the instances the node can run plus one more
    checkpoint, SSD for about halfway between that and all of them, so that calls spread over the
    checkpoints hit DRAM, the SSD and the store (EMBER_CPU_SLOTS sets the instances per node)."""
    block = -(-model_bytes // DRAM_BLOCK_BYTES) * DRAM_BLOCK_BYTES
    slots = int(os.environ.get("EMBER_CPU_SLOTS", "2"))
    if opts.scenario != "cold":
        return {"EMBER_DRAM_CAPACITY_BYTES": str(max(1 << 30, (slots + 1) * block))}
    dram_held = slots + 1
    ssd = max(dram_held + 1, (opts.checkpoints + dram_held) // 2) * (disk_bytes + (1 << 20))
    return {"EMBER_DRAM_CAPACITY_BYTES": str((slots + 1) * block), "EMBER_SSD_CAPACITY_BYTES": str(ssd)}


def _write_run_facts(opts: LoadTestOptions, plan: dict[str, Any], conditions: dict[str, Any]) -> None:
    """run.json: what ran, on what, under which machine load (the summary stays exactly its fields)."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items() if k != "api_key"}
    from ember.platform.loadtest_report import percentile, read_samples

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
