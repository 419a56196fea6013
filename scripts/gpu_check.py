#!/usr/bin/env python3
"""GPU check of Ember's loader and energy code, for a machine with a CUDA GPU and only torch,
numpy, safetensors, transformers, xxhash and nvidia-ml-py installed. Run from the source tree:

    python scripts/gpu_check.py [--size-gb 2] [--workdir /tmp/ember-gpu-check] [--rounds 3] [--json OUT]

Read-only towards the GPU: no power-limit or clock change, no reset, no persistence-mode change
(the energy controller runs in `recommend` mode; the script reads the power limit before and
after and reports both). Prints one JSON document with one entry per section:
  loader:      dram_to_gpu: the loader's DRAM tier -> GPU against a plain pinned-memory copy of
               the same bytes (target: loader >= 80% of the plain copy);
               ssd_to_gpu: the loader's SSD tier -> GPU total, against reading the partitions
               alone (into pinned memory) and copying alone (target: <= 1.15x the slower);
  tiny_model:  `ember model tiny` loaded with load_state_dict(device="cuda"), built with
               build_model, greedy tokens and logits compared with the same model on CPU;
  nvml:        NVML readings, energy counter against integrated power over a matmul burst;
  energy:      NodeEnergyAgent (recommend) over a model serving requests on the GPU;
  serving:     Ember's serving path on the GPU (scripts/gpu_serving.py): NodeTiers.load ->
               ModelInstance -> batching engine (greedy equals CPU, seeded repeats, no device
               memory held after unload), the worker's HTTP app when fastapi/redis are here,
               `ember bench engine` on an 8B-shaped bf16 model, 100 concurrent 4k-token requests
               that must queue and never run out of memory.
A section that fails reports its traceback; the others still run. Without CUDA the GPU parts
are skipped (reported as such).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from the source tree, not installed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ember-gpu-check"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None, help="also write the report here")
    ap.add_argument("--sections", default="env,loader,tiny_model,nvml,energy,serving")
    ap.add_argument("--serving-scale", choices=["full", "small"], default=None,
                    help="serving section: full (8B-shaped bf16, 100 x 4k requests; default on CUDA) or small")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    sections = {
        "env": lambda: env_info(),
        "loader": lambda: run(args.size_gb, args.workdir, args.rounds),
        "tiny_model": lambda: tiny_model(args.workdir),
        "nvml": lambda: nvml_check(),
        "energy": lambda: energy_check(args.workdir),
        "serving": lambda: _serving(args.workdir, args.serving_scale),
    }
    limit_before = _power_limit()
    for key in args.sections.split(","):
        t = time.perf_counter()
        try:
            report[key] = sections[key]()
        except Exception:  # one broken section must not hide the others' results
            report[key] = {"error": traceback.format_exc()}
        report.setdefault(key, {})["section_s"] = round(time.perf_counter() - t, 2)
        print(f"[gpu_check] {key} done in {report[key]['section_s']} s", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    report["power_limit_w_before_after"] = [limit_before, _power_limit()]
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        args.json.write_text(text)
    print(text)


def _serving(workdir: Path, scale: str | None) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_serving import serving_check

    return serving_check(workdir, scale)


def env_info() -> dict:
    import torch

    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": bool(torch.cuda.is_available()),
        "cpus": os.cpu_count(),
        "device": _device_name(),
    }
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name(0)
        out["cuda_runtime"] = torch.version.cuda
    st = os.statvfs(os.environ.get("EMBER_SHM_DIR", "/dev/shm"))
    out["shm_free_bytes"] = st.f_bavail * st.f_frsize
    for f in (
        "/sys/kernel/mm/transparent_hugepage/enabled",
        "/sys/kernel/mm/transparent_hugepage/shmem_enabled",
    ):
        try:
            out[Path(f).name] = Path(f).read_text().strip()
        except OSError:
            pass
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        out["transformers"] = None
    return out


def _power_limit() -> float | None:
    try:
        from ember.energy.nvml import NvmlDevice

        return NvmlDevice(0).power_limit_w()
    except Exception:
        return None


def run(size_gb: float, workdir: Path, rounds: int) -> dict:
    import torch

    from ember.loader.convert import read_manifest
    from ember.loader.tiers import NodeTiers

    name = "gpu-check"
    out: dict = {"size_gb": size_gb, "cuda": bool(torch.cuda.is_available())}
    src = _make_checkpoint(workdir, size_gb)
    pool = int(size_gb * 1e9 * 1.1) + (64 << 20)
    tiers = NodeTiers(
        workdir / "node", f"file://{workdir / 'store'}", dram_capacity_bytes=pool, ssd_capacity_bytes=1 << 50
    )
    try:
        name = tiers.adopt(src, name)  # from here on the pinned ref (entries are keyed by identity)
        ssd_dir = tiers.ssd.path(tiers.key(name))
        manifest = read_manifest(ssd_dir)
        nbytes = manifest.total_bytes
        out["bytes"] = nbytes
        out["pool_page_locked"] = tiers.pinned_pool
        cold = _can_drop()
        out["ssd_cache"] = "cold" if cold else "hot (not root: page cache not dropped)"
        # Host side (runs everywhere): SSD -> DRAM pool through the loader, and the raw read.
        read_s, ssd_dram_s = [], []
        for _ in range(rounds):
            r, h = _host_round(tiers, ssd_dir, manifest, name, cold)
            read_s.append(r)
            ssd_dram_s.append(h)
        out["host"] = {
            "raw_read_gbps": nbytes / statistics.median(read_s) / 1e9,
            "ssd_to_dram_gbps": nbytes / statistics.median(ssd_dram_s) / 1e9,
        }
        if not torch.cuda.is_available():
            out["skipped"] = ["dram_to_gpu", "ssd_to_gpu"]
            out["note"] = (
                "no CUDA device: GPU paths (pinned staging, copy stream, one device allocation) not exercised"
            )
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
            seconds, allocations = _timed_cuda_load(tiers, name, "dram", check)
            dram_gpu_s.append(seconds)
        plain_gbps = nbytes / statistics.median(copy_s) / 1e9
        loader_gbps = nbytes / statistics.median(dram_gpu_s) / 1e9
        out["dram_to_gpu"] = {
            "plain_pinned_copy_gbps": plain_gbps,
            "loader_gbps": loader_gbps,
            "loader_over_plain": loader_gbps / plain_gbps,
            "target": ">= 0.8",
            "device_allocations": allocations,
            "all_s": {"plain": copy_s, "loader": dram_gpu_s},
        }
        out["dram_to_gpu"]["release_touches_dram_entry"] = _release_touches_dram(tiers, name)
        reference.release()
        try:
            out["dram_to_gpu_second_process"] = _second_process_dram_to_gpu(
                tiers, name, rounds, nbytes, plain_gbps
            )
        except Exception:
            out["dram_to_gpu_second_process"] = {"error": traceback.format_exc()}
        # Loader SSD -> GPU total (reads overlapped with copies on a side stream), interleaved
        # round by round with the read alone and the loader's SSD -> DRAM (the disk drifts).
        from ember.loader import device as device_mod

        phases: dict[str, list[float]] = {"upload_init_s": [], "finish_wait_s": []}
        orig_init, orig_finish = device_mod.DeviceUpload.__init__, device_mod.DeviceUpload.finish

        def timed_init(self, *a, **k):
            t = time.perf_counter()
            orig_init(self, *a, **k)
            phases["upload_init_s"].append(time.perf_counter() - t)

        def timed_finish(self):
            t = time.perf_counter()
            try:
                return orig_finish(self)
            finally:
                phases["finish_wait_s"].append(time.perf_counter() - t)

        device_mod.DeviceUpload.__init__, device_mod.DeviceUpload.finish = timed_init, timed_finish
        total_s, read2_s, host2_s = [], [], []
        try:
            for _ in range(rounds):
                r, h = _host_round(tiers, ssd_dir, manifest, name, cold)
                read2_s.append(r)
                host2_s.append(h)
                tiers.dram.evict(tiers.key(name))
                if cold:
                    _drop()
                total_s.append(_timed_cuda_load(tiers, name, "ssd", check)[0])
        finally:
            device_mod.DeviceUpload.__init__, device_mod.DeviceUpload.finish = orig_init, orig_finish
        slower = max(statistics.median(read2_s), statistics.median(copy_s))
        out["ssd_to_gpu"] = {
            "total_s": statistics.median(total_s),
            "read_only_s": statistics.median(read2_s),
            "copy_only_s": statistics.median(copy_s),
            "ssd_to_dram_s": statistics.median(host2_s),
            "total_over_slower": statistics.median(total_s) / slower,
            "target": "<= 1.15",
            "all_s": {"total": total_s, "read_only": read2_s, "ssd_to_dram": host2_s, **phases},
        }
        return out
    finally:
        tiers.close(destroy_dram=True)


def tiny_model(workdir: Path) -> dict:
    """`ember model tiny` through the loader onto the GPU: same greedy tokens and close logits as on CPU."""
    import torch

    from ember.loader import build_model, load_state_dict
    from ember.loader.convert import convert_checkpoint
    from ember.tinymodel import make_tiny_model

    hf, conv = workdir / "tiny-hf", workdir / "tiny"
    if not (conv / "manifest.json").exists():
        make_tiny_model(hf)
        convert_checkpoint(hf, conv)
    out: dict = {}
    prompt = torch.tensor([[1, 17, 42, 99, 123, 7, 250, 3]])
    cpu_sd = load_state_dict(conv, device="cpu")
    cpu_model = build_model(conv / "files", cpu_sd, device="cpu")
    cpu_tokens, cpu_logits = _greedy(cpu_model, prompt, 24)
    out["cpu_tokens"] = cpu_tokens
    if not torch.cuda.is_available():
        out["skipped"] = "no CUDA device"
        return out
    t = time.perf_counter()
    sd = load_state_dict(conv, device="cuda")
    torch.cuda.synchronize()
    out["load_s"] = time.perf_counter() - t
    storages = {v.untyped_storage().data_ptr() for v in sd.values()}
    out["tensors"] = len(sd)
    out["device_allocations"] = len(storages)
    out["all_on_cuda"] = all(v.is_cuda for v in sd.values())
    t = time.perf_counter()
    model = build_model(conv / "files", sd, device="cuda")
    out["build_s"] = time.perf_counter() - t
    out["params_are_loader_tensors"] = all(
        p.untyped_storage().data_ptr() in storages for p in model.parameters()
    )
    tokens, logits = _greedy(model, prompt.cuda(), 24)
    out["cuda_tokens"] = tokens
    out["tokens_equal"] = tokens == cpu_tokens
    out["first_logits_max_abs_diff"] = float((logits.float().cpu() - cpu_logits.float()).abs().max())
    out["ok"] = bool(out["tokens_equal"] and out["all_on_cuda"] and out["device_allocations"] == 1)
    return out


def _host_round(tiers, ssd_dir: Path, manifest, name: str, cold: bool) -> tuple[float, float]:
    """The partitions read alone, then the loader's SSD tier -> DRAM pool: (seconds, seconds)."""
    read = _raw_read(ssd_dir, manifest, cold)
    tiers.dram.evict(tiers.key(name))
    if cold:
        _drop()
    t = time.perf_counter()
    loaded = tiers.load(name)
    seconds = time.perf_counter() - t
    assert loaded.tier == "ssd", loaded.tier
    loaded.release()
    return read, seconds


