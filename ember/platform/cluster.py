"""Live cluster state in Redis: nodes, devices, instances, claims and leases.

`RedisCluster` is the platform's `ClusterView` (ember.scheduler.view): placement policies read
nodes, devices and checkpoint holdings from here, and `place` claims device memory atomically
(a Lua script), so two gateways never book the same bytes. Workers register, heartbeat (a key
with a TTL) and re-assert their instances after a Redis restart; a node whose heartbeat lapsed
is never chosen and `reap_dead_nodes` releases what it held.

Units: bytes, seconds (wall clock, `time.time()`), bytes per second. Scripts build some keys
from the prefix at run time (holders, instances of a function), so this targets one Redis
(or an ElastiCache replication group), not Redis Cluster's sharded mode.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar, cast

import redis

from ember.errors import StateUnavailable
from ember.platform.loadqueues import LUA_IDLE_BY_DEVICE, evict_for_placement, parse_bandwidth_and_queues
from ember.platform.state import PREFIX, Keys
from ember.scheduler.estimator import EWMA_ALPHA
from ember.scheduler.view import (
    DeviceState,
    NodeState,
    PlacementPolicy,
    PlacementRequest,
    Tier,
    room_order,
    tier_rank,
)

__all__ = ["DeviceSpec", "InstanceRecord", "Placement", "RedisCluster", "EWMA_ALPHA"]

_CLAIM_ATTEMPTS = 4


@dataclass(frozen=True)
class DeviceSpec:
    """A device a worker offers: an id ("cuda:0", "cpu:1") and its memory for instances."""

    device_id: str
    memory_bytes: int


@dataclass
class InstanceRecord:
    """One function instance on one device. `state` is "loading" until the worker says "ready"."""

    instance_id: str
    function: str
    checkpoint: str
    node_id: str
    device_id: str
    worker_url: str
    state: str
    outstanding: int
    nbytes: int
    created_s: float
    last_used_s: float
    tier: str = "remote"  # where the checkpoint was when the instance was placed

    @classmethod
    def from_hash(cls, instance_id: str, h: dict[str, str]) -> InstanceRecord:
        return cls(
            instance_id=instance_id,
            function=h.get("function", ""),
            checkpoint=h.get("checkpoint", ""),
            node_id=h.get("node_id", ""),
            device_id=h.get("device_id", ""),
            worker_url=h.get("worker_url", ""),
            state=h.get("state", "loading"),
            outstanding=int(h.get("outstanding", 0)),
            nbytes=int(h.get("nbytes", 0)),
            created_s=float(h.get("created_s", 0.0)),
            last_used_s=float(h.get("last_used_s", 0.0)),
            tier=h.get("tier", "remote"),
        )

    def to_hash(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items() if k != "instance_id"}


@dataclass(frozen=True)
class Placement:
    """Where a cold start goes: the claimed device and the estimate that chose it."""

    instance_id: str
    node_id: str
    device_id: str
    worker_url: str
    tier: str
    estimate_s: float


F = TypeVar("F", bound=Callable[..., Any])


def _state_errors(fn: F) -> F:
    """Redis connection failures become StateUnavailable (HTTP 503)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StateUnavailable(f"cluster state (Redis) unavailable: {e}") from e

    return cast(F, wrapper)


