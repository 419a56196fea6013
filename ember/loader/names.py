"""Checkpoint names: the one rule that keeps a name inside its directory and key space."""

from __future__ import annotations

import re

from ember.errors import InvalidName

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def validate_name(name: str) -> str:
    """Return `name` if it is a valid checkpoint name, else raise InvalidName."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid checkpoint name {name!r}: use 1-128 characters [A-Za-z0-9._-], "
            "starting with a letter or digit, without '..'"
        )
    return name
