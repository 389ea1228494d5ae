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
        model = env.unwrapped
        dtype = torch.float64 if self.dtype == "float64" else torch.float32
        obs, _ = model.exact_states()
        policy = make_policy(self.policy, obs_dim=1, n_actions=2, target=self.target, p0=self.p0,
                             reference_obs=obs, seed=self.seed, width=self.width, depth=self.depth,
                             activation=self.activation, dtype=dtype)
        optimizer = make_optimizer(self.optimizer, policy, self.lr, **self.optimizer_kwargs())

        def utility(engine, rng):
            if self.mode == "exact":
                return exact_gradient(engine, model)
            return sampled_gradient(engine, env, self.batch_size, rng, baseline=self.baseline)

        reward = ExpectedReward(model, "R")
        return Experiment(
            env=env,
            policy=policy,
            optimizer=optimizer,
            properties=[ActionProbability(obs, self.target, "P"), reward],
            kappa=LogOdds(obs, self.target, "z"),
            utility=utility,
            target_label="do" if self.target == 1 else "dont",
            exact_utility=reward,
        )
