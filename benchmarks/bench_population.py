"""Populations (issue 12): what one member-update costs inside a population, against one update of
a single run, with the other speed and memory numbers of the issue, as ratios measured in one run.

    .venv/bin/python benchmarks/bench_population.py            # ~10 minutes on 2 cores (~15 with --juice)
    .venv/bin/python benchmarks/bench_population.py --quick    # ~1 minute smoke run (256 members, no study)

1. **Cost per member-update.** A population of ``--members`` (1024) bandit MLP members (2×64
   tanh, exact SGD, tracked every 10th update) against one single run's update of the same config,
   both measured the same way: (T(N) − T(10)) / (N − 10) of whole runs, N = ``--updates`` + 10,
   which takes out building the members, writing their run directories and their summaries (the
   population's update-loop time, ``PopulationResult.train_seconds``, and the single run's wall
   time). Over members × updates; target at most 1/100. Also with the population on two torch
   threads (``threads=2``: both cores of the 2-core machine), and the loop's raw time per
   member-update, finishing the members included.
2. **Tracker overhead in a population**: the same population of 256 members tracked every 10th
   update against tracked at update 0 only, per update by the same difference, over 5 × ``--updates``
   updates (500). Target: at most 10 %. Two separate runs scatter by several points on a shared
   VM, so 2b reads it inside one run of 2000 updates as well (:func:`in_run_overhead`): tracked
   against untracked iterations of the loop, then with every cost of the loop (the queued
   records' formatting and the flushes), then with the members' finishing at the end.
3. **Peak memory** of the 1024-member population: the peak resident set of a fresh process that
   trains it, minus that of a process that only imports ntrl and torch. Target: under 2 GiB.
4. **`ntrl rarity --quick`**, end to end in fresh processes (W&B offline, 2 workers), with
   populations (the default) and with ``--no-population`` (today's per-run pool). Target: 10×.
5. **GPU**: with CUDA present, the 1024-member population on the GPU (``bench_population_gpu.py``
   measures more: wider populations, the CPU on the same machine, juice); without, the line says
   so and the rest runs.
6. **Juice gridworld populations** (``--juice``): a chunk of the study's size (30 members, the
   study's tracking: every 5th update, the η-probe at six scales) of each juice cell kind (exact
   and sampled, tabular and MLP, SGD), its update loop over members × updates against one single
   run's update with the same config (whole runs, 100 updates, setup excluded by the same
   difference as in 1).
7. **Tracker overhead in an exact juice population** (``--juice``): 30 members, tracked every 10th
   update against update 0 only, per update by the same difference as in 2, without and with the
   study's η-probe (six more evaluations of the model per tracked update). Target: at most 10 %.
   7b reads it inside one run, as 2b does (200 updates of the tabular members, 100 of the MLP).
8. **A few members, the study's long tails**: a population of 1 single-logit, 1 MLP and 5 MLP
   bandit members as the quick study trains them (exact SGD from p₀ = 5·10⁻⁶, tracked every 10th
   update, the η-probe at six scales), its update against one single run's update of the same
   config, both by the difference of 1010 and 10 updates (the least of three). These chunks,
   tens of thousands of updates with a handful of members left, set `ntrl rarity --quick`'s length.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]


def configs(out: str, members: int, updates: int, track_every: int = 10, width: int = 64, threads: int = 1):
    from ntrl.experiments.bandit import BanditConfig

    return [BanditConfig(policy="mlp", optimizer="sgd", p0=0.01, lr=0.1, steps=updates, seed=i, width=width,
                         track_every=track_every, wandb="disabled", out=out, run_name=f"m{i}", threads=threads)
            for i in range(members)]


def population_seconds(members: int, updates: int, device: str = "cpu", threads: int = 1, **kw) -> tuple[float, float]:
    """(loop seconds, total seconds) of one population."""
    from ntrl.population import train_population

    with tempfile.TemporaryDirectory() as d:
        r = train_population(configs(d, members, updates, threads=threads), progress=False, device=device, **kw)
    return r.train_seconds, r.seconds


def population_update_seconds(members: int, updates: int, repeats: int = 3, **kw) -> float:
    """Seconds per population update, (T(updates + 10) − T(10)) / updates of the update loop, the
    least of ``repeats`` (as for the single run: this shared VM's scatter only ever adds time)."""
    return min((population_seconds(members, updates + 10, **kw)[0] - population_seconds(members, 10, **kw)[0]) / updates
               for _ in range(repeats))


@contextlib.contextmanager
def stamped_iterations(clock: Callable[[], float] = time.time) -> Iterator[list[float]]:
    """The times (``clock()``) at which a population's update loop starts each iteration, stamped
    where the loop asks which members track (its first step), for every population trained inside
    the ``with``; on a CUDA device after the previous iteration's kernels are done."""
    from ntrl.population import trainer

    stamps: list[float] = []
    original = trainer._Population.tracking

    def stamped(self, t):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        stamps.append(clock())
        return original(self, t)

    trainer._Population.tracking = stamped
    try:
        yield stamps
    finally:
        trainer._Population.tracking = original


def in_run_overhead(members: int = 256, updates: int = 2000, every: int = 10,
                    make_configs: Callable[[str, int, int], list] | None = None) -> dict[str, float]:
    """Tracker overhead read inside one run tracked every ``every``-th update (``make_configs(out,
    members, steps)``: the population's configs; by default :func:`configs`' bandit MLP members), from the time of
    each iteration of the update loop (stamped where the loop asks which members track: the
    loop's first step): ``paired``, the median tracked iteration against the median untracked
    one, (T̃_tracked − T̃_untracked)/(every · T̃_untracked), tracked and untracked iterations
    interleaved, so a slow spell of the VM counts in both; ``all_costs``, every iteration's time
    beyond the median untracked one's (the queued records' formatting and the flushes, which fall
    in a few untracked iterations, included), Σ T_i/(n · T̃_untracked) − 1, less the same reading of
    a run that tracks nothing; and ``finish_s``, what stopping the members at the end (their
    Price checks and curves, read from the records) takes beyond the untracked run's."""
    import numpy as np

    from ntrl.population import TrackSchedule, train_population

    def run(schedule) -> tuple[np.ndarray, float]:
        stamps.clear()
        with tempfile.TemporaryDirectory() as d:
            r = train_population((make_configs or configs)(d, members, updates + 10), schedule=schedule, progress=False)
        dt = np.diff(stamps)[10:]  # iterations 10 … (the last one, which stops every member, left out)
        # the loop starts just before its first stamp: what follows the last stamp is the last
        # iteration and finishing the members (the first iterations' warm-up left out: the first
        # run of a process took 0.9 s longer to its first juice update)
        return dt, r.train_seconds - (stamps[-1] - stamps[0])

    with stamped_iterations() as stamps:  # time.time: the clock of the loop's own time, train_seconds
        tracked, finish_tracked = run(TrackSchedule(every=every))
        untracked, finish_untracked = run(TrackSchedule(every=10**9))
    t = np.arange(10, 10 + len(tracked))
    base = float(np.median(tracked[t % every != 0]))
    paired = (float(np.median(tracked[t % every == 0])) - base) / every / base
    all_costs = (tracked.sum() / (len(tracked) * base) - 1) - (untracked.sum() / (len(untracked) * np.median(untracked)) - 1)
    return {"paired": paired, "all_costs": float(all_costs), "finish_s": finish_tracked - finish_untracked,
            "finish_share": (finish_tracked - finish_untracked) / (len(tracked) * base),
            "tracked_iteration_ms": float(np.median(tracked[t % every == 0])) * 1e3, "untracked_iteration_ms": base * 1e3}


def single_update_seconds(updates: int) -> float:
    from ntrl.train import train

    def run(n: int) -> float:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            train(configs(d, 1, n)[0], progress=False)
            return time.perf_counter() - t

    run(10)  # warm-up
    return min((run(updates) - run(10)) / (updates - 10) for _ in range(3))


TAIL_LRS = {"single_logit": 2.0, "mlp": 0.1}


def tail_configs(out: str, policy: str, members: int, updates: int):
    """The quick study's rewarded bandit runs from p₀ = 5e-6 (grid.py's settings), ``members`` seeds."""
    from ntrl.experiments.bandit import BanditConfig

    return [BanditConfig(policy=policy, optimizer="sgd", p0=5e-6, lr=TAIL_LRS[policy], steps=updates, seed=i,
                         track_every=10, price_scales=[4.0, 2.0, 1.0, 0.5, 0.25, 0.125], wandb="disabled", out=out,
                         run_name=f"m{i}") for i in range(members)]


def tail_ratio(policy: str, members: int, updates: int = 1000) -> tuple[float, float]:
    """(seconds per population update, seconds per single-run update) of item 8."""
    from ntrl.population import train_population
    from ntrl.train import train

    def pop(n: int) -> float:
        with tempfile.TemporaryDirectory() as d:
            return train_population(tail_configs(d, policy, members, n), progress=False).train_seconds

    def one(n: int) -> float:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            train(tail_configs(d, policy, 1, n)[0], progress=False)
            return time.perf_counter() - t

    one(10)  # warm-up
    return (min((pop(updates + 10) - pop(10)) / updates for _ in range(3)),
            min((one(updates + 10) - one(10)) / updates for _ in range(3)))


def peak_rss_gib(code: str) -> float:
    """Peak resident memory of a fresh process running ``code``: VmHWM of /proc/self/status (which
    an exec resets; getrusage's ru_maxrss would carry over this benchmark's own peak through fork)."""
    probe = "\nprint([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    out = subprocess.run([sys.executable, "-c", code + probe], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"VmHWM:\s+(\d+) kB", out).group(1)) / 2**20


def juice_configs(out: str, members: int, updates: int, policy: str, mode: str):
    from ntrl.experiments.juice import JuiceConfig
    from ntrl.study.grid import DEFAULT_LRS

    return [JuiceConfig(policy=policy, optimizer="sgd", mode=mode, p0=1e-4, lr=DEFAULT_LRS["juice"][policy]["sgd"],
                        steps=updates, seed=i, batch_size=32, track_every=5, decomposition=False,
                        price_scales=[4.0, 2.0, 1.0, 0.5, 0.25, 0.125], wandb="disabled", out=out, run_name=f"m{i}")
            for i in range(members)]


def juice_ratio(policy: str, mode: str, members: int = 30, updates: int = 100) -> tuple[float, float]:
    """(ms per member-update in a population of ``members``, ms per single-run update)."""
    from ntrl.population import train_population
    from ntrl.train import train

    def single(n: int) -> float:
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            train(juice_configs(d, 1, n, policy, mode)[0], progress=False)
            return time.perf_counter() - t

    single(5)  # warm-up
    one = min((single(updates) - single(10)) / (updates - 10) for _ in range(2))
    with tempfile.TemporaryDirectory() as d:
        r = train_population(juice_configs(d, members, updates, policy, mode), progress=False)
    return r.train_seconds / (members * updates) * 1e3, one * 1e3


def juice_in_run_overhead(policy: str, probe: bool, members: int = 30, updates: int = 200) -> dict[str, float]:
    """:func:`in_run_overhead` of an exact juice population of ``members``, SGD, tracked every 10th
    update, with or without the study's η-probe."""

    def make(out: str, n: int, steps: int) -> list:
        cfgs = juice_configs(out, n, steps, policy, "exact")
        return cfgs if probe else [dataclasses.replace(c, price_scales=[]) for c in cfgs]

    return in_run_overhead(members, updates, make_configs=make)


def juice_tracker_overhead(policy: str, probe: bool, members: int = 30, updates: int = 50) -> tuple[float, float]:
    """(ms per update tracked every 10th, ms per update tracked at update 0 only) of an exact juice
    population of ``members``, SGD, with or without the study's η-probe, by the difference
    (T(updates + 10) − T(10)) / updates."""
    from ntrl.population import TrackSchedule, train_population

    def loop(n: int, schedule) -> float:
        with tempfile.TemporaryDirectory() as d:
            cfgs = juice_configs(d, members, n, policy, "exact")
            if not probe:
                cfgs = [dataclasses.replace(c, price_scales=[]) for c in cfgs]
            return train_population(cfgs, schedule=schedule, progress=False).train_seconds

    out = []
    for schedule in (TrackSchedule(every=10), TrackSchedule(every=10**9)):
        out.append((loop(updates + 10, schedule) - loop(10, schedule)) / updates * 1e3)
    return out[0], out[1]


def rarity_seconds(population: bool) -> float:
    with tempfile.TemporaryDirectory() as d:
        cmd = [str(Path(sys.executable).with_name("ntrl")), "rarity", "--quick", "--out", d, "--quiet", "--wandb",
               "offline"] + ([] if population else ["--no-population"])
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, cwd=d)
        return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--members", type=int, default=1024)
    ap.add_argument("--updates", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="256 members, 50 updates, no study")
    ap.add_argument("--juice", action="store_true", help="also time juice populations (6.), ~2 minutes")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args()
    import torch

    from ntrl.population import TrackSchedule

    torch.set_num_threads(1)
    members, updates = (256, 50) if args.quick else (args.members, args.updates)
    res: dict[str, object] = {"members": members, "updates": updates, "nproc": os.cpu_count(),
                              "load": os.getloadavg()[0], "torch": torch.__version__}

    single = single_update_seconds(updates + 10)
    per_update = population_update_seconds(members, updates)
    per_update_2 = population_update_seconds(members, updates, threads=2)
    loop, total = population_seconds(members, updates)
    per_member = per_update / members
    res.update(single_update_ms=single * 1e3, population_update_ms=per_update * 1e3,
               population_update_ms_2_threads=per_update_2 * 1e3, population_loop_s=loop, population_total_s=total,
               member_update_us=per_member * 1e6, member_over_single=per_member / single,
               member_over_single_2_threads=per_update_2 / members / single,
               member_update_raw_us=loop / (members * updates) * 1e6)
    print(f"1. cost per member-update: {per_member * 1e6:.2f} µs in a population of {members} (one population update "
          f"{per_update * 1e3:.2f} ms); one single-run update {single * 1e3:.3f} ms; ratio {per_member / single:.4f} "
          f"(target ≤ 0.01). On two torch threads: {per_update_2 / members * 1e6:.2f} µs, ratio "
          f"{per_update_2 / members / single:.4f}. Raw loop of {updates} updates: {loop:.2f} s "
          f"({loop / (members * updates) * 1e6:.2f} µs per member-update with finishing the members; "
          f"{total:.1f} s with building them and writing their run dirs)")

    n = 256
    # 5× the updates of item 1: with 100, ten tracked updates in a difference of two short runs
    # scattered the overhead from 19 % to 60 % between runs of the same code
    tracked = population_update_seconds(n, 5 * updates)
    untracked = population_update_seconds(n, 5 * updates, schedule=TrackSchedule(every=10**9))
    res.update(tracker_overhead=tracked / untracked - 1, tracked_update_ms_256=tracked * 1e3,
               untracked_update_ms_256=untracked * 1e3)
    print(f"2. tracker overhead, {n} members tracked every 10th update vs update 0 only: "
          f"{tracked * 1e3:.2f} vs {untracked * 1e3:.2f} ms per update, {100 * (tracked / untracked - 1):.1f} % "
          f"(target ≤ 10 %)")
    inside = in_run_overhead(n)
    res.update({f"tracker_overhead_in_run_{k}": v for k, v in inside.items()})
    print(f"2b. the same read inside one run of 2000 updates: a tracked iteration {inside['tracked_iteration_ms']:.2f} ms "
          f"against an untracked one's {inside['untracked_iteration_ms']:.2f} ms (medians): {100 * inside['paired']:.1f} %; "
          f"with every cost of the loop (formatting the queued records, flushing): {100 * inside['all_costs']:.1f} %; "
          f"stopping the members at the end adds {inside['finish_s']:.2f} s more than an untracked run's "
          f"({100 * inside['finish_share']:.1f} % of the loop): {100 * (inside['all_costs'] + inside['finish_share']):.1f} % "
          f"in all (target ≤ 10 %)")

    base = peak_rss_gib("import torch, ntrl.population")
    code = (f"import tempfile, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import bench_population as b\n"
            f"b.population_seconds({members}, 20)")
    peak = peak_rss_gib(code)
    res.update(peak_rss_gib=peak, baseline_rss_gib=base)
    print(f"3. peak memory of the {members}-member population: {peak:.2f} GiB resident ({peak - base:.2f} GiB above "
          f"importing torch and ntrl; target < 2 GiB)")

    if not args.quick:
        with_pop, without = rarity_seconds(True), rarity_seconds(False)
        res.update(rarity_quick_population_s=with_pop, rarity_quick_per_run_s=without, rarity_speedup=without / with_pop)
        print(f"4. ntrl rarity --quick end to end: {with_pop:.1f} s with populations, {without:.1f} s per run: "
              f"{without / with_pop:.2f}× (target ≥ 10×)")

    if torch.cuda.is_available():
        gl, _ = population_seconds(members, updates, device="cuda")
        res.update(gpu=torch.cuda.get_device_name(), gpu_member_update_us=gl / (members * updates) * 1e6)
        print(f"5. GPU ({torch.cuda.get_device_name()}): {gl / (members * updates) * 1e6:.2f} µs per member-update "
              f"at {members} members")
    else:
        print("5. GPU: no CUDA device here; skipped")
    if args.juice:
        for policy in ("tabular", "mlp"):
            for mode in ("exact", "sampled"):
                member, one = juice_ratio(policy, mode)
                res[f"juice_{policy}_{mode}"] = {"member_update_ms": member, "single_update_ms": one,
                                                 "ratio": member / one}
                print(f"6. juice {policy} {mode}, SGD, 30 members: {member:.2f} ms per member-update, one run "
                      f"{one:.2f} ms per update: ratio {member / one:.3f}")
            for probe in (False, True):
                tracked, untracked = juice_tracker_overhead(policy, probe)
                res[f"juice_{policy}_exact_tracker_overhead{'_probe' if probe else ''}"] = tracked / untracked - 1
                print(f"7. tracker overhead, juice {policy} exact, 30 members tracked every 10th update vs update 0 "
                      f"only ({'with' if probe else 'without'} the study's η-probe): {tracked:.1f} vs {untracked:.1f} "
                      f"ms per update, {100 * (tracked / untracked - 1):.1f} % (target ≤ 10 %)")
                inside = juice_in_run_overhead(policy, probe, updates=200 if policy == "tabular" else 100)
                res[f"juice_{policy}_exact_tracker_overhead_in_run{'_probe' if probe else ''}"] = inside
                print(f"7b. the same read inside one run: a tracked iteration {inside['tracked_iteration_ms']:.1f} ms "
                      f"against an untracked one's {inside['untracked_iteration_ms']:.1f} ms (medians): "
                      f"{100 * inside['paired']:.1f} %; with every cost of the loop {100 * inside['all_costs']:.1f} %; "
                      f"with stopping the members {100 * (inside['all_costs'] + inside['finish_share']):.1f} % in all "
                      f"(target ≤ 10 %)")
    for policy, k in (("single_logit", 1), ("mlp", 1), ("mlp", 5)):
        pop, one = tail_ratio(policy, k)
        res[f"tail_{policy}_{k}"] = {"population_update_ms": pop * 1e3, "single_update_ms": one * 1e3, "ratio": pop / one}
        print(f"8. {k} {policy} member{'s' if k > 1 else ''} as the quick study trains them: {pop * 1e3:.3f} ms per "
              f"population update, one run {one * 1e3:.3f} ms per update: ratio {pop / one:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
