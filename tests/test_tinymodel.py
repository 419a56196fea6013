from pathlib import Path

from typer.testing import CliRunner

from ember.cli import app


def test_tiny_model_loads_with_transformers_and_is_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = CliRunner().invoke(app, ["model", "tiny", str(tmp_path / "again"), "--seed", "0"])
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "again" / name).exists()

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    outs = []
    for d in (tiny_model_dir, tmp_path / "again"):
        model = AutoModelForCausalLM.from_pretrained(d)
        assert model.config.model_type == "llama"
        assert model.config.vocab_size == len(tok)
        with torch.no_grad():
            outs.append(model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist())
    assert outs[0] == outs[1]  # same seed, same weights, same text


def test_tiny_model_seed_changes_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from ember.tinymodel import TinyModelSpec, make_tiny_model

    a = load_file(make_tiny_model(tmp_path / "a", TinyModelSpec(seed=1)) / "model.safetensors")
    b = load_file(make_tiny_model(tmp_path / "b", TinyModelSpec(seed=2)) / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not (a[k] == b[k]).all() for k in a)
