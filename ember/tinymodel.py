"""Small Llama-architecture causal LMs with seeded random weights and a real byte-level BPE
tokenizer, all built offline. Tests and demos use these; nothing is downloaded from a hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

# A few KB of plain text to train the BPE on: enough for merges of common English words.
_CORPUS = """
Ember runs large language models as serverless functions. Nothing runs while a function is idle.
When a request arrives, the scheduler starts the function on the machine where its checkpoint is
closest: in GPU memory, in host memory, on the local disk, or in the object store. The loader reads
the checkpoint in large chunks, in parallel, into memory that was prepared in advance, and copies it
to the device while the next chunks are still being read. The energy controller lowers the power of
each GPU as far as the latency objectives of its functions allow. Hello world. The quick brown fox
jumps over the lazy dog. Once upon a time there was a small model that wanted to answer questions.
It read books about the sea, the mountains, the stars and the cities of the world, and it learned to
write short stories, poems and letters. What is the capital of France? Paris is the capital of
France. How are you today? I am fine, thank you. Tell me a story about a cat and a dog who became
friends. The numbers one two three four five six seven eight nine ten. Good morning, good evening,
good night. Please, thank you, sorry, yes, no, maybe. Energy, power, latency, throughput, memory.
""" * 8


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a generated model. Defaults give a ~1 MB model that runs at hundreds of tok/s on CPU."""

    seed: int = 0
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate: int | None = None
    vocab_target: int = 512
    max_positions: int = 2048
    dtype: str = "float32"


def make_tiny_model(out_dir: Path | str, spec: TinyModelSpec | None = None) -> Path:
    """Write a Hugging Face model directory (config.json, model.safetensors, tokenizer files)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyModelSpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_target)
    heads = spec.heads if spec.hidden % spec.heads == 0 else 1
    kv_heads = spec.kv_heads if heads % spec.kv_heads == 0 else heads
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate or spec.hidden * 4,
        num_hidden_layers=spec.layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        dtype=spec.dtype,
    )
    torch.manual_seed(spec.seed)
    with torch.no_grad():
        model = LlamaForCausalLM(config)
        # Larger-than-default init so the seeded random model's text varies with the prompt.
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model = model.to(getattr(torch, spec.dtype))
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "ember_tiny.json").write_text(json.dumps(spec.__dict__, indent=2))
    return out


def build_tokenizer(vocab_target: int = 512):  # -> PreTrainedTokenizerFast
    """A byte-level BPE trained on a built-in corpus, wrapped as a fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_target,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
