"""Shim kept for old commands: `python loadtests/run.py --url URL --users 8 --duration-s 30 --out DIR`
runs `ember loadtest SCENARIO` (default `steady`) against that URL with EMBER_API_KEY. Use
`ember loadtest` directly; see its --help.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="steady", choices=["steady", "cold", "burst", "tenants"])
    ap.add_argument("--url", default=os.environ.get("EMBER_URL", "http://127.0.0.1:8000"))
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--spawn-rate", type=float, default=4)
    ap.add_argument("--duration-s", type=int, default=30)
    ap.add_argument("--out", default="out/load")
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "ember", "loadtest", args.scenario, "--url", args.url, "--users", str(args.users),
           "--spawn-rate", str(args.spawn_rate), "--duration", f"{args.duration_s}s", "--out", args.out,
           "--max-tokens", os.environ.get("EMBER_LOAD_MAX_TOKENS", "16")]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
