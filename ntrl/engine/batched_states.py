"""Structured tangents for a population at N shared observations: the logits' Jacobian in factored
form, and tracked quantities in the N·K-dimensional space of the logits.

:mod:`ntrl.engine.batched_structured` factors the Jacobian of M stacked Sequential networks at ONE
observation; this module does the same at N observations o = 1 … N (the juice gridworld's distinct
observations and its probes), z_m = (z_m(o, k)) ∈ R^{N·K}, flattened observation by observation.
Per Linear layer l with input a_l(o) (M, N, in) and, from one backward pass of every observation's K
unit cotangents, Δ_l(o) = [δ_l^(o,1) … δ_l^(o,K)] (M, N, out, K) with δ_l^(o,k) = ∂z(o, k)/∂y_l(o),

    ∇_{W_l} z(o, k) = δ_l^(o,k) a_l(o)ᵀ,        ∇_{b_l} z(o, k) = δ_l^(o,k),

so, with every property's gradient ∇X = Jᵀc_X (c_X = ∂X/∂z, (M, N·K)),

    G = J Jᵀ,  G[(o,k), (p,j)] = Σ_l (a_l(o)·a_l(p) + 1_b) δ_l^(o,k)·δ_l^(p,j)
    J D Jᵀ[(o,k), (p,j)]      = Σ_l Σ_i δ_l^(o,k)_i δ_l^(p,j)_i (Σ_n D_l,in a_l(o)_n a_l(p)_n + d_b,i)
    J v[(o,k)]                = Σ_l δ_l^(o,k) · (V_l a_l(o) + v_b)
    ∇X·∇Y = c_Xᵀ G c_Y,  ∇X·D∇Y = c_Xᵀ (J D Jᵀ) c_Y,  ∇X·v = c_X · (J v),

without forming any (M, P) gradient or any row of J.

**The Fisher** over the first N_F observations (the model's states, weights w_o, policy π(·|o)):
F = AᵀA, A = L J_F with L block-diagonal, block o = diag(√(w_o π_o)) (I − 1π_oᵀ), as
:class:`ntrl.engine.batched.BatchedInverseFisher` takes its rows. With G_FF = RᵀR (Cholesky) and
the SVD R Lᵀ = U S Wᵀ, A's right singular vectors are v_k = J_Fᵀ R⁻¹ u_k (as in
:class:`ntrl.engine.batched_structured.LogitInverseFisher`, with N_F·K logits), so for any c

    v_k · Jᵀc = u_kᵀ R⁻ᵀ (G_{F,:} c),        NTVar_{F⁺}(Jᵀc) = Σ_{k kept} (v_k · Jᵀc)² / S_k²,

singular values kept by the per-run rule (:func:`ntrl.engine.metrics.kept_singular`). G_FF's
conditioning is J_F's squared, and its rounding enters the NTVar as about eps·κ(G_FF): on the juice
MLP (J_F 25 × 4741 at width 64) κ(J_F) was 4–30 at initialisation and at most about 55 over 3,000
exact SGD, sign and Adam updates from p₀ = 5e-6; the trainer takes this path only while κ(G_FF) is
at most 1e4 (:data:`ntrl.population.trainer.STATES_MAX_CONDITION`).
``tests/test_population_states.py`` checks it all against explicit gradients in float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ntrl.engine.batched_structured import StackedSequential, _Layer
from ntrl.engine.metrics import kept_singular


@dataclass
class StatesJacobian:
    """J = ∂z/∂θ of every member at N observations in factored form (see the module docstring):
    per Linear layer its slot in θ, its input a_l (M, N, in) and Δ_l (M, N, out, K)."""

    layers: list[_Layer]
    inputs: list[Tensor]
    deltas: list[Tensor]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(M, N, K)."""
        M, N, _, K = self.deltas[-1].shape
        return M, N, K

    def gram(self) -> Tensor:
        """G = J Jᵀ, (M, N·K, N·K)."""
        M, N, K = self.shape
        G = None
        for L, a, D in zip(self.layers, self.inputs, self.deltas):
            A = torch.bmm(a, a.transpose(1, 2))  # (M, N, N)
            if L.b0 is not None:
                A = A + 1.0
            cols = D.transpose(2, 3).reshape(M, N * K, -1)  # row (o, k): δ_l^(o,k)
            term = torch.bmm(cols, cols.transpose(1, 2)).view(M, N, K, N, K) * A[:, :, None, :, None]
            G = term if G is None else G + term
        return G.reshape(M, N * K, N * K)

    def gram_diagonal(self, d: Tensor) -> Tensor:
        """J D Jᵀ for a diagonal metric D = diag(d), d (M, P): (M, N·K, N·K)."""
        M, N, K = self.shape
        G = None
        for L, a, D in zip(self.layers, self.inputs, self.deltas):
            pairs = (a[:, :, None, :] * a[:, None, :, :]).reshape(M, N * N, -1)  # a(o) ⊙ a(p)
            w = torch.bmm(StackedSequential._weight(d, L), pairs.transpose(1, 2))  # (M, out, N·N)
            if L.b0 is not None:
                w = w + StackedSequential._bias(d, L)[:, :, None]
            term = torch.einsum("moik,miop,mpij->mokpj", D, w.view(M, -1, N, N), D)
            G = term if G is None else G + term
        return G.reshape(M, N * K, N * K)

    def materialize(self, c: Tensor, n_params: int) -> Tensor:
        """Jᵀ c (M, P) for coefficients c (M, N·K): Σ_o of each layer's (Δ_l(o) c(o)) a_l(o)ᵀ."""
        return self.materialize_many(c[:, None], n_params)[:, 0]

    def materialize_many(self, C: Tensor, n_params: int) -> Tensor:
        """Jᵀ c (M, n_c, P) for each row c of C (M, n_c, N·K), all at once."""
        M, N, K = self.shape
        n_c = C.shape[1]
        C = C.reshape(M, n_c, N, K)
        out = torch.empty(M, n_c, n_params, dtype=C.dtype, device=C.device)
        for L, a, D in zip(self.layers, self.inputs, self.deltas):
            d = torch.matmul(D[:, None], C[..., None])[..., 0]  # Δ_l(o) c(o), (M, n_c, N, out)
            out[:, :, L.w0:L.w0 + L.out * L.inp] = torch.matmul(d.transpose(2, 3), a[:, None]).reshape(M, n_c, -1)
            if L.b0 is not None:
                out[:, :, L.b0:L.b0 + L.out] = d.sum(2)
        return out

    def dot_many(self, V: Tensor) -> Tensor:
        """J v (M, n_v, N·K) for each row v of V (M, n_v, P), all at once."""
        M, N, K = self.shape
        n_v = V.shape[1]
        out = None
        for L, a, D in zip(self.layers, self.inputs, self.deltas):
            Wv = V[:, :, L.w0:L.w0 + L.out * L.inp].reshape(M, n_v, L.out, L.inp)
            y = torch.matmul(a[:, None], Wv.transpose(2, 3))  # (M, n_v, N, out)
            if L.b0 is not None:
                y = y + V[:, :, None, L.b0:L.b0 + L.out]
            term = torch.matmul(y[:, :, :, None, :], D[:, None])[:, :, :, 0, :]  # (M, n_v, N, K)
            out = term if out is None else out + term
        return out.reshape(M, n_v, N * K)

    def dot(self, v: Tensor) -> Tensor:
        """J v for vectors v (M, P): (M, N·K)."""
        return self.dot_many(v[:, None])[:, 0]


