"""The `serving` section of scripts/gpu_check.py (issue 11): Ember's real serving path on the GPU.

1. real_path: `ember model tiny` pushed to a file store, `NodeTiers.load(device=DEV)` ->
   `ModelInstance.from_loaded` -> the batching engine: greedy text equals the same path on CPU,
   a seeded request repeats, and after unload the device holds no more memory than before.
2. worker_http: the same through the worker's HTTP app (uvicorn, a private Redis, the placement
   claim), when fastapi/uvicorn/redis and a redis-server binary are importable/present here
   (skipped with the reason otherwise: the GPU machine may lack them unless carried as wheels).
3. bench: `ember bench engine` on an 8B-shaped bf16 model with random weights built on the GPU
   (concurrency 1, 4, 16, 64), plus a bare transformers decode loop at batch 1 for the TPOT target.
4. flood: 100 concurrent 4k-token requests against a KV budget that holds ~30: they queue, none
   fails, nothing runs out of memory.
Changes no GPU setting. Without CUDA it runs everything on the CPU at a small scale (to prove it
works), reported as such.
"""

from __future__ import annotations

import gc
import threading
import time
import traceback
from pathlib import Path
from typing import Any


def serving_check(workdir: Path, scale: str | None = None) -> dict:
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda:0" if cuda else "cpu"
    scale = scale or ("full" if cuda else "small")
    out: dict[str, Any] = {"device": dev, "scale": scale}
    for name, fn in (("real_path", lambda: real_path(workdir, dev)), ("worker_http", lambda: worker_http(workdir, dev)),
                     ("bench", lambda: bench(workdir, dev, scale)), ("flood", lambda: flood(dev, scale))):
        t = time.perf_counter()
        try:
            out[name] = fn()
        except Exception:  # each part reports its own failure
            out[name] = {"error": traceback.format_exc()}
        out[name]["part_s"] = round(time.perf_counter() - t, 2)
    cpu_text = out.get("real_path", {}).get("texts", {}).get("cpu", {}).get("greedy")
    if "text" in out.get("worker_http", {}):
        out["worker_http"]["greedy_equals_cpu"] = out["worker_http"]["text"] == cpu_text
    return out


def _store(workdir: Path) -> str:
    from ember.loader import open_store
    from ember.tinymodel import make_tiny_model

    url = f"file://{workdir / 'serving-store'}"
    store = open_store(url)
    if not store.exists("tiny"):
        store.push(make_tiny_model(workdir / "serving-tiny-hf"), "tiny")
    return url


def _text(events: Any) -> tuple[str, Any]:
    from ember.platform.runtime.events import GenerationDone, TokenDelta

    evs = list(events)
    return "".join(e.text for e in evs if isinstance(e, TokenDelta)), [e for e in evs if isinstance(e, GenerationDone)][-1]


def real_path(workdir: Path, dev: str) -> dict:
    import torch

    from ember.loader import NodeTiers
    from ember.platform.gateway.protocol import GenerateRequest
    from ember.platform.runtime.engine import ModelInstance

    url = _store(workdir)
    greedy = GenerateRequest(prompt="What is the capital of France?", max_tokens=32, temperature=0)
    seeded = GenerateRequest(prompt="Tell me a story", max_tokens=32, temperature=0.9, top_p=0.95, seed=1234)
    texts: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for device in (["cpu", dev] if dev != "cpu" else ["cpu"]):
        tiers = NodeTiers(workdir / f"serving-node-{device.replace(':', '')}", url, dram_capacity_bytes=256 << 20)
        try:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                gc.collect()
                before = torch.cuda.memory_allocated()
            loaded = tiers.load("tiny", device=device)
            inst = ModelInstance.from_loaded("check", "tiny", loaded, device=device, device_id=device)
            try:
                texts[device] = {"greedy": _text(inst.generate(greedy))[0],
                                 "seeded": [_text(inst.generate(seeded))[0] for _ in range(2)],
                                 "params_on_device": all(str(p.device).startswith(device.split(":")[0])
                                                         for p in inst.model.parameters())}
            finally:
                inst.close()
            del inst, loaded
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                out["device_bytes_held_after_unload"] = torch.cuda.memory_allocated() - before
        finally:
            tiers.close()
    out["texts"] = texts
    got = texts[dev]
    out["greedy_equals_cpu"] = got["greedy"] == texts["cpu"]["greedy"]
    out["seeded_repeats"] = got["seeded"][0] == got["seeded"][1]
    out["ok"] = bool(out["greedy_equals_cpu"] and out["seeded_repeats"] and got["params_on_device"]
                     and out.get("device_bytes_held_after_unload", 0) <= 0)
    return out


