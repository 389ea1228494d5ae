"""Batched tangent quantities for a population: M members of one architecture, parameters stacked.

Member m has flat parameters θ_m (row m of a (M, P) tensor) and logits Z_m = f(θ_m; O) at a fixed
set of observations O (N rows, K actions), computed for all members at once by
``torch.func.vmap`` over ``functional_call``. Every property of a population member is a function
of its logits, X_m = X(Z_m), so by the chain rule

    ∇θ X_m = J_mᵀ ∂X_m/∂vec(Z_m),        J_m = ∂vec(Z_m)/∂θ_m,

and because members share no parameters, one reverse-mode pass of Σ_m X_m gives every member's
gradient at once (row m of ∂(Σ_m X_m)/∂θ is ∇θ_m X_m). From the gradients:

    NTVar_M(X)_m = ∇X_m · M_m ∇X_m            (M = I, diag(D_m), or the inverse Fisher)
    NTCov(X, v)_m = ∇X_m · v_m

and the Fisher of member m over states s with weights w_s,

    F_m = A_mᵀ A_m,   rows of A_m: √(w_s π(a|s)) ∇log π(a|s),  ∇log π(a|s) = ∇z_{s,a} − Σ_b π(b|s) ∇z_{s,b},

whose pseudo-inverse (or damped inverse) is formed as :class:`ntrl.engine.metrics.InverseFisher`
forms it (QR of Aᵀ, SVD of the small factor, singular values below 100·√eps·S_max dropped), batched,
with its right singular vectors applied through the QR's Householder reflectors rather than formed
(:class:`ntrl.engine.metrics.HouseholderSVD`).
``tests/test_population.py`` checks all of it against the per-run engine and its torch.func reference
in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ntrl.engine.metrics import HouseholderSVD, kept_singular


class StackedPolicy:
    """One policy architecture, evaluated at M stacked parameter vectors (rows of θ, shape (M, P))."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shapes = {n: p.shape for n, p in module.named_parameters() if p.requires_grad}
        self.sizes = [int(torch.Size(self.shapes[n]).numel()) for n in self.names]
        self.n_params = sum(self.sizes)

    def flatten(self, module: nn.Module, dtype: torch.dtype = torch.float64) -> Tensor:
        """θ of one module of this architecture, flat (P,), in ``named_parameters`` order."""
        params = dict(module.named_parameters())
        return torch.cat([params[n].detach().reshape(-1).to(dtype) for n in self.names])

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        """Per-parameter blocks of flat vectors (..., P) → {name: (..., *shape)}."""
        out, i = {}, 0
        lead = tuple(theta.shape[:-1])
        for n, k in zip(self.names, self.sizes):
            out[n] = theta[..., i : i + k].reshape(lead + tuple(self.shapes[n]))
            i += k
        return out

    def leaves(self, theta: Tensor) -> list[Tensor]:
        """Per-parameter blocks of θ (M, P) as leaves that require grad and share θ's storage.
        Differentiating the blocks, not θ itself, spares the backward of the slicing, which
        would write a zero (M, P) tensor per block."""
        return [b.detach().requires_grad_(True) for b in self.unflatten(theta.detach()).values()]

    def logits(self, params: Tensor | list[Tensor], obs: Tensor) -> Tensor:
        """Z[m] = f(θ_m; obs), shape (M, N, K): one vmap of ``functional_call`` over the members,
        from flat θ (M, P) or from its :meth:`leaves` (then differentiable in them)."""
        blocks = self.unflatten(params) if isinstance(params, Tensor) else dict(zip(self.names, params))
        return vmap(lambda p: functional_call(self.module, p, (obs,)))(blocks)


def member_gradients(outputs: list[Tensor], leaves: list[Tensor]) -> list[Tensor]:
    """∇θ_m of each output X of shape (M,), per member: the rows of ∂(Σ_m X_m)/∂θ, shape (M, P),
    one reverse pass per output, from the parameter blocks ``leaves`` (:meth:`StackedPolicy.leaves`)."""
    grads = []
    for k, x in enumerate(outputs):
        parts = (torch.autograd.grad(x.sum(), leaves, retain_graph=k < len(outputs) - 1, allow_unused=True)
                 if x.requires_grad else [None] * len(leaves))
        grads.append(torch.cat([(p if p is not None else torch.zeros_like(leaf)).reshape(x.shape[0], -1)
                                for p, leaf in zip(parts, leaves)], dim=1))
    return grads


