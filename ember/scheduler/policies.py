"""Placement policies behind one interface (`PlacementPolicy.place(request, view)`), chosen by name.

- `ember` (default): lowest estimated startup over every device that could hold the model
  (local tiers of the nodes holding the checkpoint, with eviction of idle instances, and remote
  fetches on devices with room); among choices within a small margin of the best, the one that
  costs least energy: an awake device, packed tightest, so idle GPUs stay idle.
- `serverlessllm`: the published ServerlessLLM storage-aware scheduler as a baseline (source
  below). Only nodes with a local copy are considered, and only devices with room on them: no
  eviction (`evicts = False`; live migration is off by default there and not modelled). While
  every node with a copy is full the request waits and is placed again (the published loading
  queue, retried by a 1 s loop: `poll_interval_s`, honoured by the simulator); only a checkpoint
  no node holds is loaded from remote storage, on the least-loaded device (registering a model
  downloads it to a worker's disk). Estimate: a checkpoint in host memory costs
  `nbytes / pcie_bandwidth` (hard-coded 25 GB/s), one on disk `node_waiting_time + nbytes /
  disk_bandwidth`, where `node_waiting_time` is the node's disk loading queue (here the node's
  published SSD tier queue) and `disk_bandwidth` the start-up probe's (`PROBE_DISK_BPS`). Its
  scale-out rule is its router's `auto_scaler` (`should_start`: ceil(in-flight requests /
  target) instances, starting ones counted; `routing.should_start_on_demand`), which the gateway
  and the simulator both run for it. No energy awareness, no prefetch.
  Source: ServerlessLLM (github.com/ServerlessLLM/ServerlessLLM, commit 9f50241, 2026-03-06):
  `sllm/schedulers/storage_aware_scheduler.py` (`StorageAwareScheduler.schedule`: nodes without
  the model in `node_store_info` skipped, `free_gpu >= num_gpus` else migration if enabled else
  skipped; `_control_loop`: no option leaves the request queued, 1 s sleep;
  `_get_model_loading_time`), `sllm/store_manager.py` (`SllmLocalStore.get_store_info`: the
  io_queue's last estimated completion minus now; `load_to_host`: completion = max(last, now) +
  size / disk bw; `StoreManager.register`: the model downloaded to one node's disk),
  `sllm/routers/roundrobin_router.py` (`auto_scaler`, `RoundRobinRouter._auto_scaler_loop`),
  `sllm/hardware_info_collector.py` (`collect_all_info`, `benchmark_disk_bandwidth`).
  Not modelled: one instance per GPU (Ray's `num_gpus`; here it packs by free memory as Ember
  does), its router's 1 s sleep before each dispatch, one new instance per second per model.
- `keepalive`: Knative / KServe style: a fixed keep-alive (the autoscaler's `keep_alive_s`),
  placement on the least-loaded device (most free memory, Kubernetes' LeastAllocated scoring),
  no locality: every cold start downloads the model from remote storage (KServe's storage
  initializer), `local_copies = False` (honoured by the simulator).
- `least_loaded`: the device with most free memory, no locality (like KServe / Ray Serve).
- `random`: a random device with room, no locality.
- `round_robin`: the next node in turn with a device that has room.

The SAME objects run live (the gateway, over Redis) and in the simulator.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from ember.errors import ConfigError
from ember.scheduler.estimator import can_hold, estimate_startup
from ember.scheduler.routing import should_start_on_demand
from ember.scheduler.view import (
    ClusterView,
    DeviceState,
    PlacementPolicy,
    PlacementRequest,
    StartupEstimate,
)

__all__ = [
    "POLICY_NAMES",
    "EmberPolicy",
    "KeepAlivePolicy",
    "LeastLoadedPolicy",
    "LocalCopyPolicy",
    "PolicyChooser",
    "RandomPolicy",
    "RoundRobinPolicy",
    "ServerlessLLMPolicy",
    "get_policy",
]

DEFAULT_POLICY = "ember"


def get_policy(name: str, *, seed: int = 0) -> PlacementPolicy:
    """A fresh policy object by name; unknown names raise ConfigError naming them."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown placement policy {name!r}; known: {', '.join(POLICY_NAMES)}", code="unknown_policy"
        ) from None
    return factory(seed)


class PolicyChooser:
    """Policy objects by name, each built once (round_robin and random keep state); a request's
    own `policy` (per deployment) overrides the global default. What the gateway holds."""

    def __init__(self, default: str = DEFAULT_POLICY, *, seed: int = 0) -> None:
        self.seed = seed
        self._built: dict[str, PlacementPolicy] = {}
        self.default = self.get(default)

    def get(self, name: str) -> PlacementPolicy:
        if name not in self._built:
            self._built[name] = get_policy(name, seed=self.seed)
        return self._built[name]

    def for_request(self, request: PlacementRequest) -> PlacementPolicy:
        return self.get(request.policy) if request.policy else self.default


