"""Steps per second of the native juice vector env against gymnasium's SyncVectorEnv.

    python benchmarks/bench_juice_vector.py                 # 1024 envs, writes nothing
    python benchmarks/bench_juice_vector.py --md benchmarks/RESULTS_juice_vector.md

Both step the same environment (``ntrl/JuiceGridworld-v0``, default 5×5 grid, radius 1,
horizon 50) with the same pre-drawn uniformly random actions; a "step" is one environment
transition, so steps/s = num_envs × vector steps / seconds. Each timing is the best of
``--repeats`` runs (after one warm-up), and the result is reported as a ratio.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

import gymnasium as gym
import numpy as np

import ntrl.envs  # noqa: F401


def steps_per_second(venv, actions: np.ndarray, repeats: int) -> float:
    venv.reset(seed=0)
    for a in actions[: min(5, len(actions))]:  # warm-up
        venv.step(a)
    best = float("inf")
    for _ in range(repeats):
        venv.reset(seed=0)
        t0 = time.perf_counter()
        for a in actions:
            venv.step(a)
        best = min(best, time.perf_counter() - t0)
    return actions.shape[0] * actions.shape[1] / best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}, gymnasium {gym.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", type=int, default=1024)
    parser.add_argument("--native-steps", type=int, default=500, help="vector steps timed for the native env")
    parser.add_argument("--sync-steps", type=int, default=50, help="vector steps timed for SyncVectorEnv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--md", default=None, help="append a result row to this markdown file")
    args = parser.parse_args(argv)
    n = args.num_envs
    rng = np.random.default_rng(0)
    native = gym.make_vec("ntrl/JuiceGridworld-v0", num_envs=n, vectorization_mode="vector_entry_point")
    sync = gym.make_vec("ntrl/JuiceGridworld-v0", num_envs=n, vectorization_mode="sync")
    native_sps = steps_per_second(native, rng.integers(0, 5, size=(args.native_steps, n)), args.repeats)
    sync_sps = steps_per_second(sync, rng.integers(0, 5, size=(args.sync_steps, n)), args.repeats)
    ratio = native_sps / sync_sps
    print(f"num_envs={n}: native {native_sps:,.0f} steps/s, SyncVectorEnv {sync_sps:,.0f} steps/s, ratio {ratio:.1f}x")
    if args.md:
        cmd = "python benchmarks/bench_juice_vector.py " + " ".join(argv if argv is not None else sys.argv[1:])
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = float("nan")
        row = (f"| {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC | {n} | {native_sps:,.0f} | "
               f"{sync_sps:,.0f} | **{ratio:.1f}×** | {machine()}; load avg {load:.1f} | `{cmd.strip()}` |\n")
        with open(args.md, "a") as f:
            f.write(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
