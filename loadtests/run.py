"""Run the locust load test headless against a gateway on loopback, bounded in users and time,
and write CSV, HTML, JSON and a PNG of the latency percentiles.

    python loadtests/run.py --url http://127.0.0.1:8000 --users 8 --duration-s 30 --out out/load
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("EMBER_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--spawn-rate", type=float, default=4)
    ap.add_argument("--duration-s", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("out/load"))
    args = ap.parse_args()
    host = urlparse(args.url).hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        ap.error("load tests target loopback only")
    if not (1 <= args.users <= 256 and 1 <= args.duration_s <= 600):
        ap.error("users must be 1-256 and duration 1-600 s")
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = args.out / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).with_name("locustfile.py")), "--headless",
           "--host", args.url, "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration_s}s",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--json-file", str(prefix), "--stop-timeout", "10",
           "--only-summary"]
    code = subprocess.run(cmd, timeout=args.duration_s + 120).returncode
    stats = json.loads(Path(f"{prefix}.json").read_text())
    summary = {s["name"]: {"count": s["num_requests"], "failures": s["num_failures"],
                           "mean_ms": s["total_response_time"] / max(1, s["num_requests"])}
               for s in stats}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(summary, args.out / "latency.png")
    print(json.dumps(summary, indent=2))
    return 0 if code in (0, 1) else code


def _plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(summary)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, [summary[n]["mean_ms"] for n in names])
    ax.set_ylabel("mean latency (ms)")
    ax.set_title("Ember load test")
    plt.xticks(rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
