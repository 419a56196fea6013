"""`ember bench energy`: the live energy control loop, measured on the platform itself.

The same bounded, open-loop load (a fixed arrival schedule of `requests` chat requests at
`rate_rps`, fixed prompts, greedy, `max_tokens` each) runs twice: once with the workers in
`observe` mode (factory settings: 700 W, clocks unlocked: "max_power") and once in `actuate`
mode (the controller's decisions applied). Unless a URL is given, each run gets its own
`ember up` (Redis, gateway, workers) with emulated GPUs (ember.energy.emulated): their energy is
derived from the engine's steps and the calibration, never from CPU time, so the comparison
does not depend on how busy this machine's CPUs are (the tiny model's CPU forward passes only set
the pace of the token stream; the schedule fixes the load).

Per run: energy = the growth of the devices' energy counters (GET /v1/energy, read one heartbeat
after the load drained) from the start of the load to its end; J/token = energy / completion
tokens; TTFT and TPOT measured by the client through the gateway (streaming), SLO attainment
against the function's SLO; power, limit and SM clock sampled every second for the plot.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

WORDS = ("energy", "token", "cluster", "model", "power", "clock", "latency", "budget", "request", "GPU",
         "prefill", "decode", "batch", "cache", "watt", "joule", "serve", "function", "node", "load")


@dataclass
class EnergyBenchConfig:
    requests: int = 480
    rate_rps: float = 4.0
    max_tokens: int = 32
    prompt_words: int = 40
    simulated_gpus: int = 1
    params_b: float = 7.0  # emulated model size: every step is charged as a 7B bf16 model's
    # the tiny model's CPU time is most of what TTFT measures here, and 8 engineers share 2 cores:
    # a TTFT SLO of 3 s keeps contention from reading as an SLO risk (the emulated GPU's share is ms)
    ttft_ms: float = 3000.0
    tpot_ms: float = 200.0
    eta: float = 0.5
    warmup_requests: int = 6
    heartbeat_interval_s: float = 0.5
    seed: int = 0
    function: str = "tiny"


def run_energy_bench(cfg: EnergyBenchConfig, *, url: str | None = None, api_key: str | None = None,
                     log: Any = print) -> dict[str, Any]:
    """Both runs; returns the JSON document ({"runs": {"max_power": ..., "actuate": ...}, ...})."""
    runs: dict[str, Any] = {}
    for name, mode in (("max_power", "observe"), ("actuate", "actuate")):
        log(f"{name}: {cfg.requests} requests at {cfg.rate_rps}/s, {cfg.max_tokens} tokens each ({mode} mode)")
        if url is None:
            runs[name] = _run_on_own_platform(cfg, mode, log)
        else:
            runs[name] = asyncio.run(_run_load(cfg, url, api_key or "", deploy=False))
        r = runs[name]
        log(f"{name}: {r['joules_per_token']:.3f} J/token, {r['energy_j']:.0f} J, SLO {r['slo_attainment']:.4f}, "
            f"p99 TTFT {r['p99_ttft_s'] * 1000:.1f} ms, p99 TPOT {r['p99_tpot_s'] * 1000:.2f} ms")
    base, act = runs["max_power"]["joules_per_token"], runs["actuate"]["joules_per_token"]
    return {
        "runs": runs,
        "savings_j_per_token": round(1 - act / base, 4) if base > 0 else None,
        "config": asdict(cfg),
        "url": url,
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }


def _run_on_own_platform(cfg: EnergyBenchConfig, mode: str, log: Any) -> dict[str, Any]:
    from ember.config import Settings, new_secret
    from ember.platform.redis_server import free_port
    from ember.platform.supervisor import Platform, UpOptions

    with tempfile.TemporaryDirectory(prefix="ember-energy-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        admin = new_secret()
        env = {"EMBER_SIMULATED_GPUS": str(cfg.simulated_gpus), "EMBER_ENERGY_MODE": mode,
               "EMBER_SIMULATED_PARAMS_B": str(cfg.params_b),
               "EMBER_HEARTBEAT_INTERVAL_S": str(cfg.heartbeat_interval_s), "EMBER_AUTOSCALER_INTERVAL_S": "0.5"}
        settings = Settings(admin_key=admin, data_dir=data_dir, redis_url=None, store_url=None)
        platform = Platform(UpOptions(port=free_port(), workers=1, data_dir=data_dir, demo=True, extra_env=env),
                            settings)
        try:
            platform.start(echo=lambda s: None)
            return asyncio.run(_run_load(cfg, platform.url, admin, deploy=True))
        finally:
            platform.stop()


async def _run_load(cfg: EnergyBenchConfig, url: str, key: str, *, deploy: bool) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        if deploy:
            resp = await client.put(f"/v1/functions/{cfg.function}", json={
                "checkpoint": cfg.function, "slo": {"ttft_ms": cfg.ttft_ms, "tpot_ms": cfg.tpot_ms},
                "scaling": {"min_instances": cfg.simulated_gpus, "max_instances": cfg.simulated_gpus,
                            "keep_alive_s": 3600,
                            "target_concurrency": 64},
                "energy": {"eta": cfg.eta}})
            resp.raise_for_status()
        spec = (await client.get(f"/v1/functions/{cfg.function}")).json()
        ttft_slo, tpot_slo = spec["slo"]["ttft_ms"] / 1000, spec["slo"]["tpot_ms"] / 1000
        rng = random.Random(cfg.seed)
        prompts = [" ".join(rng.choice(WORDS) for _ in range(cfg.prompt_words)) for _ in range(cfg.requests)]
        for i in range(cfg.warmup_requests):  # the cold start and the first requests are not measured
            await _one(client, cfg, prompts[i % len(prompts)])
        await asyncio.sleep(2 * cfg.heartbeat_interval_s + 0.5)
        start = await _energy(client)
        timeline: list[dict[str, Any]] = []
        decisions: dict[tuple[str, str, float], dict[str, Any]] = {}
        done = asyncio.Event()
        t0 = time.monotonic()
        sampler = asyncio.create_task(_sample(client, t0, timeline, decisions, done))
        tasks = [asyncio.create_task(_scheduled(client, cfg, p, t0 + i / cfg.rate_rps))
                 for i, p in enumerate(prompts)]
        results = await asyncio.gather(*tasks)
        duration = time.monotonic() - t0
        await asyncio.sleep(2 * cfg.heartbeat_interval_s + 0.5)  # the last steps reach the snapshots
        end = await _energy(client)
        done.set()
        await sampler
        _collect_decisions(end, decisions)
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    energy_j = sum(max(0.0, end["energy"].get(k, 0.0) - v) for k, v in start["energy"].items())
    met = sum(1 for r in ok if r["ttft_s"] <= ttft_slo and r["tpot_s"] <= tpot_slo)
    applied = sorted((d for d in decisions.values() if d.get("applied")), key=lambda d: (d["device"], d["at_s"]))
    return {
        "joules_per_token": round(energy_j / tokens, 4) if tokens else 0.0,
        "energy_j": round(energy_j, 1),
        "slo_attainment": round(met / len(results), 4) if results else 0.0,
        "p99_ttft_s": round(_p99([r["ttft_s"] for r in ok]), 4),
        "p99_tpot_s": round(_p99([r["tpot_s"] for r in ok]), 5),
        "requests": len(results),
        "failed": len(results) - len(ok),
        "tokens": tokens,
        "duration_s": round(duration, 2),
        "modes": sorted({d["mode"] for d in end["devices"]}),
        "decisions": applied,
        "timeline": timeline,
    }


async def _scheduled(client: httpx.AsyncClient, cfg: EnergyBenchConfig, prompt: str, at: float) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    return await _one(client, cfg, prompt)


async def _one(client: httpx.AsyncClient, cfg: EnergyBenchConfig, prompt: str) -> dict[str, Any]:
    body = {"model": cfg.function, "messages": [{"role": "user", "content": prompt}], "max_tokens": cfg.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    t_first: float | None = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return {"ok": False, "status": resp.status_code}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"ok": False, "status": 500}
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                for ch in chunk.get("choices", []):
                    if ch.get("delta", {}).get("content") and t_first is None:
                        t_first = time.monotonic()
    except httpx.HTTPError:
        return {"ok": False, "status": 0}
    t_end = time.monotonic()
    t_first = t_first or t_end
    return {"ok": True, "ttft_s": t_first - t0, "tpot_s": (t_end - t_first) / max(1, tokens - 1), "tokens": tokens}


async def _energy(client: httpx.AsyncClient) -> dict[str, Any]:
    body = (await client.get("/v1/energy")).json()
    devices = body.get("devices", [])
    return {"devices": devices,
            "energy": {f"{d['node']}/{d['device']}": float(d.get("energy_j") or 0.0) for d in devices}}


async def _sample(client: httpx.AsyncClient, t0: float, timeline: list[dict[str, Any]],
                  decisions: dict[tuple[str, str, float], dict[str, Any]], done: asyncio.Event) -> None:
    while not done.is_set():
        try:
            snap = await _energy(client)
        except (httpx.HTTPError, ValueError):
            snap = None
        if snap is not None:
            timeline.append({"t_s": round(time.monotonic() - t0, 2), "devices": {
                f"{d['node']}/{d['device']}": {"power_w": d.get("power_w"), "limit_w": d.get("limit_w"),
                                               "cap_w": d.get("cap_w"), **_clocks(d)}
                for d in snap["devices"]}})
            _collect_decisions(snap, decisions)
        try:
            await asyncio.wait_for(done.wait(), 1.0)
        except asyncio.TimeoutError:
            pass


def _clocks(d: dict[str, Any]) -> dict[str, Any]:
    """The decode and prefill SM clocks a device runs at (with per-phase clocks the device's own
    reading alternates between the two, so a sample of it says little; None: unlocked)."""
    from ember.energy.simulated import MAX_SM_CLOCK_MHZ

    top = MAX_SM_CLOCK_MHZ  # unlocked: the emulated H100's top clock
    if d.get("mode") != "actuate":
        return {"sm_clock_mhz": d.get("sm_clock_mhz"), "decode_sm_clock_mhz": d.get("sm_clock_mhz"),
                "prefill_sm_clock_mhz": d.get("sm_clock_mhz")}
    decode, prefill = d.get("recommended_sm_clock_mhz"), d.get("prefill_sm_clock_mhz")
    return {"sm_clock_mhz": d.get("sm_clock_mhz"), "decode_sm_clock_mhz": top if decode is None else decode,
            "prefill_sm_clock_mhz": top if prefill is None else prefill}


def _collect_decisions(snap: dict[str, Any], out: dict[tuple[str, str, float], dict[str, Any]]) -> None:
    for d in snap["devices"]:
        dev = f"{d['node']}/{d['device']}"
        for dec in d.get("decisions") or []:
            out[(dev, dec["reason"], dec["at_s"])] = {"device": dev, **dec}


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def plot_energy_bench(doc: dict[str, Any], path: Path) -> None:
    """Power (with limit) and SM clock over time, both runs, one line per device."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_c) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, style in (("max_power", "-"), ("actuate", "--")):
        run = doc["runs"][name]
        devices = sorted({k for s in run["timeline"] for k in s["devices"]})
        for dev in devices:
            pts = [(s["t_s"], s["devices"][dev]) for s in run["timeline"] if dev in s["devices"]]
            ts = [t for t, _ in pts]
            ax_p.plot(ts, [v["power_w"] or 0 for _, v in pts], style, label=f"{name} {dev} power")
            ax_p.plot(ts, [v["limit_w"] or 0 for _, v in pts], style, alpha=0.4, label=f"{name} {dev} limit")
            ax_c.plot(ts, [v["decode_sm_clock_mhz"] or 0 for _, v in pts], style, label=f"{name} {dev} decode")
            ax_c.plot(ts, [v["prefill_sm_clock_mhz"] or 0 for _, v in pts], style, alpha=0.5,
                      label=f"{name} {dev} prefill")
    ax_p.set_ylabel("W")
    ax_c.set_ylabel("SM clock MHz")
    ax_c.set_xlabel("seconds since the load started")
    mp, ac = doc["runs"]["max_power"], doc["runs"]["actuate"]
    ax_p.set_title(f"max_power {mp['joules_per_token']:.2f} J/token, actuate {ac['joules_per_token']:.2f} J/token "
                   f"(SLO {mp['slo_attainment']:.3f} / {ac['slo_attainment']:.3f})")
    ax_p.legend(fontsize=7)
    ax_c.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
