"""The juice-approach gridworld (SCIENCE.md §2): ``ntrl/JuiceGridworld-v0``.

An N×N grid holds the agent and one juice item. Actions: 0 up, 1 down, 2 left, 3 right, 4 stay;
a move into a wall leaves the agent where it is. Distance is **Manhattan**,
dist = |Δrow| + |Δcol|, so with ``view_radius = 1`` the juice is *seen* exactly when one move
lands on it.

Each step the juice is *visible* with probability 1 − ``hide_prob`` (drawn afresh for every
state, independently of everything else). The agent **sees** the juice when it is visible and
dist ≤ ``view_radius``. An action **approaches** when the juice is seen and the move reduces
dist. When the agent lands on the juice's cell the juice is consumed and respawns at a uniformly
random cell other than the agent's (from the env's seeded generator); it pays ``reward`` if it was
visible and nothing if it was hidden (a hidden juice is spoiled). Episodes are truncated after
``horizon`` steps (never terminated).

Properties of the juice example, over the state-visitation distribution d(s):

    F = Σ_{s seen} d(s)                                   how often juice is seen
    P = Σ_{s seen} d(s) π(approach | s) / F               how often it is approached when seen
    R̄ = Σ_s d(s) Σ_a π(a|s) r(s, a)                       expected reward per step

With ``view_radius = 1`` a reward is paid exactly when a seen juice is approached, so R̄ = r·F·P
as functions of θ. With a larger radius, approaches from dist ≥ 2 pay nothing and
R̄ = r·Σ_{seen, dist=1} d π(approach) = c·r·F·P, with c = the share of seen-weighted approach
probability that comes from dist = 1 — and c itself depends on θ.

**Observation** (float32, shape (3,)): ``[seen, Δcol/r, Δrow/r]`` where Δ = juice − agent and
r = ``view_radius``; all zeros when the juice is not seen. The offsets lie in [−1, 1] and
|Δcol| + |Δrow| ≥ 1 when seen. The observation is a function of the state (agent cell, juice
cell, visibility), which is what the exact model needs; it never shows the agent's position.

``info`` after a step: ``juice_seen`` (seen in the observation the action was chosen from),
``approached`` (that action approached it), ``ate`` (the juice was consumed this step); after a
reset: ``juice_seen``.

``JuiceGridworldVector`` is the native vector form (numpy, next-step autoreset), made by
``gym.make_vec("ntrl/JuiceGridworld-v0", num_envs=n, vectorization_mode="vector_entry_point")``.
``tabular_model()`` gives the exact :class:`ntrl.engine.exact_model.TabularMDP` of a configuration
with at most ``MAX_TABULAR_STATES`` states.
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

UP, DOWN, LEFT, RIGHT, STAY = range(5)
ACTION_NAMES = ("up", "down", "left", "right", "stay")
# (Δrow, Δcol) of each action
MOVES = np.array([(-1, 0), (1, 0), (0, -1), (0, 1), (0, 0)], dtype=np.int64)
N_ACTIONS = 5
OBS_DIM = 3
MAX_TABULAR_STATES = 20_000


def validate_juice_args(size: int, view_radius: int, horizon: int, reward: float, hide_prob: float) -> None:
    if int(size) != size or size < 2:
        raise ValueError(f"size must be an integer >= 2 (a grid smaller than 2×2 has no room for juice), got {size}")
    if int(view_radius) != view_radius or view_radius < 1:
        raise ValueError(f"view_radius must be an integer >= 1, got {view_radius}")
    if int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon must be an integer >= 1, got {horizon}")
    if not np.isfinite(reward):
        raise ValueError(f"reward must be finite, got {reward}")
    if not 0.0 <= hide_prob < 1.0:
        raise ValueError(f"hide_prob must be in [0, 1), got {hide_prob}")


def observe(agent: np.ndarray, juice: np.ndarray, visible: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(obs (n, 3) float32, seen (n,) bool) for arrays of agent/juice cells (n, 2) as (row, col)."""
    delta = juice - agent
    dist = np.abs(delta).sum(-1)
    seen = visible & (dist <= radius)
    obs = np.zeros((agent.shape[0], OBS_DIM), dtype=np.float32)
    obs[:, 0] = seen
    obs[:, 1] = np.where(seen, delta[:, 1] / radius, 0.0)
    obs[:, 2] = np.where(seen, delta[:, 0] / radius, 0.0)
    return obs, seen


