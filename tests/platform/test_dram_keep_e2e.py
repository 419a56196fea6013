"""The DRAM keep of a cold start through the real route (gateway + worker, a real redis-server;
the `tier_cluster` fixture): the gateway asks the worker's DRAM tier to keep first the copy of a
checkpoint whose SSD load would miss its function's TTFT SLO under the `ember` policy
(`caching.dram_keep`, the simulator's rule), keep 0 for one that loads in time, and plain LRU
(0) under a baseline."""

from __future__ import annotations

import httpx

from ember.loader import open_store
from tests.platform.conftest import TierCluster, admin_headers
from tests.platform.test_worker_dram_keep import _dram_keep

CHAT = {"messages": [{"role": "user", "content": "Once upon"}], "max_tokens": 2, "temperature": 0}


def test_the_gateway_asks_the_worker_to_keep_the_copies_that_save_an_slo(tier_cluster: TierCluster) -> None:
    store = open_store(f"file://{tier_cluster.tmp / 'store'}")
    url = tier_cluster.gateway.url
    cases = {  # function: (checkpoint, TTFT SLO ms, placement policy, the keep wanted)
        "keeptight": ("kc-tight", 0.001, None, 1),  # no SSD loads a model in a microsecond
        "keeploose": ("kc-loose", 600_000.0, None, 0),
        "keepsllm": ("kc-sllm", 0.001, "serverlessllm", 0),  # a baseline: the LRU its published system has
    }
    for fn, (ck, ttft_ms, policy, _) in cases.items():
        store.push(tier_cluster.tmp / "conv", ck)
        body: dict = {"checkpoint": ck, "slo": {"ttft_ms": ttft_ms}, "scaling": {"keep_alive_s": 300}}
        if policy:
            body["placement_policy"] = policy
        r = httpx.put(f"{url}/v1/functions/{fn}", headers=admin_headers(), json=body, timeout=60)
        assert r.status_code in (200, 201), r.text
    for fn, (ck, _, _, want) in cases.items():
        r = httpx.post(f"{url}/v1/chat/completions", headers=admin_headers(), json={"model": fn, **CHAT}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-ember-cold-start"] == "true" and r.headers["x-ember-load-tier"] == "remote", r.headers
        assert _dram_keep(tier_cluster, ck) == want, (fn, _dram_keep(tier_cluster, ck))
    for fn in cases:
        httpx.delete(f"{url}/v1/functions/{fn}", headers=admin_headers(), timeout=60)
