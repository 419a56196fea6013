"""`ember bench loader`."""

from __future__ import annotations

import typer


def bench_loader() -> None:
    """Not built yet."""
    raise typer.Exit(2)
