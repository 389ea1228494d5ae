"""REINFORCE utilities and their gradients, in two modes.

*exact*:   U(θ) = J(π_θ), the environment model's exact expected return; g = ∇θ J.
*sampled*: a batch of B episodes from the environment and the surrogate

    U_s(θ) = (1/B) Σ_i Σ_t (G_{i,t} − b_{i,t}) log π_θ(a_{i,t} | s_{i,t}),

whose gradient is an unbiased estimate of ∇θ J when the baseline b does not depend on
episode i's own actions. ``baseline="loo"`` uses the leave-one-out mean
b_{i,t} = mean_{j≠i} G_{j,t} (G_{j,t} = 0 after episode j ended); ``"none"`` uses b = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

from ntrl.engine.exact_model import sample_actions  # noqa: F401  (re-exported: one sampler for both)
from ntrl.engine.tangent import PolicyView, TangentEngine

GRADIENT_MODES = ("exact", "sampled")
BASELINES = ("none", "loo")


@dataclass
class EpisodeBatch:
    """Transitions of B episodes, flattened over (episode, time)."""

    obs: Tensor  # (T, *obs_shape)
    actions: Tensor  # (T,)
    advantages: Tensor  # (T,), G − b
    episode_returns: np.ndarray  # (B,)
    n_episodes: int
    n_cut: int = 0  # episodes cut at max_steps (neither terminated nor truncated by the env)
    undiscounted_returns: np.ndarray | None = None  # (B,) Σ_t r_t of each episode
    episode: Tensor | None = None  # (T,) the episode each transition belongs to


@dataclass
class UtilityGradient:
    """The utility the agent ascends this update, its gradient, and the states for the Fisher."""

    value: float
    gradient: Tensor
    fisher_states: tuple[Tensor, Tensor]
    mean_return: float
    episodes: int = 0  # sampled episodes behind this update (0: exact)
    episodes_cut: int = 0  # of which were cut at the rollout horizon
    mean_undiscounted_return: float | None = None  # mean Σ_t r_t of the sampled episodes
    # sampled: the per-episode terms (U_1, …, U_B) of the surrogate U = (1/B) Σ_i U_i, as a
    # property of the policy (their Jacobian rows are the per-episode gradient contributions)
    episode_utilities: Callable[[PolicyView], Tensor] | None = None


def rewards_to_go(rewards: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    """G_t = r_t + γ G_{t+1} along the last axis (rewards zero-padded after an episode ends)."""
    G = np.zeros_like(rewards, dtype=np.float64)
    acc = np.zeros(rewards.shape[:-1])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        acc = rewards[..., t] + gamma * acc
        G[..., t] = acc
    return G


def baseline_for(G: np.ndarray, baseline: str) -> np.ndarray:
    """b for returns G of shape (B, T): the leave-one-out mean b_{i,t} = mean_{j≠i} G_{j,t}
    (independent of episode i, so E[(G − b) ∇log π] is unchanged) or zero."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    B = G.shape[0]
    if baseline == "loo" and B > 1:
        return (G.sum(axis=0, keepdims=True) - G) / (B - 1)
    return np.zeros_like(G)


def advantages(G: np.ndarray, baseline: str, identical: bool | np.ndarray = False) -> np.ndarray:
    """A = G − b for returns G with episodes along axis 0 (see :func:`baseline_for`).

    Under the leave-one-out baseline Σ_i (G_i − b_i) = 0 exactly, so a batch of ``identical``
    episodes (the same actions from the same observations) has gradient (1/B) Σ_i A_i ∇log π(τ) = 0;
    computed, it is rounding noise, which sign descent and Adam would blow up into a full step, so
    A is 0 there. ``identical`` may be an array over G's trailing axes (one flag per population
    member, with G of shape (B, M))."""
    A = G - baseline_for(G, baseline)
    if baseline == "loo":
        A = np.where(identical, 0.0, A)
    return A


