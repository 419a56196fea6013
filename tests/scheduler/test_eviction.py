"""Choosing idle instances to evict so a cold start fits."""

from __future__ import annotations

from ember.scheduler.eviction import IdleInstance, choose_evictions

GB = 1 << 30


def _idle(iid: str, fn: str, dev: str, gb: int, last: float) -> IdleInstance:
    return IdleInstance(iid, fn, dev, gb * GB, last)


def test_least_recently_used_first_on_the_device_needing_fewest() -> None:
    idle = [
        _idle("a1", "a", "n1/g0", 2, 10.0),
        _idle("a2", "a", "n1/g0", 2, 5.0),
        _idle("b1", "b", "n1/g0", 2, 1.0),
        _idle("c1", "c", "n2/g0", 6, 50.0),
    ]
    free = {"n1/g0": 1 * GB, "n2/g0": 0}
    spare = {"a": 2, "b": 1, "c": 1}
    # 4 GB: n1 needs two (b1 then a2, the oldest), n2 needs one (c1): fewer evictions win
    assert [v.instance_id for v in choose_evictions(4 * GB, free, idle, spare)] == ["c1"]
    # 3 GB: one eviction on either device (n1: 1 GB free + b1's 2 GB); b1 has been idle longer than c1
    assert [v.instance_id for v in choose_evictions(3 * GB, free, idle, spare)] == ["b1"]


def test_min_instances_and_missing_devices_are_respected() -> None:
    idle = [_idle("a1", "a", "n1/g0", 4, 1.0), _idle("b1", "b", "n1/g0", 4, 2.0), _idle("x", "a", "gone/g0", 8, 0.0)]
    free = {"n1/g0": 0}
    # a may lose none (it is at its min_instances): b1 goes though it was used more recently
    assert [v.instance_id for v in choose_evictions(4 * GB, free, idle, {"a": 0, "b": 1})] == ["b1"]
    # not enough even with every evictable instance: nothing is chosen
    assert choose_evictions(6 * GB, free, idle, {"a": 0, "b": 1}) == []
    # an instance on a device the view does not know (dead node) is never chosen
    assert choose_evictions(8 * GB, free, idle, {"a": 5, "b": 5}) == [idle[0], idle[1]]
    assert choose_evictions(9 * GB, free, idle, {"a": 5, "b": 5}) == []


def test_shared_weights_free_only_with_their_last_instance() -> None:
    """Two instances sharing one checkpoint's weights on a device: evicting one frees its KV budget
    only; the weights come back with the last one (claim.lua books them once per device)."""
    from dataclasses import dataclass

    from ember.scheduler.eviction import plan_evictions

    @dataclass
    class Rec:
        instance_id: str
        function: str
        checkpoint: str
        last_used_s: float
        nbytes: int = 4 * GB
        kv_bytes: int = 1 * GB
        node_id: str = "n1"
        device_id: str = "g0"
        state: str = "ready"
        outstanding: int = 0

    recs = [Rec("a", "f", "ck", 1.0), Rec("b", "g", "ck", 2.0), Rec("c", "h", "other", 3.0)]
    free = {"n1/g0": 0}
    # 1 GB: the oldest alone frees its KV budget
    assert [v.instance_id for v in plan_evictions(1 * GB, free, recs, for_function="x", min_instances={})] == ["a"]
    # 2 GB: a frees 1 GB (b still shares the weights), b then frees 1 + 4 GB
    assert [v.instance_id for v in plan_evictions(2 * GB, free, recs, for_function="x", min_instances={})] == ["a", "b"]
    # 5 GB: one instance never frees 5 GB here unless it is the last holder of its weights (c: 1 + 4)
    assert [v.instance_id for v in plan_evictions(5 * GB, free, recs, for_function="x", min_instances={})] == ["a", "b"]
    assert [v.instance_id for v in plan_evictions(5 * GB, free, [recs[0], recs[2]], for_function="x",
                                                  min_instances={})] == ["a"]
