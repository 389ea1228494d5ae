"""Any Gymnasium environment with a Discrete action space: ``ntrl train --env ID``.

    ntrl train --env CartPole-v1 --steps 50 --property action:1
    ntrl train --env my_env:MyEnv-v0 --env-kwargs '{"size": 5}' --property my_env:prefers_left
    ntrl train --env FrozenLake-v1 --env-kwargs '{"is_slippery": false}' --mode exact --property return
    ntrl train --env CartPole-v1 --algo ppo --steps 20 --n-steps 128

``ID`` is any registered id, including gymnasium's ``module:EnvName-v0`` form (the module is
imported first, from the working directory too). The env is checked with gymnasium's
``check_env`` before training. The headline property ``P`` is π(target | s) over the probe
states; ``--property`` adds more (see :mod:`ntrl.experiments.user_properties`).

The utility REINFORCE ascends is the sampled policy-gradient surrogate of a batch of episodes
(``--mode sampled``, any env; rewards-to-go discounted by ``--gamma``), or the exact expected
return J(π) = E[Σ_{t<H} r_t] of a tabular model (``--mode exact``; toy-text envs exposing
``env.unwrapped.P``, converted by :func:`toy_text_model` to :class:`ntrl.engine.exact_model.TabularMDP`,
H = ``--horizon`` or the env's time limit, undiscounted). Without a model there is no exact
return: the records hold the sampled surrogate ``U`` and the batch's mean episode return.
``--algo ppo|a2c`` trains with Stable-Baselines3 instead (:mod:`ntrl.experiments.sb3_train`).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import ntrl.envs  # noqa: F401  (registers ntrl/TwoArmedBandit-v0 and ntrl/JuiceGridworld-v0 for --env)
from ntrl.agents.optimizers import make_optimizer
from ntrl.agents.policies import make_policy
from ntrl.agents.reinforce import collect_episodes, exact_gradient, sampled_gradient
from ntrl.config import ConfigError, Experiment, GradientMode, TrainConfig, option
from ntrl.engine.exact_model import TabularMDP
from ntrl.properties import ActionProbability, LogOdds
from ntrl.experiments.user_properties import (
    RunContext, check_properties, import_user_module, load_probe_states, parse_property, sample_rows,
)

ALGOS = ("reinforce", "ppo", "a2c")
Algo = Literal[ALGOS]
# Learning rates when --lr is not given: ntrl's for REINFORCE, SB3's own defaults for PPO and A2C.
DEFAULT_LR = {"reinforce": 0.01, "ppo": 3e-4, "a2c": 7e-4}
# Flags of ntrl's REINFORCE loop that SB3's algorithms do not use.
REINFORCE_ONLY = ("optimizer", "p0", "baseline", "batch_size", "policy", "npg_damping", "fisher", "dtype", "mode",
                  "stop_at_p", "stop_below_p", "track_per_decade", "adam_beta1", "adam_beta2", "adam_eps",
                  "price_scales", "noise", "vector_mode")


def parse_env_kwargs(text: str | dict) -> dict:
    if isinstance(text, dict):
        return text
    try:
        kwargs = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ConfigError("--env-kwargs", f"not valid JSON ({e.msg} at char {e.pos}): {text!r}") from None
    if not isinstance(kwargs, dict):
        raise ConfigError("--env-kwargs", f"must be a JSON object like '{{\"size\": 5}}', got {text!r}")
    return kwargs


def apply_wrappers(env: gym.Env, wrappers: list[str]) -> gym.Env:
    """Each ``--wrapper MODULE:CALLABLE`` in order, ``env = W(env)``, with one-line errors."""
    from ntrl.experiments.user_properties import load_object

    for spec in wrappers:
        wrapper = load_object(spec, "--wrapper")
        if not callable(wrapper):
            raise ConfigError("--wrapper", f"{spec} is not callable")
        try:
            wrapped = wrapper(env)
        except Exception as e:
            raise ConfigError("--wrapper", f"{spec} raised {type(e).__name__} on {env}: {e}") from None
        if not isinstance(wrapped, gym.Env):
            raise ConfigError("--wrapper", f"{spec}(env) returned a {type(wrapped).__name__}, not a gymnasium Env")
        env = wrapped
    return env


def space_text(space: gym.Space) -> str:
    """A space in a few words for an error line: a Box by its shape and dtype (its bounds can fill a screen)."""
    if isinstance(space, gym.spaces.Box):
        return f"a Box of shape {space.shape} ({space.dtype})"
    return str(space)


def flattenable(space: gym.Space) -> bool:
    """A Tuple or Dict whose every leaf is a Discrete or a Box: gymnasium's FlattenObservation
    turns it into one flat Box (one-hot for each Discrete)."""
    if isinstance(space, (gym.spaces.Discrete, gym.spaces.Box)):
        return True
    if isinstance(space, gym.spaces.Tuple):
        return all(flattenable(s) for s in space.spaces)
    if isinstance(space, gym.spaces.Dict):
        return all(flattenable(s) for s in space.spaces.values())
    return False


def make_env(env_id: str, env_kwargs: dict | None = None, check: bool = True, wrappers: list[str] = (),
             quiet: bool = False) -> gym.Env:
    """``gym.make(env_id, **env_kwargs)``, then each ``--wrapper`` in order, with one-line
    ConfigErrors, a Discrete-action check and gymnasium's ``check_env``; a Tuple or Dict of Box and
    Discrete observations is flattened with gymnasium's FlattenObservation (said on stderr unless
    ``quiet``)."""
    env_kwargs = env_kwargs or {}
    if ":" in env_id:
        import_user_module(env_id.split(":", 1)[0], "--env")
    try:
        env = gym.make(env_id, **env_kwargs)
    except gym.error.Error as e:  # NameNotFound, NamespaceNotFound, VersionNotFound, ...
        hint = ("" if isinstance(e, (gym.error.DeprecatedEnv, gym.error.VersionNotFound)) else
                ". Register it with gymnasium.register, or use MODULE:ID so that ntrl imports the module that registers it")
        raise ConfigError("--env", f"unknown environment {env_id!r}: {str(e).rstrip('.')}{hint}") from None
    except TypeError as e:
        raise ConfigError("--env-kwargs", f"{env_id} does not accept these keyword arguments: {e}") from None
    except Exception as e:
        raise ConfigError("--env", f"making {env_id} raised {type(e).__name__}: {e}") from None
    try:
        env = apply_wrappers(env, list(wrappers))
    except BaseException:
        env.close()
        raise
    obs_space = env.observation_space
    if isinstance(obs_space, (gym.spaces.Tuple, gym.spaces.Dict)) and flattenable(obs_space):
        env = gym.wrappers.FlattenObservation(env)
        if not quiet:
            import sys

            print(f"ntrl: note: {env_id}'s {type(obs_space).__name__} observations are flattened into one Box of "
                  f"shape {env.observation_space.shape} (gymnasium.wrappers.FlattenObservation; each Discrete "
                  f"one-hot)", file=sys.stderr)
    space = env.action_space
    if not isinstance(space, gym.spaces.Discrete):
        env.close()
        raise ConfigError("--env", f"{env_id} has a {type(space).__name__} action space: continuous and other non-Discrete "
                                   f"action spaces are not supported yet; use an env with a Discrete action space")
    obs_space = env.observation_space
    if not (isinstance(obs_space, gym.spaces.Discrete)
            or (isinstance(obs_space, gym.spaces.Box) and len(obs_space.shape) in (1, 3))):
        env.close()
        raise ConfigError("--env", f"{env_id} has observation space {obs_space}; ntrl's policies read Discrete, "
                                   f"flat (1-D) Box or image (H, W, C) observations; flatten others with "
                                   f"--wrapper MODULE:CALLABLE, e.g. --wrapper gymnasium.wrappers:FlattenObservation")
    if check:
        from gymnasium.utils.env_checker import check_env

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                check_env(env.unwrapped, skip_render_check=True)
        except Exception as e:
            env.close()
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError("--env", f"{env_id} fails gymnasium's check_env: {msg} "
                                       f"(fix the env, or pass --check-env false to skip the check)") from None
    return env


def toy_text_model(env: gym.Env, horizon: int, one_hot: bool) -> TabularMDP:
    """Gymnasium's toy-text table ``env.unwrapped.P[s][a] = [(prob, s', reward, terminated), ...]``
    as a finite-horizon :class:`ntrl.engine.exact_model.TabularMDP`.

    A transition that terminates goes to an extra absorbing state with reward 0, so
    J = E[Σ_{t<H} r_t] is the expected (undiscounted) return of an episode cut at H steps, the
    env's own time limit. r(s, a) = Σ prob·reward. The initial distribution is the env's
    ``initial_state_distrib`` (FrozenLake, CliffWalking, Taxi); the absorbing state shows the
    observation of state 0 (its actions change nothing).
    """

    u = env.unwrapped
    table = u.P
    S = len(table)
    A = int(env.action_space.n)
    done = S
    rows, cols, probs = [], [], []
    rewards = np.zeros((S + 1, A))
    for s in range(S):
        for a in range(A):
            acc: dict[int, float] = {}
            for prob, nxt, rew, term in table[s][a]:
                if prob <= 0:
                    continue
                target = done if term else int(nxt)
                acc[target] = acc.get(target, 0.0) + float(prob)
                rewards[s, a] += float(prob) * float(rew)
            total = sum(acc.values())
            for target, prob in acc.items():
                rows.append(s * A + a)
                cols.append(target)
                probs.append(prob / total)
    for a in range(A):
        rows.append(done * A + a)
        cols.append(done)
        probs.append(1.0)
    rho = getattr(u, "initial_state_distrib", None)
    if rho is None:
        raise ConfigError("--mode", f"{env.spec.id if env.spec else env}: no initial_state_distrib to build "
                                    f"the exact model from; use --mode sampled")
    initial = np.append(np.asarray(rho, dtype=np.float64), 0.0)
    initial = initial / initial.sum()
    index = np.append(np.arange(S), 0)
    observations = np.eye(S, dtype=np.float32)[index] if one_hot else index.astype(np.int64)
    return TabularMDP((np.array(rows), np.array(cols), np.array(probs)), rewards, initial, observations,
                      horizon=horizon)


def tabular_model(env: gym.Env, horizon: int, one_hot: bool) -> TabularMDP | None:
    """An exact model of a toy-text env (``env.unwrapped.P``), or None when it has none."""
    u = env.unwrapped
    if not isinstance(getattr(u, "P", None), dict) or not isinstance(env.observation_space, gym.spaces.Discrete):
        return None
    return toy_text_model(env, horizon, one_hot)


# Episode lengths when neither --horizon nor the env's own time limit gives one.
EXACT_HORIZON = 100  # the exact tabular model's H
ROLLOUT_HORIZON = 1000  # where sampled episodes are cut


def episode_horizon(env: gym.Env, horizon: int, default: int = EXACT_HORIZON) -> int:
    """``horizon`` when given (> 0), else the env's ``max_episode_steps``, else ``default``."""
    if horizon > 0:
        return horizon
    limit = env.spec.max_episode_steps if env.spec is not None else None
    return int(limit) if limit else default


