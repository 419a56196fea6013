"""EmulatedGpu on a controlled clock: idle, warm idle and busy energy follow the calibration; steps
queue on the device's timeline; the agent as the engine's StepListener charges steps and switches
clocks per phase."""

from __future__ import annotations

import pytest

from ember.energy.agent import NodeEnergyAgent
from ember.energy.emulated import EmulatedGpu, step_full_clock_s
from ember.energy.simulated import phase_power_w, phase_time_factor
from ember.energy.steps import EngineStep


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_energy_follows_the_calibration_on_the_wall_clock() -> None:
    clock = Clock()
    gpu = EmulatedGpu("sim:0", clock=clock)
    clock.t += 10
    assert gpu.energy_j() == pytest.approx(700.0)  # cold idle: 70 W
    assert gpu.charge("decode", 1.0) == pytest.approx(1.0)
    clock.t += 0.5
    assert gpu.energy_j() == pytest.approx(700 + 315 * 0.5)  # the step is integrated as time passes
    clock.t += 1.5  # the step ended 1 s ago: warm idle (110 W) for a second
    assert gpu.energy_j() == pytest.approx(700 + 315 + 110)
    clock.t += 1.0
    assert gpu.energy_j() == pytest.approx(700 + 315 + 110 + 70)
    # a locked clock: decode slows by (1 + 0.15 (1 - f)) and draws 70 + 245 f W
    elapsed = gpu.charge("decode", 1.0, 1188.0)
    assert elapsed == pytest.approx(phase_time_factor("decode", 700, 1188.0)) == pytest.approx(1.06)
    e0 = gpu.energy_j()
    clock.t += elapsed
    assert gpu.energy_j() - e0 == pytest.approx(phase_power_w("decode", 700, 1188.0) * 1.06)


def test_overlapping_steps_queue_so_power_never_exceeds_the_phase_draw() -> None:
    clock = Clock()
    gpu = EmulatedGpu("sim:0", clock=clock)
    gpu.power_w()
    for _ in range(4):  # four requests' steps at the same instant: one after another on the device
        gpu.charge("prefill", 0.25)
    clock.t += 0.5
    assert gpu.power_w() == pytest.approx(665.0)
    clock.t += 0.5
    assert gpu.energy_j() == pytest.approx(665.0)
    assert gpu.steps == {"prefill": 4, "decode": 0}


def test_step_cost_comes_from_the_model_size_not_cpu_time() -> None:
    # 7e9 params bf16 = 14e9 bytes: a decode step reads them at 2.5 TB/s; prefill 2 x params FLOPs/token
    assert step_full_clock_s("decode", 1, 1, 14e9) == pytest.approx(14e9 / 2.5e12)
    assert step_full_clock_s("decode", 4, 4, 14e9) == pytest.approx(14e9 / 2.5e12 * 1.06)
    assert step_full_clock_s("prefill", 100, 1, 14e9) == pytest.approx(100 * 2 * 7e9 / 400e12)


def _agent(mode: str, clock: Clock, **kw: object) -> tuple[NodeEnergyAgent, EmulatedGpu]:
    gpu = EmulatedGpu("sim:0", clock=clock)
    agent = NodeEnergyAgent("n1", [gpu], mode, emulated_model_bytes=14e9, profile_windows=1, min_requests=2,
                            **kw)  # type: ignore[arg-type]
    agent.aliases["cpu:0"] = "sim:0"
    return agent, gpu


def _serve(agent: NodeEnergyAgent, requests: int, tokens: int = 4) -> None:
    for _ in range(requests):
        for i in range(tokens):
            phase = "prefill" if i == 0 else "decode"
            agent.phase_starts("cpu:0", phase)  # type: ignore[arg-type]
            agent.step_done(EngineStep("cpu:0", phase, 16 if i == 0 else 1, 1, 0.001, "chat"))  # type: ignore[arg-type]
        agent.record_request("chat", "sim:0", tokens, 0.01, 0.005, 1.0, 0.2)


def test_steps_charge_the_device_and_observe_mode_keeps_factory_settings() -> None:
    clock = Clock()
    agent, gpu = _agent("observe", clock)
    _serve(agent, 3)
    assert gpu.steps == {"prefill": 3, "decode": 9}
    assert gpu.busy_s == pytest.approx(3 * step_full_clock_s("prefill", 16, 1, 14e9) + 9 * 14e9 / 2.5e12)
    clock.t += 1.0
    agent.tick()
    snap = agent.snapshot()[0]
    assert snap["energy_j"] > 0 and snap["j_per_token"] > 0 and snap["sm_clock_mhz"] == 1980
    assert gpu.clock_switch_count == 0


def test_actuate_with_phase_clocks_switches_per_phase_and_charges_each_at_its_clock() -> None:
    clock = Clock()
    agent, gpu = _agent("actuate", clock, phase_clocks=True)
    for _ in range(3):  # slack: the controller lowers the decode clock
        _serve(agent, 3)
        clock.t += 1.0
        agent.tick()
    setting = agent.controllers["sim:0"].setting
    assert setting.sm_clock_mhz is not None and setting.prefill_sm_clock_mhz is None
    assert agent.snapshot()[0]["last_decision"]["applied"] is True
    switches = gpu.clock_switch_count
    busy = gpu.busy_s
    _serve(agent, 2)
    # prefill at the top, decode at the lowered clock: two switches per request
    assert gpu.clock_switch_count - switches == 4
    decode_s = 14e9 / 2.5e12
    expected = 2 * step_full_clock_s("prefill", 16, 1, 14e9) + 6 * decode_s * phase_time_factor(
        "decode", 700, setting.sm_clock_mhz)
    assert gpu.busy_s - busy == pytest.approx(expected)
    assert [mhz for _, mhz in list(gpu.clock_switches)[-2:]] == [None, setting.sm_clock_mhz]
