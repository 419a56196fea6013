"""The local node backend divides the machine's GPUs between the workers it starts, as `ember up
--workers N` does: two workers never register the same GPU, a share comes back when its worker
is terminated, and a fleet larger than its GPUs is refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.config import Settings
from ember.errors import ConfigError
from ember.platform import devices, local_fleet


class _Proc:
    """A worker process that is running (the fleet only polls and stops them)."""

    def __init__(self, args: list[str], env: dict[str, str], **_: object) -> None:
        self.args, self.env, self.returncode, self.pid = args, env, None, 0

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, _sig: int) -> None:
        self.returncode = 0

    def terminate(self) -> None:
        self.returncode = 0

    def wait(self, timeout: float | None = None) -> int:
        self.returncode = 0
        return 0

    def kill(self) -> None:
        self.returncode = -9


@pytest.fixture
def fleet_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[_Proc]:
    started: list[_Proc] = []

    def popen(args: list[str], env: dict[str, str], **kw: object) -> _Proc:
        started.append(_Proc(args, env))
        return started[-1]

    monkeypatch.setattr(local_fleet.subprocess, "Popen", popen)
    monkeypatch.setattr(devices, "visible_gpu_ids", lambda: ["GPU-a", "GPU-b", "GPU-c", "GPU-d"])
    monkeypatch.setenv("EMBER_FLEET_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("EMBER_DEVICES", raising=False)
    return started


def test_each_local_worker_gets_its_own_gpus(fleet_env: list[_Proc]) -> None:
    fleet = local_fleet.LocalWorkerFleet(Settings(node_min=0, node_max=2))
    try:
        fleet.set_desired_capacity(2)
        assert [p.env["EMBER_DEVICES"] for p in fleet_env] == ["GPU-a,GPU-b", "GPU-c,GPU-d"]
        fleet.terminate("local-0")  # scale-in: its share is free again
        fleet.set_desired_capacity(2)
        assert fleet_env[-1].env["EMBER_DEVICES"] == "GPU-a,GPU-b"
        assert sorted(p.env["EMBER_DEVICES"] for p in fleet_env if p.returncode is None) == ["GPU-a,GPU-b",
                                                                                             "GPU-c,GPU-d"]
    finally:
        fleet.close()


def test_more_local_workers_than_gpus_is_refused(fleet_env: list[_Proc]) -> None:
    with pytest.raises(ConfigError, match="only 4 GPUs"):
        local_fleet.LocalWorkerFleet(Settings(node_min=0, node_max=8))
    assert fleet_env == []


def test_no_gpus_means_cpu_workers(fleet_env: list[_Proc], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "visible_gpu_ids", lambda: [])
    fleet = local_fleet.LocalWorkerFleet(Settings(node_min=0, node_max=3))
    try:
        fleet.set_desired_capacity(3)
        assert len(fleet_env) == 3 and all("EMBER_DEVICES" not in p.env for p in fleet_env)
    finally:
        fleet.close()


def test_workers_that_fail_to_start_are_replaced_after_a_growing_back_off(
        fleet_env: list[_Proc], monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker that cannot start (a bad setting, say) exits at once: before, every node-scaler step
    started another (a full torch import, a new node directory and log each time, without end)."""
    clock = [1000.0]
    monkeypatch.setattr(local_fleet.time, "monotonic", lambda: clock[0])
    fleet = local_fleet.LocalWorkerFleet(Settings(node_min=1, node_max=2))
    try:
        fleet.set_desired_capacity(1)
        starts = []
        for _ in range(60):  # a minute of node-scaler steps, one a second; each start dies at once
            for p in fleet_env:
                p.returncode = 1 if p.returncode is None else p.returncode
            clock[0] += 1.0
            fleet.instances()
            starts.append(len(fleet_env))
        assert len(fleet_env) <= 8, starts  # 1 + retries after 1, 2, 4, 8, 16, 32 s
        assert fleet.failed_starts >= 5
        # one that runs for a while resets the back-off
        for p in fleet_env:
            p.returncode = 1
        clock[0] += 120.0
        fleet.instances()
        n = len(fleet_env)
        clock[0] += 100.0  # it lived 100 s
        fleet_env[-1].returncode = 0
        fleet.instances()
        assert fleet.failed_starts == 0 and len(fleet_env) == n + 1
    finally:
        fleet.close()
