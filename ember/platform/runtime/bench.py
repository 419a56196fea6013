"""`ember bench engine`: the batching engine against the request-at-a-time loop, on whatever
device is present, in one run.

At each concurrency c, c clients each send `rounds` requests back to back (greedy, a random
`prompt_tokens`-token prompt, exactly `max_tokens` generated: EOS is ignored). "batching" submits
to the instance's engine; "sequential" runs each request's own decode loop in its client's
thread (the engine before batching). Per request: TTFT (submit to first token) and TPOT (mean
gap after the first token); aggregate tokens/s = generated tokens / wall time. Joules per token
from NVML's energy counter on CUDA (None where the device reports no energy).
"""

from __future__ import annotations

import json
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CONCURRENCY = (1, 4, 16, 64)


def build_random_model(hidden: int, layers: int, device: str, dtype: str = "float32", vocab: int | None = None,
                       heads: int | None = None, kv_heads: int | None = None, intermediate: int | None = None,
                       seed: int = 0) -> tuple[Any, Any]:
    """A Llama-shaped model with random weights built directly on `device`, and a small tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ember.tinymodel import build_tokenizer

    tokenizer = build_tokenizer()
    heads = heads or max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab or len(tokenizer), hidden_size=hidden,
                         intermediate_size=intermediate or hidden * 4 if intermediate is None else intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads or heads, max_position_embeddings=8192,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model.eval(), tokenizer


def _pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


class _Energy:
    """NVML energy of the model's GPU, else None."""

    def __init__(self, device: Any) -> None:
        self.handle = None
        if getattr(device, "type", "cpu") != "cuda":
            return
        try:
            import pynvml
            import torch

            from ember.platform.devices import cuda_devices

            pynvml.nvmlInit()
            uuid = cuda_devices()[device.index or 0].uuid
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                u = pynvml.nvmlDeviceGetUUID(h)
                if (u.decode() if isinstance(u, bytes) else u) == uuid:
                    self.handle = h
            del torch
        except Exception:  # no NVML here: no energy figure
            self.handle = None

    def joules(self) -> float | None:
        if self.handle is None:
            return None
        import pynvml

        return pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0


def run_case(inst: Any, engine: str, concurrency: int, *, rounds: int, prompt_tokens: int, max_tokens: int,
             vocab: int, seed: int = 0) -> dict[str, Any]:
    from ember.platform.gateway.protocol import GenerateRequest
    from ember.platform.runtime.events import GenerationDone

    rng = random.Random(seed * 1000 + concurrency)
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_tokens)] for _ in range(concurrency * rounds)]
    ttft: list[float] = []
    tpot: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            for r in range(rounds):
                ids = prompts[k * rounds + r]
                req = GenerateRequest(prompt="", max_tokens=max_tokens, temperature=0.0)
                events = inst.generate_alone(req, ids) if engine == "sequential" else inst.generate(req, ids=ids)
                for ev in events:
                    if isinstance(ev, GenerationDone):
                        with lock:
                            ttft.append(ev.ttft_s)
                            if ev.completion_tokens > 1:
                                tpot.append(ev.tpot_s)
                            tokens[0] += ev.completion_tokens
        except BaseException as e:  # reported after the case
            errors.append(e)

    energy = _Energy(inst.device)
    j0 = energy.joules()
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    j1 = energy.joules()
    if errors:
        raise errors[0]
    return {"engine": engine, "concurrency": concurrency, "tokens_per_s": tokens[0] / wall,
            "ttft_s": {"p50": _pct(ttft, 0.5), "p99": _pct(ttft, 0.99)},
            "tpot_s": {"p50": _pct(tpot, 0.5), "p99": _pct(tpot, 0.99)},
            "joules_per_token": (j1 - j0) / tokens[0] if j0 is not None and j1 is not None and tokens[0] else None,
            "requests": concurrency * rounds, "tokens": tokens[0], "wall_s": wall}


def run_engine_bench(out_json: Path, *, model_dir: Path | None = None, hidden: int = 512, layers: int = 4,
                     device: str | None = None, dtype: str = "float32", concurrency: tuple[int, ...] = CONCURRENCY,
                     rounds: int = 2, prompt_tokens: int = 64, max_tokens: int = 32, plot: Path | None = None,
                     model_kw: dict[str, Any] | None = None, log: Any = print) -> dict[str, Any]:
    import torch

    from ember.platform.runtime.engine import ModelInstance

    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    if model_dir is not None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        name = str(model_dir)
    else:
        model, tokenizer = build_random_model(hidden, layers, device, dtype, **(model_kw or {}))
        name = f"llama-shaped random hidden={hidden} layers={layers} {dtype}"
    longest = prompt_tokens + max_tokens
    inst = ModelInstance("bench", "bench", model, tokenizer, kv_budget_tokens=max(concurrency) * longest,
                         max_batch=max(concurrency), max_queue=max(concurrency) * rounds, device_id=device)
    inst.eos_ids = set()  # every request generates exactly max_tokens
    vocab = min(len(tokenizer), model.config.vocab_size)
    results = []
    try:
        # warm-up: one short request each way (first-call costs are not the engine's)
        run_case(inst, "batching", 1, rounds=1, prompt_tokens=8, max_tokens=4, vocab=vocab)
        run_case(inst, "sequential", 1, rounds=1, prompt_tokens=8, max_tokens=4, vocab=vocab)
        for c in concurrency:
            for engine in ("batching", "sequential"):
                r = run_case(inst, engine, c, rounds=rounds, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                             vocab=vocab)
                log(f"{engine:10s} c={c:3d} {r['tokens_per_s']:9.1f} tok/s  TTFT p50 {r['ttft_s']['p50']*1000:8.1f} ms"
                    f"  TPOT p50 {r['tpot_s']['p50']*1000:7.2f} ms p99 {r['tpot_s']['p99']*1000:7.2f} ms")
                results.append(r)
    finally:
        inst.close()
    doc = {"device": _device_name(device), "model": name, "results": results,
           "workload": {"rounds": rounds, "prompt_tokens": prompt_tokens, "max_tokens": max_tokens,
                        "sequential": "each request runs its own decode loop in its client's thread"}}
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(doc, indent=2))
    if plot is not None:
        plot_engine(doc, plot)
    return doc


def _device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} {torch.cuda.get_device_name(torch.device(device))}"
    import platform

    return f"cpu {platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def plot_engine(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for engine, style in (("batching", "o-"), ("sequential", "s--")):
        rows = [r for r in doc["results"] if r["engine"] == engine]
        cs = [r["concurrency"] for r in rows]
        a.plot(cs, [r["tokens_per_s"] for r in rows], style, label=engine)
        b.plot(cs, [r["tpot_s"]["p99"] * 1000 for r in rows], style, label=engine)
    for ax, title in ((a, "aggregate tokens/s"), (b, "TPOT p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{doc['model']} on {doc['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def tmp_json() -> Path:
    return Path(tempfile.mkdtemp(prefix="ember-bench-engine-")) / "engine.json"
