"""Build a transformers causal LM over loaded tensors, through transformers' own loading machinery.

`build_model` hands the loader's tensors to the model class's `from_pretrained(None, config=...,
state_dict=...)`: transformers builds the module tree without random init, applies its weight
conversions (fused MoE experts in transformers 5, renamed keys), ties weights and creates
non-persistent buffers (rotary `inv_freq`, Gemma's normalizer) for real. Where the layout allows,
the parameters ARE the loader's tensors (measured: every parameter of Llama, Qwen2, Gemma,
Phi-3 and GPT-2 shares storage with the state dict; a Mixtral-style MoE shares all but its fused
expert tensors, which the conversion has to build).

`check_servable` refuses, at deploy time, a config whose architecture cannot be served: not a
causal LM transformers knows, encoder-decoder, or needing remote code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ember.errors import BadRequest, CheckpointError


def causal_lm_class(config: Any) -> Any:
    """The transformers class that serves `config`, or BadRequest saying why none does."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_type = getattr(config, "model_type", None) or "?"
    if getattr(config, "is_encoder_decoder", False):
        raise BadRequest(f"architecture {model_type!r} is encoder-decoder; Ember serves causal (decoder-only) LMs",
                         code="unsupported_architecture")
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        archs = ", ".join(getattr(config, "architectures", None) or []) or "none listed"
        raise BadRequest(f"architecture {model_type!r} ({archs}) has no causal-LM class in transformers "
                         "(Ember does not run remote code)", code="unsupported_architecture") from None


def config_from_json(raw: bytes | str) -> Any:
    """A transformers config from config.json bytes (no files, no remote code)."""
    from transformers import AutoConfig

    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise CheckpointError("the checkpoint's config.json is not valid JSON") from e
    if not isinstance(doc, dict) or "model_type" not in doc:
        raise BadRequest("the checkpoint's config.json names no model_type", code="unsupported_architecture")
    if doc.get("auto_map"):
        raise BadRequest("the checkpoint needs remote code (config.json has auto_map); Ember does not run it",
                         code="unsupported_architecture")
    model_type = doc.pop("model_type")
    try:
        return AutoConfig.for_model(model_type, **doc)
    except (ValueError, KeyError) as e:
        raise BadRequest(f"transformers does not know architecture {model_type!r}",
                         code="unsupported_architecture") from e


def check_servable(config_json: bytes | str) -> dict[str, Any]:
    """Refuse an architecture that cannot be served (400); else its facts for the platform:
    {"architecture", "kv_bytes_per_token" (at the config's dtype), "max_positions"}."""
    config = config_from_json(config_json)
    cls = causal_lm_class(config)
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    dtype_bytes = 4 if "32" in dtype else 2
    return {"architecture": cls.__name__, "kv_bytes_per_token": kv_bytes_per_token(config, dtype_bytes),
            "max_positions": int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 0)
                                 or 0)}


def kv_bytes_per_token(config: Any, dtype_bytes: int) -> int:
    """KV-cache bytes one token costs: layers x KV heads x head dim x 2 (K and V) x dtype bytes."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layers = int(getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", 1))
    heads = int(getattr(text, "num_attention_heads", None) or getattr(text, "n_head", 1))
    kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
    hidden = int(getattr(text, "hidden_size", None) or getattr(text, "n_embd", 1))
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return layers * kv_heads * head_dim * 2 * dtype_bytes


def build_model(model_files: Path | str, state_dict: dict, device: str = "cpu") -> Any:
    """A transformers causal LM (eval mode) built by transformers' loader from the given tensors."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_files))
    cls = causal_lm_class(config)
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    try:
        # device_map keeps tensors already on the device where they are (transformers' default map
        # is {"": "cpu"}, which would copy a GPU state dict to the host and back)
        placement = {"device_map": {"": device}} if str(device) != "cpu" else {}
        model, info = cls.from_pretrained(None, config=config, state_dict=state_dict, dtype=dtype,
                                          output_loading_info=True, **placement)
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"transformers could not build {cls.__name__} from the checkpoint: {e}") from e
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} weights the model does not know, "
                              f"e.g. {unexpected[:3]}")
    mismatched = list(info.get("mismatched_keys") or [])
    if mismatched:
        raise CheckpointError(f"checkpoint has {len(mismatched)} weights of the wrong shape, e.g. {mismatched[:3]}")
    model.to(device)  # a no-op for tensors already there (the loader's); moves computed buffers
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"tensors still on the meta device after loading: {left[:3]}")
    model.eval()
    return model
