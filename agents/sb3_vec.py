"""A Gymnasium vector env as a Stable-Baselines3 ``VecEnv``: ``GymnasiumVecEnv(venv)``.

SB3 rejects ``gymnasium.vector.VectorEnv`` objects as they are: it wants ``step_async``/
``step_wait``, a single ``dones`` array, one info dict per env, and the reset observation in
the step that ended an episode, with the last observation under ``info["terminal_observation"]``.

Gymnasium vector envs declare when they reset (``metadata["autoreset_mode"]``):

- ``SAME_STEP``: the env already returns the reset observation; the final one is in
  ``infos["final_obs"]`` and is moved to ``terminal_observation``.
- ``NEXT_STEP`` (gymnasium's default) and ``DISABLED``: the adapter resets the finished
  sub-envs itself with ``reset(options={"reset_mask": done})``, so the env never spends a step
  on its own autoreset, and returns the reset observations in the same step.

    venv = GymnasiumVecEnv(gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync"))
    PPO("MlpPolicy", venv).learn(10_000)
"""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import VecEnv, VecEnvIndices, VecEnvStepReturn

try:
    from gymnasium.vector import AutoresetMode
except ImportError:  # pragma: no cover - gymnasium < 1.1
    AutoresetMode = None

__all__ = ["GymnasiumVecEnv"]


def _mode_name(mode: Any) -> str:
    if mode is None:
        return "next_step"
    return str(getattr(mode, "value", mode)).lower().replace("_", "").replace("nextstep", "next_step").replace("samestep", "same_step")


class GymnasiumVecEnv(VecEnv):
    """SB3 ``VecEnv`` over a ``gymnasium.vector.VectorEnv`` (sync, async or a native one)."""

    def __init__(self, venv: gym.vector.VectorEnv):
        if not isinstance(venv, gym.vector.VectorEnv):
            raise TypeError(f"GymnasiumVecEnv wraps a gymnasium.vector.VectorEnv, got {type(venv).__name__}")
        self.venv = venv
        self.autoreset_mode = _mode_name(venv.metadata.get("autoreset_mode"))
        if self.autoreset_mode not in ("same_step", "next_step", "disabled"):
            raise ValueError(f"unknown autoreset mode {self.autoreset_mode!r}")
        self._actions: np.ndarray | None = None
        super().__init__(venv.num_envs, venv.single_observation_space, venv.single_action_space)

    # ------------------------------------------------------------------ helpers
    def _per_env_infos(self, infos: dict[str, Any]) -> list[dict[str, Any]]:
        """Gymnasium's dict of arrays (with ``_key`` masks) → one dict per env."""
        out: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for key, value in infos.items():
            if key.startswith("_"):
                continue
            mask = infos.get("_" + key)
            for i in range(self.num_envs):
                if mask is not None and not mask[i]:
                    continue
                if isinstance(value, dict):
                    out[i][key] = self._per_env_infos(value)[i] if value else {}
                else:
                    try:
                        out[i][key] = value[i]
                    except (TypeError, IndexError, KeyError):
                        out[i][key] = value
        return out

    # ------------------------------------------------------------------ VecEnv API
    def reset(self):
        seeds: Any = None if all(s is None for s in self._seeds) else list(self._seeds)
        if seeds is not None and seeds[0] is not None and seeds == [seeds[0] + i for i in range(self.num_envs)]:
            seeds = seeds[0]  # what SB3's seed() sets; gymnasium's vector envs (native ones too) take an int
        options = self._options[0] if any(self._options) else None
        obs, infos = self.venv.reset(seed=seeds, options=options)
        self.reset_infos = self._per_env_infos(infos)
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, infos = self.venv.step(self._actions)
        terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
        dones = terminated | truncated
        per_env = self._per_env_infos({k: v for k, v in infos.items()
                                       if k not in ("final_obs", "_final_obs", "final_info", "_final_info")})
        obs = np.array(obs, copy=True)
        if dones.any():
            if self.autoreset_mode == "same_step":
                final_obs = infos["final_obs"]
                final_info = self._per_env_infos(infos.get("final_info", {})) if infos.get("final_info") else None
                for i in np.flatnonzero(dones):
                    per_env[i]["terminal_observation"] = final_obs[i]
                    if final_info is not None:
                        per_env[i] = {**final_info[i], **per_env[i]}
            else:
                for i in np.flatnonzero(dones):
                    per_env[i]["terminal_observation"] = np.array(obs[i], copy=True)
                new_obs, reset_infos = self.venv.reset(options={"reset_mask": dones})
                new_obs = np.asarray(new_obs)
                obs[dones] = new_obs[dones]
                reset_per_env = self._per_env_infos(reset_infos)
                for i in np.flatnonzero(dones):
                    self.reset_infos[i] = reset_per_env[i]
        for i in range(self.num_envs):
            per_env[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
        return obs, np.asarray(rewards, dtype=np.float32), dones, per_env

    def close(self) -> None:
        self.venv.close()

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        if attr_name == "render_mode":
            return [getattr(self.venv, "render_mode", None)] * len(self._indices(indices))
        try:
            values = self.venv.get_attr(attr_name)
        except AttributeError:
            values = [getattr(self.venv, attr_name)] * self.num_envs
        return [values[i] for i in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if indices is not None and len(self._indices(indices)) != self.num_envs:
            raise NotImplementedError("GymnasiumVecEnv.set_attr sets an attribute on all sub-envs at once")
        self.venv.set_attr(attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        results = self.venv.call(method_name, *method_args, **method_kwargs)
        return [results[i] for i in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        envs: Sequence[Any] | None = getattr(self.venv, "envs", None)
        if envs is None:
            return [False] * len(self._indices(indices))
        from stable_baselines3.common.env_util import is_wrapped

        return [is_wrapped(envs[i], wrapper_class) for i in self._indices(indices)]

    def get_images(self):
        return [None] * self.num_envs
