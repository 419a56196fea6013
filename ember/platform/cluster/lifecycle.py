"""Instance lifecycle transitions (see records.py): place (claimed), begin_load (loading),
mark_ready (ready), drain (draining), remove (gone), and the reaping of stuck claims. Each is one
Lua script, so every transition is atomic and checks the state it starts from."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from ember.platform.cluster.base import ClusterBase, state_errors
from ember.platform.cluster.records import InstanceRecord, Placement
from ember.platform.cluster.view import DecisionView
from ember.platform.state import PREFIX, Keys
from ember.scheduler.estimator import beside_weights
from ember.scheduler.view import DeviceState, PlacementPolicy, PlacementRequest

_CLAIM_ATTEMPTS = 4


class InstanceLifecycle(ClusterBase):
    @state_errors
    def place(self, request: PlacementRequest, policy: PlacementPolicy,
              evicted: list[InstanceRecord] | None = None) -> Placement | None:
        """Ask `policy` for a device, then claim `request.nbytes` there and record an instance in
        state "claimed" (deadline: now + claim_timeout_s), atomically. Retries when the claim
        loses a race; None if nothing fits. A device chosen for its idle bytes is made room on
        first (`loadqueues.evict_for_placement`, the shared eviction rule) for what the claim takes
        there (`PlacementRequest.claim_bytes`: the KV budget alone where the device holds the
        checkpoint's weights); the instances evicted are appended to `evicted` (their workers must
        unload them). The simulator's `ControlPlane._cold_start` is the twin."""
        from ember.platform.loadqueues import evict_for_placement

        unfreeable: set[str] = set()  # devices whose idle bytes this placement found it cannot free
        for _ in range(_CLAIM_ATTEMPTS):
            view = DecisionView(self, request, unfreeable)  # type: ignore[arg-type]
            holds = self._holds_weights(request)
            est = policy.place(request, view) or beside_weights(request, self, holds)  # type: ignore[arg-type]
            if est is None:
                return None
            dev = view.device(est.node_id, est.device_id)
            if dev is not None and dev.free_bytes < request.room_bytes:
                need = request.claim_bytes(holds(dev))  # what claim.lua will take there
                gone = evict_for_placement(self, est.node_id, est.device_id, need,  # type: ignore[arg-type]
                                           dev.free_bytes, request.function)
                if evicted is not None:
                    evicted.extend(gone)
                if not gone and dev.free_bytes < need:
                    # its idle bytes could not be freed (an instance min_instances keeps, or one that
                    # took a request): decide again without counting them, so that a device with room
                    # elsewhere is chosen (before: the same device on every try, nothing placed)
                    unfreeable.add(dev.key)
                    continue
            now = time.time()
            rec = InstanceRecord(
                instance_id=uuid.uuid4().hex[:16], function=request.function, checkpoint=request.checkpoint,
                node_id=est.node_id, device_id=est.device_id, worker_url="", state="claimed", outstanding=0,
                nbytes=request.nbytes, created_s=now, last_used_s=now, tier=est.tier,
                deadline_s=now + self.claim_timeout_s, kv_bytes=request.kv_bytes,
            )
            fields: list[str] = ["estimate_s", repr(est.seconds)]
            for k, v in rec.to_hash().items():
                if k != "worker_url":  # the script copies it from the node record
                    fields += [k, v]
            url = self.scripts.claim(
                keys=[Keys.node_alive(est.node_id), Keys.device(est.node_id, est.device_id),
                      Keys.instance(rec.instance_id), Keys.instances, Keys.function_instances(request.function),
                      Keys.node_instances(est.node_id), Keys.devices_free, Keys.node(est.node_id),
                      Keys.nodes_draining],
                args=[request.nbytes, repr(now), repr(est.seconds), f"{est.node_id}/{est.device_id}",
                      rec.instance_id, request.max_instances or 0, *fields],
            )
            if isinstance(url, str):
                node = view.node(est.node_id)  # read by the decision (the cold start's DRAM keep needs it)
                ssd_bps = node.bandwidth_bps.get("ssd", 0.0) if node is not None else 0.0
                return Placement(rec.instance_id, est.node_id, est.device_id, url, est.tier, est.seconds, ssd_bps)
            if url == -2:  # the function already has max_instances (another gateway won the race)
                return None
        return None

    def _holds_weights(self, request: PlacementRequest) -> Callable[[DeviceState], bool]:
        """Whether a device holds the request's checkpoint's weights (claim.lua's refcount field)."""
        field = f"ckpt:{request.checkpoint}"
        return lambda d: int(self.r.hget(Keys.device(d.node_id, d.device_id), field) or 0) > 0

    @state_errors
    def begin_load(self, instance_id: str, deadline_s: float | None = None) -> bool:
        """claimed -> loading (the worker accepted the load). False: the claim is gone (reaped, or
        the gateway gave up): do not load."""
        deadline = deadline_s if deadline_s is not None else time.time() + self.claim_timeout_s
        return bool(self.scripts.begin_load(keys=[Keys.instance(instance_id)], args=[repr(deadline)]))

    @state_errors
    def mark_ready(self, instance_id: str, function: str = "") -> bool:
        """loading -> ready, waking the function's waiting requests. False: the instance is gone or
        draining (never resurrected): the worker drops what it loaded."""
        fn = function or self.r.hget(Keys.instance(instance_id), "function") or ""
        return bool(self.scripts.mark_ready(keys=[Keys.instance(instance_id)],
                                            args=[repr(time.time()), Keys.wake(str(fn))]))

    @state_errors
    def drain(self, instance_id: str, *, force: bool = False) -> str:
        """ready -> draining (no new requests; its worker drops it when idle and then removes it).
        Without `force` only an instance with no outstanding request drains. Returns "draining",
        "removed" (a claimed/loading instance with force), "busy", "" (gone), or the state that refused."""
        return str(self.scripts.drain(keys=[Keys.instance(instance_id), Keys.instances, Keys.devices_free],
                                      args=[PREFIX, instance_id, "1" if force else "0", repr(time.time())]))

    @state_errors
    def remove_instance(self, instance_id: str) -> None:
        """Gone: forget an instance and free its claim (idempotent)."""
        self.scripts.remove_instance(keys=[Keys.instances, Keys.devices_free], args=[PREFIX, instance_id])

    @state_errors
    def evict_if_idle(self, instance_id: str) -> bool:
        """Forget a ready instance with no outstanding request and free its claim, atomically (a
        request cannot take it in between); False if it is busy, loading or gone."""
        return bool(self.scripts.evict_if_idle(keys=[Keys.instance(instance_id), Keys.instances, Keys.devices_free],
                                               args=[PREFIX, instance_id]))

    @state_errors
    def restore_instance(self, rec: InstanceRecord, slots: Sequence[str] = (), slot_expiry_s: float = 0.0) -> bool:
        """A worker re-asserts an instance it holds, with its real state (after a Redis restart or
        a reap, once `register_node` ran again): recorded and claimed unless already there, with
        the request slots of the streams it still serves (`slots`, leases until `slot_expiry_s`
        that the gateways holding them renew and release; `outstanding` counts them). False when
        its device is not registered (the node was deregistered meanwhile): nothing recorded; the
        worker's next beat finds its node unknown and registers again."""
        fields: list[Any] = []
        for k, v in rec.to_hash().items():
            fields += [k, v]
        return int(self.scripts.restore(
            keys=[Keys.instance(rec.instance_id), Keys.device(rec.node_id, rec.device_id), Keys.instances,
                  Keys.function_instances(rec.function), Keys.node_instances(rec.node_id), Keys.devices_free,
                  Keys.instance_slots(rec.instance_id)],
            args=[rec.instance_id, rec.nbytes, f"{rec.node_id}/{rec.device_id}", Keys.wake(rec.function),
                  repr(slot_expiry_s), len(slots), *slots, *fields],
        )) >= 0

    @state_errors
    def reap_stuck(self) -> list[str]:
        """Remove claimed/loading instances past their deadline; returns their ids."""
        return sorted(self.scripts.reap_stuck(keys=[Keys.instances, Keys.devices_free],
                                              args=[PREFIX, repr(time.time())]))
