"""Tracker overhead: wall and CPU time of REINFORCE training with tracking every 10th update,
against the same run with tracking only at update 0, as ratios measured in one run.

    .venv/bin/python benchmarks/bench_tracker_overhead.py            # ~4 minutes
    .venv/bin/python benchmarks/bench_tracker_overhead.py --quick    # ~30 s smoke run

Setups (all single-thread, float64 analysis engine, 2×64 tanh MLP):

* juice 5×5, sampled REINFORCE (B = 64 episodes per update from the native vector env): the
  issue's setting. P, F and R are still tracked exactly through the tabular model.
* juice 5×5, exact policy gradient (the tabular model's ∇J instead of episodes).
* the bandit, exact policy gradient.

Each setup runs with the Fisher metric tracked and without. The untracked and tracked runs are
repeated ``--reps`` times, interleaved, and the table gives the median of the per-repeat ratios
tracked / untracked − 1, with their range. "in tracker" is the time spent inside the tracking
calls themselves (``Tracker.before``/``after`` and the extra quantities), timed in the tracked
runs minus that in the untracked run (both track update 0), divided by the untracked run's time:
the same overhead measured from the inside, which other load on the machine disturbs less.
"fastest runs" is the fastest tracked run over the fastest untracked run, minus one: slow spells
only ever add time, so the minimum is the least disturbed run of each kind.
"in-run paired" compares, within each tracked run, the tracked updates with the untracked ones
(median durations; see ``paired_overhead``), so it includes any cost tracking leaves behind in
the update, and slow spells on a shared machine cancel. Each setup starts with an untimed
warm-up run. The issue's target: at most 10 % on the juice gridworld.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch

from ntrl.experiments.bandit import BanditConfig
from ntrl.experiments.juice import JuiceConfig
from ntrl.tracker import Tracker
from ntrl.train import train

SETUPS = {
    "juice 5×5, sampled REINFORCE (B = 64)": (
        lambda **k: JuiceConfig(policy="mlp", optimizer="sgd", lr=0.05, p0=0.01, mode="sampled", batch_size=64, **k),
        150),
    "juice 5×5, exact gradient": (lambda **k: JuiceConfig(policy="mlp", optimizer="sgd", lr=0.2, p0=0.01, **k), 300),
    "bandit, exact gradient": (lambda **k: BanditConfig(policy="mlp", optimizer="sgd", lr=0.1, **k), 500),
}


class TrackerClock:
    """Accumulates the wall time spent in Tracker.before / Tracker.after and in the experiment's
    extra tracking (wrapped while active), and stamps the start of every update (the utility is
    the first thing an update computes)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.starts: list[float] = []

    def stamp(self, fn):
        def stamped(*args, **kwargs):
            self.starts.append(time.perf_counter())
            return fn(*args, **kwargs)
        return stamped

    def update_durations(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return timed

    @contextmanager
    def active(self, config):
        before, after, build = Tracker.before, Tracker.after, type(config).build
        clock = self

        def build_timed(cfg):
            exp = build(cfg)
            exp.utility = clock.stamp(exp.utility)
            if exp.extra_tracking is not None:
                exp.extra_tracking = clock.wrap(exp.extra_tracking)
            return exp

        Tracker.before, Tracker.after = self.wrap(before), self.wrap(after)
        type(config).build = build_timed
        try:
            yield self
        finally:
            Tracker.before, Tracker.after, type(config).build = before, after, build


def timed_run(config) -> tuple[float, float, float, list[float]]:
    """(wall s, process CPU s, wall s inside tracking, wall s of each update but the last)."""
    clock = TrackerClock()
    with clock.active(config):
        w0, c0 = time.perf_counter(), time.process_time()
        train(config, progress=False)
        return time.perf_counter() - w0, time.process_time() - c0, clock.seconds, clock.update_durations()


def paired_overhead(durations: list[float], every: int) -> float:
    """Within one run tracked every ``every``-th update: (median tracked update − median
    untracked update) / (every × median untracked update). Neighbouring updates share the
    machine's state, so slow spells elsewhere cancel."""
    tracked = [d for t, d in enumerate(durations) if t % every == 0 and t > 0]
    plain = [d for t, d in enumerate(durations) if t % every != 0]
    base = statistics.median(plain)
    return (statistics.median(tracked) - base) / (every * base)


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repeat of shortened runs (a smoke test)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="", metavar="TEXT", help="run only the setups whose name contains TEXT")
    ap.add_argument("--fisher", choices=("both", "yes", "no"), default="both",
                    help="with the Fisher metric tracked, without, or both (default)")
    ap.add_argument("--positions", action="store_true",
                    help="also print, per setup, the mean update duration by position in each block of 10 "
                         "(position 0 is the tracked update) over the tracked runs")
    args = ap.parse_args()
    if not any(args.only in name for name in SETUPS):
        ap.error(f"--only {args.only!r} matches no setup; the setups are: {', '.join(SETUPS)}")
    torch.set_num_threads(1)
    reps = 1 if args.quick else args.reps
    print(f"# tracker overhead, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}, {reps} interleaved repeats")
    print()
    print("| setup | Fisher tracked | updates | untracked (s) | ms / update | wall overhead [range] "
          "| CPU overhead | in tracker | in-run paired | fastest runs | ms / tracked update |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    every_n, by_pos = 10, []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, steps) in SETUPS.items():
            if args.only not in name:
                continue
            steps = steps // 5 if args.quick else steps
            for fisher in {"both": (False, True), "yes": (True,), "no": (False,)}[args.fisher]:
                wall = {"off": [], "on": []}
                cpu = {"off": [], "on": []}
                inside = {"off": [], "on": []}
                paired, positions = [], [[] for _ in range(every_n)]
                timed_run(make(steps=min(steps, 20), track_every=5, fisher=fisher, wandb="disabled", out=tmp,
                               run_name="warm-up", force=True))  # imports, allocator, first-call costs
                for r in range(reps):
                    for label, every in (("off", steps + 1), ("on", every_n)):
                        cfg = make(steps=steps, track_every=every, fisher=fisher, wandb="disabled", out=tmp,
                                   run_name=f"{label}{r}", force=True)
                        w, c, t_in, durations = timed_run(cfg)
                        wall[label].append(w)
                        cpu[label].append(c)
                        inside[label].append(t_in)
                        if label == "on":
                            paired.append(paired_overhead(durations, every))
                            for t, d in enumerate(durations):
                                if t > 0:
                                    positions[t % every].append(d)
                ratios = [on / off - 1 for on, off in zip(wall["on"], wall["off"])]
                cpu_ratio = statistics.median(on / off - 1 for on, off in zip(cpu["on"], cpu["off"]))
                off = statistics.median(wall["off"])
                n_tracked = len(range(0, steps, every_n))
                # both runs track update 0: the difference is the cost of the other tracked updates
                t_in = statistics.median(on - off for on, off in zip(inside["on"], inside["off"]))
                print(f"| {name} | {'yes' if fisher else 'no'} | {steps} | {off:.2f} | {1e3 * off / steps:.1f} | "
                      f"{pct(statistics.median(ratios))} [{pct(min(ratios))}, {pct(max(ratios))}] | "
                      f"{pct(cpu_ratio)} | {pct(t_in / off)} | {pct(statistics.median(paired))} | "
                      f"{pct(min(wall['on']) / min(wall['off']) - 1)} | {1e3 * t_in / (n_tracked - 1):.1f} |",
                      flush=True)
                if args.positions:
                    by_pos.append(f"{name}, Fisher {'yes' if fisher else 'no'}: " + " ".join(
                        f"{1e3 * statistics.mean(p):.1f}" for p in positions) + " ms")
    print_positions(by_pos)


def print_positions(lines: list[str]) -> None:
    if lines:
        print()
        print("Mean update duration by position in each block of 10 (position 0 is tracked), tracked runs:")
        for line in lines:
            print(f"* {line}")


if __name__ == "__main__":
    main()
