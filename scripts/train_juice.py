"""Train REINFORCE on the juice gridworld and track the F·P decomposition (SCIENCE.md §2).

    python scripts/train_juice.py                      # the config below
    python scripts/train_juice.py --steps 50 --p0 0.001 --optimizer npg --mode sampled

The same run as ``ntrl train juice``; this file spells the configuration out top to bottom.
Each tracked update writes, besides P's predicted and realised change, the terms of

    dP/dt = NTCov(P, R),   NTCov(P, F·P) = F·NTVar(P) + P·NTCov(P, F)

under ``juice/…`` in records.jsonl (see ntrl/experiments/juice.py for every key).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ntrl.experiments.juice import JuiceConfig
from ntrl.train import describe, train

# ---------------------------------------------------------------- 1. the configuration
CONFIG = JuiceConfig(
    # environment: a 5×5 grid, juice seen when one move away, 50-step episodes
    size=5,
    view_radius=1,
    horizon=50,
    reward=1.0,
    hide_prob=0.0,      # chance that the juice is hidden on a step: makes F rarer, leaves P alone
    f0=0.0,             # > 0: solve hide_prob so that the initial F equals f0
    # agent: an MLP that starts approaching seen juice with probability p0
    policy="mlp",
    width=64,
    depth=2,
    activation="tanh",
    p0=0.01,
    # learning: exact gradients of J = H·R, Adam
    mode="exact",       # or "sampled": REINFORCE on batch_size episodes from the native vector env
    optimizer="adam",   # sgd, adam, npg, sign
    lr=0.01,
    steps=150,
    batch_size=64,
    baseline="loo",
    # tracking
    track_every=2,
    decomposition=True,
    seed=0,
    out="runs",
    wandb="offline",
)


# ---------------------------------------------------------------- 2. command-line overrides
def with_overrides(config: JuiceConfig, argv: list[str]) -> JuiceConfig:
    """``--name value`` for any config field (``--p0 0.001``, ``--mode sampled``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(config):
        default = getattr(config, f.name)
        kind = (lambda s: s.lower() in ("1", "true", "yes")) if isinstance(default, bool) else type(default)
        if default is None:  # optional fields: stop_at_p is a float, run_name and group are text
            kind = float if "float" in str(f.type) else str
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=default)
    args = parser.parse_args(argv)
    return dataclasses.replace(config, **vars(args))


# ---------------------------------------------------------------- 3. train and report
def main(argv: list[str] | None = None) -> int:
    config = with_overrides(CONFIG, sys.argv[1:] if argv is None else argv)
    result = train(config)
    print(describe(result, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