class RedisCluster:
    """Cluster state over one Redis; also the live `ClusterView` that placement policies read."""

    def __init__(self, client: redis.Redis, *, heartbeat_ttl_s: float = 5.0) -> None:
        self.r = client
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self._register = client.register_script(_REGISTER)
        self._claim = client.register_script(_CLAIM)
        self._remove = client.register_script(_REMOVE_INSTANCE)
        self._evict = client.register_script(_EVICT_IF_IDLE)
        self._drop_node = client.register_script(_DROP_NODE)
        self._reap = client.register_script(_REAP_DEAD)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._acquire = client.register_script(_ACQUIRE_WARM)
        self._release = client.register_script(_RELEASE_REQUEST)
        self._ewma = client.register_script(_EWMA)
        self._lease = client.register_script(_LEASE)
        self._restore = client.register_script(_RESTORE)
        self._ready = client.register_script(_MARK_READY)
        self._snapshot = client.register_script(_SNAPSHOT_NODES)
        self._room = client.register_script(_DEVICES_WITH_ROOM)
        self._decision = client.register_script(_DECISION_SNAPSHOT)

    # --- worker side ----------------------------------------------------------------------
    @_state_errors
    def register_node(self, node_id: str, url: str, devices: list[DeviceSpec],
                      bandwidth_bps: dict[str, float]) -> None:
        """Announce a node, its devices and measured tier bandwidths. Idempotent: claims of
        instances already recorded on its devices are kept (call again after a Redis restart)."""
        mapping: dict[str, str] = {
            "url": url,
            "devices": json.dumps([asdict(d) for d in devices]),
            "bandwidth": json.dumps(bandwidth_bps),
            "registered_s": repr(time.time()),
        }
        mapping.update({f"bw:{tier}": repr(float(bps)) for tier, bps in bandwidth_bps.items()})
        flat: list[str] = []
        for k, v in mapping.items():
            flat += [k, v]
        args: list[Any] = [PREFIX, node_id, int(self.heartbeat_ttl_s * 1000), len(devices)]
        for d in devices:
            args += [d.device_id, d.memory_bytes]
        self._register(keys=[Keys.node(node_id), Keys.nodes, Keys.node_alive(node_id), Keys.devices_free],
                       args=[*args, *flat])

    @_state_errors
    def heartbeat(self, node_id: str, holdings: dict[str, str]) -> bool:
        """Refresh the node's TTL and replace its holdings (checkpoint -> nearest local tier).
        Returns False when Redis does not know the node (restarted or reaped): register again."""
        args: list[Any] = [PREFIX, node_id, int(self.heartbeat_ttl_s * 1000)]
        for ck, tier in holdings.items():
            args += [ck, tier]
        ok = self._heartbeat(keys=[Keys.node(node_id), Keys.node_alive(node_id), Keys.node_holdings(node_id)],
                             args=args)
        return bool(ok)

    @_state_errors
    def observe_load(self, node_id: str, tier: str, nbytes: int, seconds: float) -> None:
        """Fold one observed load into the node's bandwidth for `tier` (exponentially weighted)."""
        if nbytes <= 0 or seconds <= 0:
            return
        self._ewma(keys=[Keys.node(node_id)], args=[f"bw:{tier}", repr(nbytes / seconds), repr(EWMA_ALPHA)])

    @_state_errors
    def deregister_node(self, node_id: str) -> None:
        """Remove a node with its devices, holdings, instances and claims."""
        self._drop_node(keys=[Keys.nodes, Keys.instances, Keys.devices_free], args=[PREFIX, node_id])

    @_state_errors
    def restore_instance(self, rec: InstanceRecord) -> None:
        """A worker re-asserts an instance it holds (after a Redis restart, once `register_node`
        ran again): record and claim it unless the record is already there."""
        fields: list[str] = []
        for k, v in rec.to_hash().items():
            fields += [k, v]
        self._restore(
            keys=[Keys.instance(rec.instance_id), Keys.device(rec.node_id, rec.device_id), Keys.instances,
                  Keys.function_instances(rec.function), Keys.node_instances(rec.node_id), Keys.devices_free],
            args=[rec.instance_id, rec.nbytes, f"{rec.node_id}/{rec.device_id}", *fields],
        )

    # --- placement (gateway) --------------------------------------------------------------
    @_state_errors
    def place(self, request: PlacementRequest, policy: PlacementPolicy,
              evicted: list[InstanceRecord] | None = None) -> Placement | None:
        """Ask `policy` for a device, then claim `request.nbytes` there and record an instance in
        state "loading", atomically. Retries when the claim loses a race; None if nothing fits.
        A device chosen for its idle bytes is made room on first (`evict_for_placement`); the
        instances evicted are appended to `evicted` (their workers must unload them)."""
        for _ in range(_CLAIM_ATTEMPTS):
            view = _DecisionView(self, request)
            est = policy.place(request, view)
            if est is None:
                return None
            dev = view.device(est.node_id, est.device_id)
            if dev is not None and dev.free_bytes < request.nbytes:
                gone = evict_for_placement(self, est.node_id, est.device_id, request.nbytes, dev.free_bytes,
                                           request.function)
                if evicted is not None:
                    evicted.extend(gone)
            now = time.time()
            rec = InstanceRecord(
                instance_id=uuid.uuid4().hex[:16], function=request.function, checkpoint=request.checkpoint,
                node_id=est.node_id, device_id=est.device_id, worker_url="", state="loading", outstanding=0,
                nbytes=request.nbytes, created_s=now, last_used_s=now, tier=est.tier,
            )
            fields: list[str] = ["estimate_s", repr(est.seconds)]
            for k, v in rec.to_hash().items():
                if k != "worker_url":  # the script copies it from the node record
                    fields += [k, v]
            url = self._claim(
                keys=[Keys.node_alive(est.node_id), Keys.device(est.node_id, est.device_id),
                      Keys.instance(rec.instance_id), Keys.instances, Keys.function_instances(request.function),
                      Keys.node_instances(est.node_id), Keys.devices_free, Keys.node(est.node_id)],
                args=[request.nbytes, repr(now), repr(est.seconds), f"{est.node_id}/{est.device_id}",
                      rec.instance_id, request.max_instances or 0, *fields],
            )
            if isinstance(url, str):
                return Placement(rec.instance_id, est.node_id, est.device_id, url, est.tier, est.seconds)
            if url == -2:  # the function already has max_instances (another gateway won the race)
                return None
        return None

    @_state_errors
    def mark_ready(self, instance_id: str) -> None:
        """The worker finished loading: the instance may take requests."""
        self._ready(keys=[Keys.instance(instance_id)], args=[repr(time.time())])

    @_state_errors
    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance and free its claim on the device (idempotent)."""
        self._remove(keys=[Keys.instance(instance_id), Keys.instances, Keys.devices_free],
                     args=[PREFIX, instance_id])

    @_state_errors
    def evict_if_idle(self, instance_id: str) -> bool:
        """Forget a ready instance with no outstanding request and free its claim, atomically (a
        request cannot take it in between); False if it is busy, loading or gone."""
        return bool(self._evict(keys=[Keys.instance(instance_id), Keys.instances, Keys.devices_free],
                                args=[PREFIX, instance_id]))

    @_state_errors
    def instances(self, function: str | None = None) -> list[InstanceRecord]:
        """Every instance, or those of one function."""
        ids = sorted(self.r.smembers(Keys.function_instances(function) if function else Keys.instances))
        return self._records(ids)

    @_state_errors
    def instance(self, instance_id: str) -> InstanceRecord | None:
        found = self._records([instance_id])
        return found[0] if found else None

    @_state_errors
    def acquire_warm(self, function: str, target_concurrency: int) -> InstanceRecord | None:
        """Atomically take a request slot on the least-outstanding ready instance of `function`
        that is below `target_concurrency` on a live node; None if there is none."""
        flat = self._acquire(keys=[Keys.function_instances(function)],
                             args=[PREFIX, target_concurrency, repr(time.time())])
        if not flat:
            return None
        instance_id, *pairs = flat
        return InstanceRecord.from_hash(instance_id, dict(zip(pairs[::2], pairs[1::2], strict=True)))

    @_state_errors
    def release_request(self, instance_id: str) -> None:
        """A request finished: outstanding -= 1 (never below 0), last_used_s = now."""
        self._release(keys=[Keys.instance(instance_id)], args=[repr(time.time())])

    @_state_errors
    def node_url(self, node_id: str) -> str | None:
        return cast("str | None", self.r.hget(Keys.node(node_id), "url"))

    @_state_errors
    def live_nodes(self) -> list[str]:
        """Registered nodes whose heartbeat has not expired."""
        ids = sorted(self.r.smembers(Keys.nodes))
        alive = self._alive(ids)
        return [n for n, ok in zip(ids, alive, strict=True) if ok]

    @_state_errors
    def reap_dead_nodes(self) -> list[str]:
        """Drop nodes whose heartbeat expired, releasing their instances and claims."""
        return sorted(self._reap(keys=[Keys.nodes, Keys.instances, Keys.devices_free], args=[PREFIX]))

    @_state_errors
    def try_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """Acquire the named lease, or renew it if `holder` already has it."""
        return bool(self._lease(keys=[Keys.lease(name)], args=[holder, max(1, int(ttl_s * 1000))]))

    # --- ClusterView ------------------------------------------------------------------------
    @_state_errors
    def node(self, node_id: str) -> NodeState | None:
        found = self._node_states("ids", [node_id])
        return found[0] if found else None

    @_state_errors
    def nodes(self, node_ids: Sequence[str], *, only_checkpoint: str = "") -> Sequence[NodeState]:
        """Live nodes among `node_ids` in one round trip (holdings limited to `only_checkpoint`
        when given: what one placement decision needs)."""
        return self._node_states("ids", list(node_ids), only_checkpoint) if node_ids else []

    @_state_errors
    def nodes_holding(self, checkpoint: str, limit: int | None = None, *,
                      only_checkpoint: str = "") -> Sequence[NodeState]:
        """Live nodes with the checkpoint in a local tier (from the holders index), nearest first."""
        nodes = self._node_states("holders", [checkpoint], only_checkpoint)
        nodes.sort(key=lambda n: (tier_rank(n.holdings.get(checkpoint)), n.node_id))
        return nodes if limit is None else nodes[:limit]

    @_state_errors
    def devices_with_room(self, nbytes: int, limit: int = 16, spread: bool = False) -> Sequence[DeviceState]:
        """Up to `limit` live devices with at least `nbytes` free, from the free-memory index, in one
        round trip. Default order packs (awake, least queued, least free first); `spread` puts most
        free first."""
        rows = self._room(keys=[Keys.devices_free], args=[PREFIX, nbytes, limit * 2, "1" if spread else "0"])
        return _order_room(_room_devices(rows, nbytes, time.time()), spread)[:limit]

    def node_ids(self) -> Sequence[str]:
        return self.live_nodes()

    @_state_errors
    def all_nodes(self) -> Sequence[NodeState]:
        return self._node_states("all", [])

    # --- helpers ------------------------------------------------------------------------------
    def _alive(self, node_ids: Sequence[str]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for n in node_ids:
            pipe.exists(Keys.node_alive(n))
        return [bool(x) for x in pipe.execute()]

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
        entries = self._snapshot(args=[PREFIX, mode, only, *args])
        now = time.time()
        return [_node_entry(e, now) for e in entries]


class _DecisionView:
    """What one placement decision reads. The first read of the request's holders or devices with
    room fetches both, with the nodes of the first devices, in one script (one round trip, one
    consistent snapshot); anything else falls through to the cluster."""

    ROOM_ROWS = 32  # devices-with-room rows fetched (a policy asking limit <= 16 is served)
    SORT_ROWS = 12  # rows whose nodes may be prefetched (ember asks for 6 devices: 12 rows)
    ROOM_NODES = 4  # nodes prefetched whole, in packing order (remote estimates need bandwidths)

    def __init__(self, cluster: RedisCluster, request: PlacementRequest) -> None:
        self.cluster = cluster
        self.request = request
        self.cache: dict[str, NodeState] = {}
        self._holders: list[NodeState] | None = None
        self._rows: list[DeviceState] = []

    def _load(self) -> None:
        if self._holders is not None:
            return
        req = self.request
        holders, rows, extra = self.cluster._decision(
            keys=[Keys.devices_free],
            args=[PREFIX, req.checkpoint, req.nbytes, self.ROOM_ROWS, repr(time.time()), self.SORT_ROWS,
                  self.ROOM_NODES])
        now = time.time()
        self._holders = sorted((_node_entry(e, now) for e in holders),
                               key=lambda n: (tier_rank(n.holdings.get(req.checkpoint)), n.node_id))
        self._rows = _room_devices(rows, req.nbytes, now)
        self._keep(self._holders)
        self._keep([_node_entry(e, now) for e in extra])

    def _keep(self, nodes: Sequence[NodeState]) -> Sequence[NodeState]:
        for n in nodes:
            self.cache[n.node_id] = n
        return nodes

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
        if spread or nbytes != self.request.nbytes or limit * 2 > self.ROOM_ROWS:
            return self.cluster.devices_with_room(nbytes, limit, spread)
        self._load()
        return _order_room(self._rows[: limit * 2], spread)[:limit]

    def device(self, node_id: str, device_id: str) -> DeviceState | None:
        """A device as this decision read it (read now if it did not; None if unknown or dead)."""
        found = self.nodes([node_id])
        for d in (found[0].devices if found else ()):
            if d.node_id == node_id and d.device_id == device_id:
                return d
        return None

    def node_ids(self) -> Sequence[str]:
        return self.cluster.node_ids()

    def all_nodes(self) -> Sequence[NodeState]:
        return self._keep(self.cluster.all_nodes())


def _node_entry(entry: list, now: float) -> NodeState:
    """Parse a node entry of the snapshot scripts."""
    node_id, bw, holdings = entry[0], entry[1], _pairs(entry[2])
    devices = tuple(_compact_device(node_id, row, now) for row in entry[3:])
    bandwidth, tier_queue = parse_bandwidth_and_queues(bw, now)
    return NodeState(node_id=node_id, devices=devices, bandwidth_bps=bandwidth,
                     holdings=cast("dict[str, Tier]", holdings), tier_queue_s=tier_queue)


def _room_devices(rows: list[str], nbytes: int, now: float) -> list[DeviceState]:
    """Parse "node/device,memory,claimed,instances,busy_until" rows, keeping those with room."""
    out = []
    for row in rows:
        member, rest = row.split(",", 1)
        node_id, device_id = member.split("/", 1)
        d = _compact_device(node_id, f"{device_id},{rest}", now)
        if d.free_bytes >= nbytes:
            out.append(d)
    return out


def _order_room(devices: list[DeviceState], spread: bool) -> list[DeviceState]:
    return room_order(devices, spread)


def _pairs(flat: list[str]) -> dict[str, str]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


def _compact_device(node_id: str, row: str, now: float) -> DeviceState:
    """Parse "device_id,memory,claimed,instances,busy_until,idle_bytes" (device ids hold no commas)."""
    device_id, memory, claimed, instances, busy, idle = row.rsplit(",", 5)
    mem, n = int(memory), int(instances)
    return DeviceState(node_id=node_id, device_id=device_id, memory_bytes=mem,
                       free_bytes=max(0, mem - int(claimed)), instances=n,
                       queue_s=max(0.0, float(busy) - now), awake=n > 0, idle_bytes=int(idle))


# --- Lua scripts ----------------------------------------------------------------------------
# Keys built inside scripts follow ember.platform.state.Keys (a test checks they agree).

# KEYS: node, nodes, alive, devices_free
# ARGV: prefix, node id, ttl_ms, device count, (device id, memory bytes)..., field, value, ...
# Claims already recorded on the devices are kept, and the free-memory index follows them.
_REGISTER = """
local p, n, ndev = ARGV[1], ARGV[2], tonumber(ARGV[4])
local first_field = 5 + 2 * ndev
for i = first_field, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[2], n)
redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
for i = 5, first_field - 1, 2 do
  local dkey = p .. 'device:' .. n .. '/' .. ARGV[i]
  redis.call('HSET', dkey, 'memory_bytes', ARGV[i + 1])
  redis.call('HSETNX', dkey, 'claimed_bytes', 0)
  redis.call('HSETNX', dkey, 'instances', 0)
  redis.call('HSETNX', dkey, 'busy_until_s', 0)
  local claimed = tonumber(redis.call('HGET', dkey, 'claimed_bytes'))
  redis.call('ZADD', KEYS[4], tonumber(ARGV[i + 1]) - claimed, n .. '/' .. ARGV[i])
