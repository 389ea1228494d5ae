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

Two-armed bandit (``ntrl/TwoArmedBandit-v0``, one state, observation [1]):

    P = π_t = exp(log_softmax(z)_t)
    R = J(π) = r_ref + Σ_a π_a (r_a − r_ref),   r_ref = r of the most probable action
    z_t = log π_t − log(1 − π_t)                (κ = ‖∇z_t‖²)
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
from ntrl.engine.tangent import set_log_odds


@dataclass
class SampledBatch:
    """The episodes of one update for every member: actions (M, B), advantages (M, B), mean
    episode return (M,)."""

    actions: Tensor
    advantages: Tensor
    mean_return: np.ndarray


class BanditModel:
    """The two-armed bandit for M members: rewards r (M, 2) indexed by action, target action t."""

    n_actions = 2
    n_states = 1
    n_z = 1
    properties = ("P", "R")

    def __init__(self, rewards: np.ndarray, noise_std: np.ndarray, target: int, device: torch.device):
        self.rewards_np = np.asarray(rewards, dtype=np.float64)  # the sampler's copy, on the host
        self.rewards = torch.as_tensor(self.rewards_np, device=device)
        self.noise_std = np.asarray(noise_std, dtype=np.float64)
        self.target = int(target)
        self.obs = torch.ones(1, 1, dtype=torch.float64, device=device)

    @classmethod
    def from_configs(cls, configs: Sequence[Any], device: torch.device) -> "BanditModel":
        rewards = np.array([[c.reward_dont, c.reward_do] for c in configs])
        return cls(rewards, np.array([c.noise_std for c in configs]), configs[0].target, device)

    def member_bytes(self) -> int:
        """Memory per member beyond the parameters' vectors (float64)."""
        return 8 * 64

    def select(self, keep: Tensor) -> None:
        """Keep only the members ``keep`` (an index tensor), in that order."""
        rows = keep.cpu().numpy()
        self.rewards, self.rewards_np = self.rewards[keep], self.rewards_np[rows]
        self.noise_std = self.noise_std[rows]

    def quantities(self, Z: Tensor) -> dict[str, Tensor]:
        """U, P, R (M,), z (M, 1) and log π (M, 1, 2), from logits (M, 1, 2)."""
        logp = torch.log_softmax(Z[:, 0], dim=-1)
        probs = logp.exp()
        t = self.target
        r = self.rewards.to(probs.dtype)
        r_ref = r.gather(1, probs.detach().argmax(dim=1, keepdim=True))
        R = r_ref[:, 0] + (probs * (r - r_ref)).sum(dim=1)
        return {
            "U": R,
            "P": logp[:, t].exp(),
            "R": R,
            "z": (logp[:, t] - logp[:, 1 - t])[:, None],
            "logp": logp[:, None],
            "weights": torch.ones(Z.shape[0], 1, dtype=probs.dtype, device=probs.device),
        }

    def sample(self, probs: np.ndarray, batch_size: int, baseline: str, action_rngs: list, noise_rngs: list) -> SampledBatch:
        """One batch of ``batch_size`` one-step episodes per member, from its own streams."""
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
        return SampledBatch(torch.as_tensor(actions, device=dev), torch.as_tensor(adv, device=dev), G.mean(axis=1))

    @staticmethod
    def surrogate(logp: Tensor, batch: SampledBatch) -> Tensor:
        """U_s = (1/B) Σ_i A_i log π(a_i) per member, from log π (M, 1, 2)."""
        B = batch.actions.shape[1]
        return (batch.advantages.to(logp.dtype) * logp[:, 0].gather(1, batch.actions)).sum(dim=1) / B


class JuiceModel:
    """The juice gridworld's exact model for M members (see the module docstring)."""

    n_actions = 5
    properties = ("P", "F", "R", "P_probe")

    def __init__(self, mdp, rewards: Tensor, probe_obs: np.ndarray, probe_mask: np.ndarray, device: torch.device):
        f64 = dict(dtype=torch.float64, device=device)
        self.horizon = int(mdp.horizon)
        self.n_states = int(mdp.unique_obs.shape[0])
        self.obs = torch.cat([torch.as_tensor(mdp.unique_obs, **f64), torch.as_tensor(probe_obs, **f64)])
        self.obs_index = mdp.obs_index.to(device)
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

    @classmethod
    def from_configs(cls, configs: Sequence[Any], device: torch.device) -> "JuiceModel":
        """The exact model of the members' shared gridworld, with each member's reward."""
        from ntrl.envs.juice import MAX_TABULAR_STATES, approach_mask, seen_observations, tabular_model

        first = configs[0]
        mdps = [tabular_model(**c.env_kwargs(), max_states=MAX_TABULAR_STATES) for c in configs]
        rewards = torch.stack([m.rewards for m in mdps])
        probe_obs = seen_observations(first.size, first.view_radius)
        return cls(mdps[0], rewards, probe_obs, approach_mask(probe_obs, first.view_radius), device)

    def member_bytes(self) -> int:
        """Memory per member beyond the parameters' vectors (float64): the recursion's saved
        tensors for the backward pass, a few per step over the transitions' nonzeros."""
        return 8 * 4 * self.horizon * (int(self.rows.numel()) + self.n_mdp_states)

    def select(self, keep: Tensor) -> None:
        self.rewards = self.rewards[keep]

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


def population_model(configs: Sequence[Any], device: torch.device):
    """The batched model of the members' environment (their configs share it)."""
    if configs[0].env == "juice":
        return JuiceModel.from_configs(configs, device)
    return BanditModel.from_configs(configs, device)
