"""Exact models of small tabular MDPs, differentiable in the policy's parameters.

A :class:`TabularMDP` holds the transition kernel T(s'|s, a), the expected reward r(s, a), the
initial distribution ρ(s) and the observation o(s) that the policy sees in each state. A policy
π_θ(a|o) given as a :class:`ntrl.engine.tangent.PolicyView` induces π(a|s) = π_θ(a|o(s)), and every
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

The finite-horizon visitation runs, under plain autograd, as one autograd node
(:class:`FiniteHorizonVisitation`) whose forward and backward recursions are sparse
matrix-vector products in compiled code. Its backward is the adjoint (reverse) recursion

    ν_{H−1} = ḡ/H,   ν_t = ḡ/H + P_π ν_{t+1},
    ∂L/∂π(a|s) = Σ_{t<H−1} μ_t(s) Σ_{s'} T(s'|s, a) ν_{t+1}(s')

for L with ∂L/∂d = ḡ. A step of the torch recursion is half a dozen small tensor ops forward and
as many backward, so on small models the per-op cost dominated. On the juice model the adjoint
node is 6× faster forward and 4–5× faster forward and backward, and a training update's utility
gradient 3–4× faster (``benchmarks/bench_exact_model.py``, results in ``benchmarks/RESULTS.md``).
Under ``torch.func`` transforms (the engine's ``jacrev`` reference), which cannot trace compiled
code, the torch recursion runs instead; tests check the two agree in float64. The node is first
order: asking it for a second derivative or a batched cotangent is an error that says to use
torch.func.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor

try:  # the compiled kernel behind scipy's ``csr_matrix @ vector``, without the operator's checks
    from scipy.sparse._sparsetools import csr_matvec as _csr_matvec
except ImportError:  # pragma: no cover - a scipy that moved it: the public operator does the same
    _csr_matvec = None

from ntrl.engine.tangent import PolicyView


def sample_actions(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of a probability matrix (N, K), by inverse CDF with one uniform per row."""
    c = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0])[:, None] * c[:, -1:]
    return np.minimum((u >= c).sum(axis=1), probs.shape[1] - 1)



class ModelTooLargeError(ValueError):
    """The exact model of a configuration would exceed the size limit; use sampled mode."""


def check_model_size(n_states: int, limit: int, what: str = "the tabular model") -> None:
    """Raise :class:`ModelTooLargeError` stating the limit when ``n_states > limit``."""
    if n_states > limit:
        raise ModelTooLargeError(
            f"{what} would have {n_states} states, more than the exact-model limit of {limit} states; "
            f"use sampled mode or a smaller configuration"
        )