end
return 1
"""

# KEYS: alive, device, instance, instances, function instances, node instances, devices_free, node
# ARGV: nbytes, now, estimate_s, "node/device", instance id, max_instances (0: no limit), field, value, ...
# Returns the node's worker URL when the claim holds, 0 when the device lacks room, -1 when gone.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local url = redis.call('HGET', KEYS[8], 'url')
if not url then return -1 end
local mem = tonumber(redis.call('HGET', KEYS[2], 'memory_bytes'))
if not mem then return -1 end
local claimed = tonumber(redis.call('HGET', KEYS[2], 'claimed_bytes') or '0')
local n = tonumber(ARGV[1])
local max_instances = tonumber(ARGV[6])
if max_instances > 0 and redis.call('SCARD', KEYS[5]) >= max_instances then return -2 end
if mem - claimed < n then return 0 end
claimed = redis.call('HINCRBY', KEYS[2], 'claimed_bytes', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'instances', 1)
local now = tonumber(ARGV[2])
redis.call('ZADD', KEYS[7], mem - claimed, ARGV[4])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
-- load queues (ember.scheduler.estimator.queue_after_claim): device and source tier busy until the estimated end
local done_at = now + tonumber(ARGV[3])
local tq = 'tq:' .. (redis.call('HGET', KEYS[3], 'tier') or 'remote')
if tonumber(redis.call('HGET', KEYS[2], 'busy_until_s') or '0') < done_at then
  redis.call('HSET', KEYS[2], 'busy_until_s', tostring(done_at))
end
if tonumber(redis.call('HGET', KEYS[8], tq) or '0') < done_at then redis.call('HSET', KEYS[8], tq, tostring(done_at)) end
redis.call('HSET', KEYS[3], 'expected_end_s', tostring(done_at))
redis.call('SADD', KEYS[4], ARGV[5])
redis.call('SADD', KEYS[5], ARGV[5])
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('HSET', KEYS[3], 'worker_url', url)
return url
"""

