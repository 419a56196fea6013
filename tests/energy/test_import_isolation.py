"""ember.energy imports and works with only torch, numpy and nvidia-ml-py: the platform's
dependencies are blocked in a subprocess."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = [
    "fastapi",
    "redis",
    "pydantic",
    "pydantic_settings",
    "typer",
    "prometheus_client",
    "starlette",
    "httpx",
]


def test_energy_imports_without_platform_dependencies() -> None:
    code = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked for this test: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import ember.energy
        import ember.energy.agent, ember.energy.budget, ember.energy.controller, ember.energy.detect
        import ember.energy.device, ember.energy.metrics, ember.energy.monitor, ember.energy.nvml
        import ember.energy.sim, ember.energy.simulated
        import ember.energy.emulated, ember.energy.restore, ember.energy.steps
        from ember.energy import detect_devices
        from ember.energy.agent import NodeEnergyAgent
        from ember.energy.sim import SimConfig, run_energy_sim

        assert detect_devices() == [], "no GPU here: NVML detection must give []"
        agent = NodeEnergyAgent("n1", detect_devices(simulated=2), "actuate")
        agent.record_request("f", "sim:0", 10, 0.1, 0.01, 1.0, 0.05)
        agent.tick()
        assert len(agent.snapshot()) == 2
        run_energy_sim(SimConfig(hours=0.05))
        leaked = [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
        assert not leaked, leaked
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")