def worker_http(workdir: Path, dev: str) -> dict:
    try:
        import httpx
        import redis
        import uvicorn

        from ember.platform.redis_server import RedisServerProcess, free_port
        from ember.platform.worker.app import create_worker_app
    except ImportError as e:
        return {"skipped": f"worker HTTP app not importable here: {e}"}
    from ember.config import Settings
    from ember.platform.cluster import RedisCluster
    from ember.scheduler.policies import get_policy
    from ember.scheduler.view import PlacementRequest

    url = _store(workdir)
    try:
        server = RedisServerProcess(workdir / "serving-redis", persistent=False).start()
    except Exception as e:  # no redis-server / valkey-server binary
        return {"skipped": f"no Redis server here: {e}"}
    out: dict[str, Any] = {}
    try:
        port = free_port()
        settings = Settings(redis_url=server.url, store_url=url, data_dir=workdir / "serving-worker",
                            cluster_token="gpu-check-token", node_id="gpu-check", dram_capacity_bytes=256 << 20)
        app = create_worker_app(settings, f"http://127.0.0.1:{port}")
        srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        h = {"x-ember-cluster-token": "gpu-check-token"}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/internal/healthz", headers=h, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        cluster = RedisCluster(redis.Redis.from_url(server.url, decode_responses=True), heartbeat_ttl_s=30)
        info = httpx.get(f"http://127.0.0.1:{port}/internal/checkpoints", params={"ref": "tiny"}, headers=h).json()
        placement = cluster.place(PlacementRequest(function="tiny", checkpoint="tiny", nbytes=info["nbytes"],
                                                   kv_bytes=info["kv_budget_bytes"]), get_policy("ember"))
        out["placed_on"] = placement.device_id if placement else None
        r = httpx.post(f"http://127.0.0.1:{port}/internal/instances", headers=h, timeout=120,
                       json={"instance_id": placement.instance_id, "function": "tiny", "checkpoint": "tiny",
                             "kv_budget_bytes": info["kv_budget_bytes"]})
        out["load_status"] = r.status_code
        body = {"prompt": "What is the capital of France?", "max_tokens": 32, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}/internal/instances/{placement.instance_id}/generate", headers=h,
                       json=body, timeout=120)
        import json

        lines = [json.loads(x) for x in r.text.splitlines() if x]
        out["text"] = "".join(x.get("text", "") for x in lines)
        out["done"] = lines[-1].get("done") if lines else None
        httpx.delete(f"http://127.0.0.1:{port}/internal/instances/{placement.instance_id}", headers=h, timeout=60)
        out["ok"] = bool(out["placed_on"] == (dev if dev != "cpu" else "cpu:0") and out["load_status"] == 200
                         and out["done"] and out["done"]["completion_tokens"] > 0)
        srv.should_exit = True
        thread.join(timeout=30)
    finally:
        server.stop()
    return out


EIGHT_B = {"hidden": 4096, "layers": 32, "model_kw": {"heads": 32, "kv_heads": 8, "intermediate": 14336,
                                                      "vocab": 128256}}