# KEYS: instance, device, instances, function instances, node instances, devices_free
# ARGV: instance id, nbytes, "node/device", field, value, ...
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[5], ARGV[1])
local mem = tonumber(redis.call('HGET', KEYS[2], 'memory_bytes'))
if mem then
  local claimed = redis.call('HINCRBY', KEYS[2], 'claimed_bytes', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'instances', 1)
  redis.call('ZADD', KEYS[6], mem - claimed, ARGV[3])
end
return 1
"""

# KEYS: instance, instances, devices_free; ARGV: prefix, instance id
_REMOVE_INSTANCE = """
local f = redis.call('HMGET', KEYS[1], 'function', 'node_id', 'device_id', 'nbytes')
if not f[1] then return 0 end
local p, id = ARGV[1], ARGV[2]
local dkey = p .. 'device:' .. f[2] .. '/' .. f[3]
if redis.call('EXISTS', dkey) == 1 then
  local c = redis.call('HINCRBY', dkey, 'claimed_bytes', -tonumber(f[4]))
  if c < 0 then redis.call('HSET', dkey, 'claimed_bytes', 0); c = 0 end
  if redis.call('HINCRBY', dkey, 'instances', -1) < 0 then redis.call('HSET', dkey, 'instances', 0) end
  local mem = tonumber(redis.call('HGET', dkey, 'memory_bytes'))
  redis.call('ZADD', KEYS[3], mem - c, f[2] .. '/' .. f[3])
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], id)
redis.call('SREM', p .. 'function:' .. f[1] .. ':instances', id)
redis.call('SREM', p .. 'node:' .. f[2] .. ':instances', id)
return 1
"""

# The same, only for a ready instance with no outstanding request (eviction to make room).
_EVICT_IF_IDLE = """
local g = redis.call('HMGET', KEYS[1], 'state', 'outstanding')
if g[1] ~= 'ready' or (tonumber(g[2]) or 0) > 0 then return 0 end
""" + _REMOVE_INSTANCE

# Drops node n (its instances, claims, devices, holdings); with only_if_dead, only when its
# heartbeat key has expired (checked inside the script, so a beat cannot race the reaper).
_LUA_DROP_NODE = """
local function drop_node(p, n, only_if_dead, nodes_key, instances_key, free_key)
  local nodekey = p .. 'node:' .. n
  if only_if_dead and redis.call('EXISTS', nodekey .. ':alive') == 1 then return false end
  for _, id in ipairs(redis.call('SMEMBERS', nodekey .. ':instances')) do
    local fn = redis.call('HGET', p .. 'instance:' .. id, 'function')
    if fn then redis.call('SREM', p .. 'function:' .. fn .. ':instances', id) end
    redis.call('DEL', p .. 'instance:' .. id)
    redis.call('SREM', instances_key, id)
  end
  redis.call('DEL', nodekey .. ':instances')
  local devs = redis.call('HGET', nodekey, 'devices')
  if devs then
    for _, d in ipairs(cjson.decode(devs)) do
      redis.call('DEL', p .. 'device:' .. n .. '/' .. d['device_id'])
      redis.call('ZREM', free_key, n .. '/' .. d['device_id'])
    end
  end
  for _, ck in ipairs(redis.call('HKEYS', nodekey .. ':holdings')) do
    redis.call('SREM', p .. 'holders:' .. ck, n)
  end
  redis.call('DEL', nodekey .. ':holdings', nodekey .. ':alive', nodekey)
  redis.call('SREM', nodes_key, n)
  return true
