"""Platform verbs: up, gateway, worker, and the HTTP client verbs (deploy, invoke, ls, rm, keys)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the platform verbs to the top-level app."""
