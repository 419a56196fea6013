"""Energy HTTP API: operator budgets and per-device energy state.

Routes (admin and operator only):
- `PUT /v1/energy/budget` `{"cluster_watts": W, "node_watts": {"<node id>": W}, "energy_kwh_per_day": E}`:
  each field optional; fields given replace the stored ones (null clears one), atomically against
  other updates (two operators setting different fields at once both land). Returns the budget.
- `GET /v1/energy` -> `{"budget", "projected_kwh_today", "devices": [...], "allocation": {...}}`.

The Redis state behind them (budgets, device snapshots, the allocator) is ember.platform.energy_state.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from ember.platform.energy_state import allocate_and_store, update_budget
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.deps import get_redis, require_roles
from ember.platform.names import check_name

router = APIRouter(tags=["energy"])

RedisDep = Annotated[redis.Redis, Depends(get_redis)]
EnergyOperator = Annotated[Principal, Depends(require_roles("admin", "operator"))]


class BudgetBody(BaseModel):
    """Body of PUT /v1/energy/budget."""

    model_config = ConfigDict(extra="forbid", strict=True)  # watts are JSON numbers: `true` is not 1 W

    cluster_watts: float | None = Field(None, gt=0, le=1e9)
    node_watts: dict[str, Annotated[float, Field(gt=0, le=1e7)]] | None = None
    energy_kwh_per_day: float | None = Field(None, gt=0, le=1e9)


@router.put("/v1/energy/budget")
def put_budget(body: BudgetBody, client: RedisDep, principal: EnergyOperator) -> dict[str, Any]:
    """Set (merge) the operator budget; returns it."""
    for node in (body.node_watts or {}).keys():
        check_name(node, "node id")
    changes: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set}
    if "node_watts" in changes:
        changes["node_watts"] = dict(changes["node_watts"] or {})
    budget = update_budget(client, changes)
    allocate_and_store(client)
    return budget.to_dict()


@router.get("/v1/energy")
def get_energy(client: RedisDep, principal: EnergyOperator) -> dict[str, Any]:
    """Budget, projected kWh today, every live device and the allocation."""
    return allocate_and_store(client)
