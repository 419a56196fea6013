"""Energy HTTP API: operator budgets and per-device energy state.

Routes (admin and operator only):
- `PUT /v1/energy/budget` `{"cluster_watts": W, "node_watts": {"<node id>": W}, "energy_kwh_per_day": E}`:
  each field optional; fields given replace the stored ones (null clears one). Returns the budget.
- `GET /v1/energy` -> `{"budget", "projected_kwh_today", "devices": [...], "allocation": {...}}`.

The Redis state behind them (budgets, device snapshots, the allocator) is ember.platform.energy_state.
"""

from __future__ import annotations

from typing import Annotated, Any

import redis
from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from ember.platform.energy_state import allocate_and_store, load_budget, save_budget
from ember.platform.gateway.auth import Principal
from ember.platform.gateway.deps import get_redis, require_roles
from ember.platform.names import check_name

router = APIRouter(tags=["energy"])

RedisDep = Annotated[redis.Redis, Depends(get_redis)]
EnergyOperator = Annotated[Principal, Depends(require_roles("admin", "operator"))]


class BudgetBody(BaseModel):
    """Body of PUT /v1/energy/budget."""

    model_config = ConfigDict(extra="forbid")

    cluster_watts: float | None = Field(None, gt=0, le=1e9)
    node_watts: dict[str, Annotated[float, Field(gt=0, le=1e7)]] | None = None
    energy_kwh_per_day: float | None = Field(None, gt=0, le=1e9)


@router.put("/v1/energy/budget")
def put_budget(body: BudgetBody, client: RedisDep, principal: EnergyOperator) -> dict[str, Any]:
    """Set (merge) the operator budget; returns it."""
    for node in (body.node_watts or {}).keys():
        check_name(node, "node id")
    budget = load_budget(client)
    given = body.model_fields_set
    if "cluster_watts" in given:
        budget.cluster_watts = body.cluster_watts
    if "node_watts" in given:
        budget.node_watts = dict(body.node_watts or {})
    if "energy_kwh_per_day" in given:
        budget.energy_kwh_per_day = body.energy_kwh_per_day
    save_budget(client, budget)
    allocate_and_store(client)
    return budget.to_dict()


@router.get("/v1/energy")
def get_energy(client: RedisDep, principal: EnergyOperator) -> dict[str, Any]:
    """Budget, projected kWh today, every live device and the allocation."""
    return allocate_and_store(client)
