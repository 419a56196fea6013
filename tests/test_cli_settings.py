"""Options and settings agree: every CLI option that has an EMBER_* setting leaves it in charge when
the option is not given (its default is None, so Settings reads the environment), for every command.
The behaviour through a real worker (EMBER_ENERGY_MODE reaching `ember worker`) is asserted in
tests/platform/test_energy_live.py; `ember up --simulated-gpus/--energy-mode` in tests/platform/test_e2e.py."""

from __future__ import annotations

from collections.abc import Iterator

import typer
import typer.core

from ember.cli import app
from ember.config import Settings

# options named differently from their setting
ALIASES = {"store": "store_url"}
# options whose name matches a setting that is not theirs (the worker's own port; EMBER_PORT is the gateway's)
NOT_THE_SETTING = {("worker", "port")}


def _commands(group: object, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], object]]:
    if hasattr(group, "commands"):  # a group (typer's own click types in typer >= 0.2x)
        for name, cmd in group.commands.items():
            yield from _commands(cmd, (*path, name))
    else:
        yield path, group


def test_every_option_with_a_setting_defaults_to_the_setting() -> None:
    root = typer.main.get_command(app)
    fields = set(Settings.model_fields)
    checked, wrong = [], []
    for path, cmd in _commands(root):
        for param in cmd.params:  # type: ignore[attr-defined]
            if not isinstance(param, typer.core.TyperOption):
                continue
            field = ALIASES.get(param.name or "", param.name)
            if field not in fields or (path[-1], param.name) in NOT_THE_SETTING:
                continue
            checked.append((" ".join(path), param.name))
            if param.default is not None:
                wrong.append(f"ember {' '.join(path)} --{param.name.replace('_', '-')} defaults to "
                             f"{param.default!r}, hiding EMBER_{field.upper()}")
    assert not wrong, "\n".join(wrong)
    # the walk reaches the commands that matter
    assert ("worker", "energy_mode") in checked and ("up", "simulated_gpus") in checked
    assert ("up", "energy_mode") in checked and ("gateway", "redis_url") in checked
    assert ("checkpoint push", "store") in checked


def test_up_hands_its_energy_options_to_the_workers() -> None:
    from ember.commands.platform_cmds import _settings, worker_energy_env

    env = worker_energy_env(_settings(simulated_gpus=2, energy_mode="actuate"))
    assert env["EMBER_SIMULATED_GPUS"] == "2" and env["EMBER_ENERGY_MODE"] == "actuate"


def test_durations_are_finite_seconds_and_loop_periods_above_zero() -> None:
    """A negative drain grace or a zero heartbeat interval was taken as given (a spinning loop, a
    lease that expires at once); now a ConfigError naming the variable."""
    import math

    import pytest

    from ember.errors import ConfigError

    for field, value in [("drain_grace_s", -1.0), ("heartbeat_interval_s", 0.0), ("slo_timeout_s", math.inf),
                         ("claim_timeout_s", math.nan), ("node_grace_s", -0.5)]:
        with pytest.raises(ConfigError, match=f"EMBER_{field.upper()}"):
            Settings(**{field: value})
    assert Settings(node_grace_s=0.0, drain_grace_s=0.0, node_boot_s=0.0).node_grace_s == 0.0  # zero is fine there