class SparsePattern:
    """A fixed sparsity pattern (COO ``rows``, ``cols`` of an n×m matrix, duplicates allowed) in
    CSR order, so that a matrix of that pattern with new entries is applied without rebuilding
    it: ``matvec(data, x)`` = Σ_k data_k x[cols_k] summed into rows_k."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]):
        self.order = np.argsort(rows, kind="stable")
        self.indices = np.ascontiguousarray(cols[self.order], dtype=np.int64)
        self.indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=shape[0]))]).astype(np.int64)
        self.shape = shape

    def sorted_data(self, data: np.ndarray) -> np.ndarray:
        """The entries, given in COO order, in this pattern's CSR order."""
        return np.ascontiguousarray(data[self.order], dtype=np.float64)

    def matvec(self, data: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """y = M x for the matrix M with this pattern and entries ``data`` (already CSR-ordered),
        into ``out`` where given (a contiguous float64 vector, zeroed here), so that a recursion
        does not allocate a vector per step."""
        n, m = self.shape
        if _csr_matvec is None:
            y = sp.csr_matrix((data, self.indices, self.indptr), shape=self.shape) @ x
            if out is None:
                return y
            out[:] = y
            return out
        if out is None:
            y = np.zeros(n)
        else:
            y = out
            y.fill(0.0)
        _csr_matvec(n, m, self.indptr, self.indices, data, np.ascontiguousarray(x, dtype=np.float64), y)
        return y


FIRST_ORDER_ONLY = (
    "the exact model's adjoint visitation node supports first-order, unbatched reverse mode "
    "(torch.autograd.grad / backward); for second derivatives, batched cotangents or forward mode, "
    "differentiate under torch.func (jacrev, hessian, jvp, vmap), where the model runs its torch recursion")


class FiniteHorizonVisitation(torch.autograd.Function):
    """d = (1/H) Σ_{t<H} μ_t with μ_{t+1} = P_πᵀ μ_t, as one autograd node (see the module
    docstring for the adjoint backward). Inputs: π of shape (S, A), or (M, S, A) for M policies at
    once (a population's members: one block-diagonal P_π, so each member's recursion sums in the
    same order as its own run's), in float64, and the model."""

    @staticmethod
    def forward(ctx, pi: Tensor, model: "TabularMDP") -> Tensor:
        batched = pi.ndim == 3
        p = pi.detach().numpy().reshape(-1 if not batched else pi.shape[0], model.n_states * model.n_actions)
        M = p.shape[0] if batched else 1
        # P_π(s, s') = Σ_a π(a|s) T(s'|s, a): one entry per nonzero of T, member by member
        w = (p.reshape(M, -1)[:, model.rows_np] * model.probs_np).reshape(-1)
        fwd, _ = model.block_patterns(M)
        w_T = fwd.sorted_data(w)
        H = model.horizon
        mus = np.empty((H, M * model.n_states))
        mus[0] = np.tile(model.initial_np, M)
        for t in range(1, H):
            fwd.matvec(w_T, mus[t - 1], out=mus[t])  # μ_{t+1} = P_πᵀ μ_t
        ctx.mus, ctx.w, ctx.model, ctx.M, ctx.batched = mus, w, model, M, batched  # P_π's entries in COO order
        ctx.w_sorted = None  # in P_π's CSR order: sorted by the first backward pass that needs it
        d = mus.sum(0) / H
        return torch.from_numpy(d.reshape(M, -1) if batched else d)

    @staticmethod
    def backward(ctx, grad_d: Tensor) -> tuple[Tensor, None]:
        if torch.is_grad_enabled():  # create_graph=True: a second derivative was asked for
            raise RuntimeError(FIRST_ORDER_ONLY)
        model, mus, M = ctx.model, ctx.mus, ctx.M
        _, back = model.block_patterns(M)
        if ctx.w_sorted is None:
            ctx.w_sorted = back.sorted_data(ctx.w)
        w = ctx.w_sorted
        H = model.horizon
        try:
            g = grad_d.detach().to(torch.float64).numpy().reshape(-1) / H
        except RuntimeError as e:  # a batched cotangent (is_grads_batched, vectorize=True)
            raise RuntimeError(FIRST_ORDER_ONLY) from e
        nus = np.empty_like(mus)  # nus[t] = ν_t
        nus[H - 1] = g
        product = np.empty(nus.shape[1])
        for t in range(H - 2, -1, -1):
            np.add(g, back.matvec(w, nus[t + 1], out=product), out=nus[t])  # ν_t = ḡ/H + P_π ν_{t+1}
        # ∂L/∂π(a|s) = Σ_t μ_t(s) Q_t(s, a) with Q_t(s, a) = Σ_s' T(s'|s, a) ν_{t+1}(s'), per member;
        # Q comes out as (S, A, M, H − 1), so that each (s, m) block Q[s, :, m, :] is a matrix BLAS
        # reads in place (row stride M·(H − 1)), without a copy of Q
        S, A = model.n_states, model.n_actions
        nu_next = np.ascontiguousarray(nus[1:].reshape(H - 1, M, S).transpose(2, 1, 0)).reshape(S, -1)
        Q = (model.transitions_csr @ nu_next).reshape(S, A, M, H - 1)
        # Σ_t Q[s, a, m, t] μ_t[m, s] as S·M small products (A × H−1)(H−1 × 1), one BLAS gemv each,
        # so that each member's sum runs the same way whatever M (its run and its population agree)
        mu = np.ascontiguousarray(mus[:-1].reshape(H - 1, M, S).transpose(2, 1, 0))[..., None]
        grad = np.matmul(Q.transpose(0, 2, 1, 3), mu)[..., 0].transpose(1, 0, 2)
        return torch.from_numpy(grad if ctx.batched else grad[0]).to(grad_d.dtype), None


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
        # numpy copies for the adjoint visitation node
        self.rows_np, self.cols_np, self.probs_np = self.rows.numpy(), self.cols.numpy(), self.probs.numpy()
        self.nz_state = self.rows_np // A
        self.transitions_csr = sp.csr_matrix((self.probs_np, (self.rows_np, self.cols_np)), shape=(S * A, S))
        self._block_patterns: dict[int, tuple[SparsePattern, SparsePattern]] = {}
        self.initial_np = rho.numpy()
        obs = torch.as_tensor(np.asarray(observations))
        if obs.shape[0] != S:
            raise ValueError(f"observations must have {S} rows, got {obs.shape[0]}")
        self.observations = obs
        flat = obs.reshape(S, -1)
        self.unique_obs_flat, self.obs_index = torch.unique(flat, dim=0, return_inverse=True)
        self.unique_obs = self.unique_obs_flat.reshape(-1, *obs.shape[1:])

    def block_patterns(self, M: int) -> tuple[SparsePattern, SparsePattern]:
        """(P_πᵀ, P_π) patterns of M independent copies of the chain, block-diagonal over
        (M·S) × (M·S), entries member by member in COO order (cached per M)."""
        if M not in self._block_patterns:
            S = self.n_states
            offset = np.repeat(np.arange(M) * S, self.rows_np.size)
            src, dst = np.tile(self.nz_state, M) + offset, np.tile(self.cols_np, M) + offset
            self._block_patterns[M] = (SparsePattern(dst, src, (M * S, M * S)), SparsePattern(src, dst, (M * S, M * S)))
        return self._block_patterns[M]

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
        if (self.horizon is not None and pi.dtype == torch.float64 and pi.device.type == "cpu"
                and not torch._C._functorch.is_functorch_wrapped_tensor(pi)):
            return FiniteHorizonVisitation.apply(pi, self)
        return self.visitation_torch(pi)

    def visitation_torch(self, pi: Tensor) -> Tensor:
        """d from the recursion in torch ops: the reference, and the path under torch.func."""
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
