"""`ember bench loader`: Ember's tiers against safetensors and torch.load, interleaved in one run.

The disk of a VM speeds up and slows down over minutes, so every method is measured once per
round, round after round, and only medians of the same run are compared.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

METHODS = (
    "raw_read", "raw_read_pool", "safetensors", "safetensors_copy", "torch_load", "torch_load_mmap", "ember_ssd",
    "ember_dram", "ember_dram_same_process",
)
CKPT_NAME = "bench-llama"
COUNTED = (
    "Each timing runs from the call to tensors whose every byte has come from storage "
    "(safetensors and torch mmap: plus reading one byte of every 4 KiB page; safetensors_copy: "
    "plus a copy into freshly allocated private memory). raw_read: parallel preadv of Ember's "
    "partition files into a buffer allocated and touched beforehand, no checksums (O_DIRECT when "
    "cold). raw_read_pool (extra): the same read into the DRAM pool's pages (shared memory; 4 KiB "
    "pages where tmpfs gets no huge pages): the limit for a destination other processes can map. "
    "ember_ssd: NodeTiers.load from the SSD tier into the node's DRAM pool with per-chunk "
    "xxh3 checks, DRAM entry evicted before each round. ember_dram: a second process attaching to "
    "the DRAM entry (copy-on-write mapping populated, no copy); its process start, imports and "
    "NodeTiers construction are not counted. ember_dram_same_process (extra): the DRAM hit in the "
    "process that holds the pool (the worker itself): read-only views of its pre-faulted mapping. "
    "Not counted anywhere: allocating and touching the DRAM "
    "pool once at node start, writing the files. hot: every file read once before the first round. cold: page cache dropped (echo 3 > "
    "/proc/sys/vm/drop_caches) before every measurement; the DRAM tier is shared memory and stays."
)


def run_loader_bench(
    size_gb: float,
    workdir: Path,
    *,
    cold: bool = False,
    rounds: int = 3,
    threads: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Run the benchmark; returns the JSON document (see the module docstring and the issue)."""
    import torch

    from ember.loader.pipeline import DEFAULT_THREADS
    from ember.loader.tiers import NodeTiers

    threads = threads or DEFAULT_THREADS
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    can_drop = _can_drop_caches() if cold else False
    log(f"writing a {size_gb} GB synthetic Llama-shaped checkpoint in {workdir}")
    hf_dir, pt_file = _make_checkpoints(workdir, size_gb)
    tiers = NodeTiers(
        workdir / "node",
        f"file://{workdir / 'store'}",
        dram_capacity_bytes=_pool_bytes(hf_dir),
        ssd_capacity_bytes=1 << 50,
        threads=threads,
    )
    try:
        ssd_dir, ref = _install_ssd(tiers, hf_dir)
        key = tiers.key(ref)
        from ember.loader.convert import read_manifest

        manifest = read_manifest(ssd_dir)
        nbytes = manifest.tensor_nbytes
        from ember.loader.vm import anonymous

        raw_buffer = anonymous(manifest.total_bytes)  # allocated and touched before timing
        times: dict[str, list[float]] = {m: [] for m in METHODS}
        if not (cold and can_drop):  # hot means hot from the first round on
            for f in [hf_dir / "model.safetensors", pt_file, *(ssd_dir / p.file for p in manifest.partitions)]:
                _read_through(f)
        for r in range(rounds):
            log(f"round {r + 1}/{rounds}")
            for method in METHODS:
                if cold and can_drop:
                    drop_caches()
                gc.collect()
                if method == "raw_read":
                    dt = _raw_read(ssd_dir, manifest, raw_buffer, cold and can_drop, threads)
                elif method == "raw_read_pool":
                    tiers.dram.evict(key)  # the pool is sized for this one checkpoint: now free
                    dt = _raw_read(ssd_dir, manifest, tiers.dram.rw, cold and can_drop, threads)
                elif method == "safetensors":
                    dt = _safetensors(hf_dir / "model.safetensors", copy=False)
                elif method == "safetensors_copy":
                    dt = _safetensors(hf_dir / "model.safetensors", copy=True)
                elif method == "torch_load":
                    dt = _torch_load(pt_file, mmap=False)
                elif method == "torch_load_mmap":
                    dt = _torch_load(pt_file, mmap=True)
                elif method == "ember_ssd":
                    tiers.dram.evict(key)
                    dt = _timed_load(tiers, ref, "ssd")
                elif method == "ember_dram":
                    dt = _ember_dram_child(workdir / "node", tiers, ref)
                else:
                    dt = _timed_load(tiers, ref, "dram")
                times[method].append(dt)
                log(f"  {method:18s} {dt:7.3f} s  {nbytes / dt / 1e9:6.2f} GB/s")
        del torch
    finally:
        tiers.close(destroy_dram=True)
    results = {}
    for m, ts in times.items():
        med = statistics.median(ts)
        results[m] = {"seconds": med, "gbps": nbytes / med / 1e9, "all": ts}
    doc = {
        "bytes": nbytes,
        "cache": "cold" if cold and can_drop else "hot",
        "rounds": rounds,
        "results": results,
        "counted": COUNTED
        + ("" if not cold or can_drop else " --cold was asked but the page cache could not be dropped "
           "(not root): every method was measured hot."),
        "threads": threads,
        "ratios": _ratios(results),
    }
    return doc


