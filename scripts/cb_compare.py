"""Compare batching mechanisms on this machine (issue 11 item 2), on one workload in one process:
Ember's engine (a batched cache of its own over the model's forward), transformers' continuous
batching (`generate_batch` with warmup=False and a sized paged cache), one static batched
`generate`, and a thread per request. Greedy; prints wall seconds and whether outputs agree.

    PYTHONPATH=$PWD .venv/bin/python scripts/cb_compare.py [--hidden 512 --layers 4 --n 16 --tokens 32 --prompt 64]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from ember.platform.gateway.protocol import GenerateRequest
    from ember.platform.runtime.bench import build_random_model
    from ember.platform.runtime.engine import ModelInstance

    model, tok = build_random_model(args.hidden, args.layers, args.device)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, len(tok)) for _ in range(args.prompt)] for _ in range(args.n)]
    inst = ModelInstance("cmp", "cmp", model, tok, kv_budget_tokens=args.n * (args.prompt + args.tokens))
    inst.eos_ids = set()
    results: dict[str, float] = {}
    outputs: dict[str, list[list[int]]] = {}

    def ember_engine() -> list[list[int]]:
        seqs = [inst.submit(GenerateRequest(prompt="", max_tokens=args.tokens, temperature=0), ids=p) for p in prompts]
        for s in seqs:
            list(s.stream())
        return [s.out for s in seqs]

    def threads() -> list[list[int]]:
        out: list[list[int]] = [[] for _ in prompts]

        def one(i: int) -> None:
            seq = inst.new_sequence(GenerateRequest(prompt="", max_tokens=args.tokens, temperature=0), prompts[i])
            from ember.platform.runtime.solo import run_alone

            list(run_alone(model, seq))
            out[i] = seq.out

        ts = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return out

    def static() -> list[list[int]]:
        tok.padding_side = "left"
        batch = torch.tensor(prompts, device=args.device)
        with torch.inference_mode():
            g = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=args.tokens,
                               min_new_tokens=args.tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return [row[args.prompt:].tolist() for row in g]

    def transformers_cb() -> list[list[int]]:
        gc = GenerationConfig(max_new_tokens=args.tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        cb = ContinuousBatchingConfig(page_size=64, num_blocks=args.n * 2 + 4, max_batch_tokens=1024)
        with torch.inference_mode():
            out = model.generate_batch(prompts, generation_config=gc, continuous_batching_config=cb, warmup=False)
        by_id = sorted(out.items(), key=lambda kv: int(kv[0].split("_")[-1]) if kv[0].split("_")[-1].isdigit() else 0)
        return [list(v.generated_tokens) for _, v in by_id]

    for name, fn in [("ember_engine", ember_engine), ("transformers_cb", transformers_cb), ("static_generate", static),
                     ("thread_per_request", threads)]:
        fn() if name != "transformers_cb" else None  # warm-up (transformers' CB builds its cache per call)
        t0 = time.perf_counter()
        try:
            outputs[name] = fn()
            results[name] = time.perf_counter() - t0
        except Exception as e:  # reported, not fatal: the comparison is the point
            results[name] = float("nan")
            print(f"{name} failed: {e.__class__.__name__}: {e}")
    inst.close()
    ref = outputs.get("static_generate")
    agree = {k: (v == ref) for k, v in outputs.items()} if ref else {}
    print(json.dumps({"workload": vars(args), "wall_s": results, "equal_to_static_greedy": agree,
                      "torch_threads": torch.get_num_threads()}, indent=2))


if __name__ == "__main__":
    main()
