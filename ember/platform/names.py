"""Validation of user-chosen names (functions, checkpoints, key names): no path or key tricks."""

from __future__ import annotations

import re

from ember.errors import InvalidName

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a safe identifier, else raise InvalidName saying why."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"invalid {what} {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name
