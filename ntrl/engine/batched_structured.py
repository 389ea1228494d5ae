"""Structured tangents for a population at one shared observation: the logits' Jacobian in factored
form, and every tracked quantity in the K-dimensional space of the logits.

The members are networks of one Sequential architecture (Linear layers and elementwise
activations: ntrl's MLPPolicy, or an ``nn.Sequential``), parameters stacked as the rows of θ
(M, P), all evaluated at ONE observation o (the bandits' one state), z_m = f(θ_m; o) ∈ R^K. Per
Linear layer l with input a_l (M, in) and, from one backward pass with the K unit cotangents at
once, Δ_l = [δ_l^(1) … δ_l^(K)] (M, out, K), δ_l^(k) = ∂z_k/∂y_l, logit k's gradient is

    ∇_{W_l} z_k = δ_l^(k) a_lᵀ,        ∇_{b_l} z_k = δ_l^(k),

(:mod:`ntrl.engine.structured`'s factorisation, batched over the members). Every property X of
the logits has ∇X = Jᵀ c_X with c_X = ∂X/∂z (M, K), and without forming any (M, P) gradient

    G = J Jᵀ   = Σ_l (‖a_l‖² + 1_b) Δ_lᵀ Δ_l                 (1_b = 1 when the layer has a bias)
    J D Jᵀ     = Σ_l Δ_lᵀ diag(D_l a_l² + d_b) Δ_l            (D diagonal, blocks D_l (out, in), d_b)
    J v        = Σ_l Δ_lᵀ (V_l a_l + v_b)                     (any v, blocks V_l, v_b)
    ∇X·∇Y = c_Xᵀ G c_Y,     ∇X·D∇Y = c_Xᵀ (J D Jᵀ) c_Y,     ∇X·v = c_Xᵀ (J v).

A step along a direction in the span, Δθ = η Jᵀβ, is the rank-one update W_l += η (Δ_l β) a_lᵀ,
b_l += η Δ_l β, taken in place in θ.

**The Fisher** F = AᵀA with A = L J, L = diag(√(w π)) (I − 1πᵀ) (row a: √(w π_a) ∇log π(a), as
:class:`ntrl.engine.batched.BatchedInverseFisher` takes it), is factored without forming A: the
Cholesky factor R of G = RᵀR is the R of Jᵀ = Q R (Q orthonormal, P × K), so Aᵀ = Q (R Lᵀ) and
the K × K SVD R Lᵀ = U S Vᵀ gives A's singular values S and right singular vectors v_k = Q u_k =
Jᵀ R⁻¹ u_k. Both this and the per-run QR of Aᵀ err by about eps·S_max: R carries J's conditioning,
not A's (the √π scales that make A ill-conditioned at small p enter only through the small
factor Lᵀ), and the last layer puts (1 + ‖a_L‖²)·I into G, which keeps it well conditioned
(:meth:`StackedSequential.plan` asks for that bias); the drop rule is the same
(:func:`ntrl.engine.metrics.kept_singular`). For vectors in the span, with inv_k = 1/(S_k² + λ)
on the kept k and 0 elsewhere:

    v_k · Jᵀc = u_kᵀ R c
    M Jᵀc     = Jᵀ [R⁻¹ U diag(inv) Uᵀ R c + (c − R⁻¹ U diag(keep) Uᵀ R c)/λ]      (second term: λ > 0)
    NTVar_M(Jᵀc) = Σ_k inv_k (u_kᵀ R c)² + (cᵀ G c − Σ_{k kept} (u_kᵀ R c)²)/λ        (second term: λ > 0)

``tests/test_population_structured.py`` checks all of it against the torch.func reference and the
batched engine in float64.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ntrl.engine.metrics import kept_singular
from ntrl.engine.structured import StructuredBackend, StructuredUnsupported, _Linear


@dataclass
class _Layer:
    """One Linear layer's blocks in the flat θ: weight at [w0, w0 + out·in), bias at [b0, b0 + out)."""

    out: int
    inp: int
    w0: int
    b0: int | None


