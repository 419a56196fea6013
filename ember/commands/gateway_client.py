"""What every HTTP client verb shares: the gateway client (EMBER_URL, EMBER_API_KEY), one way to
read an answer (`error <status>: <message>` on stderr and exit 1 for anything but a 2xx), and the
checks of names given on the command line."""

from __future__ import annotations

import os
from typing import Any

import typer


def gateway_client() -> Any:
    """An httpx.Client for the gateway at EMBER_URL with the key in EMBER_API_KEY."""
    import httpx

    url = os.environ.get("EMBER_URL", "http://127.0.0.1:8000")
    key = os.environ.get("EMBER_API_KEY", "").strip()
    if not key:
        raise typer.BadParameter("set EMBER_API_KEY to an API key (make up prints where the admin key is)",
                                 param_hint="EMBER_API_KEY")
    if not key.isascii() or not key.isprintable():
        raise typer.BadParameter("EMBER_API_KEY is not an API key (printable ASCII)", param_hint="EMBER_API_KEY")
    if not url.startswith(("http://", "https://")):
        raise typer.BadParameter(f"{url!r} is not an http:// or https:// URL", param_hint="EMBER_URL")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def check(resp: Any) -> Any:
    """The answer's JSON (None when it has no body); anything but a 2xx is one line on stderr and
    exit 1. A redirect is not a success: the verb did nothing (a proxy sending http to https, an
    EMBER_URL that is not the gateway's own)."""
    if not 200 <= resp.status_code < 300:
        if 300 <= resp.status_code < 400:
            where = resp.headers.get("location", "?")
            typer.echo(f"error {resp.status_code}: redirected to {where}, not followed (set EMBER_URL to the "
                       "gateway's own address)", err=True)
            raise typer.Exit(1)
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text.strip()[:300] or resp.reason_phrase
        typer.echo(f"error {resp.status_code}: {message}", err=True)
        raise typer.Exit(1)
    if not resp.content:
        return None
    try:
        return resp.json()
    except ValueError:
        typer.echo(f"error {resp.status_code}: the answer from {resp.url} is not JSON (is EMBER_URL an Ember "
                   "gateway?)", err=True)
        raise typer.Exit(1) from None


def name_arg(what: str) -> Any:
    """A typer callback refusing, at parse time, a name no function, key or node can have (an empty
    one addressed the collection instead: `ember rm ''` answered "deleted")."""

    def checked(value: str) -> str:
        from ember.errors import InvalidName
        from ember.platform.names import check_name

        try:
            return check_name(value, what)
        except InvalidName as e:
            raise typer.BadParameter(e.message) from None

    return checked