def approach_mask(obs: np.ndarray, radius: int) -> np.ndarray:
    """(n, 5) bool: which actions approach (reduce Manhattan distance to) the seen juice.
    A function of the observation alone; all False where the juice is not seen."""
    obs = np.asarray(obs, dtype=np.float64)
    dcol = np.rint(obs[:, 1] * radius)
    drow = np.rint(obs[:, 2] * radius)
    dist = np.abs(dcol) + np.abs(drow)
    new = np.abs(drow[:, None] - MOVES[None, :, 0]) + np.abs(dcol[:, None] - MOVES[None, :, 1])
    return (obs[:, :1] > 0.5) & (new < dist[:, None])


def seen_observations(size: int, radius: int) -> np.ndarray:
    """Every observation in which the juice is seen (the probe states), shape (m, 3), ordered."""
    rows = []
    for drow in range(-radius, radius + 1):
        for dcol in range(-radius, radius + 1):
            d = abs(drow) + abs(dcol)
            if 1 <= d <= radius and abs(drow) < size and abs(dcol) < size:
                rows.append((1.0, dcol / radius, drow / radius))
    return np.array(rows, dtype=np.float32)


def observation_index(obs, radius: int):
    """Integer index of an observation for tabular policies: 0 = juice not seen, else
    1 + (Δrow + r)(2r + 1) + (Δcol + r). Works on numpy arrays and torch tensors (N, 3)."""
    side = 2 * radius + 1
    if isinstance(obs, np.ndarray):
        dcol = np.rint(obs[:, 1] * radius).astype(np.int64) + radius
        drow = np.rint(obs[:, 2] * radius).astype(np.int64) + radius
        return np.where(obs[:, 0] > 0.5, 1 + drow * side + dcol, 0)
    import torch

    dcol = torch.round(obs[:, 1] * radius).long() + radius
    drow = torch.round(obs[:, 2] * radius).long() + radius
    return torch.where(obs[:, 0] > 0.5, 1 + drow * side + dcol, torch.zeros_like(dcol))


def n_observation_indices(radius: int) -> int:
    return 1 + (2 * radius + 1) ** 2


def _move(agent: np.ndarray, action: np.ndarray, size: int) -> np.ndarray:
    return np.minimum(np.maximum(agent + MOVES[action], 0), size - 1)  # np.clip's values, without its overhead


