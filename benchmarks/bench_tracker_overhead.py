"""Tracker overhead: wall time of REINFORCE training with tracking every 10th update, against
the same run with tracking only at update 0, as a ratio measured in one run.

    .venv/bin/python benchmarks/bench_tracker_overhead.py            # ~3 minutes
    .venv/bin/python benchmarks/bench_tracker_overhead.py --quick    # ~30 s smoke run

Setups: the bandit with a 2×64 MLP (exact gradients), and the 5×5 juice gridworld with a 2×64
MLP in exact mode (the tabular model's exact gradient) and in sampled mode (64 episodes per update
through the native vector env). Each pair of runs is repeated and interleaved; the median is
reported. The issue's target: at most 10 % overhead on the juice gridworld.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from ntrl.bandit_setup import BanditConfig
from ntrl.juice_setup import JuiceConfig
from ntrl.train import train

SETUPS = {
    "bandit, MLP, exact": (lambda **k: BanditConfig(policy="mlp", optimizer="sgd", lr=0.1, **k), 500),
    "juice 5×5, MLP, exact": (lambda **k: JuiceConfig(policy="mlp", optimizer="sgd", lr=0.2, p0=0.01, **k), 150),
    "juice 5×5, MLP, sampled (B = 64)": (
        lambda **k: JuiceConfig(policy="mlp", optimizer="sgd", lr=0.05, p0=0.01, mode="sampled", batch_size=64, **k),
        150),
}


def timed(config) -> float:
    t0 = time.perf_counter()
    train(config, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reps = 1 if args.quick else args.reps
    print(f"# tracker overhead, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    print("| setup | Fisher metric tracked | updates | untracked (s) | every 10th (s) | overhead |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, steps) in SETUPS.items():
            steps = steps // 5 if args.quick else steps
            for fisher in (False, True):
                times: dict[str, list[float]] = {"off": [], "on": []}
                for r in range(reps):
                    for label, every in (("off", steps + 1), ("on", 10)):
                        cfg = make(steps=steps, track_every=every, fisher=fisher, wandb="disabled", out=tmp,
                                   run_name=f"{label}{r}", force=True)
                        times[label].append(timed(cfg))
                off, on = statistics.median(times["off"]), statistics.median(times["on"])
                print(f"| {name} | {'yes' if fisher else 'no'} | {steps} | {off:.2f} | {on:.2f} | "
                      f"{100 * (on / off - 1):.0f} % |", flush=True)


if __name__ == "__main__":
    main()
