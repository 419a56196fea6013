"""Startup-time estimator: how long until an instance of a checkpoint could serve on a device.

    seconds = wait + eviction + nbytes / bandwidth(tier)

`wait` is the longer of the device's load queue and the node's queue for that tier; `bandwidth`
is the node's own figure for the tier (measured when its worker started and corrected from
observed loads, see `ewma_bandwidth_bps`), and only when a node reports nothing for a tier do
the conservative defaults below apply. Remote fetches are estimated like any other tier, so a
node without a local copy is a candidate, not skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ember.scheduler.view import ClusterView, DeviceState, NodeState, PlacementRequest, StartupEstimate, Tier

# Used only when a node did not report a tier (units: bytes/s into device memory).
DEFAULT_BANDWIDTH_BPS: Mapping[str, float] = {
    "gpu": 100e9,  # device-to-device copy on the same node
    "dram": 10e9,
    "ssd": 2e9,
    "remote": 0.5e9,
}
EVICTION_S = 0.1  # unloading idle instances to make room: drain and free, roughly constant
EWMA_ALPHA = 0.3  # weight of one observed load when correcting a tier bandwidth
SERVICE_EWMA_ALPHA = 0.2  # weight of one observation in per-function service/prefill/cold-start times


def tier_bandwidth_bps(node: NodeState, tier: Tier) -> float:
    """The node's bandwidth for `tier` (its measured/corrected figure, else the default)."""
    bw = node.bandwidth_bps.get(tier)
    if bw is None or bw <= 0:
        return DEFAULT_BANDWIDTH_BPS[tier]
    return bw


def estimate_startup(nbytes: int, node: NodeState, device: DeviceState, tier: Tier,
                     room_bytes: int | None = None) -> StartupEstimate:
    """Estimated seconds until `nbytes` loaded from `tier` on `node` could serve on `device`
    (`room_bytes`: what the claim takes there, weights + KV budget; default `nbytes`)."""
    wait = max(device.queue_s, node.tier_queue_s.get(tier, 0.0)) if node.tier_queue_s else device.queue_s
    evict = EVICTION_S if device.free_bytes < (nbytes if room_bytes is None else room_bytes) else 0.0
    seconds = wait + evict + nbytes / tier_bandwidth_bps(node, tier)
    return StartupEstimate(node.node_id, device.device_id, tier, seconds, device.awake)


def can_hold(device: DeviceState, nbytes: int) -> bool:
    """Whether the device has room now, or after evicting idle instances."""
    return device.free_bytes >= nbytes or device.free_bytes + device.idle_bytes >= nbytes


def beside_weights(request: PlacementRequest, view: ClusterView, holds_weights: Callable[[DeviceState], bool],
                   limit: int = 64) -> StartupEstimate | None:
    """A device that already holds the checkpoint's weights (claimed once per device) and has room
    for one more KV budget: where the instance goes when the policy found no device with room for
    weights and KV budget, which it cannot see here (the gateway's `place` and the simulator ask this
    after the policy). Nothing moves: the worker builds the instance from the device's copy."""
    if request.kv_bytes <= 0:
        return None
    for d in view.devices_with_room(request.kv_bytes, limit=limit):
        if holds_weights(d):
            return StartupEstimate(d.node_id, d.device_id, "gpu", 0.0, d.awake)
    return None


def ewma(current: float | None, observed: float, alpha: float) -> float:
    """An exponentially weighted average: `observed` folded into `current` (None: no history yet).
    The one EWMA of the scheduler: tier bandwidths (here and in the live Lua, alpha EWMA_ALPHA),
    and the gateway's per-function service, prefill and cold-start times (alpha 0.2)."""
    if current is None or current <= 0:
        return observed
    return (1.0 - alpha) * current + alpha * observed


def ewma_into(table: dict[str, float], key: str, observed: float, alpha: float = SERVICE_EWMA_ALPHA) -> None:
    """Fold `observed` into the EWMA kept under `key` in `table` (the gateway's per-function times)."""
    table[key] = ewma(table.get(key), observed, alpha)


def ewma_bandwidth_bps(current_bps: float | None, nbytes: int, seconds: float, alpha: float = EWMA_ALPHA) -> float:
    """Fold one observed load (`nbytes` in `seconds`) into a tier bandwidth."""
    return ewma(current_bps, nbytes / seconds, alpha)


# --- load queues: what `DeviceState.queue_s` and `NodeState.tier_queue_s` are made of ----------
# Each device and each (node, tier) keeps a busy-until time. Both backends apply the same two
# rules (the simulator in memory, the live cluster in Lua: ember/platform/loadqueues.py):
# - a claimed load occupies its device and its node's source tier until its estimated end
#   (`now + estimate`, the estimate already includes the wait for both queues);
# - when the load ends, both queues shift by how far off the estimate was (loads queued behind
#   it start that much earlier or later), never into the past.
def queue_after_claim(busy_until_s: float, now_s: float, estimate_s: float) -> float:
    """Busy-until after a load estimated at `estimate_s` (from `now_s`) is claimed."""
    return max(busy_until_s, now_s + estimate_s)


def queue_after_load(busy_until_s: float, expected_end_s: float, now_s: float) -> float:
    """Busy-until after a load that was expected to end at `expected_end_s` ended at `now_s`."""
    return max(now_s, busy_until_s + (now_s - expected_end_s))


# --- prefetches in flight: sent to a node and not landed yet -----------------------------------
# Both backends record a prefetch when it is sent (live: publish_prefetch.lua, with its queue
# time) and forget it when it lands (the simulator; a live worker when it reports the end) or
# expires; the autoscaler counts a node with one in flight as a near copy and never sends another.
PREFETCH_GRACE_S = 10.0


def prefetch_expiry_s(now_s: float, end_s: float) -> float:
    """Until when a prefetch sent at `now_s` and estimated to end at `end_s` counts as in flight
    when no end is reported: its estimate as much again past that end (a copy up to twice as slow
    as estimated), at least `PREFETCH_GRACE_S`."""
    return end_s + max(PREFETCH_GRACE_S, end_s - now_s)
