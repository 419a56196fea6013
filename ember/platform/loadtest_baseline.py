"""The usual way, for `ember loadtest --baseline`: transformers `from_pretrained` of the model's
safetensors directory, then the load test's prompt (chat template, greedy) to its first token.

Run as `python -m ember.platform.loadtest_baseline MODEL_DIR OUT_JSON PROMPT ROUNDS` in a fresh
process: one untimed load first (imports and first-use costs excluded, as a worker has them done
before any cold start), then ROUNDS timed rounds with the page cache warm and ROUNDS with it cold.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure(model_dir: Path, prompt: str, rounds: int) -> dict[str, Any]:
    """Rounds with the page cache warm (the files as the untimed first load left them) and cold
    (this model's files dropped from the page cache with posix_fadvise, nothing else)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    import torch

    with torch.no_grad():  # untimed: imports and the first use of from_pretrained and generate
        AutoModelForCausalLM.from_pretrained(model_dir).generate(ids, max_new_tokens=1, do_sample=False)
    result: dict[str, Any] = {
        "model_dir": str(model_dir),
        "model_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        "prompt": prompt, "rounds": rounds,
        "counted": "load_s: from_pretrained(model_dir) plus a read of every 4 KiB page of the weights (it maps "
                   "the file lazily; without the read the bytes are not loaded yet); first_token_s: "
                   "generate(max_new_tokens=1) on the chat-templated prompt; ttft_s: both. One process, after an "
                   "untimed first load (imports excluded). page_cache warm: as that load left it; cold: the "
                   "model's files dropped from the page cache (posix_fadvise DONTNEED) before each round.",
    }
    for cache in ("warm", "cold"):
        rows = [_round(model_dir, ids, drop_cache=cache == "cold") for _ in range(rounds)]
        result[cache] = {k: [r[k] for r in rows] for k in ("load_s", "first_token_s", "ttft_s")}
        result[cache].update({f"{k}_p50": statistics.median(r[k] for r in rows) for k in ("load_s", "ttft_s")})
    result["ttft_p50_s"] = result["warm"]["ttft_s_p50"]
    result["from_pretrained_s"] = result["warm"]["load_s"]
    return result


def _round(model_dir: Path, ids: Any, *, drop_cache: bool) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    if drop_cache:
        for f in model_dir.glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            float(flat[:: max(1, 4096 // flat.element_size())].sum())
    t1 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, do_sample=False)
    t2 = time.perf_counter()
    del model
    return {"load_s": t1 - t0, "first_token_s": t2 - t1, "ttft_s": t2 - t0}


def main(argv: list[str]) -> int:
    model_dir, out, prompt, rounds = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    result = measure(model_dir, prompt, rounds)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
