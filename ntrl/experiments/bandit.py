"""The bandit experiment: config fields of ``ntrl train bandit`` and how they are built."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import torch

import ntrl.envs  # noqa: F401  (registers ntrl/TwoArmedBandit-v0)
from ntrl.agents.optimizers import make_optimizer
from ntrl.agents.policies import make_policy
from ntrl.agents.reinforce import exact_gradient, sampled_gradient
from ntrl.config import Experiment, TrainConfig, option
from ntrl.properties import ActionProbability, ExpectedReward, LogOdds


@dataclass
class BanditConfig(TrainConfig):
    """REINFORCE on ``ntrl/TwoArmedBandit-v0`` with the target action's probability tracked."""

    env: str = option("bandit", "the environment", flag=False)
    target: Literal[0, 1] = option(1, "the tracked action: 1 = do, 0 = dont")
    reward_do: float = option(1.0, "reward for do")
    reward_dont: float = option(-1.0, "reward for dont")
    noise_std: float = option(0.0, "standard deviation of Gaussian reward noise")

    def validate(self) -> "BanditConfig":
        super().validate()
        self.need(self.policy != "cnn", "policy", "cnn reads image observations; the bandit's is the constant [1]")
        self.need(self.target in (0, 1), "target", f"must be in [0, 1] for the bandit (0 = dont, 1 = do), got {self.target}")
        for name in ("reward_do", "reward_dont"):
            self.need(math.isfinite(getattr(self, name)), name, f"must be finite, got {getattr(self, name)}")
        self.need(math.isfinite(self.noise_std) and self.noise_std >= 0, "noise_std", f"must be a finite number >= 0, got {self.noise_std}")
        return self

    def build(self) -> Experiment:
        env = gym.make("ntrl/TwoArmedBandit-v0", reward_do=self.reward_do,
                       reward_dont=self.reward_dont, noise_std=self.noise_std)
        return bandit_experiment(self, env, "do" if self.target == 1 else "dont")


def bandit_experiment(config: TrainConfig, env: gym.Env, target_label: str, **policy_kwargs) -> Experiment:
    """The experiment of a one-state bandit env (two-armed or K-armed): the config's policy at its
    p₀ (``policy_kwargs``: e.g. the K-armed start vector), its optimizer, P = π(target), R = J(π)
    and κ of the target's log-odds, and the exact or sampled utility."""
    model = env.unwrapped
    dtype = torch.float64 if config.dtype == "float64" else torch.float32
    obs, _ = model.exact_states()
    policy = make_policy(config.policy, obs_dim=1, n_actions=model.action_space.n, target=config.target, p0=config.p0,
                         reference_obs=obs, seed=config.seed, width=config.width, depth=config.depth,
                         activation=config.activation, dtype=dtype, **policy_kwargs)
    optimizer = make_optimizer(config.optimizer, policy, config.lr, **config.optimizer_kwargs())

    def utility(engine, rng):
        if config.mode == "exact":
            return exact_gradient(engine, model)
        return sampled_gradient(engine, env, config.batch_size, rng, baseline=config.baseline)

    reward = ExpectedReward(model, "R")
    return Experiment(
        env=env,
        policy=policy,
        optimizer=optimizer,
        properties=[ActionProbability(obs, config.target, "P"), reward],
        kappa=LogOdds(obs, config.target, "z"),
        utility=utility,
        target_label=target_label,
        exact_utility=reward,
    )
