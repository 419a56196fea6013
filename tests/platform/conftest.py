"""Fixtures that start real gateway and worker processes (uvicorn) on free loopback ports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ember.platform.redis_server import RedisServerProcess, free_port

ADMIN_KEY = "test-admin-key-0123456789"
CLUSTER_TOKEN = "test-cluster-token-0123456789"


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    health_url: str = ""
    headers: dict | None = None
    timeout_s: float = 60.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def base_env(redis_url: str, store_url: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "EMBER_REDIS_URL": redis_url, "EMBER_ADMIN_KEY": ADMIN_KEY,
            "EMBER_CLUSTER_TOKEN": CLUSTER_TOKEN, "EMBER_STORE_URL": store_url, "PYTHONUNBUFFERED": "1",
            "EMBER_HEARTBEAT_INTERVAL_S": "0.3", "EMBER_HEARTBEAT_TTL_S": "2", "EMBER_AUTOSCALER_INTERVAL_S": "0.3",
            "EMBER_DRAM_CAPACITY_BYTES": str(128 << 20), **extra}


def start_process(args: list[str], env: dict[str, str], log: Path, health_url: str, *, headers: dict | None = None,
                  timeout_s: float = 60.0, wait: bool = True) -> Proc:
    """Start `ember ARGS`, logging to `log`; with `wait`, return once `health_url` answers 200.
    Without it, return at once: `wait_healthy(p)` later (processes started side by side boot together)."""
    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "ember", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    p = Proc(proc, health_url.rsplit("/", 2)[0] if "/internal/" in health_url else health_url.rsplit("/", 1)[0], log,
             health_url, headers, timeout_s)
    return wait_healthy(p) if wait else p


def wait_healthy(p: Proc) -> Proc:
    """Wait until `p` answers its health check; stops it and raises when it exits or times out."""
    deadline = time.monotonic() + p.timeout_s
    while time.monotonic() < deadline:
        if p.proc.poll() is not None:
            raise RuntimeError(f"{p.proc.args[3]} exited with {p.proc.returncode}:\n{p.output()}")
        try:
            if httpx.get(p.health_url, headers=p.headers, timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    p.stop()
    raise RuntimeError(f"{p.proc.args[3]} did not become healthy:\n{p.output()}")


def start_gateway(tmp: Path, env: dict[str, str], *, wait: bool = True) -> Proc:
    port = free_port()
    return start_process(["gateway", "--host", "127.0.0.1", "--port", str(port)], env, tmp / f"gateway-{port}.log",
                         f"http://127.0.0.1:{port}/healthz", wait=wait)


def start_worker(tmp: Path, env: dict[str, str], node_id: str, *, wait: bool = True) -> Proc:
    port = free_port()
    return start_process(["worker", "--data-dir", str(tmp / node_id), "--node-id", node_id, "--host", "127.0.0.1",
                          "--port", str(port)], env, tmp / f"{node_id}.log",
                         f"http://127.0.0.1:{port}/internal/healthz",
                         headers={"x-ember-cluster-token": CLUSTER_TOKEN}, timeout_s=120, wait=wait)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny model and its tokenizer in this process, for the engine tests."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def gateway(redis_url: str, tmp_path: Path) -> Iterator[Proc]:
    """A real gateway process without workers."""
    g = start_gateway(tmp_path, base_env(redis_url, f"file://{tmp_path / 'store'}"))
    yield g
    g.stop()


def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class TierCluster:
    gateway: Proc
    worker: Proc
    node_dir: Path  # the worker's --data-dir
    node_root: Path  # the same path as the worker sees it (its own mount namespace), for faults
    tmp: Path
    small_ssd: bool  # the SSD tier is a 96 MiB tmpfs (a test can fill it)
    env: dict[str, str] | None = None  # the processes' environment (a test may start another gateway)


@pytest.fixture(scope="session")
def tier_cluster(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TierCluster]:
    """One gateway and one worker (2 CPU slots of 64 MiB) shared by the tier, tenancy and limit
    tests; each uses its own functions and checkpoints. The worker's SSD tier is a 96 MiB tmpfs in
    its own mount namespace where unshare and mount work (root), else a plain directory.
    Checkpoints: victim, twin, third, rlck, earlyck, scrubck (the tiny model), `elsewhere` store's twin (other weights),
    big (more than a device holds). Function `early` is deployed before any worker is up."""
    from ember.loader import open_store

    tmp = tmp_path_factory.mktemp("integrity")
    from ember.loader.convert import convert_checkpoint

    store = open_store(f"file://{tmp / 'store'}")
    convert_checkpoint(tiny_model_dir, tmp / "conv")
    for name in ("victim", "twin", "third", "rlck", "earlyck", "scrubck"):
        store.push(tmp / "conv", name)
    # another tenant's store with its own "twin": other weights under the same name
    other = _other_weights(tiny_model_dir, tmp / "other-hf")
    open_store(f"file://{tmp / 'elsewhere'}").push(other, "twin")
    store.push(_big_model(tmp / "big-hf"), "big")
    redis = RedisServerProcess(tmp / "redis").start()
    env = base_env(redis.url, store.uri, EMBER_ALLOWED_STORES=f"file://{tmp / 'elsewhere'}",
                   EMBER_DRAM_SCRUB_INTERVAL_S="0.5")
    node = tmp / "w0"
    (node / "ssd").mkdir(parents=True)
    small_ssd = bool(shutil.which("unshare")) and subprocess.run(
        ["unshare", "--mount", "--", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {node / 'ssd'}"],
        capture_output=True).returncode == 0
    procs: list[Proc] = []
    try:
        gateway = start_gateway(tmp, env)
        procs.append(gateway)
        r = httpx.put(f"{gateway.url}/v1/functions/early", headers=admin_headers(), json={"checkpoint": "earlyck"})
        assert r.status_code == 201 and r.json()["nbytes"] == 0, r.text  # no worker to tell its size yet
        if small_ssd:
            port = free_port()
            script = (f"mount -t tmpfs -o size=96m tmpfs {node / 'ssd'} && exec {sys.executable} -m ember worker "
                      f"--data-dir {node} --node-id w0 --host 127.0.0.1 --port {port}")
            procs.append(_start_shell(["unshare", "--mount", "--", "sh", "-c", script], env, tmp / "w0.log",
                                      f"http://127.0.0.1:{port}/internal/healthz"))
            root = Path(f"/proc/{procs[1].proc.pid}/root") / str(node).lstrip("/")
        else:
            procs.append(start_worker(tmp, env, "w0"))
            root = node
        yield TierCluster(gateway, procs[1], node, root, tmp, small_ssd, env)
    finally:
        for p in procs:
            p.stop()
        redis.stop()


def _other_weights(src: Path, dst: Path) -> Path:
    """The same model files with other weights (every matrix rolled by one row)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(src / "model.safetensors")
    save_file({k: torch.roll(v, 1, dims=0).contiguous() if v.dim() > 1 else v for k, v in sd.items()},
              dst / "model.safetensors")
    return dst