class EmberPolicy:
    """Lowest estimated startup; among near-equal choices, the awake, tightest-packed device."""

    name = "ember"
    poll_interval_s = 0.0
    slo_aware_cache = True  # DRAM tiers keep the copies that save an SLO first (`caching.dram_keep`)

    def __init__(self, *, margin_s: float = 0.25, margin_frac: float = 0.15, holders: int = 6,
                 remote_candidates: int = 6, remote_nodes: int = 3) -> None:
        self.margin_s = margin_s
        self.margin_frac = margin_frac
        self.holders = holders  # nearest-tier holders considered (popular checkpoints sit on many nodes)
        self.remote_candidates = remote_candidates
        self.remote_nodes = remote_nodes  # distinct nodes read for remote estimates

    def place(self, request: PlacementRequest, view: ClusterView) -> StartupEstimate | None:
        nbytes, need = request.nbytes, request.room_bytes  # bytes loaded; bytes claimed (weights + KV)
        choices: list[tuple[StartupEstimate, DeviceState]] = []
        holding: set[str] = set()
        for node in view.nodes_holding(request.checkpoint, limit=self.holders):
            holding.add(node.node_id)
            tier = node.holdings.get(request.checkpoint, "remote")
            for d in node.devices:
                if can_hold(d, need):
                    choices.append((estimate_startup(nbytes, node, d, tier, need), d))
        # Remote fetches onto devices with room (packing order: awake, least queued, fullest),
        # on the first few nodes they sit on (read in one go for their bandwidths).
        room = [d for d in view.devices_with_room(need, limit=self.remote_candidates) if d.node_id not in holding]
        wanted = list(dict.fromkeys(d.node_id for d in room))[: self.remote_nodes]
        nodes = {n.node_id: n for n in view.nodes(wanted)} if wanted else {}
        for d in room:
            node = nodes.get(d.node_id)
            if node is not None:
                choices.append((estimate_startup(nbytes, node, d, "remote", need), d))
        if not choices:
            return None
        best_s = min(e.seconds for e, _ in choices)
        cutoff = best_s + max(self.margin_s, self.margin_frac * best_s)
        near = [(e, d) for e, d in choices if e.seconds <= cutoff]
        # Keep warm instances when a near-equal choice needs no eviction; then save energy: an
        # awake device, packed tightest, so idle GPUs stay idle.
        est, _ = min(near, key=lambda ed: (ed[1].free_bytes < need, not ed[1].awake,
                                           ed[1].free_bytes, ed[0].seconds))
        return est


class ServerlessLLMPolicy:
    """The ServerlessLLM scheduler as published (a baseline; see the module docstring)."""

    name = "serverlessllm"
    poll_interval_s = 1.0  # `_control_loop` sleeps 1 s between passes over the loading queue
    prefetch = False  # no proactive DRAM copies: it loads to host memory when it schedules
    evicts = False  # `schedule` skips a node without enough free GPUs (migration is off by default)
    PCIE_BPS = 25e9  # `collect_all_info`: pcie_bandwidth hard-coded to 25 GB/s
    # `benchmark_disk_bandwidth`: the mean of a buffered write of 100 MiB of os.urandom (bound by
    # generating the random bytes, under 1 GB/s) and a read of it back from the page cache (a few
    # GB/s): a few GB/s whatever the disk. Ours: 0.9 GB/s on a 2-core VM; 4 GB/s taken for a server.
    PROBE_DISK_BPS = 4e9

    should_start = staticmethod(should_start_on_demand)  # `RoundRobinRouter._auto_scaler_loop`

    def place(self, request: PlacementRequest, view: ClusterView) -> StartupEstimate | None:
        """The node holding a local copy with the lowest estimated loading time, on a device with
        room; None while every holder is full (the request waits in the loading queue and is tried
        again, as the published loop does). Only where no node holds a copy at all: the
        least-loaded device, from remote storage (what registering the model does: it downloads
        it to a worker's disk)."""
        nbytes = request.nbytes
        best: tuple[float, int, StartupEstimate] | None = None
        holders = view.nodes_holding(request.checkpoint)
        for node in holders:
            tier = node.holdings.get(request.checkpoint, "ssd")
            if tier in ("gpu", "dram"):  # in the pinned host memory pool
                load_s = nbytes / self.PCIE_BPS
            else:  # the node's disk loading queue, then the disk
                load_s = node.tier_queue_s.get("ssd", 0.0) + nbytes / self.PROBE_DISK_BPS
            for d in node.devices:
                if d.free_bytes < request.room_bytes:
                    continue  # no eviction: only free GPUs
                seconds = d.queue_s + load_s
                key = (seconds, d.instances)
                if best is None or key < best[:2]:
                    best = (seconds, d.instances, StartupEstimate(node.node_id, d.device_id, tier, seconds, d.awake))
        if best is not None:
            return best[2]
        if holders:
            return None  # every node with a copy is full: wait, neither evicting nor going elsewhere
        devices = view.devices_with_room(request.room_bytes, limit=1, spread=True)
        if not devices:
            return None
        d = devices[0]
        return StartupEstimate(d.node_id, d.device_id, "remote", d.queue_s + nbytes / self.PCIE_BPS, d.awake)


