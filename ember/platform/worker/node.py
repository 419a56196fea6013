"""A worker node: its checkpoint tiers, devices, resident instances and its heartbeat.

Instances run inside the worker process (threads), with torch and the transformers model code
imported when the worker starts, so a cold start pays for loading bytes and building the module
tree only: never for a process start or for imports.

The energy wiring (the agent, its heartbeat tick, each request's joules) is `WorkerEnergy`
(node_energy.py), a base class of `WorkerNode`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.config import Settings
from ember.errors import EmberError, InstanceGone, NotFound
from ember.platform import heap
from ember.platform.cluster import DeviceSpec, InstanceRecord, RedisCluster
from ember.platform.loadqueues import LoadQueues
from ember.platform.runtime.engine import ModelInstance
from ember.platform.wire import LoadRequest, LoadResult
from ember.platform.worker.node_energy import WorkerEnergy
from ember.platform.worker.prefetch import DramPrefetcher
from ember.platform.worker.serving import ServingSlots
from ember.scheduler.memory import kv_budget_bytes

if TYPE_CHECKING:
    from ember.loader.tiers import LoadedCheckpoint

log = logging.getLogger(__name__)


def detect_compute_devices(settings: Settings) -> list[DeviceSpec]:
    """The GPUs this worker owns (`EMBER_DEVICES`, else all it sees), each offering its memory less
    the per-device reserve; else `cpu_slots` CPU slots sharing the DRAM capacity."""
    import torch

    if torch.cuda.is_available():
        from ember.platform.devices import cuda_devices, select_devices

        owned = select_devices(cuda_devices(), settings.devices)
        return [DeviceSpec(f"cuda:{d.index}", max(0, d.memory_bytes - settings.device_reserve_bytes), d.uuid)
                for d in owned]
    per_slot = max(1, settings.dram_capacity_bytes // max(1, settings.cpu_slots))
    return [DeviceSpec(f"cpu:{i}", per_slot) for i in range(settings.cpu_slots)]


def load_result(instance_id: str, loaded: LoadedCheckpoint, startup_ms: float) -> LoadResult:
    """A worker's answer to a load. The worker learns no bandwidth itself: the gateway's end of
    load (`ember.platform.gateway.coldstart.publish_load_end`) folds `transfer_s`, the tiers'
    load alone, into the node's bandwidth for the tier the bytes came from, once per load."""
    return LoadResult(instance_id=instance_id, tier=loaded.tier, startup_ms=startup_ms, nbytes=loaded.nbytes,
                      transfer_s=loaded.seconds)


def node_id_for(data_dir: Path, explicit: str | None) -> str:
    """A stable node id: explicit, else remembered in the data dir, else hostname + random suffix."""
    if explicit:
        return explicit
    path = data_dir / "node_id"
    if path.exists():
        return path.read_text().strip()
    node_id = f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(node_id)
    return node_id


