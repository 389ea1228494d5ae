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

plus ``kappa`` = ‖∇z‖² for the log-odds z of the target action, the utility ``U``, and

    first_order    |residual| ≤ ½·|pred_delta|  (the update was in the first-order regime)

With ``price_scales`` (the η-probe), for the headline property P (its mean over entries), at
every tracked update: the step replayed from θ at η·s for each scale s,

    probe_lr       η·s
    probe_real     P(θ + η s d) − P(θ)
    probe_pred     η s NTCov_M(P, U)

so that the relative error |real − pred| / |real| can be fitted against η along the whole
trajectory (slope 1 for a first-order prediction, SCIENCE.md §1), and the largest η that keeps
the update first-order read off.

In sampled mode (SCIENCE.md §4), from the batch's per-episode gradient contributions
h_i = ∇U_i (U = (1/B) Σ_i U_i; the rows of the engine's Jacobian of (U_1, …, U_B)),
Σ = Cov_i(h_i)/B, and for each property X (its mean over entries), with v_X = M ∇X:

    noise_sd       η·sqrt(∇Xᵀ M Σ M ∇X) = η·sqrt(Var_i(h_i · v_X) / B)     the predicted spread of ΔX
    noise_sd_iso   η·sqrt(tr Σ / P)·‖v_X‖                                 the isotropic model's
    expected_delta η·∇X · M ∇J     (the exact gradient of J, where the environment has a model)

and, for the first two properties X, Y: ``noise/cov_X_Y`` = η²·Cov_i(h_i·v_X, h_i·v_Y)/B and
``noise/cov_X_Y_iso`` = η²·(tr Σ / P)·v_X·v_Y, with ``noise/trace_sigma`` = tr Σ. For SGD this is
the spread of ΔX to first order; for sign descent, Adam and a sampled-Fisher NPG, M itself
depends on the batch (and Adam steps along m̂, not ĝ), so these are the spreads of M·ĝ at the
step's M.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ntrl.engine.metrics import Euclidean, InverseFisher, Metric, scaled_inner, scaled_norm
from ntrl.properties import Property
from ntrl.engine.tangent import TangentEngine, TangentStats



@dataclass(frozen=True)
class TrackSchedule:
    """Which updates are tracked: every ``every``-th, or (``per_decade``) log-spaced,
    t ∈ {0} ∪ {round(10^(i/per_decade)) : i ≥ 0}."""

    every: int = 1
    per_decade: int | None = None

    def __post_init__(self):
        from ntrl.config import ConfigError

        if self.every < 1:
            raise ConfigError("--track-every", f"must be >= 1, got {self.every}")
        if self.per_decade is not None and self.per_decade < 1:
            raise ConfigError("--track-per-decade", f"must be >= 1, got {self.per_decade}")

    def tracks(self, t: int) -> bool:
        """Whether update t is tracked."""
        if self.per_decade is None:
            return t % self.every == 0
        if t == 0:
            return True
        i = round(self.per_decade * math.log10(t))  # the only i whose round(10^(i/n)) can be t
        return any(int(round(10 ** (j / self.per_decade))) == t for j in (i - 1, i, i + 1) if j >= 0)


FIRST_ORDER_TOLERANCE = 0.5  # an update is first-order when |realised − predicted| ≤ ½·|predicted|


def first_order(real: Any, pred: Any) -> Any:
    """Whether the realised change is within FIRST_ORDER_TOLERANCE·|predicted| of the prediction
    (elementwise, for tensors or arrays): |real − pred| ≤ ½·|pred|."""
    return abs(real - pred) <= FIRST_ORDER_TOLERANCE * abs(pred)


def record_slope(rec: dict[str, Any]) -> float:
    """The log–log slope of a record's η-probe relative error |real − pred| / |real| against η,
    over the scales s ≤ 1 (the step's own η and below); nan where fewer than two errors are
    positive, or where they are all at one η (no slope against η). 1 for a first-order
    prediction, whose error is O(η²) against a change O(η)."""
    lrs, real, pred = rec.get("P/probe_lr"), rec.get("P/probe_real"), rec.get("P/probe_pred")
    if not lrs or real is None or pred is None:
        return float("nan")
    lrs, real, pred = (np.asarray(x, dtype=float) for x in (lrs, real, pred))
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(real - pred) / np.abs(real)
    ok = (lrs <= rec["lr"] * (1 + 1e-12)) & np.isfinite(err) & (err > 0)
    x = np.log(lrs[ok])
    if ok.sum() < 2 or not np.ptp(x) > 0:
        return float("nan")
    return float(np.polyfit(x, np.log(err[ok]), 1)[0])


def record_slopes(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """:func:`record_slope` of every record, (records,): the records whose probes have one length
    at once, as the least-squares slope of ln err on ln η over each record's usable scales,

        slope = Σ (x − x̄)(y − ȳ) / Σ (x − x̄)²,

    np.polyfit's degree-1 coefficient (to rounding), nan where the usable scales are all one η;
    a ragged probe by :func:`record_slope` itself."""
    out = np.full(len(records), np.nan)
    rows: list[int] = []
    for i, rec in enumerate(records):
        lrs = rec.get("P/probe_lr")
        if lrs and rec.get("P/probe_real") is not None and rec.get("P/probe_pred") is not None:
            rows.append(i)
    if not rows:
        return out
    try:
        L, R, P = (np.array([records[i][k] for i in rows], dtype=float)
                   for k in ("P/probe_lr", "P/probe_real", "P/probe_pred"))
        lr = np.array([records[i]["lr"] for i in rows], dtype=float)
        if L.ndim != 2 or R.shape != L.shape or P.shape != L.shape:
            raise ValueError("ragged")
    except (TypeError, ValueError, KeyError):
        for i in rows:
            out[i] = record_slope(records[i])
        return out
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(R - P) / np.abs(R)
        ok = (L <= lr[:, None] * (1 + 1e-12)) & np.isfinite(err) & (err > 0)
        n = ok.sum(1)
        x = np.where(ok, np.log(np.where(ok, L, 1.0)), 0.0)
        y = np.where(ok, np.log(np.where(ok, err, 1.0)), 0.0)
        dx = np.where(ok, x - (x.sum(1) / n)[:, None], 0.0)
        dy = np.where(ok, y - (y.sum(1) / n)[:, None], 0.0)
        sxx = (dx * dx).sum(1)
        slope = (dx * dy).sum(1) / sxx
    out[np.array(rows)] = np.where((n >= 2) & (sxx > 0), slope, np.nan)  # sxx = 0: one η, no slope
    return out


FIRST_ORDER_SHARE = 0.05  # "stays first-order up to η": at most 5 % of the probed updates outside there


def first_order_scale(records: Sequence[dict[str, Any]], share: float = FIRST_ORDER_SHARE) -> tuple[float, float, float]:
    """How far the step can grow and stay first-order, from the η-probe of ``records``:
    (s*, smallest probed s, largest probed s), with s* the largest probed multiple s of the
    records' η such that at most ``share`` of the probed updates leave the first-order regime
    (:func:`first_order`) at s or at any smaller multiple; 0 when even the smallest does, nan
    without a probe. A probed multiple is η_probe/η rounded to 12 digits (Python's ``round``)."""
    keys = ("lr", "P/probe_lr", "P/probe_real", "P/probe_pred")
    return first_order_scale_of_columns({k: [rec.get(k) for rec in records] for k in keys}, share)


def first_order_scale_of_columns(columns: dict[str, Sequence[Any]], share: float = FIRST_ORDER_SHARE) -> tuple[float, float, float]:
    """:func:`first_order_scale` of records given as columns: ``lr``, ``P/probe_lr``,
    ``P/probe_real`` and ``P/probe_pred``, one entry per record (None where it has none)."""
    n = max(map(len, columns.values()), default=0)
    lr, lrs, real, pred = (columns.get(k) or [None] * n for k in ("lr", "P/probe_lr", "P/probe_real", "P/probe_pred"))
    probed = [i for i, (a, b, c) in enumerate(zip(lrs, real, pred)) if a and b is not None and c is not None]
    if not probed:
        return float("nan"), float("nan"), float("nan")
    try:  # the records' probes as arrays, one row per record (the usual case: one set of scales)
        L, R, P = (np.array([col[i] for i in probed], dtype=float) for col in (lrs, real, pred))
        if L.ndim != 2 or R.shape != L.shape or P.shape != L.shape:
            raise ValueError("ragged")
    except (TypeError, ValueError):  # records with differing probes: record by record
        return _first_order_scale_by_record([(lr[i], lrs[i], real[i], pred[i]) for i in probed], share)
    ratios = L / np.array([lr[i] for i in probed], dtype=float)[:, None]
    unique, inverse = np.unique(ratios, return_inverse=True)
    scales = np.array([round(float(u), 12) for u in unique])[inverse.reshape(ratios.shape)]
    outside = ~first_order(R, P)
    flags = {float(s): outside[scales == s] for s in np.unique(scales)}
    return _largest_first_order(flags, share)


def _first_order_scale_by_record(probes: Sequence[tuple], share: float) -> tuple[float, float, float]:
    """:func:`first_order_scale`, one probed update (η, its probe's η's, real and predicted
    changes) at a time."""
    flags: dict[float, list[bool]] = {}
    for rec_lr, lrs, real, pred in probes:
        for lr, r, p in zip(lrs, real, pred):
            flags.setdefault(round(lr / rec_lr, 12), []).append(not first_order(r, p))
    return _largest_first_order(flags, share)


def _largest_first_order(flags: dict[float, Any], share: float) -> tuple[float, float, float]:
    """(s*, smallest s, largest s) from whether each probed update at multiple s left the
    first-order regime (``flags``: s → booleans)."""
    best = 0.0
    for s in sorted(flags):
        if np.mean(flags[s]) > share:
            break
        best = s
    return best, min(flags), max(flags)


def price_agreement(pred: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """How well predicted ΔX matches realised ΔX over many updates:
    R² = 1 − Σ(real − pred)² / Σ(real − mean real)², and the median and 90th percentile of the
    relative error |real − pred| / |real| (updates with real = 0 left out), and the share of the
    updates outside the first-order regime (:func:`first_order`)."""
    pred, real = np.asarray(pred, dtype=float), np.asarray(real, dtype=float)
    out = {"n": int(len(real)), "r2": float("nan"), "median_rel_error": float("nan"), "p90_rel_error": float("nan"),
           "outside_first_order": float(np.mean(~first_order(real, pred))) if len(real) else float("nan")}
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
    if len(real):
        out["max_abs_real"] = float(np.max(np.abs(real)))
        with np.errstate(over="ignore", invalid="ignore"):
            sq = (real - pred) ** 2
            total = float(np.sum(sq))
        if total > 0 and np.isfinite(total):  # how much of the squared error the TOP_MISSES largest misses make
            top = np.argsort(sq)[::-1][:TOP_MISSES]
            cum = np.cumsum(sq[top]) / total
            k = int(np.argmax(cum >= 0.9)) + 1 if (cum >= 0.9).any() else len(top)  # the fewest that make 90 %
            out["top_miss_share"] = float(cum[k - 1])
            out["top_miss_index"] = [int(i) for i in top[:k]]
    return out


TOP_MISSES = 3  # the summary names the (at most 3) updates behind 90 % of the squared error when they dominate R²


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
    """Computes, at every tracked update (``schedule``), the Price prediction and the realised change."""

    def __init__(
        self,
        engine: TangentEngine,
        properties: Sequence[Property],
        kappa: Property | None = None,
        every: int = 1,
        fisher: bool = True,
        fisher_damping: float = 0.0,
        *,
        schedule: TrackSchedule | None = None,
        price_scales: Sequence[float] = (),
        noise: bool = True,
        exact_utility: Callable[[Any], Tensor] | None = None,
    ):
        if every < 1:
            raise ValueError(f"track interval must be >= 1, got {every}")
        names = [p.name for p in properties]
        if len(set(names)) != len(names):
            raise ValueError(f"property names must be unique, got {names}")
        self.engine = engine
        self.properties = list(properties)
        self.kappa = kappa
        self.schedule = schedule if schedule is not None else TrackSchedule(every=every)
        self.fisher = fisher
        self.fisher_damping = fisher_damping
        self.price_scales = [float(s) for s in price_scales]
        self.noise = noise
        self.exact_utility = exact_utility

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
        return self.schedule.tracks(update)

    def before(self, update: int, gradient: Tensor, plan, utility_value: float,
               fisher_states: tuple[Tensor, Tensor] | None = None,
               episode_utilities: Callable[[Any], Tensor] | None = None) -> PendingUpdate:
        """Everything that is known before the step: X, NTVar, NTCov and the prediction; the
        η-probe; in sampled mode (``episode_utilities``: the per-episode terms U_i of the
        surrogate, U = (1/B) Σ_i U_i) the predicted spread of ΔX."""
        metrics: dict[str, Metric] = {"euc": Euclidean(), "opt": plan.metric}
        if self.fisher and fisher_states is not None:
            metrics["fisher"] = self._fisher(plan, fisher_states)
            if not self.fisher:
                del metrics["fisher"]
        record: dict[str, Any] = {"update": update, "lr": plan.lr, "U": utility_value}
        directions = {"g": gradient, "d": plan.direction}
        sampled = episode_utilities is not None
        if sampled and self.exact_utility is not None:  # E[ΔX] from the exact gradient of J
            g_exact = self.engine.gradient(self.exact_utility)
            directions["j"] = plan.metric.apply(g_exact[None].to(plan.direction.dtype))[0]
        before, predicted = {}, {}
        all_stats = self.engine.stats_many(self.properties, metrics, directions=directions)
        for X, s in zip(self.properties, all_stats):
            pred = plan.lr * s.ntcov["d"]
            before[X.name], predicted[X.name] = s.value, pred
            record[f"{X.name}/value"] = to_json(s.value)
            for m in metrics:
                record[f"{X.name}/ntvar_{m}"] = to_json(s.ntvar[m])
            record[f"{X.name}/ntcov_euc"] = to_json(s.ntcov["g"])
            record[f"{X.name}/ntcov_opt"] = to_json(s.ntcov["d"])
            record[f"{X.name}/pred_delta"] = to_json(pred)
            if "j" in directions:
                record[f"{X.name}/expected_delta"] = to_json(plan.lr * s.ntcov["j"])
        if self.kappa is not None:
            record["kappa"] = to_json(self.engine.ntvar(self.kappa))
        record["backend"] = "+".join(sorted({s.backend for s in all_stats}))
        if self.price_scales:
            P, s0 = self.properties[0], all_stats[0]
            record.update(self.eta_probe(P, s0.value.mean(), s0.ntcov["d"].mean(), plan))
        if sampled and self.noise:
            record.update(self.noise_spread(episode_utilities, plan))
        return PendingUpdate(update, record, before, predicted,
                             stats={X.name: s for X, s in zip(self.properties, all_stats)})

    def eta_probe(self, P: Property, value: Tensor, ntcov: Tensor, plan) -> dict[str, list[float]]:
        """The step replayed from θ at η·s for each of ``price_scales``: P's mean over entries,
        realised P(θ + η s d) − P(θ) and predicted η s NTCov_M(P, U)."""
        engine = self.engine
        theta = engine.flatten(engine.params())
        d = plan.direction.to(theta.dtype)
        lrs = [plan.lr * s for s in self.price_scales]
        real = [float(engine.evaluate(P, engine.unflatten(theta + lr * d)).mean() - value) for lr in lrs]
        return {f"{P.name}/probe_lr": lrs, f"{P.name}/probe_real": real,
                f"{P.name}/probe_pred": [float(lr * ntcov) for lr in lrs]}

    def noise_spread(self, episode_utilities: Callable[[Any], Tensor], plan) -> dict[str, float]:
        """The predicted spread of each property's change from the per-episode gradient rows H
        (B × P) of the surrogate's terms: Σ = Cov_i(h_i)/B (see the module docstring)."""
        engine = self.engine
        _, H = engine.dense_jacobian(episode_utilities)
        B, n_params = H.shape
        if B < 2:
            return {}
        Hc = H - H.mean(dim=0)
        trace = float((Hc**2).sum()) / (B * (B - 1))
        out: dict[str, float] = {"noise/trace_sigma": trace}
        lr = plan.lr
        cs, vs = [], []
        for X in self.properties:
            g = engine.gradient(lambda view, X=X: X(view).reshape(-1).mean())
            v = plan.metric.apply(g[None].to(H.dtype))[0]
            c = Hc @ v
            cs.append(c)
            vs.append(v)
            out[f"{X.name}/noise_sd"] = lr * math.sqrt(float((c**2).sum()) / (B * (B - 1)))
            # η·sqrt(tr Σ / P)·‖v‖ without squaring v: a huge v (the inverse Fisher of a nearly
            # deterministic policy) times tr Σ = 0 is 0, not 0·inf
            out[f"{X.name}/noise_sd_iso"] = lr * math.sqrt(trace / n_params) * float(scaled_norm(v))
        if len(cs) >= 2:
            a, b = self.properties[0].name, self.properties[1].name
            out[f"noise/cov_{a}_{b}"] = lr**2 * float(cs[0] @ cs[1]) / (B * (B - 1))
            out[f"noise/cov_{a}_{b}_iso"] = lr**2 * float(scaled_inner(trace / n_params, vs[0], vs[1]))
        return out

    def after(self, pending: PendingUpdate) -> dict[str, Any]:
        """Add the realised change X(θ + Δθ) − X(θ), the residual and whether the update was
        first-order; return the full record (X(θ + Δθ) itself is kept in ``pending.after``)."""
        record = dict(pending.record)
        view = self.engine.view()  # one view: properties of one model can share its forward pass
        for X in self.properties:
            with torch.no_grad():
                pending.after[X.name] = value = X(view).reshape(-1)
            real = value - pending.before[X.name]
            pred = pending.predicted[X.name]
            record[f"{X.name}/real_delta"] = to_json(real)
            record[f"{X.name}/residual"] = to_json(real - pred)
            inside = first_order(real, pred).tolist()
            record[f"{X.name}/first_order"] = inside[0] if len(inside) == 1 else inside
        return record
