"""The `ember` command. Thin: each verb lives in ember/commands/<area>.py and calls into the
subpackages, so tests call the same functions directly. Heavy imports (torch, transformers,
fastapi) happen inside the verbs, never at import time.
"""

from __future__ import annotations

import typer

from ember.commands import checkpoint, energy, loader_bench, loadtest, model, platform_cmds, scheduler_cmds

app = typer.Typer(help="Ember: serverless LLM functions.", no_args_is_help=True, add_completion=False)

platform_cmds.register(app)
app.add_typer(model.app, name="model", help="Make small models for tests and demos.")
app.add_typer(checkpoint.app, name="checkpoint", help="Convert, verify and store checkpoints.")
app.add_typer(energy.app, name="energy", help="GPU energy: status, budgets, simulation.")

bench_app = typer.Typer(help="Benchmarks that write JSON (and plots).", no_args_is_help=True)
bench_app.command("loader", help="Checkpoint loading: Ember's tiers against safetensors and torch.load.")(
    loader_bench.bench_loader
)
bench_app.command("scheduler", help="Live placement decisions against Redis.")(scheduler_cmds.bench_scheduler)
bench_app.command("gateway", help="Warm-request overhead of the gateway against the worker, by rate.")(
    platform_cmds.bench_gateway
)
bench_app.command("coldstart", help="Cold-start latency of a local platform by load tier.")(
    platform_cmds.bench_coldstart
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
    app()


if __name__ == "__main__":
    main()
