"""Exact models of small tabular MDPs, differentiable in the policy's parameters.

A :class:`TabularMDP` holds the transition kernel T(s'|s, a), the expected reward r(s, a), the
initial distribution ρ(s) and the observation o(s) that the policy sees in each state. A policy
π_θ(a|o) given as a :class:`ntrl.tangent.PolicyView` induces π(a|s) = π_θ(a|o(s)), and every
quantity below is a torch expression in θ (so ``engine.jacobian`` differentiates it exactly):

*finite horizon H* (``horizon=H``):

    μ_0 = ρ,     μ_{t+1}(s') = Σ_{s,a} μ_t(s) π(a|s) T(s'|s, a)
    d(s) = (1/H) Σ_{t<H} μ_t(s)                          (state-visitation distribution)
    R̄ = Σ_s d(s) Σ_a π(a|s) r(s, a)                       (expected reward per step)
    J = H · R̄ = E[Σ_{t<H} r_t]                             (expected return per episode)

*discounted* (``gamma=γ < 1``), by solving the policy-evaluation linear system:

    (I − γ P_πᵀ) x = ρ,   P_π(s, s') = Σ_a π(a|s) T(s'|s, a)
    d = (1 − γ) x,        R̄ = Σ_s d(s) r_π(s),        J = R̄ / (1 − γ) = E[Σ_t γᵗ r_t]

Transitions are stored sparsely (COO over (s, a) → s'); each finite-horizon step gathers and
scatters over the nonzeros, O(nnz), which under ``torch.func.jacrev`` is much cheaper than a
dense P_π (whose backward forms an S×S outer product per step). The policy is evaluated once
per *distinct* observation, which is what makes ``exact_states`` (the Fisher metric's states)
small.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ntrl.agents.reinforce import sample_actions
from ntrl.tangent import PolicyView


class ModelTooLargeError(ValueError):
    """The exact model of a configuration would exceed the size limit; use sampled mode."""


def check_model_size(n_states: int, limit: int, what: str = "the tabular model") -> None:
    """Raise :class:`ModelTooLargeError` stating the limit when ``n_states > limit``."""
    if n_states > limit:
        raise ModelTooLargeError(
            f"{what} would have {n_states} states, more than the exact-model limit of {limit} states; "
            f"use sampled mode or a smaller configuration"
        )


class TabularMDP:
    """A finite MDP with a per-state observation, evaluated exactly and differentiably.

    Parameters
    ----------
    transitions:
        dense array T[s, a, s'] of shape (S, A, S), *or* a COO triple ``(rows, cols, probs)``
        with rows = s·A + a, cols = s' and probs = T(s'|s, a).
    rewards: (S, A) expected immediate reward r(s, a).
    initial: (S,) initial distribution ρ.
    observations: (S, *obs_shape) what the policy sees in each state.
    horizon: H for the finite-horizon model, or
    gamma: γ in [0, 1) for the discounted model (exactly one of the two).
    """

    def __init__(
        self,
        transitions,
        rewards,
        initial,
        observations,
        horizon: int | None = None,
        gamma: float | None = None,
        atol: float = 1e-9,
    ):
        if (horizon is None) == (gamma is None):
            raise ValueError("give exactly one of horizon (finite) or gamma (discounted)")
        if horizon is not None and horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if gamma is not None and not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1), got {gamma}")
        self.horizon = None if horizon is None else int(horizon)
        self.gamma = None if gamma is None else float(gamma)
        r = torch.as_tensor(np.asarray(rewards), dtype=torch.float64)
        if r.ndim != 2:
            raise ValueError(f"rewards must have shape (S, A), got {tuple(r.shape)}")
        self.n_states, self.n_actions = S, A = r.shape
        self.rewards = r
        rho = torch.as_tensor(np.asarray(initial), dtype=torch.float64)
        if rho.shape != (S,):
            raise ValueError(f"initial must have shape ({S},), got {tuple(rho.shape)}")
        if (rho < 0).any() or abs(float(rho.sum()) - 1.0) > atol:
            raise ValueError("initial must be a probability distribution")
        self.initial = rho
        if isinstance(transitions, (tuple, list)):
            rows, cols, probs = (np.asarray(x) for x in transitions)
        else:
            T = np.asarray(transitions, dtype=np.float64)
            if T.shape != (S, A, S):
                raise ValueError(f"transitions must have shape ({S}, {A}, {S}), got {T.shape}")
            sa, cols = np.nonzero(T.reshape(S * A, S))
            rows, probs = sa, T.reshape(S * A, S)[sa, cols]
        self.rows = torch.as_tensor(rows, dtype=torch.long)
        self.cols = torch.as_tensor(cols, dtype=torch.long)
        self.probs = torch.as_tensor(probs, dtype=torch.float64)
        if (self.probs < 0).any():
            raise ValueError("transition probabilities must be >= 0")
        if self.rows.numel() and (int(self.rows.max()) >= S * A or int(self.cols.max()) >= S):
            raise ValueError("transition indices out of range")
        out = torch.zeros(S * A, dtype=torch.float64).index_add_(0, self.rows, self.probs)
        if (out - 1.0).abs().max() > atol:
            raise ValueError("each T(·|s, a) must sum to 1")
        obs = torch.as_tensor(np.asarray(observations))
        if obs.shape[0] != S:
            raise ValueError(f"observations must have {S} rows, got {obs.shape[0]}")
        self.observations = obs
        flat = obs.reshape(S, -1)
        self.unique_obs_flat, self.obs_index = torch.unique(flat, dim=0, return_inverse=True)
        self.unique_obs = self.unique_obs_flat.reshape(-1, *obs.shape[1:])

    # ------------------------------------------------------------------ policy
    def policy_matrix(self, view: PolicyView) -> Tensor:
        """π(a|s) = π_θ(a|o(s)), shape (S, A); the policy runs once per distinct observation."""
        logp = view.log_probs(self.unique_obs)
        if logp.shape[-1] != self.n_actions:
            raise ValueError(f"policy has {logp.shape[-1]} actions, the model {self.n_actions}")
        return logp.exp()[self.obs_index].to(torch.float64)

    def step_distribution(self, mu: Tensor, pi: Tensor) -> Tensor:
        """μ'(s') = Σ_{s,a} μ(s) π(a|s) T(s'|s, a)."""
        flow = (mu[:, None] * pi).reshape(-1)
        return torch.zeros(self.n_states, dtype=flow.dtype).index_add(0, self.cols, flow[self.rows] * self.probs)

    def transition_matrix(self, pi: Tensor) -> Tensor:
        """P_π(s, s') = Σ_a π(a|s) T(s'|s, a) as a dense (S, S) matrix (discounted model)."""
        S, A = self.n_states, self.n_actions
        w = pi.reshape(-1)[self.rows] * self.probs
        flat = self.rows.div(A, rounding_mode="floor") * S + self.cols
        return torch.zeros(S * S, dtype=w.dtype).index_add(0, flat, w).reshape(S, S)

    # ------------------------------------------------------------------ exact quantities
    def visitation(self, view: PolicyView, pi: Tensor | None = None) -> Tensor:
        """The normalised state-visitation distribution d(s) (see the module docstring)."""
        pi = self.policy_matrix(view) if pi is None else pi
        if self.horizon is not None:
            mu, total = self.initial, self.initial
            for _ in range(self.horizon - 1):
                mu = self.step_distribution(mu, pi)
                total = total + mu
            return total / self.horizon
        A = torch.eye(self.n_states, dtype=pi.dtype) - self.gamma * self.transition_matrix(pi).T
        x = torch.linalg.solve(A, self.initial.to(pi.dtype))
        return (1.0 - self.gamma) * x

    def expected_reward_per_step(self, view: PolicyView) -> Tensor:
        """R̄ = Σ_s d(s) Σ_a π(a|s) r(s, a)."""
        pi = self.policy_matrix(view)
        d = self.visitation(view, pi)
        return (d * (pi * self.rewards).sum(-1)).sum()

    def expected_return(self, view: PolicyView) -> Tensor:
        """J = H·R̄ (finite horizon) or R̄/(1 − γ) (discounted): the utility REINFORCE ascends."""
        scale = float(self.horizon) if self.horizon is not None else 1.0 / (1.0 - self.gamma)
        return scale * self.expected_reward_per_step(view)

    def exact_expected_reward(self, view: PolicyView) -> Tensor:
        """Alias of :meth:`expected_return` (the ``ntrl.properties.ExpectedReward`` protocol)."""
        return self.expected_return(view)

    def exact_states(self, view: PolicyView) -> tuple[Tensor, Tensor]:
        """(distinct observations, their visitation weights), detached: the states for the
        Fisher metric F = Σ_o w_o Σ_a π(a|o) ∇log π(a|o) ∇log π(a|o)ᵀ, w_o = Σ_{s: o(s)=o} d(s)."""
        with torch.no_grad():
            d = self.visitation(view)
            w = torch.zeros(self.unique_obs.shape[0], dtype=torch.float64).index_add_(0, self.obs_index, d)
        return self.unique_obs, w

    def sample(self, policy_probs: np.ndarray, n_episodes: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Monte Carlo episodes of the *model itself* (finite horizon only), for checking it:
        returns per-episode returns and the per-episode counts of each state, shape (B, S)."""
        if self.horizon is None:
            raise ValueError("sample() needs a finite-horizon model")
        S, A = self.n_states, self.n_actions
        Tdense = np.zeros((S * A, S))
        np.add.at(Tdense, (self.rows.numpy(), self.cols.numpy()), self.probs.numpy())
        s = rng.choice(S, size=n_episodes, p=self.initial.numpy())
        counts = np.zeros((n_episodes, S))
        returns = np.zeros(n_episodes)
        r = self.rewards.numpy()
        for _ in range(self.horizon):
            counts[np.arange(n_episodes), s] += 1
            a = sample_actions(policy_probs[s], rng)
            returns += r[s, a]
            s = sample_actions(Tdense[s * A + a], rng)
        return {"returns": returns, "counts": counts}
