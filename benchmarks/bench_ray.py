"""Ray's scheduling overhead on the rarity study (issue 17): `ntrl rarity --quick` end to end under
`--executor ray` (a local Ray instance of --workers CPUs, started and stopped by the command)
against `--executor local` (the process pool), in fresh processes, interleaved, on the same
machine in one run. Both write the same study (the tests hold them to the same verdicts).

    .venv/bin/python benchmarks/bench_ray.py                       # 2 rounds, W&B offline
    .venv/bin/python benchmarks/bench_ray.py --rounds 3 --json /tmp/ray.json
    .venv/bin/python benchmarks/bench_ray.py --config my_grid.toml # another grid

Needs the ray extra (`pip install 'ntrl[ray]'`); without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def study_seconds(executor: str, grid: list[str], wandb: str, workers: int) -> float:
    """Wall time of one `ntrl rarity` in a fresh directory, start-up and report included."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(Path(sys.executable).with_name("ntrl")), "rarity", *grid, "--out", d, "--quiet", "--wandb", wandb,
               "--executor", executor, "--workers", str(workers)]
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
        seconds = time.perf_counter() - t
        if done.returncode != 0:
            sys.exit(f"bench_ray: {' '.join(cmd)} failed:\n{done.stderr}")
        return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (local, ray) per measurement")
    ap.add_argument("--config", default=None, help="a grid file instead of --quick")
    ap.add_argument("--wandb", default="offline", choices=["offline", "disabled"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the numbers here")
    args = ap.parse_args()
    try:
        import ray  # noqa: F401
    except ImportError:
        print("bench_ray: ray is not installed (pip install 'ntrl[ray]'); skipped")
        return
    grid = ["--config", str(Path(args.config).resolve())] if args.config else ["--quick"]
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for r in range(args.rounds):
        for executor in ("local", "ray"):
            times[executor].append(study_seconds(executor, grid, args.wandb, args.workers))
            print(f"round {r + 1}: {executor} {times[executor][-1]:.1f} s", flush=True)
    local, ray_s = statistics.median(times["local"]), statistics.median(times["ray"])
    load = os.getloadavg()[0]
    print(f"ntrl rarity {' '.join(grid)}, {args.workers} workers, W&B {args.wandb}: local {local:.1f} s, "
          f"ray {ray_s:.1f} s (medians of {args.rounds}): ray / local = {ray_s / local:.2f} "
          f"(1-minute load {load:.2f}, nproc {os.cpu_count()})")
    if args.json:
        Path(args.json).write_text(json.dumps({"local_s": times["local"], "ray_s": times["ray"],
                                               "ratio": ray_s / local, "grid": grid, "wandb": args.wandb,
                                               "workers": args.workers, "load": load,
                                               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
                                              indent=2))


if __name__ == "__main__":
    main()