def aggregate_episodes(keys: np.ndarray, actions: np.ndarray, rewards: np.ndarray, n_actions: int,
                       baseline: str = "loo") -> dict[str, np.ndarray]:
    """Episodes of equal length H stepped together, (H, B) arrays of observation keys, actions and
    rewards, aggregated for the REINFORCE surrogate: rewards-to-go G_{i,t}, advantages
    A = G − b (:func:`baseline_for`), and per distinct observation key o (sorted) and action a

        C_i(o, a) = Σ_{t: key_{i,t} = o, a_{i,t} = a} A_{i,t}   (episode i's own, ``C_episode``),
        C(o, a) = Σ_i C_i(o, a),

    so that U_s = (1/B) Σ_{o,a} C(o, a) log π(a|o) = (1/B) Σ_{i,t} A_{i,t} log π(a_{i,t}|o_{i,t}).
    Also: ``keys`` (the distinct keys), ``first`` (each one's first flat transition, t·B + i),
    ``counts`` (transitions per key) and ``returns`` (G_{i,0})."""
    H, B = rewards.shape
    G = rewards_to_go(rewards.T).T  # (H, B)
    adv = (G - baseline_for(G.T, baseline).T).reshape(-1)
    uniq, first, inv = np.unique(keys.reshape(-1), return_index=True, return_inverse=True)
    C_episode = np.zeros((B, len(uniq), n_actions))
    np.add.at(C_episode, (np.tile(np.arange(B), H), inv, actions.reshape(-1)), adv)
    return {"keys": uniq, "first": first, "C": C_episode.sum(axis=0), "C_episode": C_episode,
            "counts": np.bincount(inv, minlength=len(uniq)).astype(np.float64), "returns": G[0]}


def _sample_action(policy: nn.Module, obs: np.ndarray, rng: np.random.Generator) -> int:
    with torch.no_grad():
        x = torch.as_tensor(obs)[None]
        probs = torch.softmax(policy(x).to(torch.float64), dim=-1).numpy()
    return int(sample_actions(probs, rng)[0])


Transitions = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]  # obs, actions, rewards, episode, n_cut


def collect_episodes(
    env: gym.Env | gym.vector.VectorEnv,
    policy: nn.Module,
    n_episodes: int,
    rng: np.random.Generator,
    gamma: float = 1.0,
    baseline: str = "loo",
    max_steps: int = 100_000,
) -> EpisodeBatch:
    """Run ``n_episodes`` episodes with actions drawn from π by ``rng``; rewards-to-go G_t.

    ``env`` is one env (:func:`env_transitions`) or a gymnasium vector env (:func:`vector_transitions`,
    one batched forward pass per vector step); both give B whole episodes. An episode still
    running after ``max_steps`` steps is cut there (counted in ``n_cut``); its rewards-to-go are
    those of the first ``max_steps`` steps, so the batch estimates the gradient of the return over
    that horizon, J_H = E[Σ_{t<H} γᵗ r_t], which is what REINFORCE then ascends."""
    gather = vector_transitions if isinstance(env, gym.vector.VectorEnv) else env_transitions
    return batch_from_transitions(*gather(env, policy, n_episodes, rng, max_steps), n_episodes, gamma, baseline)


def env_transitions(env: gym.Env, policy: nn.Module, n_episodes: int, rng: np.random.Generator,
                    max_steps: int) -> Transitions:
    """B episodes of one env, one after the other, one forward pass per step."""
    all_obs, all_act, all_rew, lengths = [], [], [], []  # transitions in episode order; episode lengths
    n_cut = 0
    for _ in range(n_episodes):
        obs, _ = env.reset()
        length, ended = 0, False
        while length < max_steps and not ended:
            a = _sample_action(policy, obs, rng)
            nxt, r, terminated, truncated, _ = env.step(a)
            all_obs.append(np.asarray(obs))
            all_act.append(a)
            all_rew.append(float(r))
            length += 1
            obs = nxt
            ended = bool(terminated or truncated)
        n_cut += not ended
        lengths.append(length)
    episode = np.repeat(np.arange(n_episodes), lengths)
    return np.stack(all_obs), np.asarray(all_act), np.asarray(all_rew, dtype=np.float64), episode, n_cut


NUMPY_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": np.tanh,
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: 0.5 * x * (1.0 + np.tanh(0.5 * x)),  # x·σ(x), σ(x) = (1 + tanh(x/2))/2: no overflow
    "elu": lambda x: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
    "softplus": lambda x: np.where(x > 20.0, x, np.log1p(np.exp(np.minimum(x, 20.0)))),  # torch's threshold 20
}


