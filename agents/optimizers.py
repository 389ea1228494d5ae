"""Optimizers that say, before they step, which preconditioner M the step uses.

Every optimizer ascends the utility: Δθ = η · d with d = M g_eff, where g is the utility
gradient. ``plan(g)`` returns (M, d) without touching any state; ``apply(plan)`` takes exactly
that step. The tracker predicts ΔX = η ∇X · d and compares it with the realised change.

| name  | d = M g_eff                  | M                         | implementation        |
| ----- | ---------------------------- | ------------------------- | --------------------- |
| sgd   | g                            | I                         | torch.optim.SGD       |
| adam  | m̂ / (√v̂ + ε)                 | diag(1/(√v̂ + ε))          | torch.optim.Adam      |
| sign  | sign(g)                      | diag(1/|g|), 0 where g=0  | Δθ = η sign(g)        |
| npg   | F⁺ g  (or (F + λI)⁻¹ g)      | inverse Fisher            | ntrl.engine.metrics          |

For Adam, m̂ and v̂ are the moments *after* this step's update, exactly as torch computes them.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ntrl.engine.metrics import Diagonal, Euclidean, InverseFisher, Metric
from ntrl.engine.tangent import TangentEngine

OPTIMIZERS = ("sgd", "adam", "npg", "sign")


def sign_metric(g: Tensor) -> Tensor:
    """Sign descent's diagonal metric: M = diag(1/|g|), 0 where g = 0, so that M g = sign g."""
    a = g.abs()
    return torch.where(a > 0, 1.0 / a.clamp_min(torch.finfo(g.dtype).tiny), torch.zeros_like(a))


def adam_metric_and_direction(m: Tensor, v: Tensor, beta1, beta2, t: float, eps) -> tuple[Tensor, Tensor, Tensor]:
    """Adam's metric diag(1/(√v̂ + ε)), ascent direction −m̂/(√v̂ + ε) and denominator √v̂ + ε
    (the one torch's step divides by) from the moments m, v of
    the loss gradient −g after step t: m̂ = m/(1 − β₁ᵗ), √v̂ = √v/√(1 − β₂ᵗ), as torch computes them
    (β and ε may be tensors that broadcast against m, one per population member)."""
    m_hat = m / (1 - beta1**t)
    denom = v.sqrt() / (1 - beta2**t) ** 0.5 + eps  # torch.optim.Adam's order of operations
    d = 1.0 / denom
    return d, -m_hat * d, denom


@dataclass
class StepPlan:
    """The step an optimizer is about to take: Δθ = lr · direction, direction = M g_eff."""

    metric: Metric
    direction: Tensor
    lr: float
    gradient: Tensor  # the utility gradient g the plan was made for


class PolicyOptimizer(ABC):
    name = "base"

    def __init__(self, policy: nn.Module, lr: float):
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.policy = policy
        self.lr = float(lr)
        self.params = [p for p in policy.parameters() if p.requires_grad]

    def flat_params(self) -> Tensor:
        return parameters_to_vector(self.params).detach()

    def state_tensors(self) -> dict[str, list[Tensor]]:
        """The tensors this optimizer carries from update to update, by name (for checks)."""
        return {"parameters": list(self.params)}

    def nonfinite_state(self) -> str | None:
        """The name of the first state tensor holding a NaN or ±inf, or None when all are finite."""
        for name, tensors in self.state_tensors().items():
            if any(not bool(torch.isfinite(t).all()) for t in tensors):
                return name
        return None

    @abstractmethod
    def plan(self, g: Tensor, fisher_states: tuple[Tensor, Tensor] | None = None) -> StepPlan:
        """The metric and direction of the step for utility gradient g (flat, shape (P,))."""

    def apply(self, plan: StepPlan) -> None:
        """Take the planned step: θ ← θ + lr · direction."""
        with torch.no_grad():
            vector_to_parameters(self.flat_params() + plan.lr * plan.direction.to(self.params[0].dtype), self.params)