end
"""

# KEYS: nodes, instances, devices_free; ARGV: prefix, node id
_DROP_NODE = _LUA_DROP_NODE + """
drop_node(ARGV[1], ARGV[2], false, KEYS[1], KEYS[2], KEYS[3])
return 1
"""

# KEYS: nodes, instances, devices_free; ARGV: prefix. Returns the ids of the nodes dropped.
_REAP_DEAD = _LUA_DROP_NODE + """
local reaped = {}
for _, n in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if drop_node(ARGV[1], n, true, KEYS[1], KEYS[2], KEYS[3]) then reaped[#reaped + 1] = n end
end
return reaped
"""

# KEYS: node, alive, holdings; ARGV: prefix, node id, ttl_ms, checkpoint, tier, ...
_HEARTBEAT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local p, n = ARGV[1], ARGV[2]
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
local new = {}
for i = 4, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end
for _, ck in ipairs(redis.call('HKEYS', KEYS[3])) do
  if not new[ck] then
    redis.call('HDEL', KEYS[3], ck)
    redis.call('SREM', p .. 'holders:' .. ck, n)
  end
end
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1])
  redis.call('SADD', p .. 'holders:' .. ARGV[i], n)
end
return 1
"""

# KEYS: function instances; ARGV: prefix, target_concurrency, now
_ACQUIRE_WARM = """
local p, target = ARGV[1], tonumber(ARGV[2])
local best, best_out = nil, nil
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = redis.call('HMGET', p .. 'instance:' .. id, 'state', 'outstanding', 'node_id')
  if f[1] == 'ready' and redis.call('EXISTS', p .. 'node:' .. f[3] .. ':alive') == 1 then
    local o = tonumber(f[2]) or 0
    if o < target and (best == nil or o < best_out or (o == best_out and id < best)) then
      best, best_out = id, o
    end
  end
end
if not best then return false end
local key = p .. 'instance:' .. best
redis.call('HINCRBY', key, 'outstanding', 1)
redis.call('HSET', key, 'last_used_s', ARGV[3])
local out = {best}
for _, v in ipairs(redis.call('HGETALL', key)) do out[#out + 1] = v end
return out
"""

# KEYS: instance; ARGV: now
_RELEASE_REQUEST = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], 'outstanding', -1) < 0 then redis.call('HSET', KEYS[1], 'outstanding', 0) end
redis.call('HSET', KEYS[1], 'last_used_s', ARGV[1])
return 1
"""

# KEYS: node; ARGV: field, observed bytes/s, alpha
_EWMA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local obs, a = tonumber(ARGV[2]), tonumber(ARGV[3])
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local new = obs
if cur then new = (1 - a) * cur + a * obs end
redis.call('HSET', KEYS[1], ARGV[1], tostring(new))
return tostring(new)
"""

