"""The simulated gateway's waiting loop: the twin of `Invoker.acquire` and `Invoker._should_start`
(ember/platform/gateway/invoke.py) at the simulation's clock.

As live:
- a request that finds nobody of its function waiting takes a free slot (`pick_warm`) at once;
  otherwise it queues in arrival order (never jumping the queue, even to a free slot);
- only the head of the queue takes slots and evaluates the scale-out rule, and it starts at most
  one cold start at a time: another only once its load ended (live: `starting` done) or, when the
  head got a slot first, by the next head (its start goes on and counts as a starting instance);
- the head wakes when a slot of the function frees, when one of its instances ends its load, and
  otherwise once a second (its timeout);
- the rule is `routing.should_start_estimated` on what the gateway knows: the instances' states
  and claim times, the queue's length, and the EWMAs (`estimator.ewma`, alpha
  SERVICE_EWMA_ALPHA) of a request's time holding a slot and of its prefill, folded in when the
  request ends (live: `Invoker.release`, `observe_done`), and of a cold start (claim to ready),
  folded in when the load ends (live: `InstanceStarter._load_on_worker`).

What remains approximate is listed in sim.py's docstring.
"""

from __future__ import annotations

import math
from collections import deque
from heapq import heappop, heappush

from ember.scheduler.estimator import SERVICE_EWMA_ALPHA, ewma
from ember.scheduler.routing import pick_warm, scale_out_rule, should_start_estimated
from ember.scheduler.simcontrol import ControlPlane
from ember.scheduler.simrecords import SimInstance, refresh

TIMEOUT_S = 1.0  # the waiting head's timeout (invoke.Invoker.acquire: min(remaining, 1.0))
LEARN_BACKLOG = 64  # requests recorded for a function before its ended ones are folded in anyway (memory)