@dataclass
class StatesTrace:
    """What :func:`states_forward` keeps for :func:`states_jacobian`: each Linear layer's input
    a_l (M, N, in) and weight W_l (M, out, in), each activation's derivative σ'(y) (M, N, width),
    all without autograd's graph."""

    inputs: list[Tensor]
    weights: list[Tensor]
    derivs: list[Tensor]


def layer_parameters(net: StackedSequential, theta: Tensor) -> list[tuple[Tensor, Tensor | None]]:
    """(W_l, b_l) of every Linear layer: views into the stacked parameters θ (M, P)."""
    return [(StackedSequential._weight(theta, step), StackedSequential._bias(theta, step))
            for kind, step in net.steps if kind == "linear"]


def states_forward(net: StackedSequential, params: list[tuple[Tensor, Tensor | None]], obs: Tensor,
                   trace: bool = True) -> tuple[Tensor, StatesTrace | None]:
    """Every member's logits (M, N, K) at the N observations ``obs`` from each Linear layer's
    (W_l, b_l) (:func:`layer_parameters`, or autograd leaves: then the logits carry their graph),
    as y = x W_lᵀ + b_l by one batched product per layer, which gives the bytes of ``vmap`` over
    ``functional_call`` (checked for 1, 5 and 30 members); and (``trace``) what
    :func:`states_jacobian` needs."""
    M = params[0][0].shape[0]
    x = net.encode(obs, params[0][0].dtype).reshape(obs.shape[0], -1)
    x = x[None].expand(M, -1, -1)  # (M, N, d)
    inputs, weights, derivs = [], [], []
    layer = iter(params)
    for kind, step in net.steps:
        if kind == "linear":
            W, b = next(layer)
            if trace:
                inputs.append(x.detach())
                weights.append(W.detach())
            y = torch.bmm(x, W.transpose(1, 2))
            x = y if b is None else y + b[:, None, :]
        elif type(step) is nn.Tanh:
            x = torch.tanh(x)
            if trace:
                xd = x.detach()
                derivs.append(torch.rsub(xd * xd, 1))
        else:  # any other elementwise σ: σ'(y) from autograd
            if trace:
                with torch.enable_grad():
                    y = x.detach().requires_grad_(True)
                    derivs.append(torch.autograd.grad(step(y).sum(), y)[0])
            x = step(x)
    return x, (StatesTrace(inputs, weights, derivs) if trace else None)