@dataclass
class GymConfig(TrainConfig):
    """REINFORCE (or SB3 PPO/A2C) on any Gymnasium env with Discrete actions."""

    env: str = option("CartPole-v1", "any Gymnasium id, or MODULE:ID to import the module that registers it")
    env_kwargs: str = option("{}", "JSON object of keyword arguments for gym.make, e.g. '{\"is_slippery\": false}'")
    algo: Algo = option("reinforce", "reinforce (ntrl's own loop), ppo or a2c (Stable-Baselines3 with NTCovCallback)")
    target: int = option(0, "action whose probability over the probe states is the headline property P")
    property: list[str] = option(help="a tracked property: action:A, event:MOD:PRED, return, MOD:FUNC "
                                      "or NAME=SPEC", default_factory=list)
    probe_states: str = option("rollout", "rollout (the agent's initial rollouts, frozen), FILE.npy or MOD:FUNC")
    n_probe: int = option(32, "number of probe states taken from the rollouts")
    gamma: float = option(0.99, "discount of the sampled returns (REINFORCE --mode sampled, SB3); the exact "
                                "model is undiscounted")
    horizon: int = option(0, f"episode length H: sampled episodes are cut there, and the exact tabular model "
                             f"runs H steps (0: the env's time limit, else {ROLLOUT_HORIZON} sampled and "
                             f"{EXACT_HORIZON} exact)")
    check_env: bool = option(True, "run gymnasium's check_env on the env first")
    wrapper: list[str] = option(default_factory=list, help="MODULE:CALLABLE applied to the env after gym.make, in "
                                                           "order (repeat the flag), e.g. "
                                                           "gymnasium.wrappers:FlattenObservation")
    n_steps: int = option(128, "SB3: rollout length per env (one tracked update per rollout)")
    n_envs: int = option(1, "parallel envs: SB3's, and REINFORCE's rollouts through a gymnasium vector env "
                            "(one batched forward pass per vector step)")
    vector_mode: Literal["sync", "async"] = option("sync", "REINFORCE's vector env: sync (one process) or async "
                                                          "(a process per env, for slow envs)")
    p0: float | None = option(None, "initial probability of the target action (None: uniform over actions)")
    lr: float | None = option(None, "learning rate η > 0 (None: 0.01 for reinforce; SB3's own 3e-4 for ppo, "
                                    "7e-4 for a2c)")
    mode: GradientMode = option("sampled", "sampled (REINFORCE surrogate of a batch) or exact (tabular envs: "
                                           "exact J and ∇J)")
    batch_size: int = TrainConfig.redefault("batch_size", 8)
    width: int = TrainConfig.redefault("width", 32)
    fisher: bool = TrainConfig.redefault("fisher", False)
    # from Python, a property may be a callable and the probe states an array or a callable
    TYPES_CHECKED_ELSEWHERE: ClassVar[tuple[str, ...]] = ("property", "probe_states")

    def validate(self) -> "GymConfig":
        self.check_types()  # before this config's own checks read its fields
        if self.algo == "reinforce" and self.mode == "exact":
            self.need(self.n_envs == 1, "n_envs", "applies to sampled rollouts (--mode sampled) and SB3; exact "
                                                  "gradients roll nothing out")
            self.need(self.vector_mode == "sync", "vector_mode", "applies to sampled rollouts (--mode sampled)")
        if self.algo == "reinforce":
            self.need(self.n_envs <= self.batch_size, "n_envs", f"{self.n_envs} envs for {self.batch_size} episodes an "
                                                                f"update: {self.n_envs - self.batch_size} would step for "
                                                                f"nothing; use at most --batch-size")
        self.need(not (self.wrapper and self.mode == "exact"), "wrapper",
                  "exact mode reads the env's own tabular model (env.unwrapped.P), which wrappers do not change; "
                  "use --mode sampled with --wrapper")
        if self.lr is None:
            self.lr = DEFAULT_LR.get(self.algo, DEFAULT_LR["reinforce"])
        p0 = self.p0
        if p0 is None:
            self.p0 = 0.5  # placeholder for the base range check: None means uniform
        try:
            super().validate()
        finally:
            self.p0 = p0
        need = self.need
        need(self.algo in ALGOS, "algo", f"must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        need(isinstance(self.property, (list, tuple)), "property",  # its items: strings or callables, read below
             f"must be a list of properties (action:A, event:MOD:PRED, return, MOD:FUNC or a callable), "
             f"got {type(self.property).__name__} {self.property!r}")
        need(isinstance(self.env, str) and bool(self.env), "env", "give a Gymnasium id, e.g. --env CartPole-v1")
        parse_env_kwargs(self.env_kwargs)
        need(self.target >= 0, "target", f"must be an action index >= 0, got {self.target}")
        need(self.n_probe >= 1, "n_probe", f"must be >= 1, got {self.n_probe}")
        need(math.isfinite(self.gamma) and 0 < self.gamma <= 1, "gamma", f"must be in (0, 1], got {self.gamma}")
        need(self.horizon >= 0, "horizon", f"must be >= 0 (0: the env's time limit), got {self.horizon}")
        need(self.n_steps >= 2, "n_steps", f"must be >= 2, got {self.n_steps}")
        need(self.n_envs >= 1, "n_envs", f"must be >= 1, got {self.n_envs}")
        if self.algo != "reinforce":
            need(self.mode == "sampled", "mode", f"{self.algo} learns from its own rollouts; use --mode sampled")
        return self

    def to_dict(self) -> dict:
        """The config as JSON-able values (a Python callable property is recorded as MODULE:NAME)."""
        props = [p if isinstance(p, str) else getattr(p, "name", None) or
                 f"{getattr(p, '__module__', '?')}:{getattr(p, '__qualname__', type(p).__name__)}"
                 for p in self.property]
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "property"}
        out["property"] = props
        return out

    def default_run_name(self) -> str:
        env = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.env)
        lr = f"-lr={self.lr:g}" if self.lr is not None else ""  # None: the algorithm's default
        return f"{env}-{self.algo}-{self.policy if self.algo == 'reinforce' else 'sb3'}{lr}-seed{self.seed}-{self.settings_hash()}"

    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def prebuild(self) -> Experiment:
        self.__dict__["_prebuilt"] = None
        exp = self.build()
        self.__dict__["_prebuilt"] = exp
        return exp

    def make_env(self) -> gym.Env:
        return make_env(self.env, parse_env_kwargs(self.env_kwargs), check=self.check_env, wrappers=self.wrapper)

    def make_env_unchecked(self) -> gym.Env:
        return make_env(self.env, parse_env_kwargs(self.env_kwargs), check=False, wrappers=self.wrapper, quiet=True)

    def make_vector_env(self) -> gym.vector.VectorEnv:
        """``n_envs`` copies of the env (wrappers and all) as a gymnasium vector env that resets an
        ended sub-environment in the same step (what :func:`ntrl.agents.reinforce.vector_transitions`
        reads), sync or async."""
        from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

        fns = [self.make_env_unchecked] * self.n_envs
        cls = AsyncVectorEnv if self.vector_mode == "async" else SyncVectorEnv
        return cls(fns, autoreset_mode=AutoresetMode.SAME_STEP)

    def build(self) -> Experiment:
        """Env, policy and optimizer; probe states; the properties; the REINFORCE utility.

        ``prebuild()`` builds it once ahead of :func:`ntrl.train.train` (so that bad input fails
        before a run directory exists); ``build()`` then hands over that experiment.
        """
        prebuilt = self.__dict__.pop("_prebuilt", None)
        if prebuilt is not None:
            return prebuilt
        if self.algo != "reinforce":  # ntrl.train.train runs ntrl's REINFORCE loop only
            raise ConfigError("--algo", f"{self.algo} trains through Stable-Baselines3: call "
                                        f"ntrl.experiments.sb3_train.train_sb3(config) (ntrl train does), not train()")
        raw_env = self.make_env()
        n_actions = int(raw_env.action_space.n)
        self.need(self.target < n_actions, "target", f"the env has actions 0..{n_actions - 1}, got {self.target}")
        discrete_obs = isinstance(raw_env.observation_space, gym.spaces.Discrete)
        if self.policy in ("tabular", "escort") and not discrete_obs:
            raise ConfigError("--policy", f"{self.policy} needs a Discrete observation space; {self.env} has "
                                          f"{space_text(raw_env.observation_space)}; use --policy mlp")
        if self.policy == "single_logit" and n_actions != 2:
            raise ConfigError("--policy", f"single_logit needs 2 actions; {self.env} has {n_actions}")
        image = isinstance(raw_env.observation_space, gym.spaces.Box) and len(raw_env.observation_space.shape) == 3
        if image != (self.policy == "cnn"):
            raise ConfigError("--policy", f"{self.env} has image observations ({space_text(raw_env.observation_space)}): use --policy "
                                          f"cnn (or --wrapper gymnasium.wrappers:FlattenObservation for an MLP on the "
                                          f"pixels)" if image else f"cnn reads image (H, W, C) observations; {self.env} "
                                          f"has {space_text(raw_env.observation_space)}")
        # on a Discrete space the MLP one-hot encodes the indices itself: rollouts, probe states,
        # properties and events all see the env's own observations, as with the tabular policy and SB3
        one_hot = discrete_obs and self.policy == "mlp"
        raw_shape = tuple(raw_env.observation_space.shape)
        n_states = int(raw_env.observation_space.n) if discrete_obs else 1
        obs_dim = n_states if one_hot else (int(np.prod(raw_shape)) if raw_shape else 1)
        dtype = self.torch_dtype()
        p0 = self.p0 if self.p0 is not None else 1.0 / n_actions
        context = RunContext(run=self.run_name or self.default_run_name())

        def to_policy_obs(raw: np.ndarray) -> torch.Tensor:
            if discrete_obs:
                return torch.as_tensor(raw.astype(np.int64))
            return torch.as_tensor(raw)

        def policy_for(reference: torch.Tensor) -> nn.Module:
            return make_policy(self.policy, obs_dim=obs_dim, n_actions=n_actions, target=self.target, p0=p0,
                               reference_obs=reference, seed=self.seed, n_states=n_states, width=self.width,
                               depth=self.depth, activation=self.activation, dtype=dtype,
                               one_hot_states=n_states if one_hot else None, obs_shape=raw_shape)

        # probe states: a file, a callable, or the agent's own initial rollouts (frozen now)
        rollout_horizon = episode_horizon(raw_env, self.horizon, default=ROLLOUT_HORIZON)
        self.__dict__["rollout_horizon"] = rollout_horizon  # for the summary (not a config field)
        raw_probes = load_probe_states(self.probe_states, raw_shape, raw_env, space=raw_env.observation_space)
        if raw_probes is None:
            obs0, _ = raw_env.reset(seed=self.seed)
            policy = policy_for(to_policy_obs(np.asarray(obs0)[None]))
            batch = collect_episodes(raw_env, policy, max(1, self.batch_size), np.random.default_rng(self.seed + 1),
                                     baseline="none", max_steps=rollout_horizon)
            visited = batch.obs.numpy()
            raw_probes = sample_rows(visited, self.n_probe, self.seed)
        if discrete_obs:  # in range: load_probe_states checked given ones, rollouts visit only real states
            raw_probes = raw_probes.astype(np.int64)
        probes = to_policy_obs(raw_probes)
        policy = policy_for(probes)
        optimizer = make_optimizer(self.optimizer, policy, self.lr, **self.optimizer_kwargs())

        wants_return = "return" in [s.split("=", 1)[-1] for s in self.property if isinstance(s, str)]
        model = (tabular_model(raw_env, episode_horizon(raw_env, self.horizon), one_hot=False)
                 if self.mode == "exact" or wants_return else None)
        if self.mode == "exact" and model is None:
            raise ConfigError("--mode", f"exact needs a tabular model (env.unwrapped.P, as in gymnasium's toy-text "
                                        f"envs); {self.env} has none: use --mode sampled")
        properties = [ActionProbability(probes, self.target, "P")]
        properties += [parse_property(s, probes, n_actions, context, exact_model=model, raw_probes=raw_probes)
                       for s in self.property]
        from ntrl.engine.tangent import TangentEngine

        check_properties(TangentEngine(policy, dtype=torch.float64), properties)

        env = raw_env
        if self.mode == "sampled":  # rollouts through a vector env; the probe rollouts above used one env
            raw_env.close()
            env = self.make_vector_env()

        def utility(engine, rng):
            context.step = 0 if context.step is None else context.step + 1
            if self.mode == "exact":
                return exact_gradient(engine, model)
            return sampled_gradient(engine, env, self.batch_size, rng, baseline=self.baseline, gamma=self.gamma,
                                    max_steps=rollout_horizon)

        return Experiment(
            env=env, policy=policy, optimizer=optimizer, properties=properties,
            kappa=LogOdds(probes, self.target, "z"), utility=utility, target_label=f"a={self.target}",
        )
