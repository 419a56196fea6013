"""A node's checkpoint tiers: remote store -> SSD -> DRAM (shared memory) -> device.

One NodeTiers per node process. `load(ref)` looks for the checkpoint in the nearest tier and
fills the nearer tiers on the way: an SSD hit is read into the DRAM pool; a remote load streams
every chunk into the DRAM pool and the SSD tier's temporary entry at once, verifying as it goes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import CapacityError, CheckpointError, EmberError
from ember.loader.device import DeviceUpload, register_host_memory, run_slices, unregister_host_memory
from ember.loader.devicecopies import DeviceCopies
from ember.loader.dram import DramEntry, DramTier
from ember.loader.envvars import env_flag, env_int
from ember.loader.format import (
    FILES_DIR,
    MANIFEST_FILE,
    CheckpointManifest,
    parse_manifest,
)
from ember.loader.identity import CheckpointIdentity, manifest_digest, split_digest
from ember.loader.local import load_local
from ember.loader.names import validate_name
from ember.loader.pipeline import (
    DEFAULT_THREADS,
    tensors_from_buffer,
    worker_pool,
)
from ember.loader.remote import load_remote, sweep_fallback_files
from ember.loader.ssd import REF_FILE, SsdTier
from ember.loader.store import (
    CheckpointStore,
    default_data_dir,
    default_store_url,
    open_store,
    split_ref,
)
from ember.loader.verify import verified_manifest, verify_chunks, verify_files

log = logging.getLogger(__name__)

DEFAULT_DRAM_CAPACITY_BYTES = 1 << 30
DEFAULT_SSD_CAPACITY_BYTES = 32 << 30


@dataclass
class LoadedCheckpoint:
    """A checkpoint ready to use in this process."""

    name: str
    state_dict: dict
    tier: str  # where the bytes came from for this load: "gpu" | "dram" | "ssd" | "remote"
    seconds: float
    nbytes: int  # tensor bytes
    model_files: Path
    manifest: CheckpointManifest
    _on_release: Callable[[], None] | None = field(default=None, repr=False)
    ref: str = ""  # the canonical ref (store/name#digest) of what was loaded

    def release(self) -> None:
        """This process no longer uses the tensors; the DRAM entry stays cached (by its keep, then LRU).
        Drop every model built on them first: released bytes may be evicted and reused."""
        self.state_dict = {}
        if self._on_release is not None:
            cb, self._on_release = self._on_release, None
            cb()


class NodeTiers:
    """The tiers of one node; `data_dir` is the node's own directory."""

    def __init__(
        self,
        data_dir: Path | str,
        store_url: str | None = None,
        *,
        dram_capacity_bytes: int = DEFAULT_DRAM_CAPACITY_BYTES,
        ssd_capacity_bytes: int = DEFAULT_SSD_CAPACITY_BYTES,
        threads: int = DEFAULT_THREADS,
        pretouch: bool | None = None,
        verify_dram: bool | None = None,
    ) -> None:
        """pretouch: map the DRAM pool populated at start (the node's worker: True); None does
        so only when this process creates the pool; False attaches lazily (copy-on-write views)."""
        if verify_dram is None:
            verify_dram = env_flag("EMBER_DRAM_VERIFY", True)
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store_url = store_url or f"file://{(self.data_dir / 'store').resolve()}"
        self.threads = threads
        self.ssd = SsdTier(self.data_dir / "ssd", ssd_capacity_bytes)
        self.dram = DramTier(self.data_dir, dram_capacity_bytes, pretouch=pretouch)
        sweep_fallback_files(self.data_dir, self.dram.dir)  # model files of loads whose process died
        self.pinned_pool = bool(self.dram.rw) and register_host_memory(self.dram.rw.addr, self.dram.capacity_bytes)
        worker_pool("ember-read", threads, warm=True)  # reader threads started now, not during a cold start
        self._stores: dict[str, CheckpointStore] = {}
        self._lock = threading.Lock()
        self._names_lock = threading.Lock()
        self._name_locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, loads using it)
        self.device_copies = DeviceCopies()  # checkpoints already on a GPU, shared by their instances
        self.ssd_warned = False
        # Verify a DRAM entry's bytes (chunk hashes) each time an instance attaches it; the
        # manifest and the model files are always verified. EMBER_DRAM_VERIFY=0 turns the bytes off.
        self.verify_dram = verify_dram
        # Called with a ref whose DRAM entry failed verification (an attach or a scrub), after the
        # entry is out of service: instances built on those bytes must take no new request.
        self.on_corrupt_dram: Callable[[str], None] | None = None

    @classmethod
    def from_env(cls, **overrides) -> NodeTiers:
        """From EMBER_DATA_DIR, EMBER_STORE_URL, EMBER_DRAM_CAPACITY_BYTES, EMBER_SSD_CAPACITY_BYTES."""
        kwargs = {
            "data_dir": default_data_dir(),
            "store_url": default_store_url(),
            "dram_capacity_bytes": env_int("EMBER_DRAM_CAPACITY_BYTES", DEFAULT_DRAM_CAPACITY_BYTES),
            "ssd_capacity_bytes": env_int("EMBER_SSD_CAPACITY_BYTES", DEFAULT_SSD_CAPACITY_BYTES),
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    # --- the API the worker uses ------------------------------------------------------------------
    def load(self, ref: str, device: str = "cpu", dram_keep: int = 0) -> LoadedCheckpoint:
        """Load a checkpoint (a name in the node's store, a URI, either optionally pinned with
        `#DIGEST`) from its nearest tier. Entries are keyed by identity (store + manifest digest),
        never by a bare name. Every tier hit is verified; an entry that fails is dropped (logged)
        and the next tier, else the store, serves. Concurrent loads of one checkpoint in this
        process are single-flight: the first fills the tiers, the others then hit DRAM.
        `dram_keep`: the DRAM entry's retention priority from this use on (ember.loader.retention)."""
        ident = self.identity(ref)
        key = ident.key
        with self._names_lock:  # a lock per key while loads of it are in flight, then forgotten
            lock, users = self._name_locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._name_locks[key] = (lock, users + 1)
        try:
            with lock:
                return self._load(ident, device, dram_keep)
        finally:
            with self._names_lock:
                lock, users = self._name_locks[key]
                if users > 1:
                    self._name_locks[key] = (lock, users - 1)
                else:
                    del self._name_locks[key]

    def identity(self, ref: str) -> CheckpointIdentity:
        """The identity of a ref. A ref pinned with `#DIGEST` needs no I/O; otherwise the
        store's manifest is read to learn the digest."""
        base, digest = split_digest(ref)
        store_uri, name = split_ref(base)
        store = self.store(store_uri or self.store_url)
        if digest is None:
            digest = manifest_digest(store.read_bytes(name, MANIFEST_FILE))
        return CheckpointIdentity(store.uri, name, digest)

    def key(self, ref: str) -> str:
        """The tier entry key of a ref (see ember.loader.identity)."""
        return self.identity(ref).key

    def _load(self, ident: CheckpointIdentity, device: str, dram_keep: int) -> LoadedCheckpoint:
        import torch

        t0 = time.perf_counter()
        key = ident.key
        dev = torch.device(device)
        if dev.type == "cuda":
            hit = self._device_hit(key, str(dev), t0)
            if hit is not None:
                return hit
        self.dram.wait_filling(key)
        entry = self.dram.pin(key, keep=dram_keep)
        if entry is not None:
            try:
                manifest, view = self._verified_dram(entry, ident)
            except CheckpointError as e:  # IntegrityError included: the entry is bad, not the request
                self.dram.unpin(entry)
                self.dram.quarantine(entry)
                log.warning("DRAM tier entry %s failed verification (%s): dropped; loading from the next tier",
                            ident.ref, e)
                self._corrupt_dram(ident.ref)
            except BaseException:
                self.dram.unpin(entry)
                raise
            else:
                try:
                    sd = self._dram_tensors(entry, manifest, dev, view)
                except BaseException:
                    self.dram.unpin(entry)
                    raise
                self.ssd.touch(key)
                return self._loaded(key, ident, sd, "dram", t0, manifest, entry.meta_dir / FILES_DIR, dev, entry)
        pin = self.ssd.pin(key)  # held while the load reads it; and by the instance if its files are there
        if pin is not None:
            try:
                sd, manifest, entry, files = load_local(self, ident, pin.path, dev, dram_keep)
            except (CheckpointError, OSError) as e:  # bad bytes, a truncated or unreadable file
                pin.release()
                self.ssd.remove(key)
                log.warning("SSD tier entry %s failed verification (%s): dropped; fetching from the store",
                            ident.ref, e)
            except BaseException:
                pin.release()
                raise
            else:
                self.ssd.touch(key)
                if entry is not None:  # the model files were copied beside the DRAM entry
                    pin.release()
                    pin = None
                return self._loaded(key, ident, sd, "ssd", t0, manifest, files, dev, entry, pin)
        store = self.store(ident.store_uri)
        sd, manifest, entry, files, pin = load_remote(self, store, ident, dev, dram_keep)
        return self._loaded(key, ident, sd, "remote", t0, manifest, files, dev, entry, pin)

    def _corrupt_dram(self, ref: str) -> None:
        if self.on_corrupt_dram is not None:
            try:
                self.on_corrupt_dram(ref)
            except Exception:  # the load (or scrub) goes on; the next scrub tells again
                log.exception("retiring the instances on %s failed", ref)

    def scrub(self) -> list[str]:
        """Verify every ready DRAM entry (manifest, model files, every chunk), as an attach does;
        entries that fail are taken out of service and logged. Returns their refs, so the caller
        can retire instances built on them (an attach-time check cannot see bytes that change
        under a running instance). Cost: the verification rate (scripts/dram_verify_cost.py)."""
        bad = []
        for key, ref in self.dram.refs().items():
            try:
                ident = self.identity(ref)
            except EmberError:
                continue
            entry = self.dram.pin(key)
            if entry is None:
                continue  # evicted meanwhile
            try:
                manifest = verified_manifest(entry.meta_dir, ident)
                verify_files(entry.meta_dir, manifest)
                verify_chunks(manifest, self.dram.read_view(entry), self.threads)
            except (CheckpointError, OSError) as e:
                self.dram.unpin(entry)
                self.dram.quarantine(entry)
                log.warning("DRAM tier entry %s failed verification in a scrub (%s): dropped", ref, e)
                bad.append(ref)
                self._corrupt_dram(ref)
                continue
            self.dram.unpin(entry)
        return bad

    def adopt(self, directory: Path | str, name: str) -> str:
        """Install a converted checkpoint directory (moved, not copied) as the SSD-tier entry of
        `name` in the node's store, for benchmarks whose bytes never went through a store; an
        entry already there for the same manifest is kept. Returns the pinned ref to load."""
        directory = Path(directory)
        raw = (directory / MANIFEST_FILE).read_bytes()
        ident = CheckpointIdentity(self.store(self.store_url).uri, validate_name(name), manifest_digest(raw))
        if self.ssd.path(ident.key) is None:
            tmp = self.ssd.begin(ident.key, 1)
            if tmp is None:
                raise CapacityError(f"the SSD tier {self.ssd.root} has no room now: its entries are in use")
            tmp.rmdir()
            os.replace(directory, tmp)
            (tmp / REF_FILE).write_text(ident.ref)
            pin = self.ssd.commit(ident.key, tmp)
            if pin is not None:
                pin.release()
        return ident.ref

    def holdings(self) -> dict[str, str]:
        """Canonical checkpoint ref (store/name#digest) -> nearest local tier ("dram" | "ssd")."""
        out = {ref: "ssd" for ref in self.ssd.refs().values()}
        out.update({ref: "dram" for ref in self.dram.refs().values()})
        return out

    def checkpoint_nbytes(self, ref: str) -> int:
        """Total tensor bytes of a checkpoint, from its manifest in its store."""
        return self.describe(ref)[1].tensor_nbytes

    def describe(self, ref: str) -> tuple[CheckpointIdentity, CheckpointManifest]:
        """The checkpoint's identity and manifest as its store holds them now (what a deploy pins)."""
        base, _ = split_digest(ref)
        store_uri, name = split_ref(base)
        store = self.store(store_uri or self.store_url)
        raw = store.read_bytes(name, MANIFEST_FILE)
        return CheckpointIdentity(store.uri, name, manifest_digest(raw)), parse_manifest(raw)

    def measure_bandwidth(self, probe_bytes: int = 64 << 20) -> dict[str, float]:
        """Quick probe at worker start: {"dram", "ssd", "remote"} in bytes/s."""
        from ember.loader.bandwidth import measure_tier_bandwidth

        return measure_tier_bandwidth(self, probe_bytes)

    def store(self, uri: str) -> CheckpointStore:
        """The store at `uri` (opened once)."""
        with self._lock:
            if uri not in self._stores:
                self._stores[uri] = open_store(uri)
            return self._stores[uri]

    def evict(self, ref: str) -> dict[str, bool]:
        """Drop a checkpoint from the local tiers (unpinned DRAM entry and SSD entry)."""
        key = self.key(ref)
        return {"dram": self.dram.evict(key), "ssd": self.ssd.remove(key)}

    def close(self, *, destroy_dram: bool | None = None) -> None:
        """Close handles. The DRAM pool goes when its last process closes (destroy_dram None),
        now (True), or is kept for the next worker on this data dir (False)."""
        self.ssd.close()
        if self.pinned_pool and self.dram.rw is not None:
            unregister_host_memory(self.dram.rw.addr)
            self.pinned_pool = False
        if destroy_dram:
            self.dram.destroy()
        else:
            self.dram.close(keep=destroy_dram is False)

    # --- loading paths --------------------------------------------------------------------------
    def _verified_dram(self, entry: DramEntry, ident: CheckpointIdentity):
        """Check a DRAM entry before a new instance uses it: its manifest against the identity's
        digest, its model files against their sha256, every chunk of its bytes against its hash.
        Returns (manifest, numpy view of the entry's bytes); CheckpointError when anything differs."""
        manifest = verified_manifest(entry.meta_dir, ident)
        verify_files(entry.meta_dir, manifest)
        view = self.dram.read_view(entry)
        if self.verify_dram:
            verify_chunks(manifest, view, self.threads)
        return manifest, view

    def _dram_tensors(self, entry: DramEntry, manifest: CheckpointManifest, dev, view) -> dict:
        import torch

        if dev.type == "cuda":
            up = DeviceUpload(manifest.total_bytes, dev)
            pool = torch.from_numpy(self.dram.rw.array())
            for pool_off, entry_off, n in run_slices(entry.runs, 0, manifest.total_bytes):
                up.copy(pool[pool_off : pool_off + n], entry_off)
            return tensors_from_buffer(manifest, up.finish())
        return tensors_from_buffer(manifest, torch.from_numpy(view))

    def ssd_unwritable(self, err: BaseException) -> None:
        """The SSD tier could not write (full disk, read-only, ...): said once in the log."""
        if not self.ssd_warned:
            self.ssd_warned = True
            log.warning("SSD tier %s cannot write (%s): serving from memory without caching on SSD",
                        self.ssd.root, err)
        else:
            log.debug("SSD tier %s still cannot write: %s", self.ssd.root, err)

    def pool_uploader(self, entry: DramEntry, up: DeviceUpload):
        """on_chunk that copies landed bytes from the (page-locked) pool mapping to the device."""
        import torch

        pool = torch.from_numpy(self.dram.rw.array())

        def on_chunk(at: int, n: int) -> None:
            for pool_off, entry_off, length in run_slices(entry.runs, at, n):
                up.copy(pool[pool_off : pool_off + length], entry_off)

        return on_chunk

    # --- bookkeeping ----------------------------------------------------------------------------
    def _device_hit(self, key: str, dev: str, t0: float) -> LoadedCheckpoint | None:
        copy = self.device_copies.take(key, dev)
        if copy is None:
            return None
        return LoadedCheckpoint(
            copy.name, dict(copy.state_dict), "gpu", time.perf_counter() - t0, copy.manifest.tensor_nbytes,
            copy.files, copy.manifest, lambda: self._release_device_copy(key, dev),
        )

    def _release_device_copy(self, key: str, dev: str) -> None:
        """One instance on `dev` less; with the last, the DRAM entry was used until now (a hint: a
        tier that cannot write its index, a full tmpfs, does not fail the release)."""
        if self.device_copies.release(key, dev):
            try:
                self.dram.touch(key)
            except OSError as e:
                log.warning("could not mark DRAM entry %s used (%s); its LRU place stays its load's", key, e)

    def _loaded(self, key, ident, sd, tier, t0, manifest, files, dev, entry, ssd_pin=None) -> LoadedCheckpoint:
        """The instance's LoadedCheckpoint; its release lets go of the DRAM entry, the device copy
        and the SSD entry (`ssd_pin`: its model files are there; or the load's FallbackFiles) it holds,
        and marks the DRAM entry used then (LRU by last use, not by load)."""
        def release() -> None:
            if entry is not None:
                self.dram.unpin(entry, used=True)
            if dev.type == "cuda":
                self._release_device_copy(key, str(dev))
            elif ssd_pin is not None:
                ssd_pin.release()

        if dev.type == "cuda":
            # the copy, shared by later instances on the device, keeps the files' SSD entry
            self.device_copies.hold(key, str(dev), sd, manifest, files, ident.name,
                                    ssd_pin.release if ssd_pin is not None else None)
            if entry is not None:  # device bytes are private: the DRAM entry need not stay pinned
                self.dram.unpin(entry)
                entry = None
        return LoadedCheckpoint(
            ident.name, sd, tier, time.perf_counter() - t0, manifest.tensor_nbytes, files, manifest, release,
            ref=ident.ref,
        )
