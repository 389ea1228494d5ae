"""The K-armed bandit: one state, K ≥ 2 arms, each with a fixed expected reward.

Each episode is a single step. Arm a pays ``rewards[a]`` plus optional Gaussian noise of standard
deviation ``noise_std`` (mean zero, so the exact expected reward is unchanged):

    J(π) = Σ_a π_a r_a,        ∂J/∂z_a = π_a (r_a − J)   (softmax logits z).

The observation is the constant vector [1.0]. ``start_probabilities`` builds the start the
gravity-well experiments use (SCIENCE.md §3; Mei et al., NeurIPS 2020): the target arm at p₀ and
the rest either split evenly or given explicitly, e.g. π₀ = (p₀, 0.95 − p₀, 0.05) with rewards
(1, 0.9, 0), where a rare best arm first loses probability to a common second-best one.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor

GRAVITY_WELL_REWARDS = (1.0, 0.9, 0.0)


def check_rewards(rewards: Sequence[float], noise_std: float) -> tuple[float, ...]:
    """The rewards as floats, after checking there are at least 2, all finite, and noise ≥ 0."""
    r = tuple(float(x) for x in rewards)
    if len(r) < 2:
        raise ValueError(f"a K-armed bandit needs at least 2 arms, got rewards {list(r)}")
    if not all(math.isfinite(x) for x in r):
        raise ValueError(f"rewards must be finite, got {list(r)}")
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")
    return r


def start_probabilities(p0: float, target: int, n_arms: int, start: Sequence[float] | None = None) -> np.ndarray:
    """π₀ (float64, sums to 1): ``start`` as given (its target entry must equal p₀ when both are
    given explicitly; pass ``start`` alone by setting p₀ = start[target]), else the target arm at
    p₀ and 1 − p₀ split evenly over the other K − 1 arms."""
    if not 0 <= target < n_arms:
        raise ValueError(f"target arm must be in [0, {n_arms - 1}], got {target}")
    if start is None:
        if not 0.0 < p0 < 1.0:
            raise ValueError(f"p0 must be in (0, 1), got {p0}")
        pi = np.full(n_arms, (1.0 - p0) / (n_arms - 1))
        pi[target] = p0
        return pi
    pi = np.asarray(start, dtype=np.float64)
    if pi.shape != (n_arms,):
        raise ValueError(f"the start vector needs one probability per arm ({n_arms}), got {len(pi)}: {pi.tolist()}")
    if not (np.isfinite(pi).all() and (pi > 0).all()):
        raise ValueError(f"start probabilities must be finite and > 0, got {pi.tolist()}")
    if abs(pi.sum() - 1.0) > 1e-9:
        raise ValueError(f"start probabilities must sum to 1, got {pi.tolist()} (sum {pi.sum():.12g})")
    return pi / pi.sum()


def gravity_well_start(p0: float, second: float = 0.95, rest: float = 0.05) -> tuple[float, float, float]:
    """The three-arm gravity-well start (p₀, second − p₀, rest), for rewards (1, 0.9, 0)."""
    if not 0.0 < p0 < second:
        raise ValueError(f"p0 must be in (0, {second}) for the gravity-well start, got {p0}")
    return (p0, second - p0, rest)


def expected_reward(probs: Tensor, rewards: Sequence[float]) -> Tensor:
    """J(π) = r_ref + Σ_a π_a (r_a − r_ref), r_ref the reward of the most probable arm.

    The value equals Σ_a π_a r_a, but its gradient ∂J/∂z_a = π_a (r_a − J) is then formed without
    the cancellation r_a − J ≈ 0 that would swamp it in rounding error once the other arms' π < 1e-13.
    """
    r = torch.tensor(tuple(rewards), dtype=probs.dtype, device=probs.device)
    r_ref = r[int(torch.argmax(probs.detach()))]
    return r_ref + (probs * (r - r_ref)).sum()


class KArmedBandit(gym.Env):
    """``ntrl/KArmedBandit-v0``: a one-step, one-state bandit with K arms and exact expected reward."""

    metadata = {"render_modes": []}

    def __init__(self, rewards: Sequence[float] = GRAVITY_WELL_REWARDS, noise_std: float = 0.0):
        self._rewards = check_rewards(rewards, noise_std)
        self.noise_std = float(noise_std)
        self.observation_space = gym.spaces.Box(low=0.0, high=1.0, shape=(1,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(len(self._rewards))

    @property
    def rewards(self) -> tuple[float, ...]:
        """r_a, indexed by arm."""
        return self._rewards

    @property
    def n_arms(self) -> int:
        return len(self._rewards)

    @staticmethod
    def observation() -> np.ndarray:
        return np.ones(1, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return self.observation(), {}

    def _check_action(self, action) -> None:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an arm in [0, {self.n_arms - 1}], got {action!r}")

    def _info(self, action: int) -> dict[str, Any]:
        return {"arm": action}

    def step(self, action):
        self._check_action(action)
        reward = self.rewards[int(action)]
        if self.noise_std > 0:
            reward += float(self.np_random.normal(0.0, self.noise_std))
        return self.observation(), reward, True, False, self._info(int(action))

    # ------------------------------------------------------------------ exact model
    def exact_states(self, view=None) -> tuple[Tensor, Tensor]:
        """The states of the model and their visitation weights: one state, weight 1."""
        return torch.ones(1, 1), torch.ones(1)

    def exact_expected_reward(self, view) -> Tensor:
        """J(π) = Σ_a π(a) r_a, differentiable in the view's parameters (:func:`expected_reward`)."""
        obs, _ = self.exact_states()
        return expected_reward(view.probs(obs)[0], self.rewards)


class KArmedBanditVector(VectorEnv):
    """``num_envs`` K-armed bandits stepped together in numpy.

    Every episode is one step, so every step ends every sub-environment's episode; the autoreset
    mode is same-step: the observation returned is the next episode's (the constant [1]), and
    ``info`` holds the arm pulled. Reward noise is drawn from the vector env's one generator, in
    sub-environment order.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.SAME_STEP}

    def __init__(self, num_envs: int = 1, rewards: Sequence[float] = GRAVITY_WELL_REWARDS, noise_std: float = 0.0,
                 render_mode: str | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = int(num_envs)
        single = KArmedBandit(rewards, noise_std)
        self._rewards = np.asarray(single.rewards, dtype=np.float64)
        self.noise_std = single.noise_std
        self.render_mode = render_mode
        self.single_observation_space = single.observation_space
        self.single_action_space = single.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

    def _obs(self) -> np.ndarray:
        return np.ones((self.num_envs, 1), dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return self._obs(), {}

    def step(self, actions):
        a = np.asarray(actions)
        if a.shape != (self.num_envs,) or not np.issubdtype(a.dtype, np.integer) or \
                (a < 0).any() or (a >= len(self._rewards)).any():
            raise ValueError(f"actions must be {self.num_envs} arms in [0, {len(self._rewards) - 1}], got {actions!r}")
        reward = self._rewards[a]
        if self.noise_std > 0:
            reward = reward + self.np_random.normal(0.0, self.noise_std, size=self.num_envs)
        done = np.ones(self.num_envs, dtype=bool)
        return self._obs(), reward, done, np.zeros(self.num_envs, dtype=bool), {"arm": a.astype(np.int64)}
