"""The cluster as placement policies read it (`ClusterView`), and the per-decision snapshot."""

from __future__ import annotations

import time
from collections.abc import Sequence, Set
from dataclasses import replace
from typing import cast

from ember.platform.cluster.base import ClusterBase, state_errors
from ember.platform.cluster.records import (
    TIER_RANK,
    InstanceRecord,
    node_entry,
    room_devices,
)
from ember.platform.state import PREFIX, Keys
from ember.scheduler.view import DeviceState, NodeState, PlacementRequest, choose_room, room_window


class ClusterReads(ClusterBase):
    """Reads of nodes, devices and instances; the live `ClusterView`."""

    @state_errors
    def instances(self, function: str | None = None) -> list[InstanceRecord]:
        """Every instance, or those of one function."""
        ids = sorted(self.r.smembers(Keys.function_instances(function) if function else Keys.instances))
        return self._records(ids)

    @state_errors
    def instance_counts(self) -> dict[tuple[str, str], int]:
        """Instances by (function, state): two fields of each, in one round trip after the index."""
        pipe = self.r.pipeline(transaction=False)
        for i in self.r.smembers(Keys.instances):
            pipe.hmget(Keys.instance(i), "function", "state")
        counts: dict[tuple[str, str], int] = {}
        for fn, state in pipe.execute():
            if fn is not None and state is not None:  # removed since the index was read
                counts[(fn, state)] = counts.get((fn, state), 0) + 1
        return counts

    @state_errors
    def instance(self, instance_id: str) -> InstanceRecord | None:
        found = self._records([instance_id])
        return found[0] if found else None

    @state_errors
    def node_url(self, node_id: str) -> str | None:
        return cast("str | None", self.r.hget(Keys.node(node_id), "url"))

    @state_errors
    def live_nodes(self) -> list[str]:
        """Registered nodes whose heartbeat has not expired."""
        ids = sorted(self.r.smembers(Keys.nodes))
        pipe = self.r.pipeline(transaction=False)
        for n in ids:
            pipe.exists(Keys.node_alive(n))
        return [n for n, ok in zip(ids, pipe.execute(), strict=True) if ok]

    @state_errors
    def node(self, node_id: str) -> NodeState | None:
        found = self._node_states("ids", [node_id])
        return found[0] if found else None

    @state_errors
    def nodes(self, node_ids: Sequence[str], *, only_checkpoint: str = "") -> Sequence[NodeState]:
        """Live nodes among `node_ids` in one round trip (holdings limited to `only_checkpoint`
        when given: what one placement decision needs)."""
        return self._node_states("ids", list(node_ids), only_checkpoint) if node_ids else []

    @state_errors
    def nodes_holding(self, checkpoint: str, limit: int | None = None, *,
                      only_checkpoint: str = "") -> Sequence[NodeState]:
        """Live nodes with the checkpoint in a local tier (from the holders index), nearest first."""
        nodes = self._node_states("holders", [checkpoint], only_checkpoint)
        nodes.sort(key=lambda n: (TIER_RANK.get(n.holdings.get(checkpoint, "remote"), 3), n.node_id))
        return nodes if limit is None else nodes[:limit]

    @state_errors
    def devices_with_room(self, nbytes: int, limit: int = 16, spread: bool = False) -> Sequence[DeviceState]:
        """Up to `limit` live devices with at least `nbytes` free, from the free-memory index, in one
        round trip, chosen by the rule every backend shares (`choose_room`)."""
        rows = self.scripts.devices_with_room(keys=[Keys.devices_free],
                                              args=[PREFIX, nbytes, room_window(limit), "1" if spread else "0"])
        return choose_room(room_devices(rows, nbytes, time.time()), limit, spread)

    @state_errors
    def prefetching(self, checkpoint: str) -> set[str]:
        """Live nodes a prefetch of `checkpoint` is in flight to (recorded by
        `LoadQueues.send_prefetch`, neither ended nor expired)."""
        ids = cast("list[str]", self.r.zrangebyscore(Keys.prefetching(checkpoint), f"({time.time()!r}", "+inf"))
        if not ids:
            return set()
        pipe = self.r.pipeline(transaction=False)
        for n in ids:
            pipe.exists(Keys.node_alive(n))
        return {n for n, alive in zip(ids, pipe.execute(), strict=True) if alive}

    def node_ids(self) -> Sequence[str]:
        return self.live_nodes()

    @state_errors
    def all_nodes(self) -> Sequence[NodeState]:
        return self._node_states("all", [])

    def _records(self, ids: Sequence[str]) -> list[InstanceRecord]:
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(Keys.instance(i))
        return [InstanceRecord.from_hash(i, h) for i, h in zip(ids, pipe.execute(), strict=True) if h]

    def _node_states(self, mode: str, args: Sequence[str], only: str = "") -> list[NodeState]:
        """Live nodes as NodeState, read by one script: mode "ids" (args: node ids), "holders"
        (args: [checkpoint]) or "all". With `only`, holdings list that checkpoint alone."""
        entries = self.scripts.snapshot_nodes(args=[PREFIX, mode, only, *args])
        now = time.time()
        return [node_entry(e, now) for e in entries]


