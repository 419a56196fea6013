"""The gateway's per-function window behind GET /v1/stats/functions (pure, no servers)."""

from __future__ import annotations

from ember.platform.gateway.stats import InvocationStats


def test_percentiles_attainment_and_cold_starts_by_tier() -> None:
    stats = InvocationStats(window=100)
    for i in range(1, 101):  # TTFT 1..100 ms, TPOT 2 ms; 90 meet the SLO
        stats.record("f", i / 1000, 0.002, met_slo=i <= 90, cold_tier="remote" if i == 1 else None)
    stats.record("f", 0.5, None, met_slo=False, cold_tier="dram")  # pushes TTFT 1 ms out of the window
    stats.failed("f")
    s = stats.summary("f")
    assert s["requests"] == 101 and s["errors"] == 1 and s["window"] == 100
    assert s["ttft_ms"] == {"p50": 51.0, "p99": 100.0}
    assert s["tpot_ms"] == {"p50": 2.0, "p99": 2.0}
    assert s["slo_attainment"] == 89 / 100
    assert s["cold_starts"] == {"remote": 1, "dram": 1}


def test_a_function_never_called_has_no_numbers() -> None:
    s = InvocationStats().summary("idle")
    assert s["requests"] == 0 and s["slo_attainment"] is None
    assert s["ttft_ms"] == {"p50": None, "p99": None} and s["cold_starts"] == {}


def test_a_late_record_of_an_older_generation_leaves_the_new_window_alone() -> None:
    """A request that began before its function was deleted and created again ends after the new
    function's first requests: it must not wipe their window (it did: any other generation
    replaced the window)."""
    stats = InvocationStats()
    for _ in range(5):
        stats.record("f", 0.01, None, met_slo=True, generation=200.0)
    stats.record("f", 0.02, None, met_slo=False, generation=100.0)  # the old function's last request
    stats.failed("f", generation=100.0)
    s = stats.summary("f", generation=200.0)
    assert s["requests"] == 5 and s["errors"] == 0 and s["slo_attainment"] == 1.0
    stats.record("f", 0.03, None, met_slo=True, generation=300.0)  # a newer one starts anew
    assert stats.summary("f", generation=300.0)["requests"] == 1


def test_console_files_ship_in_the_package() -> None:
    """Every file of the console matches the package-data globs of pyproject.toml (a wheel has them)."""
    import fnmatch
    from pathlib import Path

    import pytest

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from ember.platform.gateway.operator_routes import CONSOLE_DIR

    root = Path(__file__).resolve().parents[3]
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "ember.platform.gateway"]
    files = [p.relative_to(CONSOLE_DIR.parent).as_posix() for p in CONSOLE_DIR.iterdir()]
    assert sorted(files) == ["console/console.css", "console/console.js", "console/index.html"]
    assert all(any(fnmatch.fnmatch(f, g) for g in globs) for f in files)
