"""The loader's own EMBER_* settings parse as Settings does: `off` is off, a bad value is a
ConfigError naming the variable (EMBER_DRAM_VERIFY=off verified all the same; a bad
EMBER_LOADER_THREADS was a ValueError at import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ember.errors import ConfigError
from ember.loader.envvars import env_flag, env_int


def test_flags_and_whole_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, want in [("off", False), ("N", False), ("0", False), ("no", False), ("On", True), ("yes", True),
                      ("1", True), ("", True)]:
        monkeypatch.setenv("EMBER_DRAM_VERIFY", raw)
        assert env_flag("EMBER_DRAM_VERIFY", True) is want, raw
    monkeypatch.setenv("EMBER_DRAM_VERIFY", "sometimes")
    with pytest.raises(ConfigError, match="EMBER_DRAM_VERIFY"):
        env_flag("EMBER_DRAM_VERIFY", True)
    monkeypatch.setenv("EMBER_LOADER_THREADS", "12")
    assert env_int("EMBER_LOADER_THREADS", 8, minimum=1) == 12
    for bad in ("lots", "1e3", "0"):
        monkeypatch.setenv("EMBER_LOADER_THREADS", bad)
        with pytest.raises(ConfigError, match="EMBER_LOADER_THREADS"):
            env_int("EMBER_LOADER_THREADS", 8, minimum=1)


def test_a_bad_loader_setting_is_one_line_from_the_cli(tmp_path) -> None:  # noqa: ANN001
    import os

    r = subprocess.run([sys.executable, "-m", "ember", "checkpoint", "ls", "--store", f"file://{tmp_path}"],
                       env={**os.environ, "EMBER_LOADER_THREADS": "lots"}, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "EMBER_LOADER_THREADS" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr, r.stderr