def _timed_cuda_load(tiers, name: str, tier: str, check: dict) -> tuple[float, int]:
    """One load onto the GPU, timed to the last byte there: (seconds, device allocations);
    checks the tier it came from and the bytes of the `check` tensors."""
    import torch

    torch.cuda.synchronize()
    t = time.perf_counter()
    loaded = tiers.load(name, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    try:
        assert loaded.tier == tier, loaded.tier
        assert all(_same_bytes(loaded.state_dict[k], v) for k, v in check.items()), "bytes differ on the GPU"
        return seconds, len({v.untyped_storage().data_ptr() for v in loaded.state_dict.values()})
    finally:
        loaded.release()


def _release_touches_dram(tiers, name: str) -> bool:
    """Whether the DRAM entry's last use is when the device copy went with its instance (not when
    it was loaded): the LRU order the scheduler's simulator assumes (`MemCluster.remove`)."""
    loaded = tiers.load(name, device="cuda")
    time.sleep(0.05)
    released_at = time.time()
    loaded.release()
    with tiers.dram._locked():
        entry = (tiers.dram._read_index() or {}).get("entries", {}).get(tiers.key(name), {})
    return entry.get("last_used", 0.0) >= released_at


def _same_bytes(a, b) -> bool:
    """Bit-exact equality (random bytes viewed as bf16 hold NaNs, which torch.equal calls unequal)."""
    import torch

    return torch.equal(
        a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)
    )


