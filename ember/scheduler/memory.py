"""Device memory booking: one rule for the live cluster and the simulator (units: bytes).

A device claim = the checkpoint's weights once per device (the instances of one checkpoint on one
device share them) + each instance's KV-cache budget. Redis books it in Lua, whose steps are the
twins of the functions here: `claim.lua` (`claim_bytes`), `lib_remove.lua` (`release_bytes`) and
`lib_node_entry.lua`'s `idle_by_device` (`evictable_bytes`). The simulator's `MemCluster` and the
shared eviction rule (`eviction.choose_evictions`) call these functions.

The KV budget an instance claims: the worker derives it when it sizes a checkpoint
(`kv_budget_bytes`, stored on the function's spec) and the gateway claims it for each instance
(`instance_kv_bytes`); the simulator derives its functions' budgets with the same `kv_budget_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def kv_budget_bytes(kv_bytes_per_token: int, budget_tokens: int, budget_bytes: int = 0) -> int:
    """An instance's KV-cache budget: `budget_bytes` when set (EMBER_KV_BUDGET_BYTES), else
    `budget_tokens` (EMBER_KV_BUDGET_TOKENS) tokens at the model's KV bytes per token."""
    return budget_bytes if budget_bytes > 0 else kv_bytes_per_token * budget_tokens


def instance_kv_bytes(spec_kv_bytes: int, budget_bytes: int = 0) -> int:
    """What a placement claims for each instance's KV cache: the budget stored on the function's
    spec when its checkpoint was sized, else EMBER_KV_BUDGET_BYTES (0: none) for a spec sized
    before workers reported one."""
    return spec_kv_bytes or budget_bytes


def claim_bytes(nbytes: int, kv_bytes: int, weights_held: bool) -> int:
    """What a new instance takes on a device: its KV budget, plus the checkpoint's weights unless
    the device already holds them for another instance (claim.lua)."""
    return kv_bytes if weights_held else nbytes + kv_bytes


def release_bytes(nbytes: int, kv_bytes: int, last_holder: bool) -> int:
    """What an instance leaving a device frees: its KV budget always, the weights with the last
    instance of the checkpoint there (lib_remove.lua)."""
    return nbytes + kv_bytes if last_holder else kv_bytes


def evictable_bytes(idle: Sequence[tuple[str, int, int]], holders: Mapping[str, int]) -> int:
    """What evicting every idle instance of one device frees (`DeviceState.idle_bytes`): each one's
    KV budget, and a checkpoint's weights once when every instance of it on the device is idle.
    `idle`: (checkpoint, weight bytes, KV bytes) of the idle instances; `holders[checkpoint]`:
    the device's instances of it, busy ones included. (Every read of the simulator's view asks
    this per device: none or one idle instance, the common cases, skip the general walk.)"""
    if len(idle) <= 1:
        if not idle:
            return 0
        ck, nbytes, kv = idle[0]
        return kv + (nbytes if holders.get(ck, 0) <= 1 else 0)
    total = 0
    idle_of: dict[str, list[int]] = {}
    for ck, nbytes, kv in idle:
        total += kv
        seen = idle_of.get(ck)
        if seen is None:
            idle_of[ck] = [1, nbytes]
        else:
            seen[0] += 1
    for ck, (n, nbytes) in idle_of.items():
        if n >= holders.get(ck, 0):
            total += nbytes
    return total
