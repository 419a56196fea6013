"""Build a transformers model over loaded tensors: meta device, assign, no init, no second copy."""

from __future__ import annotations

from pathlib import Path

from ember.errors import CheckpointError


def build_model(model_files: Path | str, state_dict: dict, device: str = "cpu"):
    """A transformers causal LM (eval mode) whose parameters ARE the given tensors.

    Built on the meta device (no random init), given the tensors with assign=True, non-persistent
    buffers (rotary inv_freq) rebuilt for real, tied weights tied. Logits equal from_pretrained's.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_files))
    dtype = next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.float32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    tied = _tied_keys(model)
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} weights the model needs, e.g. {missing[:3]}")
    if result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint has {len(result.unexpected_keys)} weights the model does not know, "
            f"e.g. {result.unexpected_keys[:3]}"
        )
    if getattr(config, "tie_word_embeddings", False) or tied:
        model.tie_weights()
    _rebuild_meta_buffers(model, device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"parameters still unset after loading: {leftover[:3]}")
    model.eval()
    return model


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or []
    if isinstance(keys, dict):
        return set(keys)
    return set(keys)


def _rebuild_meta_buffers(model, device) -> None:
    """Modules whose buffers are still on meta (computed, not saved) are rebuilt for real."""
    import torch

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            own = list(child.named_buffers(recurse=False))
            if own and any(b.is_meta for _, b in own) and not any(True for _ in child.parameters(recurse=False)):
                config = getattr(child, "config", None) or model.config
                try:
                    with torch.device(device):
                        fresh = type(child)(config=config)
                except TypeError as e:
                    raise CheckpointError(
                        f"cannot rebuild module {parent_name}.{child_name} ({type(child).__name__}) off meta"
                    ) from e
                setattr(parent, child_name, fresh)
    left = [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise CheckpointError(f"buffers still on the meta device: {left[:3]}")
