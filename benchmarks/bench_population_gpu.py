"""Populations on a GPU (issue 12): what a member-update costs on a CUDA device, against one
update of a single run on this machine's CPU and against the same population on the CPU, with the
tracker's overhead and the GPU memory a population takes. Float64, as the analysis uses.

    python benchmarks/bench_population_gpu.py [--json FILE] [--deadline SECONDS]

Without a CUDA device it says so in one line and exits 0. Sections run from the smallest; one
that would start after ``--deadline`` seconds (default 300) is skipped and says so, so that the
script fits a lease of GPU time. The numbers land in ``--json`` after each section.

Every time is read inside one run from the update loop's own iterations (stamped where the loop
asks which members track, its first step; the first 10 iterations and the last, which stops every
member, left out): building the members, writing their run directories and finishing them are
not in it.

1. **One single run's update** on this machine's CPU (bandit MLP 2×64 tanh, exact SGD, tracked
   every 10th update, one torch thread): ``bench_population.single_update_seconds``.
2. **Bandit MLP populations on the GPU** of 1024, 4096 and 16384 members (the same config, one
   seed each), tracked every 10th update: every iteration's mean over members (the tracked ones
   and the records' formatting included, as in 1.'s mean update) and its ratio to 1.; the median
   untracked iteration over members; the tracker's overhead, (median tracked iteration − median
   untracked one)/(10 · median untracked); the GPU's peak memory (``torch.cuda.max_memory_allocated``).
3. **The same 1024 members on the CPU** (one torch thread, then all of this machine's cores):
   the GPU's speed-up over each.
4. **Exact juice populations** (the study's chunk: SGD, tracked every 5th update, the η-probe
   at six scales), tabular and MLP: 30 members on the CPU (one thread) and on the GPU, and 512
   on the GPU: ms per member-update (every iteration's mean over members).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_population as bp  # noqa: E402  (the same configs, single-run timing and loop stamps)


def iteration_seconds(make_configs: Callable[[str, int, int], list], members: int, updates: int, every: int,
                      device: str) -> dict[str, float]:
    """One population of ``members`` (``make_configs(out, members, steps)``) on ``device``,
    tracked every ``every``-th update: the median tracked and untracked iteration of its update
    loop and the mean of all, in seconds, with the peak GPU memory in GiB (CUDA only)."""
    import numpy as np
    import torch

    from ntrl.population import TrackSchedule, train_population

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with bp.stamped_iterations(time.perf_counter) as stamps, tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        r = train_population(make_configs(d, members, updates + 11), schedule=TrackSchedule(every=every),
                             progress=False, device=device)
        wall = time.perf_counter() - t0
    assert not r.failures, r.failures[:3]
    dt = np.diff(stamps)[10:]
    t = np.arange(10, 10 + len(dt))
    out = {"tracked_s": float(np.median(dt[t % every == 0])), "untracked_s": float(np.median(dt[t % every != 0])),
           "mean_s": float(dt.mean()), "wall_s": wall, "loop_s": r.train_seconds}
    out["overhead"] = (out["tracked_s"] - out["untracked_s"]) / (every * out["untracked_s"])
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def bandit(threads: int = 1) -> Callable[[str, int, int], list]:
    return lambda out, members, steps: bp.configs(out, members, steps, threads=threads)


def juice(policy: str) -> Callable[[str, int, int], list]:
    return lambda out, members, steps: bp.juice_configs(out, members, steps, policy, "exact")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the numbers to this file (after each section)")
    ap.add_argument("--deadline", type=float, default=300.0, help="start no section after this many seconds")
    ap.add_argument("--updates", type=int, default=100, help="iterations timed per bandit population")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("bench_population_gpu: no CUDA device here; skipped")
        return
    start = time.perf_counter()
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "host_cpus": os.cpu_count(),
                 "skipped": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    def section(name: str) -> bool:
        late = time.perf_counter() - start > args.deadline
        if late:
            res["skipped"].append(name)
            print(f"{name}: skipped, past the deadline of {args.deadline:.0f} s")
        save()
        return not late

    print(f"GPU: {res['gpu']}; torch {res['torch']}; {res['host_cpus']} host CPUs", flush=True)
    torch.set_num_threads(1)
    one = bp.single_update_seconds(110)
    res["single_run_update_ms"] = one * 1e3
    print(f"1. one single run's update on the CPU (1 thread): {one * 1e3:.3f} ms", flush=True)

    for members in (1024, 4096, 16384):
        if not section(f"2. bandit {members} on the GPU"):
            continue
        r = iteration_seconds(bandit(), members, args.updates, 10, "cuda")
        # like for like: every iteration (tracked every 10th update), as the single run's mean update is
        r["member_update_us"] = r["mean_s"] / members * 1e6
        r["ratio_to_single_run"] = r["mean_s"] / members / one
        r["untracked_member_update_us"] = r["untracked_s"] / members * 1e6
        res[f"gpu_bandit_{members}"] = r
        print(f"2. bandit MLP, {members} members on the GPU: {r['member_update_us']:.3f} µs per member-update, "
              f"tracked every 10th update as the single run is (1/{1 / r['ratio_to_single_run']:.0f} of its update); "
              f"untracked updates alone {r['untracked_member_update_us']:.3f} µs; tracker overhead every 10th update "
              f"{100 * r['overhead']:.1f} %; peak GPU memory {r['peak_gib']:.2f} GiB; whole population "
              f"{r['wall_s']:.1f} s", flush=True)

    for threads in (1, os.cpu_count() or 1):
        if not section(f"3. bandit 1024 on the CPU, {threads} threads"):
            continue
        torch.set_num_threads(threads)
        r = iteration_seconds(bandit(threads), 1024, args.updates, 10, "cpu")
        torch.set_num_threads(1)
        res[f"cpu_bandit_1024_threads{threads}"] = r
        gpu = res.get("gpu_bandit_1024")
        speedup = f"; the GPU's is {r['untracked_s'] / gpu['untracked_s']:.1f}× faster" if gpu else ""
        print(f"3. bandit MLP, 1024 members on the CPU, {threads} threads: {r['untracked_s'] / 1024 * 1e6:.3f} µs "
              f"per member-update{speedup}", flush=True)

    for policy in ("tabular", "mlp"):
        for members, device in ((30, "cpu"), (30, "cuda"), (512, "cuda")):
            if not section(f"4. juice {policy} {members} on {device}"):
                continue
            r = iteration_seconds(juice(policy), members, 40, 5, device)
            r["member_update_ms"] = r["mean_s"] / members * 1e3
            res[f"juice_{policy}_{members}_{device}"] = r
            peak = f"; peak GPU memory {r['peak_gib']:.2f} GiB" if device == "cuda" else ""
            print(f"4. exact juice {policy}, {members} members on {device}: {r['member_update_ms']:.3f} ms per "
                  f"member-update ({r['mean_s'] * 1e3:.1f} ms an update; tracked {r['tracked_s'] * 1e3:.1f}, "
                  f"untracked {r['untracked_s'] * 1e3:.1f}){peak}", flush=True)
    section("end")
    print(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
