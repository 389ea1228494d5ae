"""Environment models of a population, as batched functions of the members' logits.

Every quantity here is the per-run model's own expression, written for M members at once: a
function of the logits Z (M, N, K) at the model's fixed observations ``obs`` (and, in sampled
mode, of each member's sampled batch), so that :func:`ntrl.engine.batched.member_gradients`
differentiates all members in one reverse-mode pass. A model gives, from Z:

    U         the utility each member ascends (exact J, or the sampled surrogate)
    <X>       each tracked property, in ``properties`` order (P first): the per-run records' order
    z         the log-odds whose ‖∇z‖² is κ, (M, n_z)
    logp      log π(·|o) at the Fisher's states (the first ``n_states`` rows of ``obs``), (M, n_states, K)
    weights   the Fisher's state weights, (M, n_states)

Two-armed and K-armed bandit (``ntrl/TwoArmedBandit-v0``, ``ntrl/KArmedBandit-v0``, one state,
observation [1]):

    P = π_t = exp(log_softmax(z)_t)
    R = J(π) = r_ref + Σ_a π_a (r_a − r_ref),   r_ref = r of the most probable action
    z_t = log π_t − log(1 − π_t)                (κ = ‖∇z_t‖²; log(1 − π_t) = logsumexp_{b≠t} log π_b)
    exact:   U = R
    sampled: U_s = (1/B) Σ_i (G_i − b_i) log π(a_i),   b_i = leave-one-out mean of G (or 0)

with the member's own action stream (``split_seed``) and reward-noise stream, drawn exactly as the
per-run path draws them (:func:`ntrl.agents.reinforce.collect_episodes`), so that a member and the
run of the same config see the same episodes.

Juice gridworld, exact (``ntrl/JuiceGridworld-v0``'s :class:`~ntrl.engine.exact_model.TabularMDP`,
as :class:`ntrl.experiments.juice.JuiceQuantities` computes it per run): with π(a|s) = π(a|o(s)),

    μ_0 = ρ,  μ_{t+1}(s') = Σ_{s,a} μ_t(s) π(a|s) T(s'|s, a),   d = (1/H) Σ_{t<H} μ_t
    F = Σ_s d(s)·seen(s),   P = Σ_s d(s)·seen(s)·Σ_{a approaches} π(a|s) / F
    R = Σ_s d(s) Σ_a π(a|s) r(s, a),   U = J = H·R,   P_probe = mean over the seen observations o of π(approach|o)
    z = log π(approach|o) − log π(not approach|o) at each seen observation o      (κ per o)
    Fisher states: the distinct observations, weighted by w_o = Σ_{s: o(s)=o} d(s)

each member with its own reward r (so that rewarded and punished runs of a cell share a chunk).
Where each member's reward is paid exactly for an approach (view radius 1: r(s, a) =
r·approach(s, a), :meth:`JuiceModel.approach_reward`), R = r·F·P, and a tracked exact update forms ∇P from
∇U and ∇F instead of a reverse pass of its own (:func:`ntrl.population.trainer.derived_gradients`).
On the CPU the visitation is the per-run path's adjoint node,
:class:`~ntrl.engine.exact_model.FiniteHorizonVisitation`, over M copies of the chain at once;
on a GPU the recursion runs in torch ops, batched over the members.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ntrl.agents.reinforce import advantages, sample_actions
from ntrl.engine.exact_model import FiniteHorizonVisitation
from ntrl.engine.tangent import log_odds, set_log_odds


@dataclass
class SampledBatch:
    """The episodes of one update for every member: ``C_episode`` (M, B, N, K), each episode's
    advantages summed per Fisher state o and action a (its gradient contribution is
    h_i = Σ_{o,a} C_i(o, a) ∇log π(a|o)), the mean episode return (M,), and the model's own fields:
    the bandit's actions and advantages (M, B), the juice gridworld's C = Σ_i C_i (M, N, K) and
    its Fisher weights, the visit counts of the N observations normalised (M, N)."""

    C_episode: Tensor
    mean_return: np.ndarray
    actions: Tensor | None = None
    advantages: Tensor | None = None
    C: Tensor | None = None
    weights: Tensor | None = None


class BanditModel:
    """The two-armed or K-armed bandit for M members: rewards r (M, K) indexed by action, target
    action t."""

    n_states = 1
    n_z = 1
    properties = ("P", "R")
    utility_scale = 1.0  # J = R

    def __init__(self, rewards: np.ndarray, noise_std: np.ndarray, target: int, device: torch.device):
        self.rewards_np = np.asarray(rewards, dtype=np.float64)  # the sampler's copy, on the host
        self.rewards = torch.as_tensor(self.rewards_np, device=device)
        self.noise_std = np.asarray(noise_std, dtype=np.float64)
        self.target = int(target)
        self.n_actions = self.rewards_np.shape[1]
        self.obs = torch.ones(1, 1, dtype=torch.float64, device=device)
        self._ones: Tensor | None = None  # the state's weights, kept by _unit_weights

    @classmethod
    def from_configs(cls, configs: Sequence[Any], device: torch.device) -> "BanditModel":
        if configs[0].env == "kbandit":
            rewards = np.array([c.resolve().rewards for c in configs])
        else:
            rewards = np.array([[c.reward_dont, c.reward_do] for c in configs])
        return cls(rewards, np.array([c.noise_std for c in configs]), configs[0].target, device)

    def member_bytes(self) -> int:
        """Memory per member beyond the parameters' vectors (float64)."""
        return 8 * 64

    def start_sampling(self, configs: Sequence[Any], env_seeds: Sequence[int]) -> None:
        """Sampled mode needs nothing more: a member's reward noise comes from its own stream."""

    def close(self) -> None:
        """Nothing to release."""

    def select(self, keep: Tensor) -> None:
        """Keep only the members ``keep`` (an index tensor), in that order."""
        rows = keep.cpu().numpy()
        self.rewards, self.rewards_np = self.rewards[keep], self.rewards_np[rows]
        self.noise_std = self.noise_std[rows]

    def quantities(self, Z: Tensor, with_z: bool = True) -> dict[str, Tensor]:
        """U, P, R (M,), z (M, 1) and log π (M, 1, K), from logits (M, 1, K); without z where
        ``with_z`` is False (an untracked update reads none)."""
        logp = torch.log_softmax(Z[:, 0], dim=-1)
        probs = logp.exp()
        t = self.target
        r = self.rewards.to(probs.dtype)
        r_ref = r.gather(1, probs.detach().argmax(dim=1, keepdim=True))
        g_U = probs * (r - r_ref)  # ∂U/∂log π: :meth:`cotangents` reads it rather than forming it again
        R = r_ref[:, 0] + g_U.sum(dim=1)
        out = {"U": R, "P": logp[:, t].exp(), "R": R, "dU_dlogp": g_U}
        if with_z:
            out["z"] = log_odds(logp, t)[:, None]
        out["logp"] = logp[:, None]
        out["weights"] = self._unit_weights(Z.shape[0], probs.dtype)
        return out

    def _unit_weights(self, M: int, dtype: torch.dtype) -> Tensor:
        """The one state's weight 1 of every member, (M, 1): one tensor kept while M stays (read, never written)."""
        w = self._ones
        if w is None or w.shape[0] != M or w.dtype != dtype:
            w = self._ones = torch.ones(M, 1, dtype=dtype, device=self.rewards.device)
        return w

    def probability(self, Z: Tensor) -> Tensor:
        """P (rows,) alone, from logits (rows, 1, K) of any number of rows (the η-probe's members at
        every scale at once), as :meth:`quantities` computes it."""
        return torch.log_softmax(Z[:, 0], dim=-1)[:, self.target].exp()

    def cotangents(self, q: dict[str, Tensor], tracked: bool) -> list[Tensor]:
        """The cotangents c_X = ∂X/∂z (M, K) at the one state that an exact update needs, in closed
        form and in the order autograd's backward of :meth:`quantities` forms them, so that they
        are its numbers bit for bit (tested): c_U alone, or where ``tracked`` c_U, c_P, c_R and c_z
        (the order of ``[U, *properties, z]``). Each is log_softmax's backward (its own kernel),
        c = g − π Σ_a g_a, of the gradient g = ∂X/∂log π:

        * U = R = r_ref + Σ_a π_a (r_a − r_ref): g = (r − r_ref) ⊙ π (through π = exp(log π));
        * P = exp(log π_t): g = P at t, 0 elsewhere;
        * z = log π_t − logsumexp_{b≠t} log π_b: g = 1 at t, −exp(log π_b − logsumexp) elsewhere.
        """
        logp = q["logp"].detach()[:, 0]
        g = q["dU_dlogp"].detach()  # (r − r_ref) ⊙ π, as :meth:`quantities` formed it
        c_U = torch.ops.aten._log_softmax_backward_data(g, logp, 1, logp.dtype)
        if not tracked:
            return [c_U]
        t = self.target
        g_P = torch.zeros_like(logp)
        g_P[:, t] = logp[:, t].exp()
        others = torch.cat([logp[:, :t], logp[:, t + 1:]], dim=1)
        g_z = -(others - torch.logsumexp(others, dim=1, keepdim=True)).exp()
        g_z = torch.cat([g_z[:, :t], torch.ones_like(logp[:, :1]), g_z[:, t:]], dim=1)
        c_P, c_z = (torch.ops.aten._log_softmax_backward_data(x, logp, 1, logp.dtype) for x in (g_P, g_z))
        return [c_U, c_P, c_U, c_z]

    def sample(self, q: dict[str, Tensor], batch_size: int, baseline: str, action_rngs: list,
               noise_rngs: list) -> SampledBatch:
        """One batch of ``batch_size`` one-step episodes per member, from its own streams, with
        π = softmax(z) at the one state (the logits ``q["Z"]``) as the per-run sampler computes it."""
        probs = torch.softmax(q["Z"].detach()[:, 0], dim=-1).cpu().numpy()
        M = probs.shape[0]
        actions = np.empty((M, batch_size), dtype=np.int64)
        G = np.empty((M, batch_size))
        r = self.rewards_np
        for m in range(M):
            u_probs = np.broadcast_to(probs[m], (batch_size, probs.shape[1]))
            a = sample_actions(u_probs, action_rngs[m])
            actions[m] = a
            G[m] = r[m, a]
            if self.noise_std[m] > 0:
                G[m] += noise_rngs[m].normal(0.0, self.noise_std[m], size=batch_size)
        # episodes along axis 0, members along axis 1; a member whose episodes all took one action
        # has identical episodes (one step from the one state)
        adv = advantages(G.T, baseline, (actions == actions[:, :1]).all(axis=1)).T
        dev = self.rewards.device
        acts, adv = torch.as_tensor(actions, device=dev), torch.as_tensor(adv, device=dev)
        C_episode = torch.zeros(M, batch_size, 1, self.n_actions, dtype=adv.dtype, device=dev)
        C_episode[:, :, 0].scatter_(2, acts[..., None], adv[..., None])
        return SampledBatch(C_episode, G.mean(axis=1), actions=acts, advantages=adv)

    @staticmethod
    def surrogate(logp: Tensor, batch: SampledBatch) -> Tensor:
        """U_s = (1/B) Σ_i A_i log π(a_i) per member, from log π (M, 1, K), episode by episode as
        the per-run surrogate sums it."""
        B = batch.actions.shape[1]
        return (batch.advantages.to(logp.dtype) * logp[:, 0].gather(1, batch.actions)).sum(dim=1) / B


