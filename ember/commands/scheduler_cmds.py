"""`ember sim` and `ember bench scheduler`."""

from __future__ import annotations

import typer


def sim() -> None:
    """Not built yet."""
    raise typer.Exit(2)


def bench_scheduler() -> None:
    """Not built yet."""
    raise typer.Exit(2)