class WorkerNode(WorkerEnergy):
    """State and behaviour of one worker; the FastAPI app in worker/app.py is a thin shell over it."""

    def __init__(self, settings: Settings, cluster: RedisCluster, url: str) -> None:
        from ember.loader import NodeTiers

        self.settings = settings
        self.cluster = cluster
        self.url = url
        self.data_dir = Path(settings.data_dir).resolve()
        self.node_id = node_id_for(self.data_dir, settings.node_id)
        self.devices = detect_compute_devices(settings)
        self.tiers = NodeTiers(self.data_dir, settings.resolved_store_url,
                               dram_capacity_bytes=settings.dram_capacity_bytes,
                               ssd_capacity_bytes=settings.ssd_capacity_bytes)
        # any check that finds a DRAM entry corrupted (a scrub, or a load attaching it) retires the
        # instances built on it: the entry is replaced, so a later scrub cannot find them again
        self.tiers.on_corrupt_dram = lambda ref: self._retire_instances_on({ref})
        self.prefetcher = DramPrefetcher(self.tiers, LoadQueues(cluster.r), self.node_id, self.beat)
        self.instances: dict[str, ModelInstance] = {}
        self.records: dict[str, InstanceRecord] = {}
        self.slots = ServingSlots()  # the request slots of each instance's running streams
        # what this worker really holds: instance id -> "loading" | "ready" | "draining". Published on
        # every heartbeat and re-registration; changed, with its Redis transition, under _state_lock
        # (so a beat never reports a snapshot older than what Redis was told)
        self.states: dict[str, str] = {}
        self._state_lock = threading.RLock()
        self._dropping: set[str] = set()
        self._load_started: dict[str, float] = {}  # loading instance -> when its load began (monotonic)
        self._overdue: set[str] = set()  # loads past max_load_s, no longer reported
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        self._scrub_thread: threading.Thread | None = None
        self._retired: set[str] = set()  # instances built on DRAM bytes found corrupted
        self.bandwidth_bps: dict[str, float] = {}
        self.energy: Any = None
        self.energy_device_ids: list[str] = []

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Warm imports, measure tiers, register, start heartbeats."""
        import transformers.models.llama.modeling_llama  # noqa: F401 - imported now, not at a cold start

        self.bandwidth_bps = self.tiers.measure_bandwidth()
        self._start_energy_agent()
        # torch, transformers and the tiers are built: full collections skip them from now on (before
        # registering: the collection takes ~160 ms, and a registered node is expected to answer soon)
        heap.settle()
        self.register()
        self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()
        if self.settings.dram_scrub_interval_s > 0:
            self._scrub_thread = threading.Thread(target=self._scrub_loop, name="dram-scrub", daemon=True)
            self._scrub_thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(timeout=5)
        try:
            self.cluster.deregister_node(self.node_id)
        except EmberError as e:
            log.warning("could not deregister %s: %s", self.node_id, e)
        for inst in list(self.instances.values()):
            inst.close()
        self.instances.clear()
        if self.energy is not None:
            self.energy.close()  # actuate mode: every GPU back to its original limit and clocks
        self.tiers.close()  # the DRAM pool goes with the last process of this node that uses it

    def register(self) -> None:
        """Register the node and re-assert every instance it holds with its REAL state (never a
        copy read before it became ready), then beat once to reconcile."""
        with self._state_lock:
            self.cluster.register_node(self.node_id, self.url, self.devices, self.bandwidth_bps,
                                       cloud_instance_id=self.settings.cloud_instance_id)
            for iid, state in list(self.states.items()):
                rec = self.records.get(iid)
                if rec is None or state == "loading":
                    continue  # a load in progress re-asserts itself when it finishes (mark_ready)
                slots = self.slots.of(iid)  # the streams it serves: their slots come back with it
                rec.state, rec.outstanding, rec.deadline_s = state, len(slots), 0.0
                self.cluster.restore_instance(rec, slots, time.time() + self.settings.slot_ttl_s)
        self.beat()
        log.info("node %s registered at %s with %d devices", self.node_id, self.url, len(self.devices))

    def beat(self) -> bool:
        """One heartbeat: publish holdings and the instances held; act on Redis's answer. False when
        Redis did not know the node (the caller registers again)."""
        with self._state_lock:
            report = self._reported_states()
            hb = self.cluster.heartbeat(self.node_id, self.tiers.holdings(), report)
        if not hb.known:
            return False
        for iid in hb.unknown:
            log.warning("instance %s is not booked in Redis (reaped or given up): dropping it", iid)
            self.drop_when_idle(iid, remove=False)
        for iid in hb.draining:
            self.drop_when_idle(iid, remove=True)
        if hb.removed:
            log.warning("Redis dropped claims of instances this worker does not hold: %s", ", ".join(hb.removed))
        return True

    def _reported_states(self) -> list[tuple[str, str]]:
        """What a beat reports: every instance held, except loads running past `max_load_s` (their
        claims then lapse and are reaped; a load that finishes after that finds its claim gone and
        is dropped). Called under _state_lock."""
        now, out = time.monotonic(), []
        for iid, state in self.states.items():
            started = self._load_started.get(iid)
            if state == "loading" and started is not None and now - started > self.settings.max_load_s:
                if iid not in self._overdue:
                    self._overdue.add(iid)
                    log.warning("load of instance %s has run for %.0f s (EMBER_MAX_LOAD_S %.0f): no longer "
                                "reported, its claim lapses", iid, now - started, self.settings.max_load_s)
                continue
            out.append((iid, state))
        return out

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                if not self.beat():
                    log.warning("Redis forgot node %s (restart?): registering again", self.node_id)
                    self.register()
                self._energy_tick()
            except EmberError as e:
                log.warning("heartbeat failed: %s", e)
            except Exception:  # the heartbeat must survive anything one tick throws
                log.exception("heartbeat tick failed")

    # --- DRAM scrub: corruption under running instances lives at most one interval ----------------
    def _scrub_loop(self) -> None:
        """Every `dram_scrub_interval_s`, verify the DRAM tier; an instance built on an entry that
        fails takes no new request (a 409 instance_draining at once, and draining in Redis: the
        gateway starts a fresh one from the next tier) and is dropped once its requests are done.
        Its own thread: a large pool takes a while."""
        while not self._stop.wait(self.settings.dram_scrub_interval_s):
            try:
                self.tiers.scrub()  # retires what it finds through tiers.on_corrupt_dram
                with self._state_lock:
                    self._retired &= set(self.instances)
            except Exception:  # the scrub must survive anything one pass throws
                log.exception("DRAM scrub failed")

    def _retire_instances_on(self, bad_refs: set[str]) -> None:
        for iid, inst in list(self.instances.items()):
            loaded = inst.loaded
            if loaded is None or loaded.ref not in bad_refs or loaded.tier == "gpu":
                continue
            with self._state_lock:
                if iid in self._retired:
                    continue
                self._retired.add(iid)
            log.warning("instance %s retired: its DRAM-tier bytes failed verification", iid)
            try:
                self.cluster.drain(iid, force=True)
            except EmberError as e:
                log.warning("could not mark %s draining: %s", iid, e)
            self.drop_when_idle(iid, remove=True)

    # --- instances ------------------------------------------------------------------------------
    def load(self, req: LoadRequest) -> LoadResult:
        """Load a checkpoint through the tiers and build an instance; blocks until ready."""
        t0 = time.perf_counter()
        iid = req.instance_id
        rec = self.cluster.instance(iid)
        if rec is None or rec.node_id != self.node_id:
            raise InstanceGone(f"instance {iid!r} is not booked on node {self.node_id} (reaped or given up)")
        with self._state_lock:
            if iid in self.states:
                raise InstanceGone(f"instance {iid!r} is already on node {self.node_id}")
            if not self.cluster.begin_load(iid):
                raise InstanceGone(f"instance {iid!r} is no longer claimed (reaped or given up)")
            self.states[iid] = "loading"
            self._load_started[iid] = time.monotonic()
            self.records[iid] = rec
        try:
            device = rec.device_id if rec.device_id.startswith("cuda") else "cpu"
            loaded = self.tiers.load(req.checkpoint, device=device, dram_keep=req.dram_keep)
            try:
                inst = ModelInstance.from_loaded(
                    iid, req.function, loaded, device=device, device_id=rec.device_id, step_listener=self.energy,
                    kv_budget_bytes=req.kv_budget_bytes or self.settings.kv_budget_bytes,
                    kv_budget_tokens=self.settings.kv_budget_tokens,
                    max_batch=self.settings.engine_max_batch, max_queue=self.settings.engine_max_queue)
            except BaseException:
                loaded.release()
                raise
        except BaseException as e:
            if isinstance(e, EmberError):
                log.warning("load of %s (%s) failed: %s", iid, req.checkpoint, e)
            with self._state_lock:
                self.states.pop(iid, None)
                self.records.pop(iid, None)
                self._load_started.pop(iid, None)
                self._overdue.discard(iid)
            try:
                self.cluster.remove_instance(iid)  # a failed load holds nothing: free its claim
            except EmberError as e:
                log.warning("could not free the claim of failed load %s: %s", iid, e)
            raise
        startup_ms = (time.perf_counter() - t0) * 1000
        failure: EmberError | None = None
        with self._state_lock:
            self._load_started.pop(iid, None)
            self._overdue.discard(iid)
            self.instances[iid] = inst
            try:
                ready = self.cluster.mark_ready(iid, req.function)
            except EmberError as e:  # Redis unreachable: never hold what Redis may not book
                ready, failure = False, e
            if ready:
                self.states[iid] = "ready"
            else:
                self.instances.pop(iid, None)
                self.states.pop(iid, None)
                self.records.pop(iid, None)
        if not ready:
            inst.close()
            if failure is not None:
                try:
                    self.cluster.remove_instance(iid)
                except EmberError:
                    pass  # not reported by this worker, the claim is removed past its deadline
                raise failure
            raise InstanceGone(f"instance {iid!r} was removed while it loaded (the gateway gave up?): dropped")
        log.info("instance %s of %s ready in %.1f ms from %s (bytes in %.1f ms)", req.instance_id, req.function,
                 startup_ms, loaded.tier, loaded.seconds * 1000)
        heap.settle()  # after the answer's timing: the model's objects out of every later full collection
        return load_result(req.instance_id, loaded, startup_ms)

    def prefetch(self, checkpoint: str, dram_keep: int = 0) -> bool:
        """Pull a checkpoint into this node's DRAM tier in the background; False when one runs."""
        return self.prefetcher.start(checkpoint, dram_keep)

    def unload(self, instance_id: str, timeout_s: float | None = None) -> None:
        """Drop an instance once it has no active request (waiting up to `timeout_s`, default the
        drain grace), then remove it from Redis (its claim is freed only now: memory is booked
        for as long as this worker holds it)."""
        if instance_id not in self.instances:
            raise NotFound(f"no instance {instance_id!r} on node {self.node_id}", code="instance_not_found")
        self._drop(instance_id, remove=True, timeout_s=timeout_s)

    def held(self, instance_id: str) -> bool:
        """Whether this node still holds the instance: serving, or being dropped (not yet closed)."""
        with self._state_lock:
            return instance_id in self.instances or instance_id in self._dropping

    def drop_when_idle(self, instance_id: str, *, remove: bool) -> None:
        """Drop in the background (a beat must not wait for requests to finish)."""
        with self._state_lock:
            if instance_id in self._dropping or instance_id not in self.instances:
                return
            self._dropping.add(instance_id)
        threading.Thread(target=self._drop, args=(instance_id,), kwargs={"remove": remove, "claimed": True},
                         name=f"drop-{instance_id}", daemon=True).start()

    def _drop(self, instance_id: str, *, remove: bool, timeout_s: float | None = None, claimed: bool = False) -> None:
        try:
            with self._state_lock:
                if instance_id in self.states:
                    self.states[instance_id] = "draining"
            inst = self.instances.get(instance_id)
            deadline = time.monotonic() + (self.settings.drain_grace_s if timeout_s is None else timeout_s)
            while inst is not None and inst.active > 0 and time.monotonic() < deadline and not self._stop.is_set():
                time.sleep(0.05)
            with self._state_lock:
                inst = self.instances.pop(instance_id, None)
                self.states.pop(instance_id, None)
                self.records.pop(instance_id, None)
            try:
                if inst is not None:  # closed before its claim goes: memory stays booked while it is held
                    model = heap.watch(inst.model)
                    inst.close()
                    inst = None
                    if heap.reclaim_if_held(model):  # frozen with everything else: a cycle held it?
                        log.info("instance %s: its model outlived it; %s", instance_id,
                                 "still referenced" if model is not None and model() is not None
                                 else "collected (a reference cycle held it)")
                    log.info("instance %s unloaded; checkpoint stays in the DRAM tier", instance_id)
            finally:
                if remove:
                    try:
                        self.cluster.remove_instance(instance_id)
                    except Exception as e:  # noqa: BLE001 - whatever Redis says, the instance is closed
                        log.warning("could not remove %s from Redis (the next beat reconciles: Redis drops "
                                    "what this node does not hold): %s", instance_id, e)
        finally:
            if claimed:
                with self._state_lock:
                    self._dropping.discard(instance_id)

    def begin_shutdown(self) -> None:
        """SIGTERM: every instance drains (gateways route no new request here); requests in flight
        finish within the drain grace, and each instance is dropped and removed when idle."""
        for iid in list(self.instances):
            try:
                self.cluster.drain(iid, force=True)
            except EmberError as e:
                log.warning("could not mark %s draining: %s", iid, e)
            self.drop_when_idle(iid, remove=True)

    def active_requests(self) -> int:
        return sum(i.active for i in list(self.instances.values()))

    def checkpoint_info(self, ref: str) -> dict[str, Any]:
        """Identity, size and serving facts of a checkpoint, for deploy: refuses (400) an
        architecture that cannot be served, so a deploy fails rather than the first invoke."""
        from ember.loader.identity import split_digest
        from ember.loader.model import check_servable
        from ember.loader.store import split_ref

        ident, manifest = self.tiers.describe(ref)
        store_uri, name = split_ref(split_digest(ref)[0])
        store = self.tiers.store(store_uri or self.tiers.store_url)
        facts = check_servable(store.read_bytes(name, "files/config.json"))
        kv_bytes = kv_budget_bytes(facts["kv_bytes_per_token"], self.settings.kv_budget_tokens,
                                   self.settings.kv_budget_bytes)
        return {"name": ref, "nbytes": manifest.tensor_nbytes, "id": ident.ref, **facts, "kv_budget_bytes": kv_bytes}

    def get(self, instance_id: str, *, serving: bool = False) -> ModelInstance:
        """An instance this worker holds (404 otherwise). `serving`: for a new request, which an
        instance on its way out (retired by the DRAM scrub, or draining) refuses with a 409: it is
        still held and still booked, so the gateway must not free its claim (as it does on a 404),
        only try elsewhere."""
        inst = self.instances.get(instance_id)
        if inst is None:
            raise NotFound(f"no instance {instance_id!r} on node {self.node_id}", code="instance_not_found")
        if serving and (instance_id in self._retired or self.states.get(instance_id) == "draining"):
            raise InstanceGone(f"instance {instance_id!r} on node {self.node_id} takes no new request (it is "
                               "on its way out)", code="instance_draining")
        return inst
