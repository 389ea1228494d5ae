"""The two-action bandit: one state, actions *don't* (0) and *do* (1).

Each episode is a single step. Reward is ``reward_do`` for *do* and ``reward_dont`` for
*don't*, plus optional Gaussian noise of standard deviation ``noise_std`` (mean zero, so the
exact expected reward is unchanged):

    J(π) = π_do · r_do + (1 − π_do) · r_dont,     ∂J/∂z_do = Δ p (1 − p),  Δ = r_do − r_dont.

The observation is the constant vector [1.0], so an MLP policy sees a fixed input.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

DONT, DO = 0, 1
ACTION_NAMES = ("dont", "do")


class TwoArmedBandit(gym.Env):
    """``ntrl/TwoArmedBandit-v0``: a one-step, one-state bandit with exact expected reward."""

    metadata = {"render_modes": []}

    def __init__(self, reward_do: float = 1.0, reward_dont: float = -1.0, noise_std: float = 0.0):
        for name, value in (("reward_do", reward_do), ("reward_dont", reward_dont), ("noise_std", noise_std)):
            if not np.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        self.reward_do = float(reward_do)
        self.reward_dont = float(reward_dont)
        self.noise_std = float(noise_std)
        self.observation_space = gym.spaces.Box(low=0.0, high=1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(2)

    @property
    def rewards(self) -> tuple[float, float]:
        """(r_dont, r_do), indexed by action."""
        return (self.reward_dont, self.reward_do)

    @staticmethod
    def observation() -> np.ndarray:
        return np.ones(1, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return self.observation(), {}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (dont) or 1 (do), got {action!r}")
        reward = self.rewards[int(action)]
        if self.noise_std > 0:
            reward += float(self.np_random.normal(0.0, self.noise_std))
        return self.observation(), reward, True, False, {"action_name": ACTION_NAMES[int(action)]}

    # ------------------------------------------------------------------ exact model
    def exact_states(self, view=None) -> tuple[Tensor, Tensor]:
        """The states of the model and their visitation weights: one state, weight 1."""
        return torch.ones(1, 1), torch.ones(1)

    def exact_expected_reward(self, view) -> Tensor:
        """J(π) = r_ref + Σ_a π(a) (r_a − r_ref), differentiable in the view's parameters.

        r_ref is the reward of the currently most probable action. The value equals Σ_a π(a) r_a,
        but its gradient ∂J/∂z_a = π_a (r_a − J) is then formed without the cancellation
        r_a − J ≈ 0 that would swamp it in rounding error once the other action's π < 1e-13.
        """
        obs, _ = self.exact_states()
        probs = view.probs(obs)[0]
        r = torch.tensor(self.rewards, dtype=probs.dtype)
        r_ref = r[int(torch.argmax(probs.detach()))]
        return r_ref + (probs * (r - r_ref)).sum()