def plot_results(doc: dict, png: Path) -> None:
    """Bar chart of GB/s per method (median, with the range over rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(doc["results"])
    med = [doc["results"][n]["gbps"] for n in names]
    lo = [m - doc["bytes"] / max(doc["results"][n]["all"]) / 1e9 for m, n in zip(med, names, strict=True)]
    hi = [doc["bytes"] / min(doc["results"][n]["all"]) / 1e9 - m for m, n in zip(med, names, strict=True)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = ["#888" if n.startswith("raw") else "#d62" if n.startswith("ember") else "#4a7" for n in names]
    ax.bar(names, med, yerr=[lo, hi], capsize=4, color=colors)
    ax.set_yscale("log")
    ax.set_ylabel("GB/s (median; bars: range over rounds)")
    ax.set_title(f"Checkpoint loading, {doc['bytes'] / 1e9:.2f} GB, {doc['cache']} cache, {doc['rounds']} rounds")
    ax.tick_params(axis="x", rotation=25)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def drop_caches() -> None:
    """Write back dirty pages and drop the page cache (root only)."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# --- helpers -------------------------------------------------------------------------------------
def _can_drop_caches() -> bool:
    try:
        drop_caches()
    except OSError:
        return False
    return True


def _ratios(results: dict) -> dict:
    def g(m: str) -> float:
        return results[m]["gbps"]

    best_other = max(g("safetensors"), g("torch_load"), g("torch_load_mmap"))
    return {
        "ember_ssd_over_raw_read": g("ember_ssd") / g("raw_read"),
        "ember_ssd_over_raw_read_pool": g("ember_ssd") / g("raw_read_pool"),
        "ember_ssd_over_best_of_safetensors_torch": g("ember_ssd") / best_other,
        "ember_dram_over_ember_ssd": g("ember_dram") / g("ember_ssd"),
        "ember_dram_over_safetensors": g("ember_dram") / g("safetensors"),
    }