class GatewayWaits(ControlPlane):
    """Waiting requests, their heads' wake-ups and scale-out decisions, and what the gateway learns.
    The engine (`_Simulation`) calls `_init_waits`, routes arrivals (`_join`), runs due wake-ups
    (`_wake` for each entry of `wakes`) and provides `_serve` (a request takes a slot)."""

    def _init_waits(self, nf: int) -> None:
        self.queues: dict[int, deque[int]] = {}  # function -> waiting requests, arrival order
        self.head_start: dict[int, SimInstance] = {}  # function -> its head's cold start in flight
        self.wakes: list[tuple[float, int]] = []  # heap of (time, function); stale when not wake_at's
        self.wake_at: dict[int, float] = {}
        self.last_wake: dict[int, float] = {}  # function -> its head's last wake (timeouts count from it)
        self.served: list[list[tuple[float, float, float]]] = [[] for _ in range(nf)]  # heaps (end, held, prefill)
        self.ewma_service_s: list[float | None] = [None] * nf
        self.ewma_prefill_s: list[float | None] = [None] * nf
        self.ewma_startup_s: list[float | None] = [None] * nf
        self.scale_out_rule = scale_out_rule(self.policy)  # Ember's rule, or the baseline's own
        self.room_waits: set[int] = set()  # functions whose head's last placement found no room

    def _serve(self, i: int, inst: SimInstance, start: float) -> None:
        raise NotImplementedError

    # --- learning ------------------------------------------------------------------------------
    def _request_ended_later(self, f: int, end: float, held_s: float, prefill_s: float, now: float) -> None:
        """Record a request that will end at `end`, folded in once the clock passes it."""
        served = self.served[f]
        heappush(served, (end, held_s, prefill_s))
        if len(served) > LEARN_BACKLOG:
            self._learn(f, now)

    def _learn(self, f: int, now: float) -> None:
        """Fold into `f`'s EWMAs, in the order they happened, the requests and loads ended by `now`."""
        served = self.served[f]
        if served and served[0][0] <= now:
            svc, pre = self.ewma_service_s[f], self.ewma_prefill_s[f]
            while served and served[0][0] <= now:
                _, held_s, prefill_s = heappop(served)
                svc = ewma(svc, held_s, SERVICE_EWMA_ALPHA)
                pre = ewma(pre, prefill_s, SERVICE_EWMA_ALPHA)
            self.ewma_service_s[f], self.ewma_prefill_s[f] = svc, pre
        loads = self.loads_ending[f]
        while loads and loads[0][0] <= now:
            _, startup_s = heappop(loads)
            self.ewma_startup_s[f] = ewma(self.ewma_startup_s[f], startup_s, SERVICE_EWMA_ALPHA)

    def _should_start(self, f: int, now: float) -> bool:
        """The head's scale-out decision (states of `f`'s instances refreshed at `now`)."""
        self._learn(f, now)
        spec = self.specs[self.names[f]]
        return should_start_estimated(self.fn_instances[f], waiting=len(self.queues[f]),
                                      target_concurrency=spec.target_concurrency,
                                      max_instances=spec.max_instances, ttft_slo_s=spec.ttft_slo_s,
                                      service_s=self.ewma_service_s[f] or 0.0,
                                      prefill_s=self.ewma_prefill_s[f] or 0.0,
                                      startup_s=self.ewma_startup_s[f] or 0.0, now_s=now,
                                      rule=self.scale_out_rule)

    # --- waiting -------------------------------------------------------------------------------
    def _join(self, i: int, f: int, t: float) -> None:
        """Request `i` of `f` arrives at `t` and must wait: at the end of the queue, or as its head
        (no free slot, nobody waiting), which tries at once."""
        q = self.queues.get(f)
        if q is None:
            self.queues[f] = deque((i,))
            self._wake(f, t)
            return
        q.append(i)
        last = self.last_wake[f]
        self._schedule(f, last + TIMEOUT_S * (math.floor((t - last) / TIMEOUT_S) + 1))

    def _wake(self, f: int, now: float) -> None:
        """The head of `f`'s queue wakes at `now`: heads take free slots in order; the one left
        without a slot starts a cold start if it has none in flight and the rule says so."""
        self.wake_at.pop(f, None)
        self.last_wake[f] = now
        q = self.queues[f]
        insts = self.fn_instances[f]
        tc = self.specs[self.names[f]].target_concurrency
        failed = False
        while True:
            refresh(insts, now)
            hs = self.head_start.get(f)
            if hs is not None and hs.ready_s <= now:
                del self.head_start[f]  # its load ended (live: `starting` done)
            chosen = pick_warm(insts, tc)
            while chosen is not None and q:
                self.head_start.pop(f, None)  # the head leaves; its cold start goes on for the next
                self._serve(q.popleft(), chosen, now)
                chosen = pick_warm(insts, tc)
            if not q:
                del self.queues[f]
                self.room_waits.discard(f)
                return
            if f in self.head_start or not self._should_start(f, now):
                break
            new = self._cold_start(f, now)
            if new is None:
                failed = True
                self.room_waits.add(f)  # live: the waiting request counts in `waiting_for_room`
                break
            self.room_waits.discard(f)
            self.head_start[f] = new
            if new.ready_s > now:
                break
        self._schedule(f, self._next_wake_s(insts, now, failed))

    def _next_wake_s(self, insts: list[SimInstance], now: float, failed: bool) -> float:
        """When the head wakes next: a load ends or a slot frees (every ready instance is full), or
        its timeout when its placement found no room or nothing else would wake it."""
        at = math.inf
        for inst in insts:
            s = inst.ready_s if inst.ready_s > now else (inst.ends[0] if inst.ends else now)
            if s < at:
                at = s
        if at <= now:  # cannot happen (a free slot is taken before this); never wake at the same time again
            return now + TIMEOUT_S
        return min(at, now + TIMEOUT_S) if failed or at == math.inf else at

    def _schedule(self, f: int, at: float) -> None:
        cur = self.wake_at.get(f)
        if cur is None or at < cur:
            self.wake_at[f] = at
            heappush(self.wakes, (at, f))
