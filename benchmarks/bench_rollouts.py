"""REINFORCE's rollout collection against raw vector-env steps (issue 15, item 3).

    python benchmarks/bench_rollouts.py                     # CartPole-v1, 8 envs, prints the ratios

Three ways to gather the same number of CartPole transitions, per transition:

* ``raw``: a gymnasium SyncVectorEnv of 8 CartPoles (same-step autoreset) stepped with random
  actions (``action_space.sample()``), no policy: the baseline;
* ``vector``: :func:`ntrl.agents.reinforce.collect_episodes` through that vector env, one
  batched forward pass of ntrl's 2×64 MLP per vector step (what ``ntrl train --env CartPole-v1
  --n-envs 8`` does);
* ``single``: :func:`ntrl.agents.reinforce.collect_episodes` on one env, one forward pass per step
  (the path before the vector env).

Timings are interleaved medians (:func:`timing.interleaved_medians`), reported as seconds per
transition and as ratios to ``raw`` (the issue's target: ``vector`` within 2×).
"""

from __future__ import annotations

import argparse
import os
import sys

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from timing import interleaved_medians  # noqa: E402

from ntrl.agents.policies import make_policy  # noqa: E402
from ntrl.agents.reinforce import collect_episodes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--env", default="CartPole-v1")
    ap.add_argument("--n-envs", type=int, default=8)
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    venv = SyncVectorEnv([lambda: gym.make(args.env)] * args.n_envs, autoreset_mode=AutoresetMode.SAME_STEP)
    venv.reset(seed=0)
    single = gym.make(args.env)
    single.reset(seed=0)
    obs_dim = int(np.prod(single.observation_space.shape))
    policy = make_policy("mlp", obs_dim, int(single.action_space.n), 0, 0.5, torch.zeros(1, obs_dim), seed=0,
                         dtype=torch.float64)
    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}

    def vector() -> None:
        batch = collect_episodes(venv, policy, args.episodes, rng, max_steps=1000)
        counts["vector"] = int(batch.obs.shape[0])

    def single_env() -> None:
        batch = collect_episodes(single, policy, args.episodes, rng, max_steps=1000)
        counts["single"] = int(batch.obs.shape[0])

    def raw() -> None:  # the same number of transitions as the last vector batch, random actions
        n = max(1, counts.get("vector", 1000) // args.n_envs)
        venv.reset()
        for _ in range(n):
            venv.step(venv.action_space.sample())
        counts["raw"] = n * args.n_envs

    vector()
    med = interleaved_medians({"vector": vector, "single": single_env, "raw": raw}, args.rounds)
    per = {k: med[k] / counts[k] for k in med}
    print(f"{args.env}, {args.n_envs} envs, {args.episodes} episodes a batch ({counts['vector']} transitions), "
          f"torch {torch.__version__}, {args.rounds} rounds")
    for k in ("raw", "vector", "single"):
        print(f"  {k:7s} {per[k] * 1e6:8.1f} µs per transition   {per[k] / per['raw']:5.2f}× raw")


if __name__ == "__main__":
    main()
