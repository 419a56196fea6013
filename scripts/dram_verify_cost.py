"""What verifying a DRAM-tier entry costs when a new instance attaches it: DRAM hits of one
checkpoint in the worker's own process, with and without the chunk-hash check, interleaved.

    python scripts/dram_verify_cost.py --size-mb 512 --rounds 5 --json out/dram-verify.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    from ember.loader import open_store
    from ember.loader.tiers import NodeTiers

    with tempfile.TemporaryDirectory(prefix="ember-dram-verify-") as tmp:
        hf = Path(tmp) / "hf"
        hf.mkdir()
        n = args.size_mb << 20
        g = torch.Generator().manual_seed(0)
        save_file({"w": torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)}, hf / "model.safetensors")
        (hf / "config.json").write_text("{}")
        store = open_store(f"file://{tmp}/store")
        store.push(hf, "m")
        tiers = NodeTiers(Path(tmp) / "node", store.uri, dram_capacity_bytes=n + (64 << 20), ssd_capacity_bytes=1 << 40)
        try:
            ref = tiers.identity("m").ref
            tiers.load(ref).release()  # remote -> DRAM
            times: dict[str, list[float]] = {"verified": [], "unverified": []}
            for _ in range(args.rounds):
                for mode in ("verified", "unverified"):
                    tiers.verify_dram = mode == "verified"
                    t = time.perf_counter()
                    loaded = tiers.load(ref)
                    times[mode].append(time.perf_counter() - t)
                    assert loaded.tier == "dram", loaded.tier
                    loaded.release()
        finally:
            tiers.close(destroy_dram=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    doc = {"size_mb": args.size_mb, "rounds": args.rounds, "threads": tiers.threads,
           "median_s": med, "verify_cost_s": med["verified"] - med["unverified"],
           "verify_gb_per_s": n / 1e9 / max(1e-9, med["verified"] - med["unverified"]), "times_s": times}
    print(json.dumps(doc, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