def _greedy(model, prompt, n: int):
    """Greedy decode with the KV cache; (token ids, logits of the first step)."""
    import torch

    with torch.inference_mode():
        res = model(input_ids=prompt, use_cache=True)
        first = res.logits[0, -1].clone()
        past, ids = res.past_key_values, []
        nxt = int(res.logits[0, -1].argmax())
        for _ in range(n):
            ids.append(nxt)
            res = model(
                input_ids=torch.tensor([[nxt]], device=prompt.device), past_key_values=past, use_cache=True
            )
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
    return ids, first


def nvml_check() -> dict:
    """NVML readings (never a setter), and the energy counter against integrated power samples."""
    import torch

    from ember.energy.detect import detect_devices
    from ember.energy.nvml import NvmlDevice
    from ember.errors import DevicePermissionError

    devices = detect_devices()
    out: dict = {"detected": [d.device_id for d in devices]}
    if not devices:
        out["skipped"] = "no NVML device"
        return out
    if torch.cuda.is_available():  # the worker's path: its CUDA devices matched to NVML by UUID
        from ember.platform.devices import cuda_devices

        gpus = cuda_devices()
        owned = detect_devices(gpus=gpus)
        out["worker_match"] = {"cuda": [(g.index, g.uuid) for g in gpus],
                               "nvml": [(o.device_id, o.index) for o in owned],
                               "all_matched": len(owned) == len([g for g in gpus if not g.mig])}
    d = NvmlDevice(0)  # allow_actuation defaults to False
    out["readings"] = {
        "name": d.name,
        "power_w": d.power_w(),
        "energy_j": d.energy_j(),
        "power_limit_w": d.power_limit_w(),
        "power_limit_range_w": d.power_limit_range_w(),
        "default_power_limit_w": d.default_power_limit_w(),
        "sm_clock_mhz": d.sm_clock_mhz(),
        "max_sm_clock_mhz": d.max_sm_clock_mhz(),
        "memory_bytes": d.memory_bytes(),
        "can_actuate": d.can_actuate(),
    }
    try:  # refused before any NVML call: actuation is not enabled
        d.set_power_limit_w(d.power_limit_w())
        out["setter_refused"] = False
    except DevicePermissionError as e:
        out["setter_refused"] = str(e)
    if not torch.cuda.is_available():
        return out
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    samples = []  # (t, W) while the GPU works
    e0, t0 = d.energy_j(), d.now_s()
    stop_at = t0 + 4.0
    products = 0
    while d.now_s() < stop_at:
        for _ in range(20):
            a @ b
        products += 20
        samples.append((d.now_s(), d.power_w(), d.sm_clock_mhz()))
    torch.cuda.synchronize()
    e1, t1 = d.energy_j(), d.now_s()
    integral = sum(
        (t2 - t1_) * (p1 + p2) / 2 for (t1_, p1, _), (t2, p2, _) in zip(samples, samples[1:], strict=False)
    )
    span = samples[-1][0] - samples[0][0] if len(samples) > 1 else 0.0
    out["burst"] = {
        "seconds": t1 - t0,
        "tflops": products * 2 * 8192**3 / (t1 - t0) / 1e12,
        "energy_counter_j": e1 - e0,
        "avg_power_w_counter": (e1 - e0) / (t1 - t0),
        "avg_power_w_samples": integral / span if span else None,
        "peak_power_w": max(p for _, p, _ in samples),
        "sm_clock_mhz_range": [min(c for *_, c in samples), max(c for *_, c in samples)],
        "samples": len(samples),
    }
    time.sleep(1.0)
    out["idle_power_w_after"] = d.power_w()
    return out


