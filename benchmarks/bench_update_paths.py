"""What one population update of each kind that sets `ntrl rarity --quick`'s length costs, and
(``--against COMMIT``) the same against another commit's ntrl, alternated in one run.

    .venv/bin/python benchmarks/bench_update_paths.py                      # ~1 minute
    .venv/bin/python benchmarks/bench_update_paths.py --against e9018fe    # ~4 minutes per round
    .venv/bin/python benchmarks/bench_update_paths.py --against COMMIT --study    # ~90 s per round

The quick study's longest chunks are a few bandit members that go on for tens of thousands of
updates (`bench_population.py`, item 8): the single-logit SGD member from p₀ = 5·10⁻⁶ (50,000
updates), the five MLP SGD members from there (32,000–42,000), and the five punished MLP Adam
members (20,000, tracked log-spaced). Each is timed here as the study trains it, per update, by
the difference (T(N + 10) − T(10)) / N of whole populations' update loops (which takes out
building the members and writing their summaries; the least of three), with a 256-member MLP
population tracked every 10th update beside them.

With ``--study``, what is timed instead is ``ntrl rarity --quick`` end to end (W&B offline, in a
fresh temporary directory each time), the command's wall time.

With ``--against``, a temporary git worktree of COMMIT (removed at the end; only the one this
script made) supplies the other ntrl: each round runs this script's measurement in a fresh
process of the baseline (``PYTHONPATH`` = the worktree) and then of this checkout, so that the
shared VM's drift falls on both. The medians over the rounds and their ratios are printed. The
editable install maps ``ntrl.agents`` and ``ntrl.envs`` to this checkout's ``agents/`` and
``envs/`` whatever ``PYTHONPATH`` says, so a COMMIT whose ``agents/`` or ``envs/`` differ from this
checkout's is refused rather than half-measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCALES = [4.0, 2.0, 1.0, 0.5, 0.25, 0.125]  # the study's η-probe


def kinds() -> dict[str, tuple]:
    """name → (make configs(out, updates), updates timed, schedule or None)."""
    from bench_population import configs, tail_configs  # the quick study's tails, and item 1's members

    from ntrl.experiments.bandit import BanditConfig
    from ntrl.population import TrackSchedule

    def punished_adam(out, k):  # the quick study's punished MLP Adam runs
        return [BanditConfig(policy="mlp", optimizer="adam", p0=0.2, lr=0.01, steps=k, seed=i, reward_do=-1.0,
                             reward_dont=1.0, track_per_decade=50, price_scales=SCALES, wandb="disabled", out=out,
                             run_name=f"m{i}") for i in range(5)]

    def tail(policy: str, members: int):
        return lambda out, k: tail_configs(out, policy, members, k)

    return {
        "1 single-logit SGD": (tail("single_logit", 1), 1000, None),
        "1 MLP SGD": (tail("mlp", 1), 1000, None),
        "5 MLP SGD": (tail("mlp", 5), 1000, None),
        "5 MLP SGD, untracked": (tail("mlp", 5), 1000, TrackSchedule(every=10**9)),
        "5 MLP Adam, punished": (punished_adam, 2000, None),
        "256 MLP SGD": (lambda out, k: configs(out, 256, k), 300, None),
    }


def measure() -> dict[str, float]:
    """Milliseconds per update of each kind in this process's ntrl."""
    import torch

    from ntrl.population import train_population

    torch.set_num_threads(1)

    def loop_seconds(make, k: int, schedule) -> float:
        with tempfile.TemporaryDirectory() as d:
            return train_population(make(d, k), schedule=schedule, progress=False).train_seconds

    out = {}
    for name, (make, n, schedule) in kinds().items():
        out[name] = 1e3 * min((loop_seconds(make, n + 10, schedule) - loop_seconds(make, 10, schedule)) / n
                              for _ in range(3))
    return out


def environment(pythonpath: str | None) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    else:
        env.pop("PYTHONPATH", None)
    return env


def study_seconds(pythonpath: str | None) -> dict[str, float]:
    """``ntrl rarity --quick`` end to end in a fresh process of the ntrl on ``pythonpath`` (this
    checkout's where None), W&B offline: its wall time in seconds."""
    import time

    with tempfile.TemporaryDirectory() as d:
        cmd = [str(Path(sys.executable).with_name("ntrl")), "rarity", "--quick", "--out", d, "--quiet", "--wandb",
               "offline"]
        start = time.perf_counter()
        subprocess.run(cmd, env=environment(pythonpath), stdout=subprocess.DEVNULL, check=True, cwd=d)
        return {"ntrl rarity --quick, s": time.perf_counter() - start}


def run_measurement(pythonpath: str | None, study: bool = False) -> dict[str, float]:
    if study:
        return study_seconds(pythonpath)
    env = environment(pythonpath)
    done = subprocess.run([sys.executable, __file__, "--measure"], env=env, stdout=subprocess.PIPE, text=True,
                          check=True, cwd=tempfile.gettempdir())  # its stderr (which ntrl it ran) shows
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", metavar="COMMIT", help="also time this commit's ntrl, alternated with this checkout's")
    ap.add_argument("--rounds", type=int, default=3, help="alternated rounds with --against (default 3)")
    ap.add_argument("--study", action="store_true", help="time `ntrl rarity --quick` end to end instead")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # one process's measurement, as JSON
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.measure:
        import ntrl

        print(f"ntrl from {Path(ntrl.__file__).parent}", file=sys.stderr)
        print(json.dumps(measure()))
        return
    unit = "" if args.study else " ms per update"
    if not args.against:
        for name, value in run_measurement(None, args.study).items():
            print(f"{name}: {value:.3f}{unit}")
        return
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--quiet", "--verify", f"{args.against}^{{commit}}"],
                      stdout=subprocess.DEVNULL).returncode:
        sys.exit(f"--against: no commit {args.against!r} in {ROOT}; give a commit hash or branch of this repository")
    if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", args.against, "--", "agents", "envs"]).returncode:
        sys.exit(f"--against: {args.against}'s agents/ or envs/ differ from this checkout's: the editable install "
                 "would import this checkout's, so the comparison would not be of that commit")
    base_dir = Path(tempfile.mkdtemp(prefix="ntrl-base-")) / "tree"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base_dir), args.against],
                       check=True)
        readings: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
        for r in range(args.rounds):
            readings["base"].append(run_measurement(str(base_dir), args.study))
            readings["this"].append(run_measurement(None, args.study))
            print(f"round {r + 1}: " + "; ".join(f"{k} {readings['base'][-1][k]:.3f} → {readings['this'][-1][k]:.3f}"
                                                 for k in readings["this"][-1]), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)], check=False)
        with contextlib.suppress(OSError):  # the folder mkdtemp made, once git has removed its worktree
            base_dir.parent.rmdir()
    print(f"medians over {args.rounds} alternated rounds{',' if unit else ''}{unit} ({args.against} → this checkout):")
    for k in readings["this"][0]:
        b = statistics.median(x[k] for x in readings["base"])
        t = statistics.median(x[k] for x in readings["this"])
        print(f"  {k}: {b:.3f} → {t:.3f} ({100 * (t / b - 1):+.0f} %)")


if __name__ == "__main__":
    main()
