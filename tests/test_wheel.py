"""`make wheel` builds the wheel terraform's user data installs (ember_package = s3://.../*.whl),
with the package data the platform needs and the `ember` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_make_wheel_builds_an_installable_ember(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not on PATH")
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(["make", "-s", "wheel", f"DIST={tmp_path}", f"BIN={bin_dir}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("ember-*-py3-none-any.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "ember/platform/cluster/lua/claim.lua" in names  # the Redis scripts travel as package data
    assert "ember/scheduler/nodescaler.py" in names and "ember/platform/cloud.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "ember = " in zipfile.ZipFile(wheel).read(entry_points).decode()
