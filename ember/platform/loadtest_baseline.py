"""The usual way, for `ember loadtest --baseline`: transformers `from_pretrained` of the model's
safetensors directory, then the load test's prompt (chat template, greedy) to its first token.

Run as `python -m ember.platform.loadtest_baseline MODEL_DIR OUT_JSON PROMPT ROUNDS` in a fresh
process: one untimed load first (imports and first-use costs excluded, as a worker has them done
before any cold start), then ROUNDS timed rounds with the page cache as the first load left it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure(model_dir: Path, prompt: str, rounds: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    AutoModelForCausalLM.from_pretrained(model_dir)  # untimed: imports, first use
    load_s, first_token_s = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        t1 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=1, do_sample=False)
        t2 = time.perf_counter()
        load_s.append(t1 - t0)
        first_token_s.append(t2 - t1)
        del model
    total = [a + b for a, b in zip(load_s, first_token_s)]
    return {
        "model_dir": str(model_dir),
        "model_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
        "prompt": prompt,
        "rounds": rounds,
        "from_pretrained_s": load_s,
        "first_token_s": first_token_s,
        "ttft_s": total,
        "ttft_p50_s": statistics.median(total),
        "counted": "from_pretrained(model_dir) then generate(max_new_tokens=1) on the chat-templated prompt, "
                   "in one process after an untimed first load (imports excluded); page cache warm.",
    }


def main(argv: list[str]) -> int:
    model_dir, out, prompt, rounds = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    result = measure(model_dir, prompt, rounds)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