class JuiceModel:
    """The juice gridworld's exact model for M members (see the module docstring)."""

    n_actions = 5
    properties = ("P", "F", "R", "P_probe")

    def __init__(self, mdp, rewards: Tensor, probe_obs: np.ndarray, probe_mask: np.ndarray, device: torch.device,
                 order: np.ndarray | None = None):
        """``order``: the model's distinct observations in the order the members see them (the
        per-run path's: the model's own in exact mode, sorted by observation index in sampled
        mode, as :func:`ntrl.agents.reinforce.aggregate_episodes` sorts a batch's)."""
        f64 = dict(dtype=torch.float64, device=device)
        self.horizon = int(mdp.horizon)
        self.n_states = int(mdp.unique_obs.shape[0])
        order = np.arange(self.n_states) if order is None else np.asarray(order)
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        self.unique_obs = mdp.unique_obs[torch.as_tensor(order)]
        self.obs = torch.cat([torch.as_tensor(self.unique_obs, **f64), torch.as_tensor(probe_obs, **f64)])
        self.obs_index = torch.as_tensor(rank, device=device)[mdp.obs_index.to(device)]
        self.rows, self.cols = mdp.rows.to(device), mdp.cols.to(device)
        self.probs = mdp.probs.to(device)
        self.initial = mdp.initial.to(device)
        self.seen = torch.as_tensor(mdp.seen, **f64)
        self.approach = torch.as_tensor(mdp.approach, **f64)
        self.rewards = rewards.to(device)  # (M, S, A)
        self.probe_mask = torch.as_tensor(probe_mask, **f64)
        self.n_z = int(self.probe_mask.shape[0])
        self.n_mdp_states = int(mdp.n_states)
        self.mdp = mdp
        self.utility_scale = float(self.horizon)  # J = H·R
        self.venv = None  # sampled mode: the members' gridworlds, a block of them each (start_sampling)
        self.approach_entry = None  # (s, a) of an approach where every member's reward is r·approach (approach_entry)

    @classmethod
    def from_configs(cls, configs: Sequence[Any], device: torch.device) -> "JuiceModel":
        """The exact model of the members' shared gridworld, with each member's reward."""
        from ntrl.envs.juice import (
            MAX_TABULAR_STATES, approach_mask, n_observation_indices, observation_index, seen_observations,
            tabular_model,
        )

        first = configs[0]
        mdps = [tabular_model(**c.env_kwargs(), max_states=MAX_TABULAR_STATES) for c in configs]
        rewards = torch.stack([m.rewards for m in mdps])
        probe_obs = seen_observations(first.size, first.view_radius)
        keys = observation_index(mdps[0].unique_obs.numpy().reshape(mdps[0].unique_obs.shape[0], -1),
                                 first.view_radius)
        order = np.argsort(keys, kind="stable") if first.mode == "sampled" else None
        model = cls(mdps[0], rewards, probe_obs, approach_mask(probe_obs, first.view_radius), device, order)
        model.approach_entry = approach_entry(mdps[0], rewards)
        # each observation key's row of the model (−1: a key no state of the model shows)
        model.key_rows = np.full(n_observation_indices(first.view_radius), -1, dtype=np.int64)
        model.key_rows[keys if order is None else keys[order]] = np.arange(len(keys))
        return model

    def start_sampling(self, configs: Sequence[Any], env_seeds: Sequence[int]) -> None:
        """Sampled mode: one native vector env of M·``batch_size`` gridworlds, a block per member
        with the generator its run's vector env gets from ``env.reset(seed=env_seed)`` and its own
        reward, so that a member's episodes are its run's; then that first reset."""
        from ntrl.envs.juice import JuiceGridworldVector

        first = configs[0]
        self.env_kwargs = {k: v for k, v in first.env_kwargs().items() if k != "reward"}
        self.batch_size = int(first.batch_size)
        self.member_rewards = [float(c.reward) for c in configs]
        self.venv = JuiceGridworldVector(num_envs=len(configs) * self.batch_size, **self.env_kwargs)
        self.venv.seed_blocks(list(env_seeds), self.member_rewards)
        self.venv.reset()

    def close(self) -> None:
        if self.venv is not None:
            self.venv.close()
            self.venv = None

    def sample(self, q: dict[str, Tensor], batch_size: int, baseline: str, action_rngs: list,
               noise_rngs: list) -> SampledBatch:
        """One episode in each of every member's ``batch_size`` gridworlds, stepped as the per-run
        path steps them (:func:`ntrl.experiments.juice.collect_vector_batch`), from the same streams.

        The policy is fixed during the rollout and every observation is one of the model's, so
        π(·|o) = softmax(Z) of ``q["Z"]`` is looked up, not recomputed, by
        each observation's key (:meth:`JuiceGridworldVector.step_keys`). Each member's H·B action
        uniforms are drawn at once, which is the stream the per-run path draws B at a time, and the
        action is the inverse CDF of :func:`ntrl.agents.reinforce.sample_actions`,
        min(#{k: u·c_K ≥ c_k}, K − 1) with c the cumulative sums of π(·|o). The episodes are then
        aggregated by :func:`ntrl.agents.reinforce.aggregate_episodes`, per observation of the model."""
        from ntrl.agents.reinforce import aggregate_episodes

        M, H, B, K, N = len(action_rngs), self.horizon, batch_size, self.n_actions, self.n_states
        with torch.no_grad():
            cum = np.cumsum(torch.softmax(q["Z"].detach()[:, :N].to(torch.float64), dim=-1).cpu().numpy(), axis=2)
        u = np.stack([rng.random(H * B).reshape(H, B) for rng in action_rngs], axis=1)  # (H, M, B)
        member = np.arange(M)[:, None]
        self.venv.reset()
        keys = np.empty((H, M, B), dtype=np.int64)
        rows = np.empty((H, M, B), dtype=np.int64)  # each observation's row of the model
        A = np.empty((H, M, B), dtype=np.int64)
        Rw = np.empty((H, M, B))
        keys[0] = self.venv.observation_keys().reshape(M, B)
        for t in range(H):
            rows[t] = self.key_rows[keys[t]]
            c = cum[member, rows[t]]  # (M, B, K)
            A[t] = np.minimum((u[t, :, :, None] * c[:, :, -1:] >= c).sum(axis=2), K - 1)
            nxt, reward = self.venv.step_keys(A[t].reshape(-1))
            Rw[t] = reward.reshape(M, B)
            if t + 1 < H:
                keys[t + 1] = nxt.reshape(M, B)
        if rows.min() < 0:  # the model enumerates every reachable state: a bug if not
            raise RuntimeError("an episode reached an observation the juice gridworld's exact model does not have")
        C = np.zeros((M, N, K))
        C_episode = np.zeros((M, B, N, K))
        counts = np.zeros((M, N))
        returns = np.empty(M)
        for m in range(M):
            agg = aggregate_episodes(keys[:, m], A[:, m], Rw[:, m], K, baseline)
            seen = self.key_rows[agg["keys"]]  # the rows of the observations member m's episodes saw
            C[m, seen], C_episode[m][:, seen], counts[m, seen] = agg["C"], agg["C_episode"], agg["counts"]
            returns[m] = agg["returns"].mean()
        dev = self.rewards.device
        return SampledBatch(torch.as_tensor(C_episode, device=dev), returns, C=torch.as_tensor(C, device=dev),
                            weights=torch.as_tensor(counts / counts.sum(1, keepdims=True), device=dev))

    @staticmethod
    def surrogate(logp: Tensor, batch: SampledBatch) -> Tensor:
        """U_s = (1/B) Σ_{o,a} C(o, a) log π(a|o) per member, from log π (M, N, K)."""
        return (batch.C.to(logp.dtype) * logp).sum(dim=(1, 2)) / batch.C_episode.shape[1]

    def member_bytes(self) -> int:
        """Memory per member beyond the parameters' vectors (float64): the recursion's saved
        tensors for the backward pass, a few per step over the transitions' nonzeros."""
        return 8 * 4 * self.horizon * (int(self.rows.numel()) + self.n_mdp_states)

    def select(self, keep: Tensor) -> None:
        self.rewards = self.rewards[keep]
        if self.venv is not None:  # the kept members' blocks, with their generators as they stand
            from ntrl.envs.juice import JuiceGridworldVector

            rows = keep.tolist()
            rngs, self.member_rewards = [self.venv.block_rngs[i] for i in rows], [self.member_rewards[i] for i in rows]
            self.venv.close()
            self.venv = None
            if rows:
                self.venv = JuiceGridworldVector(num_envs=len(rows) * self.batch_size, **self.env_kwargs)
                self.venv.set_block_generators(rngs, self.member_rewards)

    def visitation(self, pi: Tensor) -> Tensor:
        """d (M, S) for π (M, S, A): the finite-horizon recursion, batched over the members: on the
        CPU the per-run path's adjoint node over a block-diagonal chain, elsewhere torch ops."""
        if pi.device.type == "cpu" and pi.dtype == torch.float64:
            return FiniteHorizonVisitation.apply(pi, self.mdp)
        M, S, A = pi.shape
        mu = self.initial.expand(M, S)
        total = mu
        for _ in range(self.horizon - 1):
            flow = (mu[:, :, None] * pi).reshape(M, S * A)
            mu = torch.zeros(M, S, dtype=pi.dtype, device=pi.device).index_add(1, self.cols, flow[:, self.rows] * self.probs)
            total = total + mu
        return total / self.horizon

    def quantities(self, Z: Tensor) -> dict[str, Tensor]:
        """U, P, F, R, P_probe (M,), z (M, probes), log π and weights at the distinct observations,
        from logits (M, distinct observations + probes, A)."""
        n = self.n_states
        logp = torch.log_softmax(Z[:, :n], dim=-1)
        pi = logp.exp()[:, self.obs_index]  # (M, S, A)
        d = self.visitation(pi)
        F = (d * self.seen).sum(1)
        P = (d * self.seen * (pi * self.approach).sum(-1)).sum(1) / F
        R = (d * (pi * self.rewards).sum(-1)).sum(1)
        Zp = Z[:, n:]
        P_probe = (torch.log_softmax(Zp, dim=-1).exp() * self.probe_mask).sum(-1).mean(1)
        weights = torch.zeros(Z.shape[0], n, dtype=d.dtype, device=d.device).index_add(1, self.obs_index, d.detach())
        return {"U": self.horizon * R, "P": P, "F": F, "R": R, "P_probe": P_probe, "z": set_log_odds(Zp, self.probe_mask),
                "logp": logp, "weights": weights}

    def approach_reward(self) -> Tensor | None:
        """Each member's reward r (M,) where every member's is paid exactly for an approach
        (:func:`approach_entry`), else None: then R = r·F·P, and a tracked exact update derives ∇P
        from ∇U and ∇F (:func:`ntrl.population.trainer.derived_gradients`)."""
        return None if self.approach_entry is None else self.rewards[:, self.approach_entry[0], self.approach_entry[1]]

    def probability(self, Z: Tensor) -> Tensor:
        """P (rows,) alone, from logits (rows, distinct observations + probes, A) of any number of
        rows (the η-probe's members at every scale), as :meth:`quantities` computes it: one
        visitation per block of as many rows as the population has members (one block-diagonal
        chain of all the rows is slower: its vectors no longer fit in the cache)."""
        out = []
        for z in Z.split(max(1, self.rewards.shape[0])):
            pi = torch.log_softmax(z[:, :self.n_states], dim=-1).exp()[:, self.obs_index]
            d = self.visitation(pi)
            F = (d * self.seen).sum(1)
            out.append((d * self.seen * (pi * self.approach).sum(-1)).sum(1) / F)
        return torch.cat(out)


def approach_entry(mdp, rewards: Tensor) -> tuple[int, int] | None:
    """A state and action (s, a) that approach, where each member's reward is paid exactly for an
    approach, r(s, a) = r·approach(s, a) with r ≠ 0 (the gridworld's view radius 1: a seen juice is
    one move away, and the move that approaches it eats it), so that R = r·F·P as functions of θ
    and each member's r is its reward at (s, a); else None (checked on the model's arrays)."""
    approach = torch.as_tensor(np.asarray(mdp.approach), dtype=torch.float64)
    hits = approach.nonzero()
    if len(hits) == 0:
        return None
    s, a = (int(i) for i in hits[0])
    r = rewards[:, s, a].cpu()
    if not bool((r != 0).all()) or not torch.equal(rewards.cpu(), r[:, None, None] * approach):
        return None
    return s, a


def population_model(configs: Sequence[Any], device: torch.device):
    """The batched model of the members' environment (their configs share it)."""
    if configs[0].env == "juice":
        return JuiceModel.from_configs(configs, device)
    return BanditModel.from_configs(configs, device)