def states_jacobian(net: StackedSequential, trace: StatesTrace) -> StatesJacobian:
    """The factored Jacobian of every member's logits at the observations of a
    :func:`states_forward` pass: one backward pass of every observation's K unit cotangents at
    once."""
    inputs, derivs = trace.inputs, trace.derivs
    M, N = inputs[0].shape[:2]
    K = trace.weights[-1].shape[1]
    delta = torch.eye(K, dtype=inputs[0].dtype, device=inputs[0].device).expand(M, N, K, K)  # (M, N, out, K)
    deltas: list[Tensor] = []
    layers: list[_Layer] = []
    li, ai = len(inputs), len(derivs)
    for kind, step in reversed(net.steps):
        if kind == "linear":
            li -= 1
            deltas.append(delta)
            layers.append(step)
            if li == 0:  # the first Linear layer: what comes before it holds no parameter
                break
            delta = torch.einsum("moi,mnok->mnik", trace.weights[li], delta)  # W_lᵀ Δ per observation
        else:
            ai -= 1
            delta = delta * derivs[ai][:, :, :, None]
    deltas.reverse()
    layers.reverse()
    return StatesJacobian(layers, inputs, deltas)


def quadratic_forms(C: Tensor, G: Tensor) -> Tensor:
    """C G Cᵀ per member: every product c_iᵀ G c_j of the rows of C (M, n_c, n), (M, n_c, n_c)."""
    return torch.bmm(C, torch.bmm(G, C.transpose(1, 2)))


@dataclass
class StatesInverseFisher:
    """F⁺ (undamped) of every member over its first N_F observations, acting on vectors Jᵀc
    (see the module docstring): ``GF`` the rows G_{F,:} (M, N_F·K, N·K), ``R`` (M, N_F·K, N_F·K)
    upper with G_FF = RᵀR, ``U`` the left singular vectors of R Lᵀ, ``inv`` 1/S_k² on the kept
    singular values and 0 elsewhere (NaN for a member whose G, π or w is not finite or whose G_FF
    is not positive definite)."""

    GF: Tensor
    R: Tensor
    U: Tensor
    inv: Tensor

    @classmethod
    def from_gram(cls, G: Tensor, probs: Tensor, weights: Tensor, rtol: float | None = None) -> "StatesInverseFisher":
        """From G = J Jᵀ (M, n, n), π (M, N_F, K) and the states' weights w (M, N_F)."""
        M, NF, K = probs.shape
        nf = NF * K
        GF = G[:, :nf]
        GFF = GF[:, :, :nf]
        eye = torch.eye(nf, dtype=G.dtype, device=G.device)
        ok = torch.isfinite(G).flatten(1).all(1) & torch.isfinite(probs).flatten(1).all(1) & torch.isfinite(weights).all(1)
        chol, info = torch.linalg.cholesky_ex(torch.where(ok[:, None, None], GFF, eye))
        ok = ok & (info == 0)
        R = torch.where(ok[:, None, None], chol.mT, eye)
        probs = torch.where(ok[:, None, None], probs, torch.full_like(probs, 1.0 / K))
        weights = torch.where(ok[:, None], weights, torch.ones_like(weights))
        scale = (weights[:, :, None] * probs).clamp_min(0).sqrt()  # (M, N_F, K)
        L = centring_rows(probs, scale)  # block o: √(w π_a)(e_a − π)
        U, S, _ = torch.linalg.svd(torch.bmm(R, L.mT))
        keep = kept_singular(S, rtol)
        inv = torch.where(keep, 1.0 / S**2, torch.zeros_like(S))
        inv = torch.where(ok[:, None], inv, torch.full_like(inv, float("nan")))
        return cls(GF, R, U, inv)

    def _back(self, coef: Tensor) -> Tensor:
        """β = R⁻¹ U (inv ⊙ coef) for coefficients coef_k = v_k·v (M, N_F·K), so that
        F⁺v = Σ_k v_k inv_k coef_k = J_Fᵀβ (v_k = J_Fᵀ R⁻¹ u_k)."""
        return torch.linalg.solve_triangular(self.R, torch.bmm(self.U, (coef * self.inv)[:, :, None]), upper=True)[..., 0]

    def _coefficients(self, C: Tensor) -> Tensor:
        """v_k · Jᵀc for each column c of C (M, n, n_c): Uᵀ R⁻ᵀ G_{F,:} C, (M, N_F·K, n_c)."""
        return self._coefficients_of(torch.bmm(self.GF, C))

    def _coefficients_of(self, JFv: Tensor) -> Tensor:
        """v_k · v from J_F v (M, N_F·K, n_c): Uᵀ R⁻ᵀ J_F v."""
        return torch.bmm(self.U.mT, torch.linalg.solve_triangular(self.R.mT, JFv, upper=False))

    def ntvars(self, C: Tensor) -> Tensor:
        """(Jᵀc)ᵀ F⁺ (Jᵀc) for each row c of C (M, n_c, n): (M, n_c)."""
        coef = self._coefficients(C.transpose(1, 2))  # (M, N_F·K, n_c)
        return (coef**2 * self.inv[:, :, None]).sum(1)