class _TorchOptimizer(PolicyOptimizer):
    """Steps through a torch.optim optimizer on the loss −U (so that it ascends U). The torch.optim
    optimizer is made when it is first used (:attr:`torch_opt`): making one imports torch._dynamo,
    about 1.4 s once per process, which a population, reading only its members' built policies,
    and a study sizing its chunks never need."""

    @abstractmethod
    def _make_torch_opt(self) -> torch.optim.Optimizer:
        """The torch.optim optimizer over ``self.params``."""

    @functools.cached_property
    def torch_opt(self) -> torch.optim.Optimizer:
        return self._make_torch_opt()

    def apply(self, plan: StepPlan) -> None:
        grads = -plan.gradient
        offset = 0
        for p in self.params:
            k = p.numel()
            p.grad = grads[offset : offset + k].reshape(p.shape).to(p.dtype).clone()
            offset += k
        self.torch_opt.step()
        self.torch_opt.zero_grad(set_to_none=True)

    def state_tensors(self) -> dict[str, list[Tensor]]:
        out = super().state_tensors()
        for st in self.torch_opt.state.values():
            for key, value in st.items():
                if isinstance(value, Tensor) and value.is_floating_point() and key != "step":
                    out.setdefault(key, []).append(value)
        return out


class SGD(_TorchOptimizer):
    name = "sgd"

    def __init__(self, policy: nn.Module, lr: float):
        super().__init__(policy, lr)

    def _make_torch_opt(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.params, lr=self.lr)

    def plan(self, g, fisher_states=None):
        return StepPlan(Euclidean(), g.detach(), self.lr, g.detach())


class Adam(_TorchOptimizer):
    name = "adam"

    def __init__(self, policy: nn.Module, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(policy, lr)
        self.betas, self.eps = betas, eps

    def _make_torch_opt(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.params, lr=self.lr, betas=self.betas, eps=self.eps, foreach=False)

    def plan(self, g, fisher_states=None):
        """Reproduce torch's Adam update for loss gradient −g without mutating its state."""
        b1, b2 = self.betas
        ms, vs, offset = [], [], 0
        t = None
        for p in self.params:
            k = p.numel()
            gp = -g[offset : offset + k].to(p.dtype)
            offset += k
            st = self.torch_opt.state.get(p, {})
            m = st["exp_avg"].reshape(-1) if st else torch.zeros_like(gp)
            v = st["exp_avg_sq"].reshape(-1) if st else torch.zeros_like(gp)
            t = (float(st["step"]) if st else 0.0) + 1.0
            ms.append(torch.lerp(m, gp, 1 - b1))
            vs.append(v * b2 + (1 - b2) * gp * gp)
        m, v = torch.cat(ms), torch.cat(vs)
        d, direction, _ = adam_metric_and_direction(m, v, b1, b2, t, self.eps)
        return StepPlan(Diagonal(d), direction, self.lr, g.detach())


class SignDescent(PolicyOptimizer):
    name = "sign"

    def plan(self, g, fisher_states=None):
        g = g.detach()
        return StepPlan(Diagonal(sign_metric(g)), torch.sign(g), self.lr, g)


class NaturalPolicyGradient(PolicyOptimizer):
    """Δθ = η F⁺ g, with F the policy's Fisher over the given states (exact or damped CG),
    factored in float64 whatever the policy's dtype (a float32 SVD would lose directions)."""

    name = "npg"

    def __init__(self, policy: nn.Module, lr: float, damping: float = 0.0, method: str = "auto"):
        super().__init__(policy, lr)
        self.damping, self.method = damping, method
        self.engine = TangentEngine(policy, dtype=torch.float64)

    def plan(self, g, fisher_states=None):
        if fisher_states is None:
            raise ValueError("npg needs the states (and weights) over which to take the Fisher")
        obs, weights = fisher_states
        metric = InverseFisher(self.engine, obs, weights, damping=self.damping, method=self.method)
        direction = metric.apply(g.detach()[None].to(metric.row_scale.dtype))[0]
        return StepPlan(metric, direction, self.lr, g.detach())


def make_optimizer(name: str, policy: nn.Module, lr: float, **kwargs) -> PolicyOptimizer:
    classes = {"sgd": SGD, "adam": Adam, "npg": NaturalPolicyGradient, "sign": SignDescent}
    if name not in classes:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return classes[name](policy, lr, **kwargs)
