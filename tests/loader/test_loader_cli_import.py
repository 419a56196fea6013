"""The import constraint, the `ember checkpoint` verbs and a tiny `ember bench loader` run."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from typer.testing import CliRunner

from ember.cli import app

BLOCKER = textwrap.dedent(
    """
    import sys
    BLOCKED = {"fastapi", "redis", "pydantic", "pydantic_settings", "boto3", "botocore", "typer",
               "uvicorn", "starlette", "ember.config", "ember.platform", "ember.scheduler"}
    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name in BLOCKED or name.split(".")[0] in BLOCKED or any(name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"blocked import: {name}")
    sys.meta_path.insert(0, Blocker())
    """
)


def test_loader_imports_and_loads_without_web_redis_or_boto(tmp_path, tiny_model_dir) -> None:
    code = BLOCKER + textwrap.dedent(
        """
        import sys, torch
        import ember.loader as L
        from ember.loader import (NodeTiers, LoadedCheckpoint, load_state_dict, build_model, open_store,
                                  CheckpointStore, convert_checkpoint, verify_checkpoint)
        import ember.loader.tiers, ember.loader.bench, ember.loader.bandwidth
        root = sys.argv[1]
        open_store(f"file://{root}/store").push(sys.argv[2], "tiny")
        t = NodeTiers(f"{root}/node", f"file://{root}/store", dram_capacity_bytes=16 << 20, ssd_capacity_bytes=1 << 30)
        l = t.load("tiny")
        print("ok", l.tier, len(l.state_dict))
        l.release(); t.close(destroy_dram=True)
        """
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(tiny_model_dir)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok remote")


def test_checkpoint_verbs(tmp_path, tiny_model_dir) -> None:
    runner = CliRunner()
    store = f"file://{tmp_path / 'store'}"
    r = runner.invoke(app, ["checkpoint", "convert", str(tiny_model_dir), str(tmp_path / "conv")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["checkpoint", "verify", str(tmp_path / "conv")])
    assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["ok"]
    r = runner.invoke(app, ["checkpoint", "push", str(tmp_path / "conv"), "tiny", "--store", store])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["checkpoint", "ls", "--store", store])
    assert [c["name"] for c in json.loads(r.output.strip().splitlines()[-1])] == ["tiny"]
    r = runner.invoke(app, ["checkpoint", "rm", "tiny", "--store", store])
    assert r.exit_code == 0
    r = runner.invoke(app, ["checkpoint", "rm", "tiny", "--store", store])
    assert r.exit_code == 1 and "no checkpoint" in r.output
    r = runner.invoke(app, ["checkpoint", "push", str(tmp_path / "conv"), "../evil", "--store", store])
    assert r.exit_code == 1 and "invalid checkpoint name" in r.output
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"x")
    r = runner.invoke(app, ["checkpoint", "convert", str(tmp_path / "pickle"), str(tmp_path / "out")])
    assert r.exit_code == 1 and "pickle" in r.output


def test_bench_loader_writes_json_and_plot(tmp_path) -> None:
    r = CliRunner().invoke(app, ["bench", "loader", "--size-gb", "0.02", "--json", str(tmp_path / "b.json"),
                                 "--plot", str(tmp_path / "b.png"), "--rounds", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "b.json").read_text())
    assert doc["cache"] == "hot" and doc["rounds"] == 1 and doc["bytes"] > 0 and doc["counted"]
    assert set(doc["results"]) == {"raw_read", "raw_read_pool", "safetensors", "safetensors_copy", "torch_load", "torch_load_mmap",
                                   "ember_ssd", "ember_dram", "ember_dram_same_process"}
    for r_ in doc["results"].values():
        assert r_["seconds"] > 0 and r_["gbps"] > 0 and len(r_["all"]) == 1
    assert (tmp_path / "b.png").stat().st_size > 1000


def test_pushing_a_stores_own_checkpoint_under_another_name_keeps_both(tmp_path, tiny_model_dir) -> None:
    """`ember checkpoint push <store root>/a b`: a checkpoint already in a file store, copied under a
    new name. The source is the user's: it must stay (it was moved, and `a` vanished from the store)."""
    runner = CliRunner()
    root = tmp_path / "store"
    store = f"file://{root}"
    r = runner.invoke(app, ["checkpoint", "push", str(tiny_model_dir), "a", "--store", store])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["checkpoint", "push", str(root / "a"), "b", "--store", store])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["checkpoint", "ls", "--store", store])
    assert sorted(c["name"] for c in json.loads(r.output.strip().splitlines()[-1])) == ["a", "b"]
    for name in ("a", "b"):
        r = runner.invoke(app, ["checkpoint", "verify", str(root / name)])
        assert r.exit_code == 0 and json.loads(r.output.strip().splitlines()[-1])["ok"], r.output
    assert not [p.name for p in root.iterdir() if p.name.startswith((".tmp-", "ember-push-"))]  # no scratch left


def test_checkpoint_push_goes_to_the_store_ember_up_serves(tmp_path, tiny_model_dir) -> None:
    """The README's CLI sequence: `make up` (ember up, data dir `data`), then in the same directory
    `ember checkpoint push DIR NAME` and `ember deploy NAME`. The push went to ~/.ember/store while
    `ember up` served data/store, so the deploy was a 404."""
    import os

    from ember.config import Settings

    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_DATA_DIR", "EMBER_STORE_URL")}
    r = subprocess.run([sys.executable, "-m", "ember", "checkpoint", "push", str(tiny_model_dir), "mymodel"],
                       cwd=tmp_path, env={**env, "HOME": str(tmp_path / "home")}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "store" / "mymodel" / "manifest.json").exists()
    assert not (tmp_path / "home" / ".ember").exists()
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        served = Settings(_env_file=None, data_dir="data").resolved_store_url  # what `ember up` gives its workers
    finally:
        os.chdir(cwd)
    assert served == f"file://{tmp_path / 'data' / 'store'}"
