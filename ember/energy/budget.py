"""Operator power and energy budgets, and the allocator that splits them across devices.

Pure logic over device snapshots (the dicts `NodeEnergyAgent.snapshot()` makes); the platform
stores budgets and snapshots in Redis (ember.platform.energy_state) and calls `allocate`.

- Watts (cluster and per node) bound the sum of device power LIMITS, so the draw stays under
  the budget at every moment. Each device first gets its hardware minimum, then what its SLOs
  need (`need_w`: recent average draw plus headroom that grows with SLO pressure), then any
  leftover in proportion to SLO pressure. When the budget cannot cover every need, it is split
  by need weighted by pressure, and the functions on short devices are reported as misses.
- Energy per day: `projected_kwh_today` = energy drawn since midnight UTC + current draw for the
  rest of the day. Above the budget, caps go down toward the average draw the remaining energy
  allows, never below what the SLOs need; if that is not enough the functions are reported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

J_PER_KWH = 3.6e6


@dataclass
class EnergyBudget:
    """What an operator allows; every field optional (None: no limit)."""

    cluster_watts: float | None = None
    node_watts: dict[str, float] = field(default_factory=dict)
    energy_kwh_per_day: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> EnergyBudget:
        data = data or {}
        return cls(
            cluster_watts=data.get("cluster_watts"),
            node_watts=dict(data.get("node_watts") or {}),
            energy_kwh_per_day=data.get("energy_kwh_per_day"),
        )


@dataclass(frozen=True)
class Miss:
    """A function whose SLO a budget cannot meet, and why."""

    function: str
    node: str
    device: str
    reason: str


@dataclass
class Allocation:
    caps_w: dict[str, float | None]  # "node/device" -> power cap (None: uncapped)
    need_w: dict[str, float]
    misses: list[Miss]
    projected_kwh_today: float
    used_kwh_today: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "caps_w": self.caps_w,
            "need_w": self.need_w,
            "misses": [asdict(m) for m in self.misses],
            "projected_kwh_today": self.projected_kwh_today,
            "used_kwh_today": self.used_kwh_today,
        }


def need_w(snapshot: Mapping[str, Any]) -> float:
    """Watts a device needs for its SLOs: recent average draw, plus headroom as pressure rises
    (p95 latency / SLO above 0.5 adds the same fraction), within its limit range."""
    lo = float(snapshot.get("min_limit_w") or 0.0)
    hi = float(snapshot.get("max_limit_w") or snapshot.get("limit_w") or lo)
    draw = float(snapshot.get("avg_power_w") or snapshot.get("power_w") or lo)
    pressure = float(snapshot.get("pressure") or 0.0)
    headroom = 1.1 + max(0.0, pressure - 0.5)
    if pressure >= 1.0:  # already missing SLOs: do not cap at all
        return hi
    return max(lo, min(hi, draw * headroom))


def allocate(
    budget: EnergyBudget,
    snapshots: Sequence[Mapping[str, Any]],
    used_j_today: float,
    seconds_left_today: float,
) -> Allocation:
    """Caps per device and the misses, for one moment."""
    keys = [f"{s['node']}/{s['device']}" for s in snapshots]
    by_key = dict(zip(keys, snapshots, strict=True))
    needs = {k: need_w(s) for k, s in by_key.items()}
    lo = {k: float(s.get("min_limit_w") or 0.0) for k, s in by_key.items()}
    hi = {k: float(s.get("max_limit_w") or s.get("limit_w") or 0.0) for k, s in by_key.items()}
    weight = {k: 0.5 + float(s.get("pressure") or 0.0) for k, s in by_key.items()}
    caps: dict[str, float] = dict(hi)
    misses: dict[str, str] = {}  # key -> reason

    # per node, then the cluster over what the nodes left
    for node, watts in budget.node_watts.items():
        members = [k for k in keys if by_key[k]["node"] == node]
        if members:
            _split(watts, members, lo, caps, needs, weight, misses, f"node {node} budget {_watts(watts)} W")
    if budget.cluster_watts is not None and keys:
        _split(
            budget.cluster_watts,
            keys,
            lo,
            caps,
            needs,
            weight,
            misses,
            f"cluster budget {_watts(budget.cluster_watts)} W",
        )

    draw_w = sum(float(s.get("avg_power_w") or s.get("power_w") or 0.0) for s in snapshots)
    projected_j = used_j_today + draw_w * seconds_left_today
    if budget.energy_kwh_per_day is not None and seconds_left_today > 0 and draw_w > 0:
        left_j = max(0.0, budget.energy_kwh_per_day * J_PER_KWH - used_j_today)
        allowed_w = left_j / seconds_left_today
        if allowed_w < draw_w:
            scale = allowed_w / draw_w
            for k, s in by_key.items():
                draw = float(s.get("avg_power_w") or s.get("power_w") or 0.0)
                target = max(lo[k], draw * scale)
                if target < needs[k]:
                    target = needs[k]
                    misses.setdefault(
                        k,
                        f"energy budget {budget.energy_kwh_per_day:g} kWh/day allows {_watts(allowed_w)} W on "
                        f"average for the rest of the day; the SLOs need about {sum(needs.values()):.0f} W",
                    )
                caps[k] = min(caps[k], target)
            projected_j = (
                used_j_today
                + sum(
                    min(caps[k], float(s.get("avg_power_w") or s.get("power_w") or 0.0))
                    for k, s in by_key.items()
                )
                * seconds_left_today
            )

    out_misses = []
    for k, reason in misses.items():
        s = by_key[k]
        functions = list((s.get("functions") or {}).keys()) or ["(no function yet)"]
        for fn in functions:
            out_misses.append(Miss(fn, str(s["node"]), str(s["device"]), reason))
    return Allocation(
        caps_w={k: (None if caps[k] >= hi[k] else round(caps[k], 1)) for k in keys},
        need_w={k: round(v, 1) for k, v in needs.items()},
        misses=out_misses,
        projected_kwh_today=round(projected_j / J_PER_KWH, 4),
        used_kwh_today=round(used_j_today / J_PER_KWH, 4),
    )


def _split(
    watts: float,
    members: list[str],
    lo: dict[str, float],
    caps: dict[str, float],
    needs: dict[str, float],
    weight: dict[str, float],
    misses: dict[str, str],
    what: str,
) -> None:
    """Split `watts` of limits across `members` (each within [lo, current cap]), by SLO pressure."""
    floor = sum(lo[k] for k in members)
    if watts < floor:
        for k in members:
            caps[k] = lo[k]
            misses.setdefault(k, f"{what} is below the devices' minimum power limits ({floor:.0f} W)")
        return
    want = {k: max(lo[k], min(caps[k], needs[k])) for k in members}
    total_want = sum(want.values())
    if total_want <= watts:
        # everyone gets their need; the rest goes by pressure, up to each cap
        alloc = dict(want)
        left = watts - total_want
        for _ in range(4):
            open_ = [k for k in members if alloc[k] < caps[k] - 1e-6]
            if left <= 1e-6 or not open_:
                break
            wsum = sum(weight[k] for k in open_)
            given = 0.0
            for k in open_:
                add = min(caps[k] - alloc[k], left * weight[k] / wsum)
                alloc[k] += add
                given += add
            left -= given
    else:
        # short: minimum for all, then the rest in proportion to need above the minimum x pressure
        left = watts - floor
        shares = {k: (want[k] - lo[k]) * weight[k] for k in members}
        ssum = sum(shares.values()) or 1.0
        alloc = {k: min(want[k], lo[k] + left * shares[k] / ssum) for k in members}
        for k in members:
            if alloc[k] < want[k] - 0.5:
                misses.setdefault(
                    k,
                    f"{what} < {total_want:.0f} W the SLOs need; this device gets {alloc[k]:.0f} W of "
                    f"{want[k]:.0f} W",
                )
    for k in members:
        caps[k] = min(caps[k], alloc[k])


def _watts(w: float) -> str:
    """Watts as a reason shows them: whole watts, or enough digits for a budget under 10 W (a
    budget of 1e-300 W read "0 W")."""
    return f"{w:.0f}" if w >= 10 else f"{w:.3g}"
