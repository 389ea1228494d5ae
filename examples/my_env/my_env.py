"""A user's own environment and properties, kept in the user's own module (not in ntrl).

    ntrl train --env my_env:Corridor-v0 --property my_env:prefers_right

``my_env:Corridor-v0`` makes gymnasium (and ntrl) import this module first, which registers
``Corridor-v0``; ``--property my_env:prefers_right`` tracks the function below.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import torch

LEFT, STAY, RIGHT = 0, 1, 2


class Corridor(gym.Env):
    """Walk a corridor of ``length`` cells from the middle; juice (+1) waits at the right end.

    Observation: the one-hot position (Box, float32). Actions: 0 left, 1 stay, 2 right.
    The episode ends at either end (reward 1 on the right, 0 on the left) or after
    ``max_steps`` steps.
    """

    metadata = {"render_modes": []}

    def __init__(self, length: int = 7, max_steps: int = 20):
        if length < 3:
            raise ValueError(f"length must be >= 3, got {length}")
        self.length, self.max_steps = int(length), int(max_steps)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(self.length,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(3)
        self.pos, self.t = self.length // 2, 0

    def _obs(self) -> np.ndarray:
        obs = np.zeros(self.length, dtype=np.float32)
        obs[self.pos] = 1.0
        return obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = self.length // 2, 0
        return self._obs(), {}

    def step(self, action):
        self.pos += {LEFT: -1, STAY: 0, RIGHT: 1}[int(action)]
        self.t += 1
        at_goal = self.pos == self.length - 1
        terminated = bool(at_goal or self.pos == 0)
        truncated = bool(not terminated and self.t >= self.max_steps)
        return self._obs(), float(at_goal), terminated, truncated, {}


if "Corridor-v0" not in gym.registry:
    gym.register(id="Corridor-v0", entry_point=Corridor)


def start_state(length: int = 7) -> torch.Tensor:
    obs = torch.zeros(1, length)
    obs[0, length // 2] = 1.0
    return obs


def prefers_right(view):
    """X = π(right | start cell): how much the agent wants to head for the juice at the start."""
    return view.probs(start_state())[0, RIGHT]


def right_minus_left(view, probe_states):
    """X(s) = π(right | s) − π(left | s) at every probe state (a batch: one value per state)."""
    p = view.probs(probe_states)
    return p[:, RIGHT] - p[:, LEFT]


def heads_for_juice(obs, action) -> bool:
    """An event on (observation, action): stepping right from anywhere but the left end."""
    return action == RIGHT and int(np.argmax(obs)) > 0


def broken_after_a_while(view):
    """A property that fails once the policy prefers right a little more (for the error path)."""
    x = prefers_right(view)
    if float(x.detach()) > 0.42:
        raise RuntimeError("this property only works while π(right) <= 0.42")
    return x


def every_cell(env=None):
    """Probe states from a callable (``--probe-states my_env:every_cell``): one per inner cell."""
    length = env.unwrapped.length if env is not None else 7
    return np.eye(length, dtype=np.float32)[1:-1]
