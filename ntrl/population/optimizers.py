"""The four optimizers of :mod:`ntrl.agents.optimizers`, for M members at once.

Members share the optimizer kind; learning rate, Adam's β₁, β₂, ε and NPG's damping λ are per
member (tensors of shape (M,)). The step ascends the utility, Δθ_m = η_m d_m with d_m = M_m g_m:

| name  | d                      | M (the tracked metric)       |
| ----- | ---------------------- | ---------------------------- |
| sgd   | g                      | I                            |
| adam  | −m̂ / (√v̂ + ε)          | diag(1/(√v̂ + ε))             |
| sign  | sign(g)                | diag(1/|g|), 0 where g = 0   |
| npg   | (F + λI)⁻¹ g or F⁺ g   | the member's inverse Fisher  |

Adam's moments are those of the loss gradient −g, updated as ``torch.optim.Adam`` (foreach=False)
updates them, and the parameter step is taken in torch's own order
(θ ← θ − (η/(1 − β₁ᵗ))·m/(√v/√(1 − β₂ᵗ) + ε)), so that a member follows the per-run trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ntrl.agents.optimizers import OPTIMIZERS, adam_metric_and_direction, sign_metric
from ntrl.engine.batched import BatchedInverseFisher


@dataclass
class BatchedPlan:
    """The step about to be taken: Δθ = lr · direction; ``diagonal`` is M's diagonal for Adam and
    sign descent, ``fisher`` the metric for NPG (None otherwise: M = I)."""

    direction: Tensor | None  # None in an untracked Adam plan: its step needs only adam_state
    diagonal: Tensor | None = None
    fisher: BatchedInverseFisher | None = None
    adam_state: tuple[Tensor, Tensor, Tensor] | None = None  # (m, v, √v̂ + ε) after this step


class BatchedOptimizer:
    def __init__(self, name: str, lr: Tensor, betas: tuple[Tensor, Tensor] | None = None, eps: Tensor | None = None,
                 damping: Tensor | None = None):
        if name not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
        self.name = name
        self.lr = lr
        M = lr.shape[0]
        self.beta1, self.beta2 = betas if betas is not None else (torch.full_like(lr, 0.9), torch.full_like(lr, 0.999))
        self.eps = eps if eps is not None else torch.full_like(lr, 1e-8)
        self.damping = damping if damping is not None else torch.zeros(M, dtype=lr.dtype, device=lr.device)
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.t = 0  # Adam's step count (every active member steps at every update)
        self._columns: dict[str, Tensor] = {}
        self._columns_of: tuple[Tensor, ...] = ()  # the tensors _columns was formed from

    def select(self, keep: Tensor) -> None:
        """Keep only the members ``keep`` (an index tensor), in that order."""
        for name in ("lr", "beta1", "beta2", "eps", "damping", "m", "v"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[keep])

    def plan(self, g: Tensor, fisher: BatchedInverseFisher | None = None, tracked: bool = True) -> BatchedPlan:
        """The step for gradients g (M, P). Without ``tracked``, only what the step itself needs:
        no metric diagonal, and for Adam no direction (the step divides m by √v̂ + ε itself)."""
        if self.name == "sgd":
            return BatchedPlan(g)
        if self.name == "sign":
            return BatchedPlan(torch.sign(g), diagonal=sign_metric(g) if tracked else None)
        if self.name == "npg":
            if fisher is None:
                raise ValueError("npg needs the Fisher metric of each member")
            return BatchedPlan(fisher.apply(g), fisher=fisher)
        gp = -g
        m = torch.zeros_like(gp) if self.m is None else self.m
        v = torch.zeros_like(gp) if self.v is None else self.v
        c = self.columns()
        b1, b2 = c["beta1"], c["beta2"]
        m = torch.lerp(m, gp, c["1-beta1"])
        v = v * b2 + c["1-beta2"] * gp * gp
        if not tracked:  # √v̂ + ε as adam_metric_and_direction forms it
            # (1 − β₂ᵗ)^½ by torch.rsub: the number 1 − β₂ᵗ gives, without Tensor.__rsub__'s Python wrapper
            return BatchedPlan(None, adam_state=(m, v, v.sqrt() / torch.rsub(b2 ** (self.t + 1), 1) ** 0.5 + c["eps"]))
        d, direction, denom = adam_metric_and_direction(m, v, b1, b2, self.t + 1, c["eps"])
        return BatchedPlan(direction, diagonal=d, adam_state=(m, v, denom))

    def columns(self) -> dict[str, Tensor]:
        """lr, β₁, β₂, 1 − β₁, 1 − β₂ and ε as columns (M, 1), formed once for the members of the
        moment (the same numbers at every update, so an update need not form them again)."""
        source = (self.lr, self.beta1, self.beta2, self.eps)
        if len(self._columns_of) != len(source) or any(a is not b for a, b in zip(self._columns_of, source)):
            b1, b2 = self.beta1[:, None], self.beta2[:, None]
            self._columns = {"lr": self.lr[:, None], "beta1": b1, "beta2": b2, "1-beta1": 1 - b1, "1-beta2": 1 - b2,
                             "eps": self.eps[:, None]}
            self._columns_of = source
        return self._columns

    def apply(self, theta: Tensor, plan: BatchedPlan, in_place: bool = False) -> Tensor:
        """θ + η·d, for every member (Adam: torch's step, θ − η/(1 − β₁ᵗ)·m/(√v̂ + ε), from the
        moments and denominator the plan formed); ``in_place``: into ``theta`` itself (the same
        numbers), which it returns."""
        c = self.columns()
        lr = c["lr"]
        if self.name != "adam":
            step = lr * plan.direction
            return theta.add_(step) if in_place else theta + step
        self.m, self.v, denom = plan.adam_state
        self.t += 1
        step_size = lr / torch.rsub(c["beta1"] ** self.t, 1)  # lr/(1 − β₁ᵗ)
        step = step_size * (self.m / denom)
        return theta.sub_(step) if in_place else theta - step

    def nonfinite(self) -> Tensor:
        """Which members' optimizer state holds a NaN or ±inf, shape (M,)."""
        bad = torch.zeros(self.lr.shape[0], dtype=torch.bool, device=self.lr.device)
        for state in (self.m, self.v):
            if state is not None:
                bad |= ~torch.isfinite(state).all(dim=1)
        return bad