def _respawn(agent_cell: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform cell ≠ agent_cell (flat indices), vectorised."""
    k = rng.integers(0, size * size - 1, size=agent_cell.shape[0])
    return k + (k >= agent_cell)


class JuiceGridworld(gym.Env):
    """``ntrl/JuiceGridworld-v0``: see the module docstring for the rules and the encoding."""

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, size: int = 5, view_radius: int = 1, horizon: int = 50, reward: float = 1.0,
                 hide_prob: float = 0.0, render_mode: str | None = None):
        validate_juice_args(size, view_radius, horizon, reward, hide_prob)
        self.size, self.view_radius, self.horizon = int(size), int(view_radius), int(horizon)
        self.reward, self.hide_prob = float(reward), float(hide_prob)
        self.render_mode = render_mode
        r = 1.0
        self.observation_space = gym.spaces.Box(low=np.array([0.0, -r, -r], dtype=np.float32),
                                                high=np.array([1.0, r, r], dtype=np.float32), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(N_ACTIONS)
        self._agent = np.zeros(2, dtype=np.int64)
        self._juice = np.zeros(2, dtype=np.int64)
        self._visible = True
        self._t = 0

    # ------------------------------------------------------------------ gym API
    def _obs(self) -> tuple[np.ndarray, bool]:
        obs, seen = observe(self._agent[None], self._juice[None], np.array([self._visible]), self.view_radius)
        return obs[0], bool(seen[0])

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        n = self.size
        a = int(self.np_random.integers(n * n))
        j = int(_respawn(np.array([a]), n, self.np_random)[0])
        self._agent = np.array(divmod(a, n), dtype=np.int64)
        self._juice = np.array(divmod(j, n), dtype=np.int64)
        self._visible = bool(self.np_random.random() >= self.hide_prob)
        self._t = 0
        obs, seen = self._obs()
        return obs, {"juice_seen": seen}

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an integer in [0, 4] (up, down, left, right, stay), got {action!r}")
        a = int(action)
        obs, seen = self._obs()
        approached = bool(approach_mask(obs[None], self.view_radius)[0, a])
        self._agent = _move(self._agent, a, self.size)
        ate = bool((self._agent == self._juice).all())
        reward = self.reward if (ate and self._visible) else 0.0
        if ate:
            cell = self._agent[0] * self.size + self._agent[1]
            j = int(_respawn(np.array([cell]), self.size, self.np_random)[0])
            self._juice = np.array(divmod(j, self.size), dtype=np.int64)
        self._visible = bool(self.np_random.random() >= self.hide_prob)
        self._t += 1
        obs, _ = self._obs()
        truncated = self._t >= self.horizon
        return obs, reward, False, truncated, {"juice_seen": seen, "approached": approached, "ate": ate}

    def render(self):
        grid = [["." for _ in range(self.size)] for _ in range(self.size)]
        grid[self._juice[0]][self._juice[1]] = "J" if self._visible else "j"
        grid[self._agent[0]][self._agent[1]] = "A"
        return "\n".join("".join(row) for row in grid)

    # ------------------------------------------------------------------ exact model
    def tabular_model(self, max_states: int = MAX_TABULAR_STATES):
        """The exact :class:`~ntrl.engine.exact_model.TabularMDP` of this configuration."""
        return tabular_model(self.size, self.view_radius, self.horizon, self.reward, self.hide_prob, max_states)


def n_model_states(size: int, hide_prob: float = 0.0) -> int:
    """States of the exact model: (agent cell, juice cell ≠ agent cell, visible), N²(N² − 1)·(2 if hide_prob > 0 else 1)."""
    C = int(size) ** 2
    return C * (C - 1) * (2 if hide_prob > 0 else 1)


@functools.lru_cache(maxsize=16)  # a model is never changed after it is built: runs and populations share it
def tabular_model(size: int = 5, view_radius: int = 1, horizon: int = 50, reward: float = 1.0,
                  hide_prob: float = 0.0, max_states: int = MAX_TABULAR_STATES):
    """Enumerate the juice gridworld as a finite-horizon TabularMDP.

    States are (agent cell, juice cell ≠ agent cell, visible) — S = N²(N² − 1)·(2 if
    hide_prob > 0 else 1). The model carries extra arrays: ``seen`` (S,) bool,
    ``approach`` (S, A) bool, ``dist`` (S,) Manhattan distance, ``agent``/``juice`` (S, 2).
    Raises :class:`~ntrl.engine.exact_model.ModelTooLargeError` above ``max_states`` states.
    """
    from ntrl.engine.exact_model import TabularMDP, check_model_size

    validate_juice_args(size, view_radius, horizon, reward, hide_prob)
    n, C = int(size), int(size) ** 2
    vis_values = (1, 0) if hide_prob > 0 else (1,)
    V = len(vis_values)
    S = n_model_states(size, hide_prob)
    check_model_size(S, max_states, f"the exact model of the {n}×{n} juice gridworld")
    a_cell = np.repeat(np.arange(C), C - 1)
    j_off = np.tile(np.arange(C - 1), C)
    j_cell = j_off + (j_off >= a_cell)  # juice cell ≠ agent cell
    a_cell, j_cell = np.repeat(a_cell, V), np.repeat(j_cell, V)
    vis = np.tile(np.array(vis_values, dtype=bool), C * (C - 1))

    def index(a, j, v):  # (agent cell, juice cell, visible) -> state index
        jo = j - (j > a)
        return (a * (C - 1) + jo) * V + (0 if V == 1 else (1 - v.astype(np.int64)))

    agent = np.stack(divmod(a_cell, n), -1)
    juice = np.stack(divmod(j_cell, n), -1)
    obs, seen = observe(agent, juice, vis, view_radius)
    approach = approach_mask(obs, view_radius)
    vis_probs = (1.0 - hide_prob, hide_prob) if V == 2 else (1.0,)

    rows, cols, probs = [], [], []
    rewards = np.zeros((S, N_ACTIONS))
    sidx = np.arange(S)
    for a in range(N_ACTIONS):
        new_agent = np.clip(agent + MOVES[a], 0, n - 1)
        new_cell = new_agent[:, 0] * n + new_agent[:, 1]
        ate = new_cell == j_cell
        rewards[:, a] = np.where(ate & vis, reward, 0.0)
        sa = sidx * N_ACTIONS + a
        for v, pv in zip(vis_values, vis_probs):
            keep = ~ate
            rows.append(sa[keep])
            cols.append(index(new_cell[keep], j_cell[keep], np.full(keep.sum(), v)))
            probs.append(np.full(keep.sum(), pv))
            # eaten: juice respawns uniformly on the C − 1 cells other than the agent's
            e = np.nonzero(ate)[0]
            for k in range(C - 1):
                jn = k + (k >= new_cell[e])
                rows.append(sa[e])
                cols.append(index(new_cell[e], jn, np.full(e.size, v)))
                probs.append(np.full(e.size, pv / (C - 1)))
    initial = np.zeros(S)
    for v, pv in zip(vis_values, vis_probs):
        initial[vis == bool(v)] = pv / (C * (C - 1))
    model = TabularMDP((np.concatenate(rows), np.concatenate(cols), np.concatenate(probs)),
                       rewards, initial, obs, horizon=horizon)
    model.seen, model.approach = seen, approach
    model.dist = np.abs(juice - agent).sum(-1)
    model.agent, model.juice, model.visible = agent, juice, vis
    return model


class JuiceGridworldVector(VectorEnv):
    """``num_envs`` juice gridworlds stepped together in numpy (next-step autoreset).

    Same rules, encoding and ``info`` keys as :class:`JuiceGridworld` (``info`` values are arrays
    of shape (num_envs,)). All sub-environments share one seeded generator, or, after
    :meth:`seed_blocks`, each of k equal blocks of them has its own, and then draws exactly what a
    vector env of that block's size seeded alike would draw (a population's members, one block
    each). With next-step autoreset, the ``step`` after an episode's truncation resets that
    sub-environment, ignores its action, and returns the reset observation with reward 0.
    """

    metadata = {"render_modes": [], "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs: int = 1, size: int = 5, view_radius: int = 1, horizon: int = 50,
                 reward: float = 1.0, hide_prob: float = 0.0, render_mode: str | None = None,
                 max_episode_steps: int | None = None):
        validate_juice_args(size, view_radius, horizon, reward, hide_prob)
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if max_episode_steps is not None:
            horizon = min(horizon, int(max_episode_steps))
        self.num_envs = int(num_envs)
        self.size, self.view_radius, self.horizon = int(size), int(view_radius), int(horizon)
        self.reward, self.hide_prob = float(reward), float(hide_prob)
        self.render_mode = render_mode
        single = JuiceGridworld(size, view_radius, horizon, reward, hide_prob)
        self.single_observation_space = single.observation_space
        self.single_action_space = single.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.agent = np.zeros((self.num_envs, 2), dtype=np.int64)
        self.juice = np.zeros((self.num_envs, 2), dtype=np.int64)
        self.visible = np.ones(self.num_envs, dtype=bool)
        self.t = np.zeros(self.num_envs, dtype=np.int64)
        self.prev_done = np.zeros(self.num_envs, dtype=bool)
        self.block_rngs: list[np.random.Generator] | None = None

    def seed_blocks(self, seeds: list[int], rewards: list[float] | None = None) -> None:
        """Give each of ``len(seeds)`` equal blocks of sub-environments its own generator, the one
        ``reset(seed=s)`` gives a vector env (gymnasium's ``seeding.np_random(s)``), and, with
        ``rewards``, its own reward for drinking."""
        from gymnasium.utils import seeding

        if self.num_envs % len(seeds):
            raise ValueError(f"{self.num_envs} sub-environments do not split into {len(seeds)} equal blocks")
        self.set_block_generators([seeding.np_random(s)[0] for s in seeds], rewards)

    def set_block_generators(self, rngs: list[np.random.Generator], rewards: list[float] | None = None) -> None:
        """Blocks with these generators (and rewards) as they are, e.g. the ones of another
        instance whose other blocks have stopped."""
        self.block_rngs = list(rngs)
        if rewards is not None:
            self.reward = np.repeat(np.asarray(rewards, dtype=np.float64), self.num_envs // len(rngs))

    def _blocks(self) -> list[tuple[slice, np.random.Generator]]:
        if self.block_rngs is None:
            return [(slice(0, self.num_envs), self.np_random)]
        size = self.num_envs // len(self.block_rngs)
        return [(slice(i * size, (i + 1) * size), rng) for i, rng in enumerate(self.block_rngs)]

    def _reset_some(self, mask: np.ndarray) -> None:
        n = self.size
        for block, rng in self._blocks():
            idx = np.flatnonzero(mask[block]) + block.start
            k = len(idx)
            if k == 0:
                continue
            a = rng.integers(n * n, size=k)
            j = _respawn(a, n, rng)
            self.agent[idx] = np.stack(divmod(a, n), -1)
            self.juice[idx] = np.stack(divmod(j, n), -1)
            self.visible[idx] = rng.random(k) >= self.hide_prob
            self.t[idx] = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.block_rngs = None
        self._reset_some(np.ones(self.num_envs, dtype=bool))
        self.prev_done[:] = False
        obs, seen = observe(self.agent, self.juice, self.visible, self.view_radius)
        return obs, {"juice_seen": seen, "_juice_seen": np.ones(self.num_envs, dtype=bool)}

    def _check_actions(self, actions) -> np.ndarray:
        actions = np.asarray(actions, dtype=np.int64).reshape(self.num_envs)
        if ((actions < 0) | (actions >= N_ACTIONS)).any():
            raise ValueError("actions must be integers in [0, 4] (up, down, left, right, stay)")
        return actions

    def _advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The dynamics of one step, autoreset included: (reward, ate, done), where ``done``
        marks the sub-environments that ended last step and start again now (reward 0)."""
        n, B = self.size, self.num_envs
        self.agent = _move(self.agent, actions, n)
        ate = (self.agent == self.juice).all(-1)
        reward = np.where(ate & self.visible, self.reward, 0.0)
        uniforms = np.empty(B)
        blocks = self._blocks()
        # which blocks have a juice to respawn (one test for all of them)
        eaten = ate.reshape(len(blocks), -1).any(1).tolist() if ate.any() else [False] * len(blocks)
        for (block, rng), respawn in zip(blocks, eaten):  # each block's draws in the order of a vector env of its own
            if respawn:
                idx = np.flatnonzero(ate[block]) + block.start
                j = _respawn(self.agent[idx, 0] * n + self.agent[idx, 1], n, rng)
                self.juice[idx] = np.stack(divmod(j, n), -1)
            rng.random(out=uniforms[block])  # the stream of rng.random(block size)
        self.visible = uniforms >= self.hide_prob
        self.t += 1
        truncated = self.t >= self.horizon
        # next-step autoreset: sub-environments that ended last step start again now
        done = self.prev_done
        if done.any():
            self._reset_some(done)
            reward[done] = 0.0
            truncated[done] = False
        self.prev_done = truncated
        return reward, ate, done

    def step(self, actions):
        actions = self._check_actions(actions)
        obs, seen = observe(self.agent, self.juice, self.visible, self.view_radius)
        approached = approach_mask(obs, self.view_radius)[np.arange(self.num_envs), actions]
        reward, ate, done = self._advance(actions)
        if done.any():
            seen, approached, ate = seen & ~done, approached & ~done, ate & ~done
        obs, _ = observe(self.agent, self.juice, self.visible, self.view_radius)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = self.prev_done.copy()
        mask = np.ones(self.num_envs, dtype=bool)
        info = {"juice_seen": seen, "approached": approached, "ate": ate,
                "_juice_seen": mask, "_approached": mask, "_ate": mask}
        return obs, reward, terminated, truncated, info

    def observation_keys(self) -> np.ndarray:
        """(num_envs,) int64: :func:`observation_index` of each sub-environment's observation,
        formed from its state without the float observation."""
        r = self.view_radius
        delta = self.juice - self.agent
        seen = self.visible & (np.abs(delta).sum(-1) <= r)
        return np.where(seen, 1 + (delta[:, 0] + r) * (2 * r + 1) + (delta[:, 1] + r), 0)

    def step_keys(self, actions) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`step` for a caller that needs only (the new observations' keys
        (:meth:`observation_keys`), the rewards): the same dynamics and draws, without forming
        the float observations, the approach masks or ``info``."""
        reward, _, _ = self._advance(self._check_actions(actions))
        return self.observation_keys(), reward
