"""`ember bench coldstart`: cold-start latency of a real local platform (Redis, gateway, one
worker) by load tier, side by side with `from_pretrained` of the same model in the same run.

Each round deploys a fresh copy of the model (so the first call must come from the store), calls it
(cold, remote), calls it again (warm), waits for the autoscaler to unload it after keep_alive_s, and
calls it once more (cold, from the node's DRAM tier).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from ember.config import Settings


def run_coldstart_bench(out_json: Path, *, hidden: int = 256, layers: int = 4, rounds: int = 3,
                        plot: Path | None = None, progress: Any = None) -> dict[str, Any]:
    from ember.loader import open_store
    from ember.platform.redis_server import free_port
    from ember.platform.supervisor import Platform, UpOptions
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    with tempfile.TemporaryDirectory(prefix="ember-coldstart-") as tmp:
        data_dir = Path(tmp) / "data"
        heads = max(1, hidden // 64)
        model_dir = make_tiny_model(Path(tmp) / "model", TinyModelSpec(hidden=hidden, layers=layers, heads=heads,
                                                                       kv_heads=heads))
        model_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
        store_url = f"file://{data_dir / 'store'}"
        store = open_store(store_url)
        for i in range(rounds):
            store.push(model_dir, f"cs-{i}")
        baseline = _from_pretrained_s(model_dir, rounds)
        port = free_port()
        admin = "bench-admin-key"
        settings = Settings(admin_key=admin, store_url=store_url, data_dir=data_dir)
        platform = Platform(UpOptions(port=port, workers=1, data_dir=data_dir, demo=False, extra_env={
            "EMBER_AUTOSCALER_INTERVAL_S": "0.2", "EMBER_DRAM_CAPACITY_BYTES": str(max(256 << 20, 4 * model_bytes)),
            "EMBER_STORE_URL": store_url}), settings)
        results: dict[str, list[dict[str, float]]] = {"remote": [], "warm": [], "dram": []}
        try:
            platform.start(echo=lambda s: None)
            h = {"Authorization": f"Bearer {admin}"}
            url = platform.url
            for i in range(rounds):
                fn = f"cs-{i}"
                r = httpx.put(f"{url}/v1/functions/{fn}", headers=h, timeout=120,
                              json={"checkpoint": fn, "scaling": {"keep_alive_s": 0.5}})
                r.raise_for_status()
                for expect in ("remote", "warm"):
                    results[expect].append(_call(url, h, fn))
                _wait_unloaded(url, h, fn)
                results["dram"].append(_call(url, h, fn))
                if progress:
                    progress(i + 1, rounds)
        finally:
            platform.stop()
    summary: dict[str, Any] = {
        "model_bytes": model_bytes, "hidden": hidden, "layers": layers, "rounds": rounds,
        "results": {tier: {"startup_ms": statistics.median(x["startup_ms"] for x in runs),
                           "ttft_ms": statistics.median(x["ttft_ms"] for x in runs),
                           "tiers_seen": sorted({x["tier"] for x in runs}), "all": runs}
                    for tier, runs in results.items()},
        "baseline": {"from_pretrained_ms": statistics.median(baseline) * 1000,
                     "all_ms": [b * 1000 for b in baseline]},
        "counted": "startup_ms: worker-side, from the load request to a ready instance (tier read, model built "
                   "on meta and given the tensors); ttft_ms: client-side, request sent to first token, through "
                   "the gateway (routing + cold start + prefill). from_pretrained_ms: "
                   "AutoModelForCausalLM.from_pretrained of the same HF directory in this process plus a read of "
                   "every 4 KiB page of the weights, page cache warm, imports excluded. The platform's start-up (processes, imports, DRAM pool) is not counted.",
    }
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(summary, indent=2))
    if plot is not None:
        _plot(summary, plot)
    return summary


def _call(url: str, headers: dict[str, str], fn: str) -> dict[str, Any]:
    body = {"model": fn, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, "stream": True,
            "temperature": 0}
    t0 = time.perf_counter()
    ttft = None
    with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, json=body, timeout=300) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if '"content"' in line and ttft is None and '"content": ""' not in line:
                ttft = time.perf_counter() - t0
        total = time.perf_counter() - t0
        return {"tier": resp.headers["x-ember-load-tier"], "cold": resp.headers["x-ember-cold-start"] == "true",
                "startup_ms": float(resp.headers["x-ember-startup-ms"]), "ttft_ms": (ttft or total) * 1000}


def _wait_unloaded(url: str, headers: dict[str, str], fn: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not httpx.get(f"{url}/v1/functions/{fn}", headers=headers).json()["instances"]:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{fn} was not unloaded within {timeout_s}s")


def _from_pretrained_s(model_dir: Path, rounds: int) -> list[float]:
    """from_pretrained plus a read of every 4 KiB page of the weights (safetensors maps the file
    lazily, so without the touch the bytes would not have been loaded yet)."""
    import torch
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir)  # imports and first-use costs excluded
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with torch.no_grad():
            for p in model.parameters():
                flat = p.detach().reshape(-1)
                step = max(1, 4096 // flat.element_size())
                float(flat[::step].sum())
        times.append(time.perf_counter() - t0)
    return times


def _plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["remote (cold)", "dram (cold)", "warm", "from_pretrained"]
    r = summary["results"]
    values = [r["remote"]["ttft_ms"], r["dram"]["ttft_ms"], r["warm"]["ttft_ms"],
              summary["baseline"]["from_pretrained_ms"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, values, color=["#c44", "#e93", "#4a4", "#888"])
    ax.set_ylabel("ms (TTFT through the gateway; baseline: load only)")
    ax.set_title(f"Ember cold start, {summary['model_bytes'] / 1e6:.0f} MB model, median of {summary['rounds']}")
    fig.tight_layout()
    fig.savefig(path)
    os.sync()
