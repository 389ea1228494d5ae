"""Metrics M for NTCov_M(X, Y) = ∇X · M ∇Y: the geometry an optimizer's step lives in.

| optimizer        | M                                    | class          |
| ---------------- | ------------------------------------ | -------------- |
| SGD              | I                                    | Euclidean      |
| Adam / RMSprop   | diag(1 / (√v̂ + ε))                   | Diagonal       |
| sign descent     | diag(1 / |g|)  (so that M g = sign g) | Diagonal       |
| NPG              | F⁻¹ (pseudo-inverse or damped)       | InverseFisher  |

Every metric acts on rows: ``apply(V)`` maps V of shape (k, P) to (M vᵢ)ᵢ, shape (k, P).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.func import functional_call, jvp, vjp

if TYPE_CHECKING:  # pragma: no cover
    from ntrl.engine.tangent import TangentEngine


def scaled_norm(v: Tensor) -> Tensor:
    """‖v‖ over the last axis as s·‖v/s‖ with s = max|v| (0 where v = 0), so that it is finite
    wherever ‖v‖ is: the squares of a v near 10¹⁵⁴ or beyond (an inverse Fisher of a nearly
    deterministic policy) overflow, and the plain Σv² would be inf."""
    s = v.abs().amax(-1)
    unit = v / torch.where(s > 0, s, torch.ones_like(s))[..., None]
    return s * unit.square().sum(-1).sqrt()


def scaled_inner(c: Tensor | float, a: Tensor, b: Tensor) -> Tensor:
    """c·(a·b) over the last axis, formed as ((c·s_a)·s_b)·(â·b̂) with s = max|·| and â = a/s_a,
    so that it is finite wherever the result is: c = 0 gives 0 however large a and b are."""
    sa, sb = a.abs().amax(-1), b.abs().amax(-1)
    ua = a / torch.where(sa > 0, sa, torch.ones_like(sa))[..., None]
    ub = b / torch.where(sb > 0, sb, torch.ones_like(sb))[..., None]
    return ((c * sa) * sb) * (ua * ub).sum(-1)


class Metric(ABC):
    """A symmetric positive semi-definite preconditioner M."""

    name: str = "metric"

    @abstractmethod
    def apply(self, V: Tensor) -> Tensor:
        """Return M vᵢ for every row vᵢ of V (shape (k, P))."""

    @property
    def diagonal(self) -> Tensor | None:
        """The diagonal of M when M is diagonal (used by structured backends), else None."""
        return None


class Euclidean(Metric):
    """M = I: plain gradient descent."""

    name = "euclidean"

    def apply(self, V: Tensor) -> Tensor:
        return V



class Diagonal(Metric):
    """M = diag(d): Adam, RMSprop (d = 1/(√v̂ + ε)) and sign descent (d = 1/|g|, 0 where g = 0)."""

    name = "diagonal"

    def __init__(self, d: Tensor):
        if d.ndim != 1:
            raise ValueError(f"Diagonal metric needs a flat vector, got shape {tuple(d.shape)}")
        if not torch.isfinite(d).all() or (d < 0).any():
            raise ValueError("Diagonal metric entries must be finite and non-negative")
        self.d = d

    def apply(self, V: Tensor) -> Tensor:
        return V * self.d.to(V.dtype)

    @property
    def diagonal(self) -> Tensor | None:
        return self.d


def right_singular(A: Tensor) -> tuple[Tensor, Tensor]:
    """Singular values S (descending) and right singular vectors Vh of A (m × n), A = U S Vh.

    Through the QR factorisation Aᵀ = Q R and the small SVD R = U_R S V_Rᵀ: then
    A = V_R S (Q U_R)ᵀ, so Vh = (Q U_R)ᵀ. Householder QR is backward stable, so this is as
    accurate as a direct SVD, and for the Fisher's short, wide A (m = states × actions rows,
    n = parameters) it is faster: 1.6× on the juice Fisher (25 × 4741) and 2.8× at 320 rows
    (``benchmarks/bench_fisher.py``). Leading axes of A are batch axes (a population's members)."""
    Q, R = torch.linalg.qr(A.mT)
    U_R, S, _ = torch.linalg.svd(R, full_matrices=False)
    return S, (Q @ U_R).mT


class HouseholderSVD:
    """The factors of :func:`right_singular` without Vh: A = U S Vh (leading axes are batch axes)
    held as the Householder reflectors of Aᵀ = Q R (``torch.geqrf``) and the SVD of the small
    R = U_R S V_Rᵀ, so that Vh = (Q U_R)ᵀ is applied, never formed:

        Vh v = U_Rᵀ (Qᵀ v)[:k],        Vhᵀ c = Q [U_R c; 0],        k = min(m, n),

    each Q or Qᵀ as the k reflectors applied to the vectors (``torch.ormqr``). Forming Q (the
    other half of ``torch.linalg.qr``) and Q U_R costs more than the factorisation itself: for a
    population's juice Fishers, 30 × (25 × 4741), with three properties' directional derivatives,
    31 ms against 64 ms (``benchmarks/bench_fisher.py``); an application reads the reflectors as a
    product with Vh reads Vh."""

    def __init__(self, A: Tensor):
        self.reflectors, self.tau = torch.geqrf(A.mT)  # (…, n, m): R in the upper triangle of the first k rows
        k = self.tau.shape[-1]
        self.U_R, self.S, _ = torch.linalg.svd(self.reflectors[..., :k, :].triu(), full_matrices=False)

    def project(self, V: Tensor) -> Tensor:
        """Vh V for columns V (…, n, c): (…, k, c)."""
        QtV = torch.ormqr(self.reflectors, self.tau, V, left=True, transpose=True)
        return self.U_R.mT @ QtV[..., :self.S.shape[-1], :]

    def lift(self, C: Tensor) -> Tensor:
        """Vhᵀ C for columns C (…, k, c): (…, n, c)."""
        k = self.S.shape[-1]
        Y = C.new_zeros(*C.shape[:-2], self.reflectors.shape[-2], C.shape[-1])
        Y[..., :k, :] = self.U_R @ C
        return torch.ormqr(self.reflectors, self.tau, Y, left=True, transpose=False)


def kept_singular(S: Tensor, rtol: float | None = None) -> Tensor:
    """Which singular values (descending along the last axis) the inverse Fisher keeps: those above
    ``rtol``·S_max, ``rtol`` = 100·√eps by default. F⁺ amplifies a component along a singular
    direction by 1/S², so rounding noise of relative size eps in g (autograd's, in every
    direction) stays below 1e-4 of the step. Keeping smaller S let NPG take a catastrophic step on
    the juice MLP (P from 0.3 to 1e-166 in one update)."""
    rtol = rtol if rtol is not None else 100 * torch.finfo(S.dtype).eps ** 0.5
    return S > rtol * S.max(dim=-1, keepdim=True).values.clamp_min(torch.finfo(S.dtype).tiny)


class AllLogProbs:
    """X = log π(·|o) for every state and action, flattened (entry i·K + a = log π(a|o_i)).

    It is per-state on the states repeated K times (row i·K + a reads its own action a), so the
    structured backend forms its Jacobian, the Fisher's rows, from one forward and one backward
    pass (``per_state`` is the (obs, fn of logits) pair the engine looks for)."""

    def __init__(self, obs: Tensor, n_actions: int):
        self.obs = obs
        self.name = "log_probs"
        n = obs.shape[0]
        self.actions = torch.arange(n_actions, device=obs.device).repeat(n)[:, None]
        self.per_state = (obs.repeat_interleave(n_actions, dim=0), self.of_logits)

    def of_logits(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits, dim=-1).gather(-1, self.actions)[:, 0]

    def __call__(self, view) -> Tensor:
        return view.log_probs(self.obs).reshape(-1)


class InverseFisher(Metric):
    """M = (F + λI)⁻¹, or the pseudo-inverse F⁺ when λ = 0, for the policy's Fisher information

        F = Σ_s w_s Σ_a π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ = AᵀA,
        A = rows √(w_s π(a|s)) ∇log π(a|s)   (π in the weights is held constant).

    ``method="exact"`` factors A = U S Vᵀ (thin SVD) and applies V diag(1/(S² + λ)) Vᵀ, plus
    (1/λ)(I − VVᵀ) when λ > 0. Singular values below ``rtol``·S_max (default 100·√eps) are treated
    as zero: the softmax's shift direction is always one, and near-zero ones only amplify noise. ``method="cg"`` never forms A: it runs
    conjugate gradient on (F + λI) x = v with Fisher-vector products from ``torch.func`` jvp/vjp,
    and needs λ > 0. ``method="auto"`` is exact while A has at most ``max_exact_elements``, CG
    beyond that when λ > 0, and an error that says so when λ = 0.
    """

    name = "inverse_fisher"

    def __init__(
        self,
        engine: "TangentEngine",
        obs: Tensor,
        weights: Tensor | None = None,
        damping: float = 0.0,
        method: str = "auto",
        rtol: float | None = None,
        max_exact_elements: int = 2**24,
        cg_tol: float = 1e-10,
        cg_max_iter: int = 200,
    ):
        if method not in ("auto", "exact", "cg"):
            raise ValueError(f"method must be auto, exact or cg, got {method!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.engine = engine
        params = engine.params()
        dtype = next(iter(params.values())).dtype
        view = engine.view(params)
        self.obs = view.as_obs(obs)
        with torch.no_grad():
            logp = view.log_probs(self.obs)
        n_states, n_actions = logp.shape
        w = torch.full((n_states,), 1.0 / n_states, dtype=dtype) if weights is None else weights
        w = torch.as_tensor(w, dtype=dtype)
        self.row_scale = (w[:, None] * logp.exp()).clamp_min(0).sqrt().reshape(-1)
        self.damping = float(damping)
        m = n_states * n_actions
        if method == "auto":
            method = "exact" if m * engine.n_params <= max_exact_elements else "cg"
            if method == "cg" and self.damping <= 0:
                raise ValueError(f"the Fisher over {n_states} states × {n_actions} actions × {engine.n_params} "
                                 f"parameters is too large for the exact solve (limit {max_exact_elements} "
                                 "elements); give a damping > 0 to use conjugate gradient")
        if method == "cg" and self.damping <= 0:
            raise ValueError("InverseFisher with method='cg' needs damping > 0")
        self.method = method
        self.cg_tol, self.cg_max_iter = cg_tol, cg_max_iter
        self._params = params
        if method == "exact":
            _, J = engine.dense_jacobian(AllLogProbs(self.obs, n_actions), params)
            S, Vh = right_singular(J * self.row_scale[:, None])
            keep = kept_singular(S, rtol)
            self.S, self.Vh = S[keep], Vh[keep]

    def _scaled_logp(self, flat: Tensor) -> Tensor:
        p = self.engine.unflatten(flat)
        logp = torch.log_softmax(functional_call(self.engine.module, p, (self.obs,)), dim=-1)
        return logp.reshape(-1) * self.row_scale

    def fvp(self, v: Tensor) -> Tensor:
        """F v = Aᵀ(A v), by one jvp and one vjp (no Jacobian is formed)."""
        theta = self.engine.flatten(self._params)
        _, Av = jvp(self._scaled_logp, (theta,), (v,))
        _, pullback = vjp(self._scaled_logp, theta)
        return pullback(Av)[0]

    def _cg(self, b: Tensor) -> Tensor:
        x = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rr = r @ r
        b_norm = b.norm().clamp_min(torch.finfo(b.dtype).tiny)
        for _ in range(self.cg_max_iter):
            Ap = self.fvp(p) + self.damping * p
            alpha = rr / (p @ Ap)
            x = x + alpha * p
            r = r - alpha * Ap
            rr_new = r @ r
            if rr_new.sqrt() <= self.cg_tol * b_norm:
                break
            p = r + (rr_new / rr) * p
            rr = rr_new
        return x

    def low_rank(self) -> tuple[Tensor, Tensor, float] | None:
        """(Vh, w, λ) with M = Vhᵀ diag(w) Vh + (1/λ)(I − VhᵀVh), w = 1/(S² + λ), for the exact
        method (None for CG). Then ∇X·M∇X = Σ_k w_k (∇X·v_k)² + (‖∇X‖² − Σ_k (∇X·v_k)²)/λ, which a
        structured backend evaluates from r directional derivatives without forming ∇X."""
        if self.method != "exact":
            return None
        return self.Vh, 1.0 / (self.S**2 + self.damping), self.damping

    def apply(self, V: Tensor) -> Tensor:
        V = V.to(self.row_scale.dtype)
        if self.method == "cg":
            return torch.stack([self._cg(v) for v in V]) if V.shape[0] else V
        coef = V @ self.Vh.T  # (k, r)
        out = (coef / (self.S**2 + self.damping)) @ self.Vh
        if self.damping > 0:
            out = out + (V - coef @ self.Vh) / self.damping
        return out