def _big_model(dst: Path) -> Path:
    """A model directory whose one tensor (68 MB of zeros) is larger than a test device (64 MiB)."""
    import json

    import torch
    from safetensors.torch import save_file

    dst.mkdir(parents=True)
    save_file({"w": torch.zeros(17 << 20, dtype=torch.float32)}, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return dst


def _start_shell(cmd: list[str], env: dict[str, str], log: Path, health_url: str) -> Proc:
    import time

    out = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    p = Proc(proc, health_url.rsplit("/", 2)[0], log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{p.output()}")
        try:
            if httpx.get(health_url, headers={"x-ember-cluster-token": CLUSTER_TOKEN}, timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    p.stop()
    raise RuntimeError(f"worker did not become healthy:\n{p.output()}")


def flip_byte(path: Path, at: int, mask: int = 0x01) -> bool:
    """XOR the byte at offset `at` of `path` with `mask`; False when the file has no byte there."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        if not b:
            return False
        f.seek(at)
        f.write(bytes([b[0] ^ mask]))
    return True


def until(cond, timeout_s: float = 15.0) -> bool:
    """Poll `cond` every 0.1 s until it holds (True) or `timeout_s` passes (its last answer)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


def feed_fifo(fifo: Path, data: bytes, timeout_s: float = 30.0) -> bool:
    """Write a file's bytes to the FIFO that stands in for it (a load held reading it) once a load
    reads it; False when none did within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            time.sleep(0.05)
            continue
        os.set_blocking(fd, True)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    return False
