"""Energy state in Redis: operator budgets, device snapshots, the power allocator.

Workers call `publish_device_snapshots` every heartbeat; it returns the caps the allocator set
for that node's devices (feed them to `NodeEnergyAgent.set_caps_w`). `allocate_and_store` runs the
allocator over the live snapshots and stores caps and misses; GET /v1/energy (ember.platform.
energy_api) runs it too, and `allocate_if_leader` runs it from any periodic loop under the
`energy-allocator` lease. Kept apart from the routes so the worker never imports the gateway.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import redis

from ember.energy.budget import EnergyBudget, allocate
from ember.errors import StateUnavailable
from ember.platform.state import Keys

DEVICE_FIELDS = (
    "node",
    "device",
    "power_w",
    "limit_w",
    "sm_clock_mhz",
    "energy_j",
    "j_per_token",
    "slo_attainment",
    "mode",
    "last_decision",
    "decisions",  # the device's recent decisions, with reasons and whether they were applied
    "recommended_sm_clock_mhz",  # the controller's (decode) clock; applied in actuate mode. None: unlocked
    "prefill_sm_clock_mhz",  # its clock for prefills (per-phase clocks), None: unlocked
    "clock_switches",  # emulated GPUs: how often the SM clock lock changed (per-phase switching)
)


def load_budget(client: redis.Redis) -> EnergyBudget:
    """The stored budget (empty when none was set)."""
    raw = _redis(client.get, Keys.energy_budget)
    return EnergyBudget.from_dict(json.loads(raw) if raw else None)


def update_budget(client: redis.Redis, changes: Mapping[str, Any]) -> EnergyBudget:
    """Replace the given fields of the stored budget (field name -> value, None clears one) and
    return it. Read, merge and write under WATCH, retried when another update came in between:
    a plain read-merge-write lost the field of one of two updates made at once."""
    while True:
        try:
            with client.pipeline(transaction=True) as p:
                p.watch(Keys.energy_budget)
                raw = p.get(Keys.energy_budget)
                budget = EnergyBudget.from_dict(json.loads(raw) if raw else None)
                for name, value in changes.items():
                    setattr(budget, name, value)
                p.multi()
                p.set(Keys.energy_budget, json.dumps(budget.to_dict()))
                p.execute()
                return budget
        except redis.WatchError:
            continue
        except redis.RedisError as e:
            raise StateUnavailable(f"redis: {e}") from e


def seed_budget(client: redis.Redis, budget: EnergyBudget) -> bool:
    """Store `budget` only if none is stored (a deployment's seed); True if it was stored."""
    return bool(_redis(client.set, Keys.energy_budget, json.dumps(budget.to_dict()), nx=True))


def publish_device_snapshots(
    client: redis.Redis,
    node_id: str,
    snapshots: Sequence[Mapping[str, Any]],
    ttl_s: float,
    now: float | None = None,
) -> dict[str, float | None]:
    """Store this node's device snapshots (expiring after `ttl_s`) and return the caps the
    allocator set for its devices (device id -> watts, None: uncapped)."""
    if not snapshots:
        return {}
    now = time.time() if now is None else now
    day = _day(now)
    members = [f"{node_id}/{s['device']}" for s in snapshots]
    readings: list[str] = []  # member, energy_j, origin triples for the day's count (unreadable counters skipped)
    for member, snap in zip(members, snapshots, strict=True):
        energy_j = float(snap.get("energy_j") or 0.0)
        if math.isfinite(energy_j) and energy_j >= 0:
            readings += [member, repr(energy_j), str(snap.get("energy_origin") or "")]
    try:
        pipe = client.pipeline(transaction=True)
        for snap in snapshots:
            key = Keys.energy_device(node_id, str(snap["device"]))
            pipe.hset(key, mapping={"snapshot": json.dumps(dict(snap), default=str), "at": now})
            pipe.expire(key, max(1, int(ttl_s)))
        pipe.sadd(Keys.energy_devices, *members)
        client.register_script(_COUNT_DAY)(keys=[Keys.energy_day_last(day), Keys.energy_day_used(day)],
                                           args=[2 * 86400, *readings], client=pipe)
        pipe.hmget(Keys.energy_caps, members)
        caps_raw = pipe.execute()[-1]
    except redis.RedisError as e:
        raise StateUnavailable(f"redis: {e}") from e
    return {
        str(s["device"]): (float(c) if c not in (None, "", "none") else None)
        for s, c in zip(snapshots, caps_raw, strict=True)
    }


def device_snapshots(client: redis.Redis) -> list[dict[str, Any]]:
    """Every live device snapshot (expired ones are dropped from the index)."""
    members = sorted(_redis(client.smembers, Keys.energy_devices))
    out, gone = [], []
    for member in members:
        node, _, device = member.partition("/")
        raw = _redis(client.hget, Keys.energy_device(node, device), "snapshot")
        if raw is None:
            gone.append(member)
            continue
        out.append(json.loads(raw))
    if gone:
        _redis(client.srem, Keys.energy_devices, *gone)
    return out


def allocate_and_store(client: redis.Redis, now: float | None = None) -> dict[str, Any]:
    """Run the allocator over the live snapshots, store caps and misses; returns GET /v1/energy's body."""
    now = time.time() if now is None else now
    budget = load_budget(client)
    snapshots = device_snapshots(client)
    used_j = energy_used_today_j(client, now=now)
    midnight = datetime.fromtimestamp(now, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    seconds_left = max(0.0, 86400.0 - (now - midnight.timestamp()))
    allocation = allocate(budget, snapshots, used_j, seconds_left)
    try:
        pipe = client.pipeline(transaction=True)
        pipe.delete(Keys.energy_caps)
        caps = {k: v for k, v in allocation.caps_w.items() if v is not None}
        if caps:
            pipe.hset(Keys.energy_caps, mapping=caps)
        pipe.set(Keys.energy_allocation, json.dumps(allocation.to_dict()))
        pipe.execute()
    except redis.RedisError as e:
        raise StateUnavailable(f"redis: {e}") from e
    devices = []
    for s in snapshots:
        entry = {f: s.get(f) for f in DEVICE_FIELDS}
        entry["cap_w"] = allocation.caps_w.get(f"{s['node']}/{s['device']}")
        devices.append(entry)
    return {
        "budget": budget.to_dict(),
        "projected_kwh_today": allocation.projected_kwh_today,
        "devices": devices,
        "allocation": {
            "used_kwh_today": allocation.used_kwh_today,
            "need_w": allocation.need_w,
            "misses": allocation.to_dict()["misses"],
        },
    }


def energy_used_today_j(client: redis.Redis, now: float | None = None) -> float:
    """Joules every device drew since midnight UTC (since first seen today), as counted by
    `publish_device_snapshots`: the count only grows, a counter restart adds what was drawn
    before it, and a device that stopped reporting keeps what it drew."""
    now = time.time() if now is None else now
    return sum(float(v) for v in _redis(client.hvals, Keys.energy_day_used(_day(now))))


def allocate_if_leader(client: redis.Redis, holder: str, lease_s: float = 15.0) -> dict[str, Any] | None:
    """Run `allocate_and_store` if this process holds (or takes) the allocator lease; call it
    periodically from any number of gateways or workers: one of them allocates per lease."""
    key = Keys.lease("energy-allocator")
    ttl_ms = max(1000, int(lease_s * 1000))
    try:
        took = client.set(key, holder, nx=True, px=ttl_ms)
        if not took:
            current = client.get(key)
            if current != holder:
                return None
            client.pexpire(key, ttl_ms)
    except redis.RedisError as e:
        raise StateUnavailable(f"redis: {e}") from e
    return allocate_and_store(client)


# KEYS: the day's last readings, the day's joules; ARGV: ttl_s, then member, energy_j, origin triples.
# A reading at or above the last adds the difference; one below it, or one whose counter names
# another origin (`energy_origin`: the boot for NVML, the emulated device's start), is a counter
# that restarted (worker or driver restart, re-zeroed emulated counter): it counts from zero again,
# so all it reads was drawn since. Without the origin, a restarted counter that climbed past the
# old value by its first report was taken for the old one (only the excess counted). The first
# reading of the day only sets the mark. Origins are kept beside the readings as "<member>#origin".
_COUNT_DAY = """
for i = 2, #ARGV, 3 do
  local m, e, o = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
  local last = tonumber(redis.call('HGET', KEYS[1], m))
  if last then
    local was = redis.call('HGET', KEYS[1], m .. '#origin') or ''
    local drawn = e - last
    if e < last or (o ~= '' and was ~= '' and o ~= was) then drawn = e end
    if drawn > 0 then redis.call('HINCRBYFLOAT', KEYS[2], m, string.format('%.17g', drawn)) end
  end
  redis.call('HSET', KEYS[1], m, ARGV[i + 1], m .. '#origin', o)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return 0
"""


def _day(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d")


def _redis(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except redis.RedisError as e:
        raise StateUnavailable(f"redis: {e}") from e
