"""The platform an `ember loadtest` run drives: a private `ember up` started on a free port (with
models made by `ember model tiny`, pushed to its store, and node tiers sized for the scenario) or a
gateway the user names; what the scenario deploys on it, and taking all of it down again."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from ember.errors import BadRequest, EmberError

if TYPE_CHECKING:
    from ember.platform.loadtest import LoadTestOptions

DRAM_BLOCK_BYTES = 2 << 20  # the DRAM tier's block (ember/loader/dram.py)


class TargetPlatform:
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
    def given(cls, opts: LoadTestOptions) -> TargetPlatform:
        key = opts.api_key or os.environ.get("EMBER_API_KEY", "")
        if not key:
            raise BadRequest("--url needs an admin key: --api-key or EMBER_API_KEY", code="missing_api_key")
        target = cls(opts.url or "", key)
        target.checkpoints = [opts.checkpoint]
        return target

    @classmethod
    def own(cls, opts: LoadTestOptions, tmp: Path, echo: Callable[[str], None]) -> TargetPlatform:
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
               "EMBER_HEARTBEAT_INTERVAL_S": "0.5", **_tier_env(opts, models[0], model_bytes, disk_bytes), **opts.extra_env}
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
                limits = {"rpm": opts.flood_rpm} if tenant == "flood" and opts.flood_rpm else {}
                r = self.http.post("/v1/keys", json={"role": "invoker", "name": f"lt-{tenant}", **limits})
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


def _tier_env(opts: LoadTestOptions, model_dir: Path, model_bytes: int, disk_bytes: int) -> dict[str, str]:
    """Node tier and instance sizes. A CPU slot offers DRAM capacity / slots bytes and an instance
    claims its weights plus its KV-cache budget there, so the capacity is sized from both; the KV
    budget is what the scenario's requests need (EMBER_CPU_SLOTS sets the instances per node).
    For `cold`: the DRAM tier holds one checkpoint more than the node runs, the SSD tier about
    halfway between that and all of them, so calls spread over the checkpoints hit DRAM, the SSD
    and the store."""
    block = -(-model_bytes // DRAM_BLOCK_BYTES) * DRAM_BLOCK_BYTES
    slots = int(os.environ.get("EMBER_CPU_SLOTS", "2"))
    kv_tokens = min(8192, max(1024, opts.users * (opts.max_tokens + 64)))
    kv_bytes = kv_tokens * _kv_bytes_per_token(model_dir)
    env = {"EMBER_KV_BUDGET_TOKENS": str(kv_tokens)}
    dram = slots * (block + kv_bytes) + block
    if opts.scenario != "cold":
        return {**env, "EMBER_DRAM_CAPACITY_BYTES": str(max(1 << 30, dram))}
    dram_held = slots + 1
    ssd = max(dram_held + 1, (opts.checkpoints + dram_held) // 2) * (disk_bytes + (1 << 20))
    return {**env, "EMBER_DRAM_CAPACITY_BYTES": str(dram), "EMBER_SSD_CAPACITY_BYTES": str(ssd)}


def _kv_bytes_per_token(model_dir: Path) -> int:
    """K and V of every layer for one token, from the model's config.json."""
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
    dtype_bytes = 2 if str(c.get("dtype") or c.get("torch_dtype")) in ("float16", "bfloat16") else 4
    return 2 * c["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes
