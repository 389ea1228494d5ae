"""The tangent-covariance engine: every tangent quantity in ntrl is computed here.

For scalar properties X(θ), Y(θ) of a policy's parameters θ and a symmetric metric M
(the optimizer's preconditioner),

    NTCov_M(X, Y) = ∇θX · M ∇θY,        NTVar_M(X) = NTCov_M(X, X),

and for the log-odds z_a = log π_a − log(1 − π_a) of an action, the logit kernel is
κ = NTVar(z_a) = ‖∇θ z_a‖², so that NTVar(π_a) = π_a²(1 − π_a)²·κ exactly.

A *property* is any callable ``X(view) -> Tensor`` that maps a :class:`PolicyView` (the policy
evaluated at explicit parameters) to a scalar or a 1-D batch of scalars.  The reference backend
materialises the Jacobian ∂X/∂θ with ``torch.func.jacrev``; faster backends must agree with it
in float64 (see tests/test_tangent_*.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

from ntrl.metrics import Euclidean, Metric

ParamDict = dict[str, Tensor]


class PolicyView:
    """A policy module evaluated at explicit parameters (``torch.func.functional_call``).

    ``logits(obs)`` returns z(obs; θ) of shape (N, K); ``log_probs`` is log_softmax(z),
    computed in log space so that probabilities down to 1e-300 stay finite in float64.
    """

    def __init__(self, module: nn.Module, params: ParamDict):
        self.module = module
        self.params = params
        first = next(iter(params.values()))
        self.dtype = first.dtype
        self.device = first.device

    def as_obs(self, obs: Tensor) -> Tensor:
        """Cast observations to the view's floating dtype (integer obs are kept as they are)."""
        obs = torch.as_tensor(obs, device=self.device)
        return obs.to(self.dtype) if obs.is_floating_point() else obs

    def logits(self, obs: Tensor) -> Tensor:
        return functional_call(self.module, self.params, (self.as_obs(obs),))

    def log_probs(self, obs: Tensor) -> Tensor:
        """log π(·|obs) = log_softmax(z), shape (N, K)."""
        return torch.log_softmax(self.logits(obs), dim=-1)

    def probs(self, obs: Tensor) -> Tensor:
        return self.log_probs(obs).exp()


TangentFn = Callable[[PolicyView], Tensor]


def log_odds(log_probs: Tensor, action: int) -> Tensor:
    """z_a = log π_a − log(1 − π_a), with log(1 − π_a) = logsumexp_{b≠a} log π_b (stable)."""
    others = torch.cat([log_probs[..., :action], log_probs[..., action + 1 :]], dim=-1)
    return log_probs[..., action] - torch.logsumexp(others, dim=-1)


@dataclass
class TangentStats:
    """What one engine query returns for a property X with n entries.

    value:  X itself, shape (n,)
    ntvar:  metric name -> NTVar_M(X), shape (n,)
    ntcov:  direction name -> ∇X · M v (M already folded into v by the caller), shape (n,)
    backend: which implementation produced the numbers
    """

    value: Tensor
    ntvar: dict[str, Tensor] = field(default_factory=dict)
    ntcov: dict[str, Tensor] = field(default_factory=dict)
    backend: str = "reference"