def member_gradients_through(outputs: list[Tensor], Z: Tensor, leaves: list[Tensor], n_logits: int = 0) -> list[Tensor]:
    """:func:`member_gradients` of ``outputs`` (each (M,), a function of θ through the logits Z
    (M, N, K) alone), then of the first ``n_logits`` logits Z[:, o, a] in (o, a) order, by the chain
    rule split at Z: each output's cotangent c_X = ∂(Σ_m X_m)/∂Z by one reverse pass through the
    model only, the logits' cotangents the unit tensors e_{o,a}, and then ∇θ_m X_m = J_mᵀ c_X for all
    of them in one batched reverse pass through the network (``is_grads_batched``), instead of a
    pass through the network per output. Frees the graph. Faster for a few members, where
    each reverse pass costs mostly its fixed overhead; slower for many (on the juice MLP from about
    sixteen), where the batched pass's tensors leave the cache (``benchmarks/bench_juice_population.py``)."""
    M = Z.shape[0]
    cots = []
    for x in outputs:
        c = torch.autograd.grad(x.sum(), Z, retain_graph=True, allow_unused=True)[0] if x.requires_grad else None
        cots.append(torch.zeros_like(Z) if c is None else c)
    if n_logits:
        units = torch.zeros(n_logits, M, Z[0].numel(), dtype=Z.dtype, device=Z.device)
        units[torch.arange(n_logits), :, torch.arange(n_logits)] = 1.0
        cots.extend(units.reshape(n_logits, *Z.shape).unbind(0))
    parts = torch.autograd.grad(Z, leaves, grad_outputs=torch.stack(cots), is_grads_batched=True, allow_unused=True)
    flat = torch.cat([(p if p is not None else torch.zeros(len(cots), *leaf.shape, dtype=leaf.dtype,
                                                            device=leaf.device)).reshape(len(cots), M, -1)
                      for p, leaf in zip(parts, leaves)], dim=2)
    return list(flat.unbind(0))


@dataclass
class BatchedInverseFisher:
    """M_m = (F_m + λ_m I)⁻¹, or F_m⁺ where λ_m = 0, for every member (see the module docstring).

    ``svd`` holds A_m's factors (:class:`ntrl.engine.metrics.HouseholderSVD`: its right singular
    vectors v_k are applied, not formed), ``inv`` (M, r) the weights 1/(S² + λ) of the kept
    singular values and 0 for the dropped ones, ``keep`` (M, r) which are kept, ``damping`` (M,) λ."""

    svd: HouseholderSVD
    inv: Tensor
    keep: Tensor
    damping: Tensor

    @classmethod
    def from_log_prob_rows(cls, rows: Tensor, weights: Tensor, probs: Tensor, damping: Tensor,
                           rtol: float | None = None) -> "BatchedInverseFisher":
        """From ∇log π(a|s) for every member, state and action (``rows``, shape (M, N, K, P)),
        the states' weights (M, N) and π(a|s) (M, N, K)."""
        M, N, K, P = rows.shape
        scale = (weights[:, :, None] * probs).clamp_min(0).sqrt()
        svd = HouseholderSVD((rows * scale[..., None]).reshape(M, N * K, P))
        S = svd.S
        keep = kept_singular(S, rtol)
        damping = damping.to(S.dtype)
        inv = torch.where(keep, 1.0 / (S**2 + damping[:, None]), torch.zeros_like(S))
        return cls(svd, inv, keep, damping)

    def apply(self, v: Tensor) -> Tensor:
        """M_m v_m for vectors v of shape (M, P): Σ_k w_k C_k v_k, plus (v − Σ_{k kept} C_k v_k)/λ
        where damped, with C_k = v_k·v (both sums lifted in one pass)."""
        coef = self.svd.project(v[..., None])[..., 0]  # (M, r)
        damped = self.damping > 0
        if not bool(damped.any()):
            return self.svd.lift((coef * self.inv)[..., None])[..., 0]
        both = self.svd.lift(torch.stack([coef * self.inv, coef * self.keep], -1))
        lam = torch.where(damped, self.damping, torch.ones_like(self.damping))
        return both[..., 0] + torch.where(damped[:, None], (v - both[..., 1]) / lam[:, None], torch.zeros_like(v))

    def ntvar(self, grad: Tensor) -> Tensor:
        """∇X_m · M_m ∇X_m for gradients of shape (M, P) (:meth:`ntvars` of one)."""
        return self.ntvars([grad])[0]

    def ntvars(self, grads: list[Tensor]) -> list[Tensor]:
        """∇X_m · M_m ∇X_m for each of several gradients (M, P), from the directional derivatives
        C_k = ∇X·v_k of all of them at once: Σ_k w_k C_k² + (‖∇X‖² − Σ_{k kept} C_k²)/λ."""
        C = self.svd.project(torch.stack(grads, -1))  # (M, r, n)
        out = (C**2 * self.inv[..., None]).sum(1)
        damped = self.damping > 0
        if bool(damped.any()):
            rest = torch.stack([(g**2).sum(-1) for g in grads], -1) - (C**2 * self.keep[..., None]).sum(1)
            lam = torch.where(damped, self.damping, torch.ones_like(self.damping))
            out = out + torch.where(damped[:, None], rest / lam[:, None], torch.zeros_like(out))
        return list(out.unbind(-1))


def log_prob_rows(jacobian_rows: Tensor, probs: Tensor, overwrite: bool = False) -> Tensor:
    """∇log π(a|s) = ∇z_{s,a} − Σ_b π(b|s) ∇z_{s,b} from logit gradients (M, N, K, P) and π (M, N, K).
    The mean Σ_b π_b ∇z_b is one contraction (no (M, N, K, P) temporary); ``overwrite``: the rows
    are written into ``jacobian_rows`` (a tensor the caller owns) instead of a new tensor, which
    halves the memory traffic of a population's Fisher rows (25 × 4741 per member on the juice MLP)."""
    mean = torch.einsum("mnkp,mnk->mnp", jacobian_rows, probs)[:, :, None]
    return jacobian_rows.sub_(mean) if overwrite else jacobian_rows - mean