# KEYS: instance; ARGV: now (a removed instance is not resurrected)
_MARK_READY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'ready', 'last_used_s', ARGV[1])
return 1
"""

# A Lua function shared by the snapshot scripts: one live node as
# {node id, "tier=bps;...", holdings (only `only`'s tier unless only == ''), "device_id,memory,claimed,instances,busy_until", ...}
# or nil when the node is dead or unknown.
_LUA_NODE_ENTRY = LUA_IDLE_BY_DEVICE + """
local function node_entry(p, n, only)
  local nk = p .. 'node:' .. n
  if redis.call('EXISTS', nk .. ':alive') == 0 then return nil end
  local h = redis.call('HGETALL', nk)
  local devs, bw = nil, {}
  for i = 1, #h, 2 do
    if h[i] == 'devices' then devs = h[i + 1]
    elseif string.sub(h[i], 1, 3) == 'bw:' then bw[#bw + 1] = string.sub(h[i], 4) .. '=' .. h[i + 1]
    elseif string.sub(h[i], 1, 3) == 'tq:' then bw[#bw + 1] = h[i] .. '=' .. h[i + 1] end
  end
  local idle = idle_by_device(p, n)
  if not devs then return nil end
  local holdings = {}
  if only == '' then
    holdings = redis.call('HGETALL', nk .. ':holdings')
  else
    local tier = redis.call('HGET', nk .. ':holdings', only)
    if tier then holdings = {only, tier} end
  end
  local entry = {n, table.concat(bw, ';'), holdings}
  for _, d in ipairs(cjson.decode(devs)) do
    local f = redis.call('HMGET', p .. 'device:' .. n .. '/' .. d['device_id'],
                         'memory_bytes', 'claimed_bytes', 'instances', 'busy_until_s')
    if f[1] then
      entry[#entry + 1] = d['device_id'] .. ',' .. f[1] .. ',' .. (f[2] or '0') .. ',' .. (f[3] or '0') .. ',' .. (f[4] or '0') .. ',' .. (idle[d['device_id']] or 0)
    end
  end
  return entry
end

local function room_rows(p, zkey, nbytes, count, spread)
  local members
  if spread == '1' then
    members = redis.call('ZREVRANGEBYSCORE', zkey, '+inf', nbytes, 'LIMIT', 0, count)
  else
    members = redis.call('ZRANGEBYSCORE', zkey, nbytes, '+inf', 'LIMIT', 0, count)
  end
  local rows, nodes, idle = {}, {}, {}
  for _, m in ipairs(members) do
    local slash = string.find(m, '/', 1, true)
    if slash then
      local n = string.sub(m, 1, slash - 1)
      if redis.call('EXISTS', p .. 'node:' .. n .. ':alive') == 1 then
        local f = redis.call('HMGET', p .. 'device:' .. m, 'memory_bytes', 'claimed_bytes', 'instances', 'busy_until_s')
        if f[1] then
          if not idle[n] then idle[n] = idle_by_device(p, n) end
          rows[#rows + 1] = m .. ',' .. f[1] .. ',' .. (f[2] or '0') .. ',' .. (f[3] or '0') .. ',' .. (f[4] or '0')
            .. ',' .. (idle[n][string.sub(m, slash + 1)] or 0)
          nodes[#nodes + 1] = n
        end
      end
    end
  end
  return rows, nodes
end
"""

# ARGV: prefix, mode ("ids" | "holders" | "all"), checkpoint whose holdings to return ("": all),
#       then node ids ("ids") or the checkpoint whose holders to read ("holders")
# Returns one node entry (see node_entry) per live node.
_SNAPSHOT_NODES = _LUA_NODE_ENTRY + """
local p, mode, only = ARGV[1], ARGV[2], ARGV[3]
local ids
if mode == 'holders' then
  ids = redis.call('SMEMBERS', p .. 'holders:' .. ARGV[4])
elseif mode == 'all' then
  ids = redis.call('SMEMBERS', p .. 'nodes')
else
  ids = {}
  for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
for _, n in ipairs(ids) do
  local e = node_entry(p, n, only)
  if e then out[#out + 1] = e end
end
return out
"""

# What one placement decision reads, in one round trip. KEYS: devices_free
# ARGV: prefix, checkpoint, nbytes, rows, now, sort_rows, nodes
# Returns {holder entries, device-with-room rows (scan order), entries of the first `nodes`
# non-holder nodes among the first `sort_rows` rows in packing order (awake, least queued,
# least free): the nodes a remote estimate would read next. A prefetch: misses fall through.
_DECISION_SNAPSHOT = _LUA_NODE_ENTRY + """
local p, ck = ARGV[1], ARGV[2]
local holders, seen = {}, {}
for _, n in ipairs(redis.call('SMEMBERS', p .. 'holders:' .. ck)) do
  local e = node_entry(p, n, ck)
  if e then holders[#holders + 1] = e; seen[n] = true end
end
local rows, row_nodes = room_rows(p, KEYS[1], ARGV[3], ARGV[4], '0')
local now, k = tonumber(ARGV[5]), math.min(#rows, tonumber(ARGV[6]))
local order = {}
for i = 1, k do
  local mem, claimed, inst, busy = string.match(rows[i], ',(%d+),(%-?%d+),(%-?%d+),([^,]+),%d+$')
  local q = (tonumber(busy) or 0) - now
  if q < 0 then q = 0 end
  order[#order + 1] = {tonumber(inst) > 0 and 0 or 1, q, tonumber(mem) - tonumber(claimed), row_nodes[i]}
end
table.sort(order, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end)
local extra, wanted = {}, tonumber(ARGV[7])
for _, o in ipairs(order) do
  if #extra >= wanted then break end
  local n = o[4]
  if not seen[n] then
    seen[n] = true
    local e = node_entry(p, n, ck)
    if e then extra[#extra + 1] = e end
  end
end
return {holders, rows, extra}
"""

# KEYS: devices_free; ARGV: prefix, nbytes, count, spread ("1"/"0")
# Returns "node/device,memory,claimed,instances,busy_until" for devices of live nodes only.
_DEVICES_WITH_ROOM = _LUA_NODE_ENTRY + """
local rows = room_rows(ARGV[1], KEYS[1], ARGV[2], ARGV[3], ARGV[4])
return rows
"""

# KEYS: lease; ARGV: holder, ttl_ms
_LEASE = """
local h = redis.call('GET', KEYS[1])
if h and h ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
