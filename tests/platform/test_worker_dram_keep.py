"""`dram_keep` on the worker's wire, through a real worker (uvicorn, a real redis-server): a load
or a prefetch sets the DRAM entry's retention priority; a body without it means 0 (plain LRU), one
out of range is a 422, never a 500."""

from __future__ import annotations

import json
import time

import httpx
import redis

from ember.loader import open_store
from ember.loader.shm import shm_dir_for
from ember.platform.cluster import RedisCluster
from ember.platform.gateway.protocol import FunctionSpec
from ember.platform.state import Keys
from ember.scheduler.view import PlacementRequest, StartupEstimate
from tests.platform.conftest import CLUSTER_TOKEN, TierCluster, admin_headers
from tests.platform.conftest import until as _until

WORKER = {"x-ember-cluster-token": CLUSTER_TOKEN}


class OnW0:
    name = "on_w0"

    def place(self, request, view):
        d = next(d for n in view.all_nodes() if n.node_id == "w0" for d in n.devices)
        return StartupEstimate("w0", d.device_id, "remote", 0.1)


def _dram_entry(cluster: TierCluster, checkpoint: str) -> dict | None:
    """The worker's ready DRAM entry of `checkpoint` as its index has it (None: no entry)."""
    index = json.loads((shm_dir_for(cluster.node_dir) / "index.json").read_text())
    got = [e for k, e in index["entries"].items() if k.partition("@")[0] == checkpoint and e["state"] == "ready"]
    return got[0] if got else None


def _dram_keep(cluster: TierCluster, checkpoint: str) -> int | None:
    """The `keep` of the worker's ready DRAM entry of `checkpoint` (None: no entry)."""
    entry = _dram_entry(cluster, checkpoint)
    return None if entry is None else entry.get("keep")


def test_dram_keep_in_a_load_or_prefetch_body_reaches_the_dram_entry(tier_cluster: TierCluster) -> None:
    store = open_store(f"file://{tier_cluster.tmp / 'store'}")
    for name in ("keepck", "keeppre"):
        store.push(tier_cluster.tmp / "conv", name)
    # deployed (idle instances kept 300 s): the gateway's autoscaler unloads instances of unknown functions
    r = httpx.put(f"{tier_cluster.gateway.url}/v1/functions/keepf", headers=admin_headers(), timeout=60,
                  json={"checkpoint": "keepck", "scaling": {"keep_alive_s": 300}})
    assert r.status_code in (200, 201), r.text
    c = RedisCluster(redis.Redis.from_url(tier_cluster.env["EMBER_REDIS_URL"], decode_responses=True))  # type: ignore[index]
    url = f"{tier_cluster.worker.url}/internal/instances"
    # the checkpoint as the deployed spec names it (its pinned identity): an instance of another
    # checkpoint than its function's is retired by the gateway's autoscaler at its next step
    ref = FunctionSpec.model_validate_json(c.r.hget(Keys.functions, "keepf") or "").checkpoint_ref

    def load(**extra: object) -> httpx.Response:
        placed = c.place(PlacementRequest(function="keepf", checkpoint=ref, nbytes=1 << 20), OnW0())
        assert placed is not None
        r = httpx.post(url, headers=WORKER, timeout=120,
                       json={"instance_id": placed.instance_id, "function": "keepf", "checkpoint": ref, **extra})
        if r.status_code == 200:  # unloaded now
            assert httpx.delete(f"{url}/{placed.instance_id}", headers=WORKER, timeout=30).status_code == 200
        else:
            c.remove_instance(placed.instance_id)
        return r

    first = load(dram_keep=1)
    assert first.status_code == 200 and first.json()["tier"] == "remote", first.text
    assert _dram_keep(tier_cluster, "keepck") == 1
    again = load()  # an old gateway that does not send it: 0, the latest use sets it
    assert again.status_code == 200 and again.json()["tier"] == "dram", again.text
    assert _dram_keep(tier_cluster, "keepck") == 0

    for bad in (99, -1, 10, "high"):
        r = load(dram_keep=bad)
        assert r.status_code == 422, (bad, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error", r.text
    assert _dram_keep(tier_cluster, "keepck") == 0  # a refused body changed nothing

    r = httpx.post(f"{tier_cluster.worker.url}/internal/prefetch", headers=WORKER, timeout=30,
                   json={"checkpoint": "keeppre", "dram_keep": 99})
    assert r.status_code == 422, r.text
    r = httpx.post(f"{tier_cluster.worker.url}/internal/prefetch", headers=WORKER, timeout=30,
                   json={"checkpoint": "keeppre", "dram_keep": 1})
    assert r.status_code == 202, r.text
    assert _until(lambda: _dram_keep(tier_cluster, "keeppre") == 1, 60), _dram_keep(tier_cluster, "keeppre")


def test_an_unloaded_instance_leaves_its_dram_entry_used_until_then(tier_cluster: TierCluster) -> None:
    """The worker's unload route (what the gateway's autoscaler calls): the DRAM entry's last use is
    when the instance let go of it, not when it was loaded (the tier's LRU order)."""
    open_store(f"file://{tier_cluster.tmp / 'store'}").push(tier_cluster.tmp / "conv", "touchck")
    r = httpx.put(f"{tier_cluster.gateway.url}/v1/functions/touchf", headers=admin_headers(), timeout=60,
                  json={"checkpoint": "touchck", "scaling": {"keep_alive_s": 300}})
    assert r.status_code in (200, 201), r.text
    c = RedisCluster(redis.Redis.from_url(tier_cluster.env["EMBER_REDIS_URL"], decode_responses=True))  # type: ignore[index]
    ref = FunctionSpec.model_validate_json(c.r.hget(Keys.functions, "touchf") or "").checkpoint_ref
    placed = c.place(PlacementRequest(function="touchf", checkpoint=ref, nbytes=1 << 20), OnW0())
    assert placed is not None
    url = f"{tier_cluster.worker.url}/internal/instances"
    r = httpx.post(url, headers=WORKER, timeout=120,
                   json={"instance_id": placed.instance_id, "function": "touchf", "checkpoint": ref})
    assert r.status_code == 200, r.text
    loaded = _dram_entry(tier_cluster, "touchck")
    assert loaded is not None
    time.sleep(0.05)
    unloaded_at = time.time()
    assert httpx.delete(f"{url}/{placed.instance_id}", headers=WORKER, timeout=30).status_code == 200
    after = _dram_entry(tier_cluster, "touchck")
    assert after is not None and after["last_used"] >= unloaded_at > loaded["last_used"]
