"""build_model: a transformers model over the loaded tensors, logits equal from_pretrained's."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ember.loader import build_model, open_store


def test_build_model_matches_from_pretrained_and_generates(tmp_path, tiny_model_dir, make_tiers) -> None:
    open_store(f"file://{tmp_path / 'store'}").push(tiny_model_dir, "tiny")
    tiers = make_tiers()
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok("Hello world, the quick brown fox", return_tensors="pt").input_ids
    for tier in ("remote", "dram"):  # the DRAM hit gives read-only views of the shared pool
        loaded = tiers.load("tiny")
        assert loaded.tier == tier
        model = build_model(loaded.model_files, loaded.state_dict)
        assert not model.training
        assert model.model.embed_tokens.weight.data_ptr() == loaded.state_dict["model.embed_tokens.weight"].data_ptr()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
            out = model.generate(ids, max_new_tokens=5, do_sample=False)
            assert torch.equal(out, ref.generate(ids, max_new_tokens=5, do_sample=False))
        del model
        loaded.release()


def test_tied_embeddings(tmp_path, tiny_model_dir, make_tiers) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    tied_dir = tmp_path / "tied"
    model.save_pretrained(tied_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tied_dir)
    ref = AutoModelForCausalLM.from_pretrained(tied_dir).eval()
    open_store(f"file://{tmp_path / 'store'}").push(tied_dir, "tied")
    loaded = make_tiers().load("tied")
    assert "lm_head.weight" not in loaded.state_dict
    built = build_model(loaded.model_files, loaded.state_dict)
    assert built.lm_head.weight.data_ptr() == built.model.embed_tokens.weight.data_ptr()
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(built(ids).logits, ref(ids).logits)
    del built
    loaded.release()
