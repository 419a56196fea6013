"""The startup-latency CDF per policy (PNG), from simulation results."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ember.scheduler.sim import SimResult


def plot_startup_cdf(results: Mapping[str, SimResult], path: Path | str, *, title: str = "") -> Path:
    """Two panels: startup over all invocations and over cold starts, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    q = np.linspace(0.0, 1.0, 2001)
    for name, res in results.items():
        for ax, data in ((axes[0], res.startup_s), (axes[1], res.startup_s[res.cold])):
            if data.size:
                ax.plot(np.quantile(data, q), q, label=f"{name} (p99 {np.quantile(data, 0.99):.2f} s)")
    for ax, label in ((axes[0], "all invocations"), (axes[1], "invocations that needed a cold start")):
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlabel("startup (s): arrival until an instance is ready to serve")
        ax.set_ylabel("fraction of invocations")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
