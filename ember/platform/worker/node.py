"""A worker node: its checkpoint tiers, devices, resident instances and its heartbeat.

Instances run inside the worker process (threads), with torch and the transformers model code
imported when the worker starts, so a cold start pays for loading bytes and building the module
tree only: never for a process start or for imports.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ember.config import Settings
from ember.errors import EmberError, NotFound
from ember.platform.cluster import DeviceSpec, InstanceRecord, RedisCluster
from ember.platform.gateway.protocol import GenerateRequest, LoadRequest, LoadResult
from ember.platform.runtime.engine import ModelInstance

log = logging.getLogger(__name__)


def detect_compute_devices(settings: Settings) -> list[DeviceSpec]:
    """The GPUs this process sees, else `cpu_slots` CPU slots sharing the DRAM capacity."""
    import torch

    if torch.cuda.is_available():
        return [DeviceSpec(f"cuda:{i}", torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())]
    per_slot = max(1, settings.dram_capacity_bytes // max(1, settings.cpu_slots))
    return [DeviceSpec(f"cpu:{i}", per_slot) for i in range(settings.cpu_slots)]


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


class WorkerNode:
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
        self.instances: dict[str, ModelInstance] = {}
        self.records: dict[str, InstanceRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._prefetching: set[str] = set()
        self._heartbeat_thread: threading.Thread | None = None
        self._scrub_thread: threading.Thread | None = None
        self._retired: set[str] = set()  # instances built on DRAM bytes a scrub found corrupted
        self.bandwidth_bps: dict[str, float] = {}
        self.energy: Any = None
        self.energy_device_ids: list[str] = []

    # --- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Warm imports, measure tiers, register, start heartbeats."""
        import transformers.models.llama.modeling_llama  # noqa: F401 - imported now, not at a cold start

        self.bandwidth_bps = self.tiers.measure_bandwidth()
        self._start_energy_agent()
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
        self.tiers.close()  # the DRAM pool goes with the last process of this node that uses it

    def register(self) -> None:
        self.cluster.register_node(self.node_id, self.url, self.devices, self.bandwidth_bps)
        for rec in list(self.records.values()):
            self.cluster.restore_instance(rec)
        self.cluster.heartbeat(self.node_id, self.tiers.holdings())
        log.info("node %s registered at %s with %d devices", self.node_id, self.url, len(self.devices))

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                if not self.cluster.heartbeat(self.node_id, self.tiers.holdings()):
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
        fails takes no new request (404: the gateway forgets it and starts a fresh one from the next
        tier) and is closed once its requests are done. Its own thread: a large pool takes a while."""
        while not self._stop.wait(self.settings.dram_scrub_interval_s):
            try:
                bad = set(self.tiers.scrub())
                with self._lock:
                    for inst in self.instances.values():
                        loaded = inst.loaded
                        if loaded is not None and loaded.ref in bad and loaded.tier != "gpu":
                            self._retired.add(inst.instance_id)
                self._close_retired()
            except Exception:  # the scrub must survive anything one pass throws
                log.exception("DRAM scrub failed")

    def _close_retired(self) -> None:
        with self._lock:
            done = [i for i in self._retired if i in self.instances and self.instances[i].active == 0]
            closing = [self.instances.pop(i) for i in done]
            for i in done:
                self.records.pop(i, None)
            self._retired -= set(done) | {i for i in self._retired if i not in self.instances}
        for inst in closing:
            inst.close()
            log.warning("instance %s retired: its DRAM-tier bytes failed verification", inst.instance_id)

    # --- energy (read-only unless configured) -----------------------------------------------
    def _start_energy_agent(self) -> None:
        try:
            from ember.energy import detect_devices
            from ember.energy.agent import NodeEnergyAgent
        except ImportError:
            return
        devices = detect_devices(simulated=self.settings.simulated_gpus,
                                 allow_actuation=self.settings.energy_mode == "actuate")
        if devices:
            self.energy = NodeEnergyAgent(self.node_id, devices, self.settings.energy_mode, warmup_requests=1)
            self.energy_device_ids = [d.device_id for d in devices]

    def _energy_tick(self) -> None:
        if self.energy is None:
            return
        self.energy.tick()
        try:
            from ember.platform.energy_api import publish_device_snapshots
        except ImportError:
            return
        caps_w = publish_device_snapshots(self.cluster.r, self.node_id, self.energy.snapshot(),
                                          ttl_s=self.settings.heartbeat_ttl_s * 3)
        self.energy.set_caps_w(caps_w)  # the cluster allocator's share of the power budget

    # --- instances ------------------------------------------------------------------------------
    def load(self, req: LoadRequest) -> LoadResult:
        """Load a checkpoint through the tiers and build an instance; blocks until ready."""
        t0 = time.perf_counter()
        rec = self.cluster.instance(req.instance_id)
        device_id = rec.device_id if rec is not None else "cpu:0"
        device = device_id if device_id.startswith("cuda") else "cpu"
        loaded = self.tiers.load(req.checkpoint, device=device)
        try:
            inst = ModelInstance.from_loaded(req.instance_id, req.function, loaded, device=device)
        except BaseException:
            loaded.release()
            raise
        startup_ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            self.instances[req.instance_id] = inst
            if rec is not None:
                self.records[req.instance_id] = rec
        self.cluster.observe_load(self.node_id, loaded.tier, loaded.nbytes, max(loaded.seconds, 1e-6))
        self.cluster.mark_ready(req.instance_id)
        log.info("instance %s of %s ready in %.1f ms from %s", req.instance_id, req.function, startup_ms, loaded.tier)
        return LoadResult(instance_id=req.instance_id, tier=loaded.tier, startup_ms=startup_ms, nbytes=loaded.nbytes)

    def prefetch(self, checkpoint: str) -> bool:
        """Pull a checkpoint into this node's DRAM tier in the background (load, then release)."""
        with self._lock:
            if checkpoint in self._prefetching:
                return False
            self._prefetching.add(checkpoint)

        def run() -> None:
            try:
                self.tiers.load(checkpoint).release()
                log.info("prefetched %s into the DRAM tier", checkpoint)
            except EmberError as e:
                log.warning("prefetch of %s failed: %s", checkpoint, e)
            finally:
                with self._lock:
                    self._prefetching.discard(checkpoint)

        threading.Thread(target=run, name=f"prefetch-{checkpoint}", daemon=True).start()
        return True

    def unload(self, instance_id: str) -> None:
        with self._lock:
            inst = self.instances.pop(instance_id, None)
            self.records.pop(instance_id, None)
        if inst is None:
            raise NotFound(f"no instance {instance_id!r} on node {self.node_id}", code="instance_not_found")
        inst.close()
        log.info("instance %s unloaded; checkpoint stays in the DRAM tier", instance_id)

    def get(self, instance_id: str) -> ModelInstance:
        inst = self.instances.get(instance_id)
        if inst is None or instance_id in self._retired:
            raise NotFound(f"no instance {instance_id!r} on node {self.node_id}", code="instance_not_found")
        return inst

    def record_request(self, inst: ModelInstance, done: Any, req: GenerateRequest) -> None:
        """Feed the energy agent with the request's tokens, latencies and its function's SLO."""
        if self.energy is None:
            return
        rec = self.records.get(inst.instance_id)
        device_id = rec.device_id if rec else self.devices[0].device_id
        if device_id not in self.energy_device_ids:  # CPU slots accounted on simulated GPUs: same index
            index = next((i for i, d in enumerate(self.devices) if d.device_id == device_id), 0)
            device_id = self.energy_device_ids[index % len(self.energy_device_ids)]
        self.energy.record_request(inst.function, device_id, done.completion_tokens, done.ttft_s, done.tpot_s,
                                   req.ttft_slo_s, req.tpot_slo_s, req.eta)