@dataclass
class StatesFisherMetric:
    """:class:`StatesInverseFisher` acting on vectors of parameter space (M, P), as
    :class:`ntrl.engine.batched.BatchedInverseFisher` does (its ``apply`` and ``ntvars``), through the
    Jacobian ``jac`` at every observation (the Fisher's first): v_k · v = u_kᵀ R⁻ᵀ (J_F v), and
    F⁺v = J_Fᵀ R⁻¹ U (inv ⊙ (v_k · v)_k)."""

    fisher: StatesInverseFisher
    jac: StatesJacobian
    n_params: int

    def _coefficients(self, vs: list[Tensor]) -> Tensor:
        nf = self.fisher.R.shape[1]
        JFv = self.jac.dot_many(torch.stack(vs, 1))[:, :, :nf].transpose(1, 2)  # (M, N_F·K, n)
        return self.fisher._coefficients_of(JFv)

    def apply(self, v: Tensor) -> Tensor:
        """F⁺ v for vectors v (M, P)."""
        beta = self.fisher._back(self._coefficients([v])[..., 0])
        M, N, K = self.jac.shape
        padded = torch.zeros(M, N * K, dtype=beta.dtype, device=beta.device)
        padded[:, :beta.shape[1]] = beta
        return self.jac.materialize(padded, self.n_params)

    def ntvar(self, grad: Tensor) -> Tensor:
        return self.ntvars([grad])[0]

    def ntvars(self, grads: list[Tensor]) -> list[Tensor]:
        """∇X · F⁺ ∇X for each of several gradients (M, P)."""
        coef = self._coefficients(grads)
        return list((coef**2 * self.fisher.inv[:, :, None]).sum(1).unbind(-1))


def centring_rows(probs: Tensor, scale: Tensor | None = None) -> Tensor:
    """The block-diagonal matrix (M, N·K, N·K) whose block o maps the logits' gradients at o to
    ∇log π(a|o) = ∇z(o, a) − Σ_b π(b|o) ∇z(o, b): row (o, a) is e_(o,a) − Σ_b π(b|o) e_(o,b), times
    ``scale`` (M, N, K) where given, for π (M, N, K)."""
    M, N, K = probs.shape
    block = torch.eye(K, dtype=probs.dtype, device=probs.device) - probs[:, :, None, :]  # (M, N, K, K)
    if scale is not None:
        block = scale[..., None] * block
    out = torch.zeros(M, N, K, N, K, dtype=probs.dtype, device=probs.device)
    idx = torch.arange(N, device=probs.device)
    out[:, idx, :, idx, :] = block.transpose(0, 1)
    return out.reshape(M, N * K, N * K)


def factored_log_prob_rows(jac: StatesJacobian, G: Tensor, probs: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The rows ∇log π(a|o) = ∇z(o, a) − Σ_b π(b|o) ∇z(o, b) of the first N_F observations, in
    factored form: L = B J_F with B block-diagonal (block o: I − 1π_oᵀ), as (L Lᵀ = B G_FF Bᵀ,
    (M, N_F·K, N_F·K); v ↦ L v for v (M, P)), from the Jacobian, G = J Jᵀ and π (M, N_F, K)."""
    nf = probs.shape[1] * probs.shape[2]
    B = centring_rows(probs)
    gram = torch.bmm(B, torch.bmm(G[:, :nf, :nf], B.mT))
    return gram, lambda v: torch.bmm(B, jac.dot(v)[:, :nf, None])[..., 0]
