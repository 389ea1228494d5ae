"""Environment models of a population, as batched functions of the members' logits.

Every quantity here is the per-run model's own expression, written for M members at once: a
function of the logits Z (M, N, K) at the model's fixed observations (and, in sampled mode, of
each member's sampled batch), so that :func:`ntrl.engine.batched.member_gradients` differentiates
all members in one reverse-mode pass.

Two-armed bandit (``ntrl/TwoArmedBandit-v0``, one state, observation [1]):

    P = π_t = exp(log_softmax(z)_t)
    R = J(π) = r_ref + Σ_a π_a (r_a − r_ref),   r_ref = r of the most probable action
    z_t = log π_t − log(1 − π_t)                (κ = ‖∇z_t‖²)
    exact:   U = R
    sampled: U_s = (1/B) Σ_i (G_i − b_i) log π(a_i),   b_i = leave-one-out mean of G (or 0)

with the member's own action stream (``split_seed``) and reward-noise stream, drawn exactly as the
per-run path draws them (:func:`ntrl.agents.reinforce.collect_episodes`), so that a member and the
run of the same config see the same episodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ntrl.agents.reinforce import advantages, sample_actions


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

    def __init__(self, rewards: np.ndarray, noise_std: np.ndarray, target: int, device: torch.device):
        self.rewards_np = np.asarray(rewards, dtype=np.float64)  # the sampler's copy, on the host
        self.rewards = torch.as_tensor(self.rewards_np, device=device)
        self.noise_std = np.asarray(noise_std, dtype=np.float64)
        self.target = int(target)
        self.obs = torch.ones(1, 1, dtype=torch.float64, device=device)
        self.fisher_weights = torch.ones(1, dtype=torch.float64, device=device)

    def select(self, keep: Tensor) -> None:
        """Keep only the members ``keep`` (an index tensor), in that order."""
        rows = keep.cpu().numpy()
        self.rewards, self.rewards_np = self.rewards[keep], self.rewards_np[rows]
        self.noise_std = self.noise_std[rows]

    def quantities(self, Z: Tensor) -> dict[str, Tensor]:
        """P, R and the log-odds z of the target, each of shape (M,), from logits (M, 1, 2)."""
        logp = torch.log_softmax(Z[:, 0], dim=-1)
        probs = logp.exp()
        t = self.target
        r = self.rewards.to(probs.dtype)
        r_ref = r.gather(1, probs.detach().argmax(dim=1, keepdim=True))
        return {
            "P": logp[:, t].exp(),
            "R": r_ref[:, 0] + (probs * (r - r_ref)).sum(dim=1),
            "z": logp[:, t] - logp[:, 1 - t],
            "logp": logp,
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
        """U_s = (1/B) Σ_i A_i log π(a_i) per member, from log π (M, 2)."""
        B = batch.actions.shape[1]
        return (batch.advantages.to(logp.dtype) * logp.gather(1, batch.actions)).sum(dim=1) / B
