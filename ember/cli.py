"""The `ember` command. Thin: each verb lives in ember/commands/<area>.py and calls into the
subpackages, so tests call the same functions directly. Heavy imports (torch, transformers,
fastapi) happen inside the verbs, never at import time.
"""

from __future__ import annotations

import math
from typing import Any

import typer
import typer.core

from ember.commands import (
    checkpoint,
    energy,
    engine_bench,
    loader_bench,
    loadtest,
    model,
    platform_cmds,
    scheduler_cmds,
)


def _finite_then(callback: Any) -> Any:
    """A parameter callback that refuses nan and inf at parse time, then runs `callback` (a float
    option took `nan`, which reached the JSON encoder or a loop and ended in a traceback)."""

    def checked(ctx: Any, param: Any, value: Any) -> Any:
        for v in value if isinstance(value, list | tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise typer.BadParameter(f"{v} is not a finite number", ctx=ctx, param=param)
        return callback(ctx, param, value) if callback is not None else value

    return checked


class _EmberGroup(typer.core.TyperGroup):
    """The root command: every float parameter of every verb, sub-verbs included, is finite."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        todo: list[Any] = list(self.commands.values())
        while todo:
            cmd = todo.pop()
            todo.extend(getattr(cmd, "commands", {}).values())
            for param in cmd.params:
                param.callback = _finite_then(param.callback)


app = typer.Typer(help="Ember: serverless LLM functions.", no_args_is_help=True, add_completion=False,
                  cls=_EmberGroup)

platform_cmds.register(app)
app.add_typer(model.app, name="model", help="Make small models for tests and demos.")
app.add_typer(checkpoint.app, name="checkpoint", help="Convert, verify and store checkpoints.")
app.add_typer(energy.app, name="energy", help="GPU energy: status, budgets, simulation.")

bench_app = typer.Typer(help="Benchmarks that write JSON (and plots).", no_args_is_help=True)
bench_app.command("loader", help="Checkpoint loading: Ember's tiers against safetensors and torch.load.")(
    loader_bench.bench_loader
)
bench_app.command("engine", help="Batching engine against the request-at-a-time loop.")(engine_bench.bench_engine)
bench_app.command("scheduler", help="Live placement decisions against Redis.")(scheduler_cmds.bench_scheduler)
bench_app.command("gateway", help="Warm-request overhead of the gateway against the worker, by rate.")(
    platform_cmds.bench_gateway
)
bench_app.command("coldstart", help="Cold-start latency of a local platform by load tier.")(
    platform_cmds.bench_coldstart
)
bench_app.command("tracing", help="What OpenTelemetry tracing adds to warm request latency.")(
    platform_cmds.bench_tracing
)
bench_app.command("energy", help="The live energy control loop: max power against actuate, same load.")(
    energy.bench_energy
)
app.add_typer(bench_app, name="bench")
app.command("loadtest", help="Load test (locust) a platform: steady, cold, burst or tenants; reports by tier.")(
    loadtest.loadtest
)
app.command("sim", help="Trace-driven cluster simulation comparing placement policies.")(scheduler_cmds.sim)


def main() -> None:
    """Run the command; an I/O or Ember error ends it with one clear line on stderr, not a traceback."""
    import sys

    import httpx
    from pydantic import ValidationError

    from ember.errors import EmberError

    try:
        app()
    except OSError as e:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        sys.exit(1)
    except EmberError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except httpx.HTTPError as e:  # the gateway unreachable, or gone mid-answer
        where = f" ({e.request.url})" if _has_request(e) else ""
        print(f"error: {type(e).__name__}: {e}{where}", file=sys.stderr)
        sys.exit(1)
    except ValidationError as e:  # an EMBER_* setting of the wrong type or out of range
        problems = "; ".join(f"EMBER_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
                             for err in e.errors())
        print(f"error: bad setting: {problems}", file=sys.stderr)
        sys.exit(2)


def _has_request(e: Exception) -> bool:
    try:
        return getattr(e, "request", None) is not None
    except RuntimeError:  # httpx raises when the error has no request
        return False


if __name__ == "__main__":
    main()