def numpy_policy(policy: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """obs → π(·|o) (float64) at the policy's current parameters, for drawing actions: for an ntrl
    MLP without hooks the same layers in numpy (float64; a tiny network's pass is about 2.5× faster
    than through torch modules), else one no-grad torch pass. The parameters are read once, so
    build it again after they change. Probabilities agree with torch's to rounding."""
    from ntrl.agents.policies import MLPPolicy
    from ntrl.engine.structured import no_hooks

    plain = type(policy) is MLPPolicy and all(no_hooks(m) for m in policy.modules())
    activation = NUMPY_ACTIVATIONS.get(policy.activation) if plain else None
    if activation is None:
        def torch_probs(obs: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return torch.softmax(policy(torch.as_tensor(obs)).to(torch.float64), dim=-1).numpy()

        return torch_probs
    layers = [(m.weight.detach().to(torch.float64).numpy().T.copy(), m.bias.detach().to(torch.float64).numpy().copy())
              for m in policy.net if isinstance(m, nn.Linear)]
    n_states = policy.one_hot_states

    def probs(obs: np.ndarray) -> np.ndarray:
        x = np.asarray(obs)
        if n_states is not None:
            x = np.eye(n_states)[x.reshape(len(x), -1)[:, 0].astype(np.int64)]
        z = x.astype(np.float64)
        for i, (W, b) in enumerate(layers):
            z = z @ W + b
            if i < len(layers) - 1:
                z = activation(z)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    return probs


def vector_transitions(venv: gym.vector.VectorEnv, policy: nn.Module, n_episodes: int, rng: np.random.Generator,
                       max_steps: int) -> Transitions:
    """B episodes through a gymnasium vector env of n sub-environments, with one batched forward
    pass of the policy per vector step (actions drawn by ``rng``, one uniform per
    sub-environment). The vector env must reset an ended sub-environment in the same step
    (``AutoresetMode.SAME_STEP``).

    Exactly B episodes are started: each sub-environment whose episode ends (or is cut at
    ``max_steps``, then reset) starts the next one, until B have started, and the batch ends when
    every started episode has ended. So every episode is a whole, independent one and the batch is
    distributed as B episodes of the single-env path (stopping at the first B episodes to finish,
    and dropping the rest, would favour short ones). A sub-environment with no episode left idles;
    its steps are not recorded. Every sub-environment is reset at the start of the batch. The
    transitions are kept as (step, sub-environment) arrays and sorted into episodes once, at the end."""
    n = venv.num_envs
    slot = np.arange(n)  # the batch episode each sub-environment runs; ≥ n_episodes: idle
    started = n
    steps = np.zeros(n, dtype=np.int64)
    obs_steps, act_steps, rew_steps, eid_steps = [], [], [], []
    n_cut = 0
    obs, _ = venv.reset()
    pi = numpy_policy(policy)  # θ is fixed while the batch is collected
    live = slot < n_episodes
    while live.any():
        actions = sample_actions(pi(obs), rng)
        nxt, reward, terminated, truncated, _ = venv.step(actions)
        obs_steps.append(obs)  # the vector env returns a new array every step
        act_steps.append(actions)
        rew_steps.append(reward)
        eid_steps.append(np.where(live, slot, -1))
        steps += live  # an idle sub-environment's steps do not count
        ended = terminated | truncated
        if ended.any() or steps.max() >= max_steps:
            cut = ~ended & (steps >= max_steps) & live
            done = (ended | cut) & live
            n_cut += int(cut.sum())
            steps[ended | cut] = 0
            for j in np.flatnonzero(done):  # the next episode of the batch, to whichever env is free
                slot[j] = started
                started += 1
            live = slot < n_episodes
            if cut.any():  # an episode cut at the horizon: start that sub-environment afresh
                nxt, _ = venv.reset(options={"reset_mask": cut})
        obs = nxt
    eid = np.stack(eid_steps)  # (T, n)
    t_idx = np.broadcast_to(np.arange(eid.shape[0])[:, None], eid.shape)
    keep = eid.reshape(-1) >= 0
    order = np.lexsort((t_idx.reshape(-1)[keep], eid.reshape(-1)[keep]))  # by episode, then time
    flat = lambda steps_: np.stack(steps_).reshape(eid.size, *np.shape(steps_[0])[1:])[keep][order]  # noqa: E731
    return (flat(obs_steps), flat(act_steps), flat(rew_steps).astype(np.float64), eid.reshape(-1)[keep][order],
            n_cut)


def batch_from_transitions(obs: np.ndarray, actions: np.ndarray, rewards: np.ndarray, episode: np.ndarray, n_cut: int,
                           n_episodes: int, gamma: float = 1.0, baseline: str = "loo") -> EpisodeBatch:
    """The EpisodeBatch of transitions already in episode order (``episode``: each one's episode,
    non-decreasing, every episode 0..B−1 present): rewards-to-go, advantages (:func:`advantages`;
    a batch of identical episodes, the same actions from the same observations, has A = 0)."""
    lengths = np.bincount(episode, minlength=n_episodes)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    pos = np.arange(len(episode)) - starts[episode]
    R_pad = np.zeros((n_episodes, int(lengths.max())))
    R_pad[episode, pos] = rewards
    G_pad = rewards_to_go(R_pad, gamma)
    identical = False
    if (lengths == lengths[0]).all():  # the same actions from the same observations in every episode
        L = int(lengths[0])
        a = actions.reshape(n_episodes, L)
        o = obs.reshape(n_episodes, L, -1)
        identical = bool((a == a[:1]).all() and (o == o[:1]).all())
    A_pad = advantages(G_pad, baseline, identical)
    return EpisodeBatch(
        obs=torch.as_tensor(obs),
        actions=torch.as_tensor(actions, dtype=torch.long),
        advantages=torch.as_tensor(A_pad[episode, pos], dtype=torch.float64),
        episode_returns=G_pad[:, 0].copy(),
        n_episodes=n_episodes,
        n_cut=n_cut,
        undiscounted_returns=R_pad.sum(axis=1),
        episode=torch.as_tensor(episode),
    )


def surrogate_utility(batch: EpisodeBatch) -> Callable[[PolicyView], Tensor]:
    """U_s(view) = (1/B) Σ (G − b) log π(a|s): the REINFORCE surrogate on a fixed batch."""

    def U(view: PolicyView) -> Tensor:
        logp = view.log_probs(batch.obs).gather(-1, batch.actions[:, None])[:, 0]
        return (batch.advantages.to(logp.dtype) * logp).sum() / batch.n_episodes

    return U


def episode_utilities(batch: EpisodeBatch) -> Callable[[PolicyView], Tensor]:
    """U_i(view) = Σ_{t in episode i} (G − b) log π(a|s) for every episode i, shape (B,): the terms
    of the surrogate, U_s = (1/B) Σ_i U_i, whose gradients are the per-episode contributions."""

    def U(view: PolicyView) -> Tensor:
        logp = view.log_probs(batch.obs).gather(-1, batch.actions[:, None])[:, 0]
        terms = batch.advantages.to(logp.dtype) * logp
        return torch.zeros(batch.n_episodes, dtype=logp.dtype, device=logp.device).index_add(
            0, batch.episode.to(logp.device), terms)

    return U


def exact_gradient(engine: TangentEngine, model) -> UtilityGradient:
    """U = J(π_θ) from the model's ``exact_expected_reward``; g = ∇θ J; the Fisher states are the
    model's ``exact_states(view)`` (observations and their visitation weights under π_θ)."""
    U = model.exact_expected_reward
    value, g = engine.value_and_gradient(U)
    obs, w = model.exact_states(engine.view())
    return UtilityGradient(value, g, (obs, w), value)


def sampled_gradient(
    engine: TangentEngine,
    env: gym.Env,
    n_episodes: int,
    rng: np.random.Generator,
    baseline: str = "loo",
    gamma: float = 1.0,
    max_steps: int = 100_000,
) -> UtilityGradient:
    """Collect a batch (:func:`collect_episodes`, from one env or a vector env; episodes cut at
    ``max_steps``) and return the surrogate, its gradient and the visited states."""
    batch = collect_episodes(env, engine.module, n_episodes, rng, gamma=gamma, baseline=baseline, max_steps=max_steps)
    U = surrogate_utility(batch)
    value, g = engine.value_and_gradient(U)
    w = torch.full((batch.obs.shape[0],), 1.0 / batch.obs.shape[0], dtype=torch.float64)
    return UtilityGradient(value, g, (batch.obs, w), float(batch.episode_returns.mean()),
                           episodes=batch.n_episodes, episodes_cut=batch.n_cut,
                           mean_undiscounted_return=float(batch.undiscounted_returns.mean()),
                           episode_utilities=episode_utilities(batch))