class TangentEngine:
    """Computes NTCov, NTVar, NTCov matrices and κ for properties of one policy module.

    ``dtype=torch.float64`` evaluates everything on float64 copies of the parameters, which is
    what the analysis of tiny probabilities (p down to 1e-12) needs.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype | None = None):
        self.module = module
        self.dtype = dtype
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        self.shapes = {n: p.shape for n, p in module.named_parameters() if p.requires_grad}
        self.n_params = sum(int(torch.Size(s).numel()) for s in self.shapes.values())
        self.backend = "reference"

    # ---------------------------------------------------------------- parameters
    def params(self) -> ParamDict:
        """Detached copies of the current parameters, cast to the engine's dtype."""
        out = {}
        for n, p in self.module.named_parameters():
            if n in self.shapes:
                q = p.detach()
                out[n] = q.to(self.dtype) if self.dtype is not None else q
        return out

    def view(self, params: ParamDict | None = None) -> PolicyView:
        return PolicyView(self.module, self.params() if params is None else params)

    def flatten(self, tensors: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate per-parameter tensors into flat vectors, in ``named_parameters`` order."""
        parts = []
        for n in self.names:
            t = tensors[n]
            lead = t.shape[:batch_dims]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> ParamDict:
        out, i = {}, 0
        for n in self.names:
            k = int(torch.Size(self.shapes[n]).numel())
            out[n] = flat[i : i + k].reshape(self.shapes[n])
            i += k
        return out

    # ---------------------------------------------------------------- gradients
    def evaluate(self, X: TangentFn, params: ParamDict | None = None) -> Tensor:
        """X(θ) as a 1-D tensor."""
        with torch.no_grad():
            return X(self.view(params)).reshape(-1)

    def jacobian(self, X: TangentFn, params: ParamDict | None = None) -> tuple[Tensor, Tensor]:
        """(X(θ), ∂X/∂θ): values of shape (n,) and the flat Jacobian of shape (n, P).

        Reference implementation: ``torch.func.jacrev`` over the parameter dict.
        """
        params = self.params() if params is None else params

        def f(p: ParamDict) -> tuple[Tensor, Tensor]:
            v = X(PolicyView(self.module, p)).reshape(-1)
            return v, v

        jac, value = jacrev(f, has_aux=True)(params)
        return value.detach(), self.flatten(jac, batch_dims=1).detach()

    def gradient(self, X: TangentFn, params: ParamDict | None = None) -> Tensor:
        """∇θX for a scalar property, as a flat vector of shape (P,)."""
        value, J = self.jacobian(X, params)
        if J.shape[0] != 1:
            raise ValueError(f"gradient() needs a scalar property, got {J.shape[0]} values")
        return J[0]

    # ---------------------------------------------------------------- tangent quantities
    def stats(
        self,
        X: TangentFn,
        metrics: Mapping[str, Metric] | None = None,
        directions: Mapping[str, Tensor] | None = None,
        params: ParamDict | None = None,
    ) -> TangentStats:
        """One query: X, NTVar_M(X) for each named metric, and ∇X·v for each named direction.

        NTVar_M(X)_i = ∇X_i · M ∇X_i;   ntcov[name]_i = ∇X_i · v_name.
        To get NTCov_M(X, U) pass v = M ∇U (the optimizer's actual step direction).
        """
        metrics = {"euc": Euclidean()} if metrics is None else metrics
        directions = {} if directions is None else directions
        value, J = self.jacobian(X, params)
        out = TangentStats(value=value, backend="reference")
        for name, metric in metrics.items():
            out.ntvar[name] = (J * metric.apply(J)).sum(dim=-1)
        for name, v in directions.items():
            out.ntcov[name] = J @ v.to(J.dtype)
        return out

    def ntcov(self, X: TangentFn, Y: TangentFn, metric: Metric | None = None) -> Tensor:
        """NTCov_M(X, Y) = ∂X/∂θ · M · (∂Y/∂θ)ᵀ, shape (n_X, n_Y)."""
        metric = metric or Euclidean()
        _, Jx = self.jacobian(X)
        _, Jy = self.jacobian(Y)
        return Jx @ metric.apply(Jy).T

    def ntvar(self, X: TangentFn, metric: Metric | None = None) -> Tensor:
        """NTVar_M(X) = ∇X · M ∇X for each entry of X, shape (n,)."""
        metric = metric or Euclidean()
        return self.stats(X, metrics={"m": metric}).ntvar["m"]

    def ntcov_matrix(self, props: Sequence[TangentFn], metric: Metric | None = None) -> Tensor:
        """The NTCov_M matrix between all entries of several properties (stacked in order)."""
        metric = metric or Euclidean()
        J = torch.cat([self.jacobian(X)[1] for X in props], dim=0)
        return J @ metric.apply(J).T

    def kappa(self, obs: Tensor, action: int, metric: Metric | None = None) -> Tensor:
        """κ = ‖∇θ z_a‖² for the log-odds z_a of ``action`` at each observation, shape (N,)."""
        return self.ntvar(lambda v: log_odds(v.log_probs(obs), action), metric)