class StackedSequential:
    """A Sequential architecture evaluated at one shared observation for M stacked members."""

    def __init__(self, module: nn.Module, layers: list, encode, offsets: dict[str, int]):
        self.module = module
        self.steps = []  # ("linear", _Layer) or ("act", module)
        for step in layers:
            if isinstance(step, _Linear):
                w = module.get_parameter(step.weight)
                out, inp = w.shape
                self.steps.append(("linear", _Layer(out, inp, offsets[step.weight],
                                                    None if step.bias is None else offsets[step.bias])))
            else:
                self.steps.append(("act", step.module))
        self.encode = encode
        self._views: tuple[weakref.ref, list[tuple[Tensor, Tensor | None, Tensor]]] | None = None
        self._x0: tuple[Tensor, torch.dtype, int, Tensor] | None = None
        self._pads: dict = {}  # row_times' padded rows, by shape

    @classmethod
    def plan(cls, module: nn.Module, names: list[str], sizes: list[int]) -> "StackedSequential | None":
        """The structured form of ``module`` with flat parameters ``names`` (of ``sizes``, in θ's
        order), or None when it has none: not a Sequential of Linear + elementwise layers, a
        parameter frozen or shared, or no trainable bias on the last layer (which keeps G
        invertible)."""
        try:
            kind, steps, prefix = StructuredBackend._plan(module)
        except StructuredUnsupported:
            return None
        if kind != "sequential":
            return None
        offsets, i = {}, 0
        for n, k in zip(names, sizes):
            offsets[n] = i
            i += k
        linear = [s for s in steps if isinstance(s, _Linear)]
        wanted = [n for s in linear for n in (s.weight, s.bias) if n is not None]
        if not linear or sorted(wanted) != sorted(names) or linear[-1].bias is None:
            return None
        if prefix == "mlp":
            encode = lambda obs, dtype: module.encode(obs, dtype)  # noqa: E731
        else:
            encode = lambda obs, dtype: obs.to(dtype)  # noqa: E731
        return cls(module, steps, encode, offsets)

    @staticmethod
    def _weight(theta: Tensor, L: _Layer) -> Tensor:
        return theta[:, L.w0:L.w0 + L.out * L.inp].view(theta.shape[0], L.out, L.inp)

    @staticmethod
    def _bias(theta: Tensor, L: _Layer) -> Tensor | None:
        return None if L.b0 is None else theta[:, L.b0:L.b0 + L.out]

    def layer_views(self, theta: Tensor, keep: bool = True) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """(W_l, b_l, W_lᵀ) of every Linear layer: views into ``theta``; where ``keep``, kept for
        the θ of the last such call (a population's θ is stepped in place, so every update reads
        the same views)."""
        if self._views is not None and self._views[0]() is theta:
            return self._views[1]
        views = []
        for kind, step in self.steps:
            if kind == "linear":
                W = self._weight(theta, step)
                views.append((W, self._bias(theta, step), W.transpose(1, 2)))
        if keep:
            self._views = (weakref.ref(theta), views)
        return views

    def _first_input(self, obs: Tensor, dtype: torch.dtype, M: int) -> Tensor:
        """The encoded observation, (M, d): the same rows for every member (kept for the last call)."""
        if self._x0 is not None and self._x0[0] is obs and self._x0[1] == dtype and self._x0[2] == M:
            return self._x0[3]
        x = self.encode(obs, dtype).reshape(1, -1).expand(M, -1)
        self._x0 = (obs, dtype, M, x)
        return x

    def forward(self, theta: Tensor, obs: Tensor, trace: bool = True) -> tuple[Tensor, "Forward | None"]:
        """The logits (M, K) at the one observation ``obs`` (1, d), and (``trace``) every layer's
        input and every activation's derivative for :meth:`jacobian`."""
        M = theta.shape[0]
        x = self._first_input(obs, theta.dtype, M)
        inputs, derivs, views = [], [], []
        layer_views = iter(self.layer_views(theta, keep=trace))  # the η-probe's θ (no trace) is new each time
        for kind, step in self.steps:
            if kind == "linear":
                inputs.append(x)
                W, b, WT = next(layer_views)
                views.append((W, b))
                y = W[:, :, 0] * x if step.inp == 1 else row_times(x, WT, self._pads)
                x = y if b is None else y + b
            else:
                if trace and type(step) is nn.Tanh:  # σ' = 1 − σ², as autograd's tanh_backward forms it
                    x = torch.tanh(x)
                    derivs.append(torch.rsub(x * x, 1))  # 1 − x², without Tensor.__rsub__'s Python wrapper
                elif trace:  # any other elementwise σ: σ'(y) from autograd, the gradient of Σ σ(y)
                    with torch.enable_grad():
                        y = x.detach().requires_grad_(True)
                        out = step(y)
                        derivs.append(torch.autograd.grad(out.sum(), y)[0])
                    x = out.detach()
                else:  # the values alone (the η-probe's perturbed members)
                    x = torch.tanh(x) if type(step) is nn.Tanh else step(x)
                    derivs.append(None)
        return x, (Forward(theta, inputs, derivs, views) if trace else None)

    def jacobian(self, fwd: "Forward", columns: bool = True) -> "LogitJacobian":
        """One backward pass of the K unit cotangents through every member: Δ_l for each layer; or
        where ``columns`` is False, J without its columns: each Δ_l c is then formed, when asked
        for, by a backward pass of c itself (:meth:`combination`), which is all that an update
        reading no Gram matrix needs (an untracked SGD, sign or Adam step: the finiteness check,
        Jᵀc and the step along c)."""
        if not columns:
            return LogitJacobian([s for k, s in self.steps if k == "linear"], fwd.inputs, None, fwd,
                                 combination=lambda c: self.combination(fwd, c))
        theta = fwd.theta
        M = theta.shape[0]
        K = next(step.out for kind, step in reversed(self.steps) if kind == "linear")
        delta = torch.eye(K, dtype=theta.dtype, device=theta.device).expand(M, K, K)
        identity = True  # Δ is still the identity (no activation after the last Linear layer)
        deltas: list[Tensor] = []
        layers: list[_Layer] = []
        li, ai = len(fwd.inputs), len(fwd.derivs)
        for idx in range(len(self.steps) - 1, -1, -1):
            kind, step = self.steps[idx]
            if kind == "linear":
                li -= 1
                deltas.append(delta)
                layers.append(step)
                if li > 0:
                    W = fwd.views[li][0]
                    # Wᵀ Δ: Wᵀ itself where Δ is the identity; elsewhere (Δᵀ W)ᵀ, which reads W
                    # in its own row order
                    delta = W.transpose(1, 2).contiguous() if identity else \
                        torch.bmm(delta.transpose(1, 2), W).transpose(1, 2)
                    identity = False
                else:  # the first Linear layer: what comes before it holds no parameter
                    break
            else:
                ai -= 1
                delta = delta * fwd.derivs[ai][:, :, None]
                identity = False
        deltas.reverse()
        layers.reverse()
        return LogitJacobian(layers, fwd.inputs, deltas, fwd)

    def combination(self, fwd: "Forward", c: Tensor) -> list[Tensor]:
        """Δ_l c (M, out) of every Linear layer l, first to last, for one cotangent c (M, K) at the
        logits, by the backward pass of c alone: δ = c at the last layer's output, then back
        through each activation δ ← σ'(y) ⊙ δ and each Linear layer δ ← Wᵀδ (as autograd's backward
        of the network forms ∂(cᵀz)/∂y_l, per member)."""
        out: list[Tensor] = []
        delta = c
        li, ai = len(fwd.inputs), len(fwd.derivs)
        for kind, _ in reversed(self.steps):
            if kind == "linear":
                li -= 1
                out.append(delta)
                if li > 0:
                    delta = row_times(delta, fwd.views[li][0], self._pads)
                else:  # the first Linear layer: what comes before it holds no parameter
                    break
            else:
                ai -= 1
                delta = delta * fwd.derivs[ai]
        out.reverse()
        return out


