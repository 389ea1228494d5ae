"""The tracker: Price's equation checked at every k-th update.

Before the step, for each property X (with Δθ = η d and d = M g_eff the optimizer's plan):

    value          X(θ)
    ntvar_euc      NTVar(X)            = ‖∇X‖²
    ntvar_opt      NTVar_M(X)          = ∇X · M ∇X        (M: the optimizer's metric)
    ntvar_fisher   NTVar_F⁻¹(X)        = ∇X · F⁺ ∇X       (natural-gradient geometry)
    ntcov_euc      NTCov(X, U)         = ∇X · g
    ntcov_opt      NTCov_M(X, U)       = ∇X · d           (for Adam, g_eff = m̂)
    pred_delta     predicted ΔX        = η · NTCov_M(X, U)

and after the step

    real_delta     X(θ + Δθ) − X(θ)
    residual       real_delta − pred_delta     (O(η²) from curvature)

plus ``kappa`` = ‖∇z‖² for the log-odds z of the target action, and the utility ``U``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import warnings

import numpy as np
import torch
from torch import Tensor

from ntrl.engine.metrics import Euclidean, InverseFisher, Metric
from ntrl.properties import Property
from ntrl.engine.tangent import TangentEngine, TangentStats



def price_agreement(pred: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """How well predicted ΔX matches realised ΔX over many updates:
    R² = 1 − Σ(real − pred)² / Σ(real − mean real)², and the median and 90th percentile of the
    relative error |real − pred| / |real| (updates with real = 0 left out)."""
    pred, real = np.asarray(pred, dtype=float), np.asarray(real, dtype=float)
    out = {"n": int(len(real)), "r2": float("nan"), "median_rel_error": float("nan"), "p90_rel_error": float("nan")}
    with np.errstate(over="ignore", invalid="ignore"):  # a huge misprediction overflows to R² = −inf
        if len(real) >= 2:
            ss_tot = float(np.sum((real - real.mean()) ** 2))
            if ss_tot > 0:
                out["r2"] = 1.0 - float(np.sum((real - pred) ** 2)) / ss_tot
        nz = real != 0
        rel = np.abs(real[nz] - pred[nz]) / np.abs(real[nz])
    if nz.any():
        out["median_rel_error"] = float(np.median(rel))
        out["p90_rel_error"] = float(np.quantile(rel, 0.9))
    return out


def to_json(t: Tensor) -> float | list[float]:
    """A tensor as a JSON value: a float for one entry, else a list of floats."""
    flat = t.detach().reshape(-1).to(torch.float64).tolist()
    return flat[0] if len(flat) == 1 else flat


@dataclass
class PendingUpdate:
    """A tracked update between ``before`` and ``after``: the record so far, X(θ), the predicted
    ΔX and the engine's stats per property; ``after`` fills in X(θ + Δθ)."""

    update: int
    record: dict[str, Any]
    before: dict[str, Tensor]
    predicted: dict[str, Tensor]
    stats: dict[str, TangentStats] = field(default_factory=dict)
    after: dict[str, Tensor] = field(default_factory=dict)


class Tracker:
    """Computes, at every ``every``-th update, the Price prediction and the realised change."""

    def __init__(
        self,
        engine: TangentEngine,
        properties: Sequence[Property],
        kappa: Property | None = None,
        every: int = 1,
        fisher: bool = True,
        fisher_damping: float = 0.0,
    ):
        if every < 1:
            raise ValueError(f"track interval must be >= 1, got {every}")
        names = [p.name for p in properties]
        if len(set(names)) != len(names):
            raise ValueError(f"property names must be unique, got {names}")
        self.engine = engine
        self.properties = list(properties)
        self.kappa = kappa
        self.every = every
        self.fisher = fisher
        self.fisher_damping = fisher_damping

    def _fisher(self, plan, fisher_states: tuple[Tensor, Tensor]) -> Metric:
        """The Fisher metric over the update's states: NPG's own when it is the same metric;
        tracking it is switched off, with a warning, when it is too large to factor."""
        m = plan.metric
        if isinstance(m, InverseFisher) and m.damping == self.fisher_damping:
            return m
        try:
            return InverseFisher(self.engine, *fisher_states, damping=self.fisher_damping)
        except ValueError as e:
            warnings.warn(f"NTVar in the Fisher metric is not tracked: {e}", stacklevel=3)
            self.fisher = False
            return Euclidean()

    def should_track(self, update: int) -> bool:
        return update % self.every == 0

    def before(self, update: int, gradient: Tensor, plan, utility_value: float,
               fisher_states: tuple[Tensor, Tensor] | None = None) -> PendingUpdate:
        """Everything that is known before the step: X, NTVar, NTCov and the prediction."""
        metrics: dict[str, Metric] = {"euc": Euclidean(), "opt": plan.metric}
        if self.fisher and fisher_states is not None:
            metrics["fisher"] = self._fisher(plan, fisher_states)
            if not self.fisher:
                del metrics["fisher"]
        record: dict[str, Any] = {"update": update, "lr": plan.lr, "U": utility_value}
        before, predicted = {}, {}
        all_stats = self.engine.stats_many(self.properties, metrics, directions={"g": gradient, "d": plan.direction})
        for X, s in zip(self.properties, all_stats):
            pred = plan.lr * s.ntcov["d"]
            before[X.name], predicted[X.name] = s.value, pred
            record[f"{X.name}/value"] = to_json(s.value)
            for m in metrics:
                record[f"{X.name}/ntvar_{m}"] = to_json(s.ntvar[m])
            record[f"{X.name}/ntcov_euc"] = to_json(s.ntcov["g"])
            record[f"{X.name}/ntcov_opt"] = to_json(s.ntcov["d"])
            record[f"{X.name}/pred_delta"] = to_json(pred)
        if self.kappa is not None:
            record["kappa"] = to_json(self.engine.ntvar(self.kappa))
        record["backend"] = "+".join(sorted({s.backend for s in all_stats}))
        return PendingUpdate(update, record, before, predicted,
                             stats={X.name: s for X, s in zip(self.properties, all_stats)})

    def after(self, pending: PendingUpdate) -> dict[str, Any]:
        """Add the realised change X(θ + Δθ) − X(θ) and the residual; return the full record
        (X(θ + Δθ) itself is kept in ``pending.after``)."""
        record = dict(pending.record)
        view = self.engine.view()  # one view: properties of one model can share its forward pass
        for X in self.properties:
            with torch.no_grad():
                pending.after[X.name] = value = X(view).reshape(-1)
            real = value - pending.before[X.name]
            record[f"{X.name}/real_delta"] = to_json(real)
            record[f"{X.name}/residual"] = to_json(real - pending.predicted[X.name])
        return record
