"""Node membership: registration, heartbeats that reconcile a node's instances, dead-node reaping,
and the bandwidth each node observes per tier."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from typing import Any

from ember.platform.cluster.base import ClusterBase, state_errors
from ember.platform.cluster.records import DeviceSpec, Heartbeat
from ember.platform.state import PREFIX, Keys


class NodeMembership(ClusterBase):
    @state_errors
    def register_node(self, node_id: str, url: str, devices: list[DeviceSpec],
                      bandwidth_bps: dict[str, float], cloud_instance_id: str = "") -> None:
        """Announce a node, its devices and measured tier bandwidths. Idempotent: claims of
        instances already recorded on its devices are kept (call again after a Redis restart)."""
        mapping: dict[str, str] = {
            "url": url,
            "devices": json.dumps([asdict(d) for d in devices]),
            "bandwidth": json.dumps(bandwidth_bps),
            "registered_s": repr(time.time()),
            "cloud_instance_id": cloud_instance_id,  # the node scaler terminates the node by this id
        }
        mapping.update({f"bw:{tier}": repr(float(bps)) for tier, bps in bandwidth_bps.items()})
        flat: list[str] = []
        for k, v in mapping.items():
            flat += [k, v]
        args: list[Any] = [PREFIX, node_id, int(self.heartbeat_ttl_s * 1000), len(devices)]
        for d in devices:
            args += [d.device_id, d.memory_bytes]
        self.scripts.register(keys=[Keys.node(node_id), Keys.nodes, Keys.node_alive(node_id), Keys.devices_free],
                              args=[*args, *flat])

    @state_errors
    def set_draining(self, node_id: str, draining: bool) -> None:
        """Mark a node draining (placement, claims and warm routing skip it) or take it back."""
        if draining:
            self.r.sadd(Keys.nodes_draining, node_id)
        else:
            self.r.srem(Keys.nodes_draining, node_id)

    @state_errors
    def draining_nodes(self) -> set[str]:
        return set(self.r.smembers(Keys.nodes_draining))

    @state_errors
    def heartbeat(self, node_id: str, holdings: dict[str, str],
                  instances: Iterable[tuple[str, str]] | None = None) -> Heartbeat:
        """Refresh the node's TTL, replace its holdings (checkpoint -> nearest local tier) and, when
        `instances` ((id, state) the worker really holds) is given, reconcile them: Redis drops
        instances of this node the worker does not hold (claims still within their deadline stay),
        a worker's loading instance gets a new deadline, and the answer lists the instances Redis
        does not know (the worker drops them) and those draining (the worker unloads them when
        idle). `known` False: Redis does not know the node (restarted or reaped): register again."""
        now = time.time()
        args: list[Any] = [PREFIX, node_id, int(self.heartbeat_ttl_s * 1000), repr(now),
                           repr(now + self.claim_timeout_s), len(holdings)]
        for ck, tier in holdings.items():
            args += [ck, tier]
        reconcile = instances is not None
        for iid, state in instances or ():
            args += [iid, state]
        out = self.scripts.heartbeat(
            keys=[Keys.node(node_id), Keys.node_alive(node_id), Keys.node_holdings(node_id),
                  Keys.node_instances(node_id) if reconcile else Keys.node_instances("\x00none"),
                  Keys.instances, Keys.devices_free],
            args=args)
        if not out:
            return Heartbeat(known=False)
        _, unknown, draining, removed = out
        return Heartbeat(True, tuple(unknown), tuple(draining), tuple(removed))

    @state_errors
    def deregister_node(self, node_id: str) -> None:
        """Remove a node with its devices, holdings, instances, claims and draining mark."""
        self.scripts.drop_node(keys=[Keys.nodes, Keys.instances, Keys.devices_free], args=[PREFIX, node_id])

    @state_errors
    def reap_dead_nodes(self) -> list[str]:
        """Drop nodes whose heartbeat expired, releasing their instances and claims. A draining mark
        stays (`deregister_node` or the node scaler's undrain forgets it): a worker that was alive
        registers again and must not take new work on a node being drained."""
        return sorted(self.scripts.reap_dead(keys=[Keys.nodes, Keys.instances, Keys.devices_free], args=[PREFIX]))