@dataclass
class Forward:
    """What :meth:`StackedSequential.forward` keeps for the backward pass."""

    theta: Tensor
    inputs: list[Tensor]  # a_l, (M, in) per Linear layer
    derivs: list[Tensor | None]  # σ'(y) per activation, (M, width)
    views: list[tuple[Tensor, Tensor | None]]  # (W_l, b_l) per Linear layer: views into θ


NO_OVERFLOW = 1e150  # factors at most this large multiply to at most 1e300, below float64's 1.8e308


class LogitJacobian:
    """J = ∂z/∂θ of every member in factored form (see the module docstring)."""

    def __init__(self, layers: list[_Layer], inputs: list[Tensor], deltas: list[Tensor] | None, fwd: Forward | None = None,
                 combination: Callable[[Tensor], list[Tensor]] | None = None):
        """``deltas`` None: J without its columns (:meth:`StackedSequential.jacobian`), whose
        ``combination(c)`` gives every Δ_l c; then only the products of one c with J are available
        (:meth:`combinations`, :meth:`finite_gradient`, :meth:`materialize`, :meth:`step_`)."""
        self.layers, self.inputs, self.deltas = layers, inputs, deltas
        self.fwd = fwd  # the forward pass it came from: its views into θ serve an in-place step of that θ
        self._combination = combination
        self._gram: Tensor | None = None
        self._combined: tuple[Tensor, list[Tensor]] | None = None

    def _columns(self) -> list[Tensor]:
        if self.deltas is None:
            raise RuntimeError("this LogitJacobian was formed without its columns (jacobian(fwd, columns=False)); "
                               "the Gram matrix and products with other vectors need them")
        return self.deltas

    def combinations(self, c: Tensor) -> list[Tensor]:
        """Δ_l c (M, out) of every layer, for coefficients c (M, K); kept for the last c, which
        the finiteness check, the gradient and the step of one update share."""
        if self._combined is None or self._combined[0] is not c:
            ds = self._combination(c) if self.deltas is None else [combine(D, c) for D in self.deltas]
            self._combined = (c, ds)
        return self._combined[1]

    @property
    def gram(self) -> Tensor:
        """G = J Jᵀ, (M, K, K)."""
        if self._gram is None:
            self._columns()
            G = None
            for L, a, D in zip(self.layers, self.inputs, self.deltas):
                w = (a * a).sum(1) + (0.0 if L.b0 is None else 1.0)
                term = gram_columns(D) * w[:, None, None]
                G = term if G is None else G + term
            self._gram = G
        return self._gram

    def finite_gradient(self, c: Tensor) -> Tensor:
        """Whether every entry of Jᵀc is finite, per member (M,): no layer's Δc or input a holds a
        NaN or ±inf, and no product (Δc)_i a_j overflows (max |Δc| · max |a| is finite). First for
        all members at once: where every |c|, |Δc| and |a| is at most :data:`NO_OVERFLOW` (a NaN
        is not), no product can overflow, and every member passes; otherwise layer by layer."""
        bad = self.nonfinite_members(c)
        return torch.ones(c.shape[0], dtype=torch.bool, device=c.device) if bad is None else ~bad

    def nonfinite_members(self, c: Tensor) -> Tensor | None:
        """:meth:`finite_gradient`'s answer the other way round, (M,) bool, true where Jᵀc has a
        NaN or ±inf entry; None where every member surely passes (its first test, one number):
        what an update needs, as :func:`ntrl.population.trainer.nonfinite_members` gives it of a
        formed g."""
        if self.surely_finite(c):
            return None
        ok = torch.isfinite(c).all(1)
        for a, d in zip(self.inputs, self.combinations(c)):
            ok &= torch.isfinite(d.abs().amax(1) * a.abs().amax(1))
        return ~ok

    def surely_finite(self, c: Tensor) -> bool:
        """Whether every member's Jᵀc is surely finite, by :meth:`finite_gradient`'s first test:
        every |c|, |Δc| and |a| at most :data:`NO_OVERFLOW`. False says only that the test per
        member is needed."""
        return bool((torch.cat([c, *self.combinations(c), *self.inputs], 1).abs().amax(1) <= NO_OVERFLOW).all())

    def gram_diagonal(self, d: Tensor) -> Tensor:
        """J D Jᵀ for a diagonal metric D = diag(d), d (M, P): (M, K, K)."""
        G = None
        for L, a, D in zip(self.layers, self.inputs, self._columns()):
            w = matvec(StackedSequential._weight(d, L), a * a)
            if L.b0 is not None:
                w = w + StackedSequential._bias(d, L)
            term = torch.bmm(D.transpose(1, 2), D * w[:, :, None])
            G = term if G is None else G + term
        return G

    def dot(self, v: Tensor) -> Tensor:
        """J v for vectors v (M, P): (M, K)."""
        out = None
        for L, a, D in zip(self.layers, self.inputs, self._columns()):
            y = matvec(StackedSequential._weight(v, L), a)
            if L.b0 is not None:
                y = y + StackedSequential._bias(v, L)
            term = matvec(D.transpose(1, 2), y)
            out = term if out is None else out + term
        return out

    def materialize(self, c: Tensor, n_params: int) -> Tensor:
        """Jᵀ c (M, P) for coefficients c (M, K): the gradient of cᵀz."""
        M = c.shape[0]
        out = torch.empty(M, n_params, dtype=c.dtype, device=c.device)
        for L, a, d in zip(self.layers, self.inputs, self.combinations(c)):  # d = Δ_l c, (M, out)
            torch.mul(d[:, :, None], a[:, None, :], out=StackedSequential._weight(out, L))
            if L.b0 is not None:
                StackedSequential._bias(out, L).copy_(d)
        return out

    def step_(self, theta: Tensor, beta: Tensor, scale: Tensor) -> None:
        """θ += scale · Jᵀβ in place, per member (scale (M,), β (M, K)): a rank-one update per layer,
        W_l += (scale·Δ_l β) a_lᵀ."""
        views = self.fwd.views if self.fwd is not None and self.fwd.theta is theta else \
            [(StackedSequential._weight(theta, L), StackedSequential._bias(theta, L)) for L in self.layers]
        scale = scale[:, None]
        for (W, b), a, d in zip(views, self.inputs, self.combinations(beta)):
            d = d * scale
            W.addcmul_(d[:, :, None], a[:, None, :])
            if b is not None:
                b.add_(d)