def bench(workdir: Path, dev: str, scale: str) -> dict:
    import torch

    from ember.platform.runtime.bench import build_random_model, run_engine_bench

    if scale == "full":
        shape, dtype, levels, prompt, tokens = EIGHT_B, "bfloat16", (1, 4, 16, 64), 128, 64
    else:
        shape, dtype, levels, prompt, tokens = {"hidden": 128, "layers": 2, "model_kw": {}}, "float32", (1, 4), 16, 8
    doc = run_engine_bench(workdir / "serving-bench.json", hidden=shape["hidden"], layers=shape["layers"], device=dev,
                           dtype=dtype, concurrency=levels, rounds=1, prompt_tokens=prompt, max_tokens=tokens,
                           plot=workdir / "serving-bench.png", model_kw=shape["model_kw"], log=lambda s: None)
    # a bare transformers decode loop at batch 1 (the TPOT target's reference)
    model, _ = build_random_model(shape["hidden"], shape["layers"], dev, dtype, **shape["model_kw"])
    from transformers import DynamicCache

    ids = torch.randint(3, 400, (1, prompt), device=dev)
    with torch.inference_mode():
        cache = DynamicCache()
        nxt = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        if dev.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(tokens - 1):
            nxt = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            int(nxt)
        bare_tpot = (time.perf_counter() - t) / (tokens - 1)
    del model, cache
    gc.collect()
    by = {(r["engine"], r["concurrency"]): r for r in doc["results"]}
    top = max(levels)
    out = {"results": doc["results"], "model": doc["model"], "bare_loop_tpot_s": bare_tpot}
    out[f"speedup_at_{top}"] = by[("batching", top)]["tokens_per_s"] / by[("sequential", top)]["tokens_per_s"]
    out["tpot_c1_over_bare"] = by[("batching", 1)]["tpot_s"]["p50"] / bare_tpot
    return out


def flood(dev: str, scale: str) -> dict:
    """100 concurrent long requests against a budget that holds about 30 of them."""
    import torch

    from ember.platform.gateway.protocol import GenerateRequest
    from ember.platform.runtime.bench import build_random_model
    from ember.platform.runtime.engine import ModelInstance

    if scale == "full":
        shape, dtype, n, prompt, tokens = EIGHT_B, "bfloat16", 100, 4064, 32
    else:
        shape, dtype, n, prompt, tokens = {"hidden": 64, "layers": 2, "model_kw": {}}, "float32", 20, 96, 8
    model, tok = build_random_model(shape["hidden"], shape["layers"], dev, dtype, **shape["model_kw"])
    need = prompt + tokens
    holds = 30 if scale == "full" else 6  # the budget holds this many at once; the rest must queue
    inst = ModelInstance("flood", "flood", model, tok, kv_budget_tokens=holds * need, max_batch=64, max_queue=n,
                         device_id=dev)
    inst.eos_ids = set()
    peak_queue = [0]
    peak_batch = [0]
    errors: list[str] = []
    done: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            s = inst.stats()
            peak_queue[0] = max(peak_queue[0], int(s["queue_depth"]))
            peak_batch[0] = max(peak_batch[0], int(s["batch_size"]))

    def client(k: int) -> None:
        ids = [3 + (k * 7919 + j * 104729) % (len(tok) - 3) for j in range(prompt)]
        try:
            _, fin = _text(inst.generate(GenerateRequest(prompt="", max_tokens=tokens, temperature=0), ids=ids))
            done.append(fin.completion_tokens)
        except Exception as e:  # an OOM or anything else: reported
            errors.append(f"{e.__class__.__name__}: {e}")

    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    t = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    stop.set()
    out: dict[str, Any] = {"requests": n, "prompt_tokens": prompt, "max_tokens": tokens, "budget_holds": holds,
                           "kv_budget_tokens": inst.engine.limits.kv_budget_tokens,
                           "kv_budget_bytes": inst.kv_budget_bytes, "completed": len(done),
                           "all_full_length": all(c == tokens for c in done), "errors": errors[:5],
                           "peak_queue_depth": peak_queue[0], "peak_batch": peak_batch[0],
                           "wall_s": time.perf_counter() - t}
    if dev.startswith("cuda"):
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["device_total_bytes"] = torch.cuda.get_device_properties(0).total_memory
    inst.close()
    gc.collect()
    out["ok"] = bool(len(done) == n and not errors and out["peak_queue_depth"] > 0 and out["peak_batch"] <= holds)
    return out
