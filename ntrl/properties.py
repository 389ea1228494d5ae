"""Properties: named scalar (or batched) functions X(θ) of a policy, tracked by the engine.

Every property, built-in or a user's, has one interface: ``prop(view) -> Tensor`` where
``view`` is a :class:`ntrl.engine.tangent.PolicyView`, plus a ``name`` used in records.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

from ntrl.engine.tangent import PolicyView, log_odds, log_odds_of_logits
from ntrl.engine.structured import PerState


class Property:
    """A named property X(θ): ``Property(name, fn)`` with ``fn(view) -> Tensor``."""

    def __init__(self, name: str, fn: Callable[[PolicyView], Tensor]):
        if not name or "/" in name:
            raise ValueError(f"property name must be non-empty and contain no '/', got {name!r}")
        self.name = name
        self.fn = fn

    def __call__(self, view: PolicyView) -> Tensor:
        return self.fn(view)

    def __repr__(self) -> str:
        return f"Property({self.name!r})"


class ActionProbability(Property):
    """X = π(a | s) for each probe state s, computed as exp(log_softmax(z)[a]) (log space).

    Per-state (``per_state``): X_i = exp(log_softmax(z_i)[a]) depends on the logits z_i only.
    """

    def __init__(self, obs: Tensor, action: int, name: str = "P"):
        self.obs = torch.as_tensor(obs)
        self.action = int(action)
        super().__init__(name, lambda v: v.log_probs(self.obs)[:, self.action].exp())

    def of_logits(self, logits: Tensor) -> Tensor:
        """X_i = exp(log_softmax(z_i)[a]) for logits z of shape (N, K)."""
        return torch.log_softmax(logits, dim=-1)[:, self.action].exp()

    @property
    def per_state(self) -> PerState:
        """(obs, fn_of_logits): the structured tangent backend's view of this property."""
        return PerState(self.obs, self.of_logits)


class LogOdds(Property):
    """X = z_a = log π_a − log(1 − π_a), whose NTVar is the logit kernel κ (per-state)."""

    def __init__(self, obs: Tensor, action: int, name: str = "z"):
        self.obs = torch.as_tensor(obs)
        self.action = int(action)
        super().__init__(name, lambda v: log_odds(v.log_probs(self.obs), self.action))

    def of_logits(self, logits: Tensor) -> Tensor:
        """X_i = z_a(z_i) for logits z of shape (N, K)."""
        return log_odds_of_logits(logits, self.action)

    @property
    def per_state(self) -> PerState:
        """(obs, fn_of_logits): the structured tangent backend's view of this property."""
        return PerState(self.obs, self.of_logits)


class ExactRewardModel(Protocol):
    """Anything that gives the exact expected reward J(π) differentiably in the policy."""

    def exact_expected_reward(self, view: PolicyView) -> Tensor:  # pragma: no cover - protocol
        ...


class ExpectedReward(Property):
    """X = R = J(π_θ), the exact expected reward from an environment's model."""

    def __init__(self, model: ExactRewardModel, name: str = "R"):
        self.model = model
        super().__init__(name, lambda v: model.exact_expected_reward(v))