class LogitSelection:
    """A policy whose logits at the one observation are entries of θ or zero: the single-logit
    policy (z_t = b, the other logit 0) and a tabular softmax policy of one state (z = θ). Then

        z_k = θ_{s(k)}  (or 0),     J = ∂z/∂θ a fixed 0/1 matrix with one 1 per parameter,
        ∇X = Jᵀ c_X:   (∇X)_p = (c_X)_{k(p)},   k(p) the logit parameter p is,

    read off without arithmetic, so every gradient is the one autograd's backward through the
    policy's stack/expand gives (bit for bit), for all members at once and without vmap."""

    def __init__(self, logit_of_param: list[int], param_of_logit: list[int | None]):
        self.logit_of_param = logit_of_param  # k(p), per parameter
        self.param_of_logit = param_of_logit  # s(k), None for a logit that is 0
        self._index: dict[torch.device, tuple[Tensor, Tensor]] = {}

    @classmethod
    def plan(cls, module: nn.Module, names: list[str]) -> "LogitSelection | None":
        """The selection of ``module`` (flat parameters ``names``), or None for any other policy."""
        try:
            kind, _, _ = StructuredBackend._plan(module)
        except StructuredUnsupported:
            return None
        if kind == "single_logit" and names == ["bias"]:
            t = module.target
            return cls([t], [0 if k == t else None for k in range(module.n_actions)])
        if kind == "tabular" and module.n_states == 1 and names == ["logits"]:
            K = module.n_actions
            return cls(list(range(K)), list(range(K)))
        return None

    def _indices(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._index:
            P = len(self.logit_of_param)  # column P of the padded θ is the zero
            pick = [P if s is None else s for s in self.param_of_logit]
            self._index[device] = (torch.tensor(pick, device=device), torch.tensor(self.logit_of_param, device=device))
        return self._index[device]

    def logits(self, theta: Tensor) -> Tensor:
        """z (M, K) of every member, θ (M, P)."""
        pick, _ = self._indices(theta.device)
        return torch.cat([theta, theta.new_zeros(theta.shape[0], 1)], dim=1)[:, pick]

    def gradient(self, c: Tensor) -> Tensor:
        """Jᵀc (M, P) for cotangents c = ∂X/∂z (M, K)."""
        _, read = self._indices(c.device)
        return c[:, read]


SMALL_K = 4  # up to this many logits, small products are written out column by column rather than
# as batched matmuls of many tiny matrices, whose cost is per matrix, not per number


def combine(D: Tensor, c: Tensor) -> Tensor:
    """D c per member: D (M, n, K), c (M, K) → (M, n)."""
    K = D.shape[2]
    if K > SMALL_K:
        return matvec(D, c)
    out = D[:, :, 0] * c[:, 0:1]
    for k in range(1, K):
        out = out.addcmul_(D[:, :, k], c[:, k:k + 1])
    return out


def gram_columns(D: Tensor) -> Tensor:
    """Dᵀ D per member: D (M, n, K) → (M, K, K)."""
    K = D.shape[2]
    if K > SMALL_K:
        return torch.bmm(D.transpose(1, 2), D)
    out = torch.empty(D.shape[0], K, K, dtype=D.dtype, device=D.device)
    for k in range(K):
        for j in range(k, K):
            out[:, k, j] = (D[:, :, k] * D[:, :, j]).sum(1)
            out[:, j, k] = out[:, k, j]
    return out


def matvec(A: Tensor, x: Tensor) -> Tensor:
    """A x per member: A (M, n, m), x (M, m) → (M, n), as the first column of A [x, 0]. A batched
    matrix-vector product takes BLAS's gemv for one member and gemm for several, which sum in
    different orders; with two columns every member goes through gemm, so that a member's result
    does not depend on how many others share its population (a resumed study re-chunks its runs)."""
    X = torch.zeros(*x.shape, 2, dtype=x.dtype, device=x.device)
    X[:, :, 0] = x
    return torch.bmm(A, X)[:, :, 0]


def row_times(x: Tensor, A: Tensor, pads: dict | None = None) -> Tensor:
    """xᵀ A per member: x (M, n), A (M, n, m) → (M, m): for a few rows of A (n ≤ SMALL_K, the last
    layer's K logits) a sum of scaled rows, else the first row of [x, 0]ᵀ A by one batched
    product. Like :func:`matvec`, each member's result is the same bytes whatever M (checked for
    M = 1 to 1024, on one and two threads; a single-column product A x would not be: BLAS takes
    gemv for one member and gemm for several). On a 64 × 64 layer it is about 1.25× faster than
    :func:`matvec` of Aᵀ for one member and about 2× for 5 to 256, but 10–16 % slower per product
    at 1024, where a whole population update took as long either way (15.6 against 15.9 ms, one
    thread). ``pads``: where given, [·, 0] is kept there by shape and written again at each call
    (its zero row stays), not allocated (outside autograd)."""
    if x.shape[1] <= SMALL_K:  # a few rows (the last layer's K logits): a sum of scaled rows
        out = A[:, 0] * x[:, 0:1]
        for k in range(1, x.shape[1]):
            out = out.addcmul_(A[:, k], x[:, k:k + 1])
        return out
    if pads is None or (torch.is_grad_enabled() and (x.requires_grad or A.requires_grad)):
        X = torch.zeros(x.shape[0], 2, x.shape[1], dtype=x.dtype, device=x.device)
    else:
        key = (x.shape[0], x.shape[1], x.dtype, x.device)
        X = pads.get(key)
        if X is None:
            if len(pads) >= 8:  # the shapes of the moment: a population's, its η-probe's
                pads.clear()
            X = pads[key] = torch.zeros(x.shape[0], 2, x.shape[1], dtype=x.dtype, device=x.device)
    X[:, 0] = x
    return torch.bmm(X, A)[:, 0]


def quad(c1: Tensor, G: Tensor, c2: Tensor) -> Tensor:
    """c1ᵀ G c2 per member: c (M, K), G (M, K, K) → (M,)."""
    return (c1 * matvec(G, c2)).sum(1)


@dataclass
class TwoActionFisherNTVar:
    """NTVar in the Fisher metric, F⁺ undamped, of every member of a two-action policy, in closed
    form: :meth:`LogitInverseFisher.ntvar` with λ = 0, for K = 2, without its Cholesky factor and
    K × K SVD. For K = 2 every row of L = diag(√(w π)) (I − 1πᵀ) is a multiple of v = e₀ − e₁
    (L = u vᵀ, u = (√(w π₀) π₁, −√(w π₁) π₀), ‖u‖² = w π₀ π₁), so A = L J = u (Jᵀv)ᵀ has rank
    one: one singular value s, s² = w π₀ π₁ vᵀGv, always kept (it is the largest; the other is
    0), with right singular vector Jᵀv/‖Jᵀv‖. Hence

        NTVar_F(Jᵀc) = (vᵀ G c)² / (w π₀ π₁ (vᵀ G v)²)

    (= c₀²/(w π₀) + c₁²/(w π₁) for c ⟂ 1, a softmax output's cotangent), and 0 where s = 0 (π₀π₁
    or w is 0: :func:`kept_singular` keeps nothing). A member that
    :meth:`LogitInverseFisher.from_jacobian` would give NaN weights (G, π or w not finite, G not
    positive definite) gets NaN here too. ``scale`` = 1/(w π₀ π₁ (vᵀGv)²) (M,), ``Gv`` (M, 2)."""

    scale: Tensor
    Gv: Tensor

    @classmethod
    def from_jacobian(cls, G: Tensor, probs: Tensor, weights: Tensor) -> "TwoActionFisherNTVar":
        """From G = J Jᵀ (M, 2, 2), π (M, 2) and the state's weight w (M,)."""
        # positive definite as Cholesky finds it: G₀₀ > 0, then G₁₁ − (G₁₀/√G₀₀)² > 0 (NaN fails both)
        g00, g10, g11 = G[:, 0, 0], G[:, 1, 0], G[:, 1, 1]
        ok = (torch.isfinite(G).all(2).all(1) & torch.isfinite(probs).all(1) & torch.isfinite(weights)
              & (g00 > 0) & (g11 - (g10 / g00.sqrt()) ** 2 > 0))
        Gv = G[:, :, 0] - G[:, :, 1]
        vGv = Gv[:, 0] - Gv[:, 1]
        s2 = weights * probs[:, 0] * probs[:, 1] * vGv**2
        scale = torch.where(s2 > 0, 1.0 / s2, torch.zeros_like(s2))
        return cls(torch.where(ok, scale, torch.full_like(scale, float("nan"))), Gv)

    def ntvar(self, c: Tensor) -> Tensor:
        """(Jᵀc)ᵀ F⁺ (Jᵀc), (M,), for c (M, 2)."""
        return (self.Gv * c).sum(1) ** 2 * self.scale


def fisher_ntvar(G: Tensor, probs: Tensor, weights: Tensor) -> "TwoActionFisherNTVar | LogitInverseFisher":
    """The undamped inverse Fisher F⁺ of every member, for its :meth:`ntvar` (the tracker's NTVar
    in the Fisher metric), from G = J Jᵀ, π and the state's weight w: in closed form for two
    actions (:class:`TwoActionFisherNTVar`), by the K-space SVD otherwise."""
    if probs.shape[1] == 2:
        return TwoActionFisherNTVar.from_jacobian(G, probs, weights)
    return LogitInverseFisher.from_jacobian(G, probs, weights, torch.zeros_like(weights))


@dataclass
class LogitInverseFisher:
    """M = (F + λI)⁻¹, or F⁺ where λ = 0, of every member, acting on vectors Jᵀc of the span
    (see the module docstring). ``R`` (M, K, K) upper, G = RᵀR; ``U`` A's left factor; ``inv``,
    ``keep`` (M, K); ``damping`` (M,)."""

    G: Tensor
    R: Tensor
    U: Tensor
    S: Tensor
    inv: Tensor
    keep: Tensor
    damping: Tensor

    @classmethod
    def from_jacobian(cls, G: Tensor, probs: Tensor, weights: Tensor, damping: Tensor,
                      rtol: float | None = None) -> "LogitInverseFisher":
        """From G = J Jᵀ (M, K, K), π (M, K) and the state's weight w (M,). A member whose G, π or
        w is not finite, or whose G is not positive definite, gets NaN weights: everything it
        computes is NaN, and the trainer stops it."""
        M, K = probs.shape
        eye = torch.eye(K, dtype=probs.dtype, device=probs.device)
        ok = torch.isfinite(G).all(2).all(1) & torch.isfinite(probs).all(1) & torch.isfinite(weights)
        chol, info = torch.linalg.cholesky_ex(torch.where(ok[:, None, None], G, eye))
        ok = ok & (info == 0)
        R = torch.where(ok[:, None, None], chol.mT, eye)
        probs = torch.where(ok[:, None], probs, torch.full_like(probs, 1.0 / K))
        weights = torch.where(ok, weights, torch.ones_like(weights))
        scale = (weights[:, None] * probs).clamp_min(0).sqrt()
        L = scale[:, :, None] * (eye - probs[:, None, :])  # row a: √(w π_a) (e_a − π)
        U, S, _ = torch.linalg.svd(torch.bmm(R, L.mT))
        keep = kept_singular(S, rtol)
        damping = damping.to(S.dtype)
        inv = torch.where(keep, 1.0 / (S**2 + damping[:, None]), torch.zeros_like(S))
        inv = torch.where(ok[:, None], inv, torch.full_like(inv, float("nan")))
        return cls(G, R, U, S, inv, keep, damping)

    def _coef(self, c: Tensor) -> Tensor:
        """u_kᵀ R c, (M, K)."""
        return matvec(self.U.mT, matvec(self.R, c))

    def _back(self, w: Tensor) -> Tensor:
        """R⁻¹ U w for w (M, K)."""
        Uw = matvec(self.U, w)
        X = torch.zeros(*Uw.shape, 2, dtype=Uw.dtype, device=Uw.device)  # two columns, as in matvec
        X[:, :, 0] = Uw
        return torch.linalg.solve_triangular(self.R, X, upper=True)[:, :, 0]

    def apply(self, c: Tensor) -> Tensor:
        """β with M Jᵀc = Jᵀβ."""
        coef = self._coef(c)
        out = self._back(coef * self.inv)
        damped = self.damping > 0
        if bool(damped.any()):
            lam = torch.where(damped, self.damping, torch.ones_like(self.damping))
            rest = (c - self._back(coef * self.keep)) / lam[:, None]
            out = out + torch.where(damped[:, None], rest, torch.zeros_like(rest))
        return out

    def ntvar(self, c: Tensor) -> Tensor:
        """(Jᵀc)ᵀ M (Jᵀc), (M,)."""
        coef = self._coef(c)
        out = (coef**2 * self.inv).sum(-1)
        damped = self.damping > 0
        if bool(damped.any()):
            rest = quad(c, self.G, c) - (coef**2 * self.keep).sum(-1)
            lam = torch.where(damped, self.damping, torch.ones_like(self.damping))
            out = out + torch.where(damped, rest / lam, torch.zeros_like(out))
        return out