def _llama_shapes(size_gb: float) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a Llama-like model of about `size_gb` GB in bf16."""
    hidden = 2048 if size_gb >= 0.5 else 512
    inter, vocab = int(hidden * 2.75), 32000 if size_gb >= 0.5 else 8000
    kv = hidden // 4
    per_layer = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (kv, hidden),
                p + "self_attn.v_proj.weight": (kv, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _make_checkpoints(workdir: Path, size_gb: float) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    hf_dir, pt_file = workdir / "hf", workdir / "model.pt"
    stamp = workdir / f".made-{size_gb}"
    if stamp.exists() and (hf_dir / "model.safetensors").exists() and pt_file.exists():
        return hf_dir, pt_file
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, generator=gen)
    sd = {}
    for i, (name, shape) in enumerate(_llama_shapes(size_gb).items()):
        t = torch.empty(shape, dtype=torch.bfloat16)
        flat = t.view(-1).view(torch.uint8)
        start = (i * 4099) % (noise.numel() // 2)
        for o in range(0, flat.numel(), noise.numel() // 2):
            n = min(noise.numel() // 2, flat.numel() - o)
            flat[o : o + n] = noise[start : start + n]
        sd[name] = t
    save_file(sd, hf_dir / "model.safetensors")
    torch.save(sd, pt_file)
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama", "synthetic": True}))
    stamp.touch()
    return hf_dir, pt_file


def _pool_bytes(hf_dir: Path) -> int:
    size = (hf_dir / "model.safetensors").stat().st_size
    return (size * 11 // 10 + (64 << 20)) // (2 << 20) * (2 << 20)


def _install_ssd(tiers, hf_dir: Path) -> tuple[Path, str]:
    """The bench checkpoint as an SSD-tier entry (an earlier run's is reused): (its dir, its ref)."""
    from ember.loader.convert import convert_checkpoint

    for key, ref in tiers.ssd.refs().items():
        if key.startswith(CKPT_NAME + "@"):
            return tiers.ssd.path(key), ref
    converted = hf_dir.parent / f"{CKPT_NAME}-converted"
    shutil.rmtree(converted, ignore_errors=True)
    convert_checkpoint(hf_dir, converted)
    ref = tiers.adopt(converted, CKPT_NAME)
    return tiers.ssd.path(tiers.key(ref)), ref


def _raw_read(ssd_dir: Path, manifest, buffer, direct: bool, threads: int) -> float:
    from ember.loader.pipeline import open_partitions, read_from_fds

    t = time.perf_counter()
    fds = open_partitions(ssd_dir, manifest, direct)
    try:
        read_from_fds(fds, manifest, buffer.memoryview()[: manifest.total_bytes], threads=threads, verify=False)
    finally:
        for fd, _ in fds:
            os.close(fd)
    return time.perf_counter() - t


def _timed_load(tiers, ref: str, tier: str) -> float:
    """Seconds for one NodeTiers.load of the bench checkpoint, which must come from `tier`."""
    t = time.perf_counter()
    loaded = tiers.load(ref)
    dt = time.perf_counter() - t
    assert loaded.tier == tier, loaded.tier
    loaded.release()
    return dt


def _read_through(path: Path) -> None:
    """Read a file once (into the page cache), untimed."""
    buf = bytearray(16 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def _touch(sd: dict) -> int:
    total = 0
    for t in sd.values():
        if t.numel():
            total += int(t.reshape(-1).view(__import__("torch").uint8)[::4096].sum())
    return total


def _safetensors(path: Path, *, copy: bool) -> float:
    import torch
    from safetensors.torch import load_file

    t = time.perf_counter()
    sd = load_file(str(path))
    if copy:
        sd = {k: torch.empty_like(v).copy_(v) for k, v in sd.items()}
    else:
        _touch(sd)
    dt = time.perf_counter() - t
    del sd
    return dt


def _torch_load(path: Path, *, mmap: bool) -> float:
    import torch

    t = time.perf_counter()
    sd = torch.load(str(path), weights_only=True, mmap=mmap)
    if mmap:
        _touch(sd)
    dt = time.perf_counter() - t
    del sd
    return dt


def _ember_dram_child(data_dir: Path, tiers, ref: str) -> float:
    code = (
        "import json,sys,time\n"
        "from ember.loader.tiers import NodeTiers\n"
        "t=NodeTiers(sys.argv[1], sys.argv[2], dram_capacity_bytes=int(sys.argv[3]), ssd_capacity_bytes=1<<50)\n"
        "s=time.perf_counter(); l=t.load(sys.argv[4]); dt=time.perf_counter()-s\n"
        "print(json.dumps({'seconds': dt, 'tier': l.tier}))\n"
        "l.release(); t.close()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(data_dir), tiers.store_url, str(tiers.dram.capacity_bytes), ref],
        check=True,
        capture_output=True,
        text=True,
    )
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    if doc["tier"] != "dram":
        raise RuntimeError(f"second process loaded from {doc['tier']}, not dram")
    return float(doc["seconds"])
