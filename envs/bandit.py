"""The two-action bandit: one state, actions *don't* (0) and *do* (1).

Each episode is a single step. Reward is ``reward_do`` for *do* and ``reward_dont`` for
*don't*, plus optional Gaussian noise of standard deviation ``noise_std`` (mean zero, so the
exact expected reward is unchanged):

    J(π) = π_do · r_do + (1 − π_do) · r_dont,     ∂J/∂z_do = Δ p (1 − p),  Δ = r_do − r_dont.

The observation is the constant vector [1.0], so an MLP policy sees a fixed input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ntrl.envs.kbandit import KArmedBandit

DONT, DO = 0, 1
ACTION_NAMES = ("dont", "do")


class TwoArmedBandit(KArmedBandit):
    """``ntrl/TwoArmedBandit-v0``: a one-step, one-state bandit with exact expected reward: the
    K-armed bandit (:class:`ntrl.envs.kbandit.KArmedBandit`) with K = 2, rewards given as
    ``reward_do`` and ``reward_dont``."""

    def __init__(self, reward_do: float = 1.0, reward_dont: float = -1.0, noise_std: float = 0.0):
        for name, value in (("reward_do", reward_do), ("reward_dont", reward_dont), ("noise_std", noise_std)):
            if not np.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        super().__init__((reward_dont, reward_do), noise_std)

    @property
    def reward_do(self) -> float:
        return self.rewards[DO]

    @property
    def reward_dont(self) -> float:
        return self.rewards[DONT]

    def _check_action(self, action) -> None:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be 0 (dont) or 1 (do), got {action!r}")

    def _info(self, action: int) -> dict[str, Any]:
        return {"action_name": ACTION_NAMES[action]}