class LeastLoadedPolicy:
    """The device with most free memory; no locality."""

    name = "least_loaded"
    poll_interval_s = 0.0

    def place(self, request: PlacementRequest, view: ClusterView) -> StartupEstimate | None:
        devices = view.devices_with_room(request.room_bytes, limit=1, spread=True)
        if not devices:
            return None
        d = devices[0]
        return StartupEstimate(d.node_id, d.device_id, "remote", d.queue_s, d.awake)


class KeepAlivePolicy(LeastLoadedPolicy):
    """Knative / KServe style: least-loaded placement, every load from remote storage."""

    name = "keepalive"
    local_copies = False
    prefetch = False


class RandomPolicy:
    """A uniformly random node, then a random device on it with room; no locality."""

    name = "random"
    poll_interval_s = 0.0

    def __init__(self, seed: int = 0, tries: int = 8) -> None:
        self.rng = random.Random(seed)
        self.tries = tries

    def place(self, request: PlacementRequest, view: ClusterView) -> StartupEstimate | None:
        ids = view.node_ids()
        for _ in range(self.tries if ids else 0):
            node = view.node(self.rng.choice(ids))
            fits = [d for d in node.devices if d.free_bytes >= request.room_bytes] if node else []
            if fits:
                d = self.rng.choice(fits)
                return StartupEstimate(d.node_id, d.device_id, "remote", d.queue_s, d.awake)
        devices = view.devices_with_room(request.room_bytes, limit=16, spread=True)
        if not devices:
            return None
        d = self.rng.choice(list(devices))
        return StartupEstimate(d.node_id, d.device_id, "remote", d.queue_s, d.awake)


class RoundRobinPolicy:
    """Nodes in turn; the first device with room on the next node that has one."""

    name = "round_robin"
    poll_interval_s = 0.0

    def __init__(self) -> None:
        self.cursor = 0

    def place(self, request: PlacementRequest, view: ClusterView) -> StartupEstimate | None:
        ids = sorted(view.node_ids())
        for _ in range(len(ids)):
            node_id = ids[self.cursor % len(ids)]
            self.cursor += 1
            node = view.node(node_id)
            for d in node.devices if node else ():
                if d.free_bytes >= request.room_bytes:
                    return StartupEstimate(d.node_id, d.device_id, "remote", d.queue_s, d.awake)
        return None


class LocalCopyPolicy:
    """Only devices of nodes holding a local copy (gpu/dram/ssd tier), fastest estimate first,
    never `exclude`: where a load goes when one node found every copy it could reach bad (its own
    tiers and the store's): another node's copy may still be good. Not a policy users choose."""

    name = "local_copy"
    poll_interval_s = 0.0

    def __init__(self, exclude: set[str] | frozenset[str] = frozenset()) -> None:
        self.exclude = frozenset(exclude)

    def place(self, request: PlacementRequest, view: ClusterView) -> StartupEstimate | None:
        best: StartupEstimate | None = None
        for node in view.nodes_holding(request.checkpoint):
            tier = node.holdings.get(request.checkpoint)
            if node.node_id in self.exclude or tier is None or tier == "remote":
                continue
            for d in node.devices:
                if can_hold(d, request.room_bytes):
                    est = estimate_startup(request.nbytes, node, d, tier, request.room_bytes)
                    if best is None or est.seconds < best.seconds:
                        best = est
        return best


_FACTORIES: dict[str, Callable[[int], PlacementPolicy]] = {
    "ember": lambda seed: EmberPolicy(),
    "serverlessllm": lambda seed: ServerlessLLMPolicy(),
    "keepalive": lambda seed: KeepAlivePolicy(),
    "least_loaded": lambda seed: LeastLoadedPolicy(),
    "random": lambda seed: RandomPolicy(seed),
    "round_robin": lambda seed: RoundRobinPolicy(),
}
POLICY_NAMES: tuple[str, ...] = tuple(_FACTORIES)