class DecisionView:
    """What one placement decision reads. The first read of the request's holders or devices with
    room fetches both, with the nodes of the first devices, in one script (one round trip, one
    consistent snapshot); anything else falls through to the cluster."""

    ROOM_ROWS = 32  # devices-with-room rows fetched (a policy asking limit <= 16 is served)
    SORT_ROWS = 12  # rows whose nodes may be prefetched (ember asks for 6 devices: 12 rows)
    ROOM_NODES = 4  # nodes prefetched whole, in packing order (remote estimates need bandwidths)

    def __init__(self, cluster: ClusterReads, request: PlacementRequest, unfreeable: Set[str] = frozenset()) -> None:
        self.cluster = cluster
        self.request = request
        self.unfreeable = unfreeable  # "node/device" keys whose idle bytes are shown as 0 (cannot be freed)
        self.cache: dict[str, NodeState] = {}
        self._holders: list[NodeState] | None = None
        self._rows: list[DeviceState] = []

    def _load(self) -> None:
        if self._holders is not None:
            return
        req = self.request
        holders, rows, extra = self.cluster.scripts.decision_snapshot(
            keys=[Keys.devices_free],
            args=[PREFIX, req.checkpoint, req.room_bytes, self.ROOM_ROWS, repr(time.time()), self.SORT_ROWS,
                  self.ROOM_NODES])
        now = time.time()
        self._holders = list(self._keep(sorted(
            (node_entry(e, now) for e in holders),
            key=lambda n: (TIER_RANK.get(n.holdings.get(req.checkpoint, "remote"), 3), n.node_id))))
        self._rows = [self._shown(d) for d in room_devices(rows, req.room_bytes, now)]
        self._keep([node_entry(e, now) for e in extra])

    def _keep(self, nodes: Sequence[NodeState]) -> Sequence[NodeState]:
        if self.unfreeable:
            nodes = [replace(n, devices=tuple(self._shown(d) for d in n.devices)) for n in nodes]
        for n in nodes:
            self.cache[n.node_id] = n
        return nodes

    def _shown(self, d: DeviceState) -> DeviceState:
        """`d` as this decision sees it: no idle bytes where the placement found them unfreeable."""
        return replace(d, idle_bytes=0) if d.key in self.unfreeable else d

    def node(self, node_id: str) -> NodeState | None:
        found = self.nodes([node_id])
        return found[0] if found else None

    def nodes(self, node_ids: Sequence[str]) -> Sequence[NodeState]:
        missing = [n for n in node_ids if n not in self.cache]
        if missing:
            self._keep(self.cluster.nodes(missing, only_checkpoint=self.request.checkpoint))
        return [self.cache[n] for n in node_ids if n in self.cache]

    def nodes_holding(self, checkpoint: str, limit: int | None = None) -> Sequence[NodeState]:
        if checkpoint != self.request.checkpoint:
            return self._keep(self.cluster.nodes_holding(checkpoint, limit))
        self._load()
        assert self._holders is not None
        return self._holders if limit is None else self._holders[:limit]

    def devices_with_room(self, nbytes: int, limit: int = 16, spread: bool = False) -> Sequence[DeviceState]:
        # the snapshot holds the devices with room for the request's claim (weights + KV budget),
        # what the policies ask for; anything else is read live
        if spread or nbytes != self.request.room_bytes or room_window(limit) > self.ROOM_ROWS:
            return self.cluster.devices_with_room(nbytes, limit, spread)
        self._load()
        return choose_room(self._rows, limit, spread)

    def device(self, node_id: str, device_id: str) -> DeviceState | None:
        """A device as this decision read it (read now if it did not; None if unknown or dead)."""
        found = self.nodes([node_id])
        for d in (found[0].devices if found else ()):
            if d.device_id == device_id:
                return d
        return None

    def prefetching(self, checkpoint: str) -> set[str]:
        return self.cluster.prefetching(checkpoint)

    def node_ids(self) -> Sequence[str]:
        return self.cluster.node_ids()

    def all_nodes(self) -> Sequence[NodeState]:
        return self._keep(self.cluster.all_nodes())