def energy_check(workdir: Path, requests: int = 48, devices=None, device: str = "cuda", spec=None) -> dict:
    """A model serving greedy requests on the GPU, reported to a NodeEnergyAgent in recommend mode.
    (devices/device/spec let the same code run on CPU against a SimulatedGpu.)"""
    import torch

    from ember.energy.agent import NodeEnergyAgent
    from ember.energy.detect import detect_devices
    from ember.loader import build_model, load_state_dict
    from ember.loader.convert import convert_checkpoint
    from ember.tinymodel import TinyModelSpec, make_tiny_model

    if devices is None:
        devices = detect_devices()  # NvmlDevice(allow_actuation=False)
        if not devices or not torch.cuda.is_available():
            return {"skipped": "no NVML device or no CUDA"}
    spec = spec or TinyModelSpec(layers=12, hidden=1536, heads=12, kv_heads=4, dtype="bfloat16")
    hf, conv = (
        workdir / f"model-{spec.layers}x{spec.hidden}-hf",
        workdir / f"model-{spec.layers}x{spec.hidden}",
    )
    if not (conv / "manifest.json").exists():
        make_tiny_model(hf, spec)
        convert_checkpoint(hf, conv)
    sd = load_state_dict(conv, device=device)
    model = build_model(conv / "files", sd, device=device)
    agent = NodeEnergyAgent("gpu-check", devices[:1], mode="recommend", profile_windows=2, min_requests=3)
    dev_id = devices[0].device_id
    gen = torch.Generator().manual_seed(0)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    _greedy(model, torch.randint(1, 500, (1, 64), generator=gen).to(device), 4)  # warm-up
    ticks = []
    ttfts, tpots = [], []
    for _ in range(requests):
        prompt = torch.randint(1, 500, (1, 256), generator=gen).to(device)
        sync()
        t = time.perf_counter()
        with torch.inference_mode():
            res = model(input_ids=prompt, use_cache=True)
            nxt = res.logits[0, -1].argmax().view(1, 1)
            sync()
            ttft = time.perf_counter() - t
            past = res.past_key_values
            t_dec = time.perf_counter()
            for _ in range(63):
                res = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = res.past_key_values, res.logits[0, -1].argmax().view(1, 1)
            sync()
        tpot = (time.perf_counter() - t_dec) / 63
        ttfts.append(ttft)
        tpots.append(tpot)
        agent.record_request(
            "medium", dev_id, 64, ttft, tpot, ttft_slo_s=0.5, tpot_slo_s=0.1, busy_s=ttft + 63 * tpot
        )
        if len(ttfts) % 4 == 0:  # a controller window every 4 requests
            _, decisions = agent.tick()
            ticks.append([dc.to_dict() for dc in decisions])
    _, decisions = agent.tick()
    ticks.append([dc.to_dict() for dc in decisions])
    snap = agent.snapshot()[0]
    flat = [dc for t in ticks for dc in t]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "requests": requests,
        "ttft_ms_median": 1000 * statistics.median(ttfts),
        "tpot_ms_median": 1000 * statistics.median(tpots),
        "ticks": len(ticks),
        "decisions": flat,
        "any_applied": any(dc["applied"] for dc in flat),
        "snapshot": snap,
    }


