"""The simulator's waiting requests follow the gateway's loop (`Invoker.acquire`): only the head of
a function's queue starts cold starts, one at a time, on what the gateway has learned by then, and
it re-evaluates when woken (a slot frees, a load ends, its 1 s timeout), not at each arrival."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ember.config import Settings
from ember.scheduler.autoscaler import Autoscaler
from ember.scheduler.policies import get_policy
from ember.scheduler.sim import SimConfig, _Simulation
from ember.scheduler.trace import Trace

CFG = dict(nodes=2, gpus_per_node=2, functions=1, duration_s=60.0, seed=0, target_concurrency=4, max_instances=8)


class _Loads(_Simulation):
    """Records each cold start: (claim time, the instance or None)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.started: list[tuple[float, object]] = []

    def _cold_start(self, f, t):
        inst = super()._cold_start(f, t)
        self.started.append((t, inst))
        return inst


def _sim(arrivals: list[float], **cfg) -> _Loads:
    c = SimConfig(**{**CFG, **cfg}).check()
    trace = Trace(["f"], np.asarray(arrivals, dtype=np.float64), np.zeros(len(arrivals), dtype=np.int32), c.duration_s)
    return _Loads(c, trace, get_policy("ember"), Autoscaler())


def test_a_burst_starts_one_cold_start_at_a_time_and_scales_before_a_request_ends() -> None:
    """Forty requests arrive together at a function with no instance. As live, the first is the head:
    it starts one cold start and blocks others while it waits on it (no second load while the first
    loads); once it is ready and full, the heads after it have no learned service time (nothing has
    ended) and more wait than starting instances take, so they start another, one at a time, before
    the first request ends. Before, the simulator asked the rule at every arrival with the load's
    real end and the slots' real end times, and started 8 loads before the first ended."""
    arrivals = [0.01 * k for k in range(40)]
    sim = _sim(arrivals)
    res = sim.run(None)
    first_t, first = sim.started[0]
    assert first_t == 0.0 and first is not None
    exec_s = sim._request_costs()[1]
    first_end = min(a + s + e for a, s, e in zip(arrivals, res.startup_s, exec_s, strict=True))
    later = [t for t, _ in sim.started[1:]]
    assert later and all(t >= first.ready_s for t in later)
    assert min(later) < first_end
    assert res.unplaced == 0 and np.isfinite(res.startup_s).all()


def test_the_gateway_learns_a_cold_start_when_its_load_ends_and_a_request_when_it_ends() -> None:
    """Before, the simulator folded a cold start into its average when it was claimed (its real end
    known in advance), and had no service or prefill times at all (it used the true ones)."""
    sim = _sim([0.0, 1.0])
    sim.start_run()
    inst = sim._cold_start(0, 0.0)
    assert inst is not None and inst.ready_s > 0
    sim._learn(0, math.nextafter(inst.ready_s, 0.0))
    assert sim.ewma_startup_s[0] is None
    sim._learn(0, inst.ready_s)
    assert sim.ewma_startup_s[0] == inst.ready_s
    sim.cluster.advance(inst.ready_s)
    sim._serve(0, inst, inst.ready_s)
    end = inst.ready_s + sim.exec_req[0]
    sim._learn(0, math.nextafter(end, 0.0))
    assert sim.ewma_service_s[0] is None and sim.ewma_prefill_s[0] is None
    sim._learn(0, end)
    assert sim.ewma_service_s[0] == sim.exec_req[0] and sim.ewma_prefill_s[0] == sim.prefill_req[0]


def test_arrivals_behind_the_head_are_seen_at_its_next_timeout() -> None:
    """A request that joins a queue does not wake its head (live: only slot releases, loads ending
    and the head's 1 s timeout do): the scale-out that three waiting requests call for starts at
    the head's timeout, one second after it last woke, not at the arrival that made it three."""
    t0 = 100.0
    sim = _sim([t0, t0 + 0.2, t0 + 0.4], target_concurrency=1, duration_s=200.0)
    name = sim.names[0]
    sim.specs[name] = dataclasses.replace(sim.specs[name], ttft_slo_s=8.0)
    sim.start_run()
    sim.next_step = math.inf  # no autoscaler steps here
    inst = sim._cold_start(0, 0.0)
    sim.cluster.advance(inst.ready_s)
    sim.loads_ending[0].clear()
    inst.ends.append(1000.0)  # its one slot is busy for long
    inst.last_used_s = 1000.0
    sim.ewma_service_s[0], sim.ewma_startup_s[0] = 5.0, 1.0  # learned: 5 s per request, 1 s per cold start
    sim.cluster.now = t0
    sim._join(0, 0, t0)  # the head: 5 s of queue + no prefill <= 8 s SLO, no start
    for i in (1, 2):
        sim.cluster.now = sim.t_list[i]
        sim._join(i, 0, sim.t_list[i])  # three waiting: 15 s > 8 s, a start would be sooner
    assert len(sim.started) == 1
    sim._run_events(t0 + 0.999)
    assert len(sim.started) == 1
    sim._run_events(t0 + 1.0)
    assert [t for t, _ in sim.started[1:]] == [t0 + 1.0]



def test_the_simulator_steps_the_autoscaler_at_the_gateways_interval() -> None:
    """Before, the simulator stepped it every 10 s by default, the gateway every second."""
    assert SimConfig().autoscaler_interval_s == Settings.model_fields["autoscaler_interval_s"].default == 1.0
