"""Prefetches into this node's DRAM tier, as the autoscaler asks (POST /internal/prefetch): each
runs in the background, one per checkpoint at a time (a repeat while one runs starts nothing, but
its `dram_keep` is applied when the running one ends: the latest use sets an entry's keep).

The gateway recorded the prefetch as in flight when it sent it (`LoadQueues.send_prefetch`).
When the copy lands in DRAM the worker publishes it at once (a heartbeat) and then ends that
record, so the autoscaler reads one or the other, never neither (and sends nothing twice). A
copy the DRAM tier did not keep, or a failed prefetch, keeps its record until it expires
(`ember.scheduler.estimator.prefetch_expiry_s`): the next try waits that long."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import redis

from ember.errors import EmberError
from ember.platform.loadqueues import LoadQueues

if TYPE_CHECKING:
    from ember.loader import NodeTiers

log = logging.getLogger(__name__)


class DramPrefetcher:
    def __init__(self, tiers: NodeTiers, queues: LoadQueues, node_id: str, beat: Callable[[], bool]) -> None:
        self.tiers = tiers
        self.queues = queues
        self.node_id = node_id
        self.beat = beat  # publishes the node's holdings now; False when Redis does not know the node
        self._running: dict[str, int | None] = {}  # checkpoint -> the keep a repeat asked for meanwhile
        self._lock = threading.Lock()

    def start(self, checkpoint: str, dram_keep: int = 0) -> bool:
        """Pull a checkpoint into the DRAM tier in the background (load, then release), its entry
        with retention priority `dram_keep`; False when a prefetch of it is running already."""
        with self._lock:
            if checkpoint in self._running:
                self._running[checkpoint] = dram_keep
                return False
            self._running[checkpoint] = None
        threading.Thread(target=self._run, args=(checkpoint, dram_keep), name=f"prefetch-{checkpoint}",
                         daemon=True).start()
        return True

    def running(self) -> set[str]:
        """The checkpoints being prefetched now."""
        with self._lock:
            return set(self._running)

    def _run(self, checkpoint: str, dram_keep: int) -> None:
        keep: int | None = dram_keep
        try:
            while keep is not None:
                try:
                    # a repeat's pass finds the copy in DRAM: it only sets the entry's keep
                    self.tiers.load(checkpoint, dram_keep=keep).release()
                    log.info("prefetched %s into the DRAM tier (keep %d)", checkpoint, keep)
                    self._landed(checkpoint)
                except Exception as e:  # noqa: BLE001 - a prefetch is an optimisation: logged, never a traceback
                    log.warning("prefetch of %s failed: %s", checkpoint, e)
                with self._lock:
                    asked = self._running.get(checkpoint)
                    self._running[checkpoint] = None
                keep = asked if asked is not None and asked != keep else None
        finally:
            with self._lock:
                self._running.pop(checkpoint, None)

    def _landed(self, checkpoint: str) -> None:
        try:
            if self.tiers.holdings().get(checkpoint) == "dram" and self.beat():
                self.queues.prefetch_landed(self.node_id, checkpoint)
        except (EmberError, redis.RedisError) as e:  # the next beat publishes the copy, the record expires
            log.warning("could not publish the prefetched %s now: %s", checkpoint, e)