def _second_process_dram_to_gpu(tiers, name: str, rounds: int, nbytes: int, plain_gbps: float) -> dict:
    """Another process on the node attaching to the DRAM tier and loading onto the GPU (its
    process start, imports, CUDA context and NodeTiers construction are not counted)."""
    import subprocess

    code = (
        "import json,sys,time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "import torch\n"
        "from ember.loader.tiers import NodeTiers\n"
        "t=NodeTiers(sys.argv[1], sys.argv[2], dram_capacity_bytes=int(sys.argv[3]), ssd_capacity_bytes=1<<50)\n"
        "torch.zeros(1, device='cuda'); torch.cuda.synchronize()\n"
        "res=[]\n"
        "for _ in range(int(sys.argv[5])):\n"
        "    torch.cuda.synchronize(); s=time.perf_counter(); l=t.load(sys.argv[4], device='cuda')\n"
        "    torch.cuda.synchronize(); res.append((time.perf_counter()-s, l.tier)); l.release(); del l\n"
        "print(json.dumps({'seconds': [r[0] for r in res], 'tiers': [r[1] for r in res], 'pinned': t.pinned_pool}))\n"
        "t.close()\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tiers.data_dir),
            tiers.store_url,
            str(tiers.dram.capacity_bytes),
            name,
            str(rounds),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    med = statistics.median(doc["seconds"])
    return {
        "loader_gbps": nbytes / med / 1e9,
        "loader_over_plain": nbytes / med / 1e9 / plain_gbps,
        "tiers": doc["tiers"],
        "pool_page_locked": doc["pinned"],
        "all_s": doc["seconds"],
    }


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
        tensors[f"layers.{i}.weight"] = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).view(
            torch.bfloat16
        )
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
    buf[::4096] = 0
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
