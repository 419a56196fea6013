#!/usr/bin/env python3
"""GPU check of Ember's loader, for a machine with a CUDA GPU and only torch, numpy, safetensors
(and optionally nvidia-ml-py, xxhash) installed. Run from the source tree:

    python scripts/gpu_check.py [--size-gb 2] [--workdir /tmp/ember-gpu-check] [--rounds 3]

Prints one JSON document:
  dram_to_gpu: the loader's DRAM tier -> GPU against a plain pinned-memory copy of the same
               bytes in this script (target: loader >= 80% of the plain copy);
  ssd_to_gpu:  the loader's SSD tier -> GPU total, against reading the partitions alone (into
               pinned memory) and copying alone (target: total <= 1.15x the slower of the two).
Without CUDA the GPU parts are skipped (reported as such) and only the host-side reads run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from the source tree, not installed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ember-gpu-check"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(json.dumps(run(args.size_gb, args.workdir, args.rounds), indent=2))


def run(size_gb: float, workdir: Path, rounds: int) -> dict:
    import torch

    from ember.loader.convert import read_manifest
    from ember.loader.tiers import NodeTiers

    workdir.mkdir(parents=True, exist_ok=True)
    name = "gpu-check"
    out: dict = {"size_gb": size_gb, "cuda": bool(torch.cuda.is_available()), "torch": torch.__version__}
    out["device"] = _device_name()
    src = _make_checkpoint(workdir, size_gb)
    pool = int(size_gb * 1e9 * 1.1) + (64 << 20)
    tiers = NodeTiers(workdir / "node", f"file://{workdir / 'store'}", dram_capacity_bytes=pool, ssd_capacity_bytes=1 << 50)
    try:
        if tiers.ssd.path(name) is None:
            tmp = tiers.ssd.begin(name, 1)
            tmp.rmdir()
            os.replace(src, tmp)
            tiers.ssd.commit(name, tmp)
        ssd_dir = tiers.ssd.path(name)
        manifest = read_manifest(ssd_dir)
        nbytes = manifest.total_bytes
        out["bytes"] = nbytes
        out["pool_page_locked"] = tiers.pinned_pool
        cold = _can_drop()
        out["ssd_cache"] = "cold" if cold else "hot (not root: page cache not dropped)"
        # Host side (runs everywhere): SSD -> DRAM pool through the loader, and the raw read.
        read_s, ssd_dram_s = [], []
        for _ in range(rounds):
            read_s.append(_raw_read(ssd_dir, manifest, cold))
            tiers.dram.evict(name)
            if cold:
                _drop()
            t = time.perf_counter()
            loaded = tiers.load(name)
            ssd_dram_s.append(time.perf_counter() - t)
            assert loaded.tier == "ssd", loaded.tier
            loaded.release()
        out["host"] = {
            "raw_read_gbps": nbytes / statistics.median(read_s) / 1e9,
            "ssd_to_dram_gbps": nbytes / statistics.median(ssd_dram_s) / 1e9,
        }
        if not torch.cuda.is_available():
            out["skipped"] = ["dram_to_gpu", "ssd_to_gpu"]
            out["note"] = "no CUDA device: GPU paths (pinned staging, copy stream, one device allocation) not exercised"
            return out
        dev = torch.device("cuda")
        # Plain pinned copy of the same number of bytes: the reference.
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        host[:: 1 << 20] = 1
        dbuf = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        copy_s = []
        for _ in range(rounds + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            dbuf.copy_(host, non_blocking=True)
            torch.cuda.synchronize()
            copy_s.append(time.perf_counter() - t)
        copy_s = copy_s[1:]  # the first copy warms up the driver
        del dbuf
        # Loader DRAM -> GPU (the entry is in the pool from the host-side rounds).
        reference = tiers.load(name)
        check = {k: v for k, v in list(reference.state_dict.items())[:4]}
        dram_gpu_s = []
        for _ in range(rounds):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loaded = tiers.load(name, device="cuda")
            torch.cuda.synchronize()
            dram_gpu_s.append(time.perf_counter() - t)
            assert loaded.tier == "dram", loaded.tier
            assert all(torch.equal(loaded.state_dict[k].cpu(), v) for k, v in check.items())
            loaded.release()
            del loaded
        plain_gbps = nbytes / statistics.median(copy_s) / 1e9
        loader_gbps = nbytes / statistics.median(dram_gpu_s) / 1e9
        out["dram_to_gpu"] = {
            "plain_pinned_copy_gbps": plain_gbps,
            "loader_gbps": loader_gbps,
            "loader_over_plain": loader_gbps / plain_gbps,
            "target": ">= 0.8",
            "all_s": {"plain": copy_s, "loader": dram_gpu_s},
        }
        reference.release()
        # Loader SSD -> GPU total (reads overlapped with copies on a side stream).
        total_s = []
        for _ in range(rounds):
            tiers.dram.evict(name)
            if cold:
                _drop()
            torch.cuda.synchronize()
            t = time.perf_counter()
            loaded = tiers.load(name, device="cuda")
            torch.cuda.synchronize()
            total_s.append(time.perf_counter() - t)
            assert loaded.tier == "ssd", loaded.tier
            assert all(torch.equal(loaded.state_dict[k].cpu(), v) for k, v in check.items())
            loaded.release()
            del loaded
        slower = max(statistics.median(read_s), statistics.median(copy_s))
        out["ssd_to_gpu"] = {
            "total_s": statistics.median(total_s),
            "read_only_s": statistics.median(read_s),
            "copy_only_s": statistics.median(copy_s),
            "total_over_slower": statistics.median(total_s) / slower,
            "target": "<= 1.15",
            "all_s": total_s,
        }
        return out
    finally:
        tiers.close(destroy_dram=True)


def _device_name() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            return name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, no driver, no GPU: the check still runs its host part
        return None


def _make_checkpoint(workdir: Path, size_gb: float) -> Path:
    """A converted synthetic checkpoint (bf16 matrices of random bytes) under workdir/conv."""
    import torch
    from safetensors.torch import save_file

    from ember.loader.convert import convert_checkpoint

    conv = workdir / f"conv-{size_gb}"
    if (conv / "manifest.json").exists():
        return conv
    hf = workdir / "hf"
    hf.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors, left, i = {}, int(size_gb * 1e9), 0
    while left > 0:
        n = min(64 << 20, left)
        tensors[f"layers.{i}.weight"] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(torch.bfloat16)
        left -= n
        i += 1
    save_file(tensors, hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    convert_checkpoint(hf, conv)
    (hf / "model.safetensors").unlink()
    return conv


def _raw_read(ssd_dir: Path, manifest, direct: bool) -> float:
    """Reading the partitions alone into a buffer prepared beforehand (pinned when CUDA)."""
    import torch

    from ember.loader.pipeline import open_partitions, read_from_fds

    buf = torch.empty(manifest.total_bytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
    buf[:: 4096] = 0
    if direct:
        _drop()
    t = time.perf_counter()
    fds = open_partitions(ssd_dir, manifest, True if direct else None)
    try:
        read_from_fds(fds, manifest, memoryview(buf.numpy()), verify=False)
    finally:
        for fd, _ in fds:
            os.close(fd)
    return time.perf_counter() - t


def _can_drop() -> bool:
    try:
        _drop()
    except OSError:
        return False
    return True


def _drop() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


if __name__ == "__main__":
    main()
