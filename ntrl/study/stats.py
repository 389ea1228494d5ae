"""The statistics the study's analyses share: runs as read from disk, estimates with intervals,
bootstrap resampling over seeds, regression intervals, and model comparison by AICc.

Model comparison (Burnham & Anderson): a least-squares fit with k free parameters of the model
and a Gaussian error of unknown variance (k + 1 parameters in all) to n points has

    AICc = n·log(RSS/n) + 2(k + 1) + 2(k + 1)(k + 2)/(n − k − 2),

the small-sample correction of AIC; it exists only for n ≥ k + 3 (a model with at least as many
parameters as points has nothing to be compared on). A difference below MIN_DELTA_AIC is no
evidence either way.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy import stats

from ntrl.study.grid import RunSpec

MIN_DELTA_AIC = 2.0  # an AICc difference below 2 is no evidence either way


@dataclass
class RunData:
    spec: RunSpec
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.json
    # per-run point arrays, read from the records once (the bootstrap asks for them ~1000 times)
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Estimate:
    """A point estimate with its 95 % interval (bootstrap, or a fit's t interval) and the number
    of items (runs or points) behind it."""

    value: float
    lo: float
    hi: float
    n: int = 0

    def within(self, target: float, margin: float) -> bool:
        """Whether the whole interval lies within target ± margin."""
        return all(math.isfinite(x) for x in (self.lo, self.hi)) and target - margin <= self.lo and self.hi <= target + margin

    def overlaps(self, target: float, margin: float) -> bool:
        """Whether the interval meets target ± margin at all."""
        return all(math.isfinite(x) for x in (self.lo, self.hi)) and self.lo <= target + margin and self.hi >= target - margin

    @property
    def has_interval(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    def fmt(self, digits: int = 3, style: str = "f") -> str:
        """"1.000 [0.990, 1.010]", "1.000 (exact)" for a point, "1.000 (no interval)"; ``style``
        "g" for quantities spanning decades (:meth:`fmt_g`)."""
        if not math.isfinite(self.value):
            return "n/a"
        show = lambda x: f"{x:.{digits}{style}}"  # noqa: E731
        if not self.has_interval:
            return f"{show(self.value)} (no interval)"
        if self.lo == self.hi == self.value:
            return f"{show(self.value)} (exact)" if style == "f" else show(self.value)
        return f"{show(self.value)} [{show(self.lo)}, {show(self.hi)}]"

    def fmt_g(self, digits: int = 3) -> str:
        """As :meth:`fmt`, in %g notation."""
        return self.fmt(digits, "g")

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: self.value, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


NAN = Estimate(float("nan"), float("nan"), float("nan"))


def kappa_of(record: dict[str, Any]) -> float:
    """κ of a record: the value, or its mean over probe states when κ was tracked per state."""
    return float(np.mean(record["kappa"]))


def by_p0(runs: Sequence[RunData]) -> list[list[RunData]]:
    """The runs grouped by p₀, in increasing p₀ (the bootstrap's strata)."""
    groups: dict[float, list[RunData]] = {}
    for r in runs:
        groups.setdefault(r.spec.p0, []).append(r)
    return [groups[k] for k in sorted(groups)]


def stratified_bootstrap(
    strata: Sequence[Sequence[Any]],
    statistic: Callable[[list[Any]], float],
    n_resamples: int = 999,
    seed: int = 0,
    batch_statistic: Callable[[list[Any], np.ndarray], np.ndarray] | None = None,
) -> Estimate:
    """95 % percentile CI of ``statistic(items)`` resampling items within each stratum (scipy).

    ``strata`` is a list of lists of items (runs); strata of one item are held fixed.
    ``batch_statistic(items, counts)``, where given, computes the statistic of every resample at
    once: ``items`` all the items, stratum after stratum, and ``counts`` (resamples, items) how
    many times each resample draws each one; it must give ``statistic`` of each resample's items
    (to rounding). The resamples are the same either way (scipy draws them before it applies the
    statistic; tested).
    """
    strata = [list(s) for s in strata if len(s) > 0]
    items = [x for s in strata for x in s]
    if not items:
        return NAN
    value = statistic(items)
    free = [i for i, s in enumerate(strata) if len(s) >= 2]
    fixed = [x for i, s in enumerate(strata) if i not in free for x in s]
    if not free or not math.isfinite(value):
        return Estimate(value, value, value, len(items))

    def stat(*index_arrays):
        chosen = list(fixed)
        for k, idx in zip(free, index_arrays):
            chosen.extend(strata[k][int(i)] for i in idx)
        return statistic(chosen)

    if batch_statistic is not None:
        starts = np.cumsum([0] + [len(s) for s in strata])

        def batch_stat(*index_arrays, axis=-1):  # each (resamples, n_k): the drawn indices of free stratum k
            counts = np.zeros((index_arrays[0].shape[0], len(items)), dtype=np.int64)
            for i, s in enumerate(strata):
                if i not in free:
                    counts[:, starts[i]:starts[i + 1]] = 1
            for k, idx in zip(free, index_arrays):
                counts[:, starts[k]:starts[k + 1]] = (idx[:, :, None] == np.arange(len(strata[k]))).sum(1)
            return batch_statistic(items, counts)

    data = tuple(np.arange(len(strata[k])) for k in free)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(data, stat if batch_statistic is None else batch_stat,
                              vectorized=batch_statistic is not None, paired=False,
                              n_resamples=n_resamples, method="percentile", confidence_level=0.95,
                              random_state=np.random.default_rng(seed))
    return _percentile_estimate(res, value, len(items))


def resampled(items: Sequence[Any], counts: np.ndarray) -> list[Any]:
    """The items one resample draws: item j ``counts[j]`` times."""
    return [x for x, c in zip(items, counts) for _ in range(int(c))]


def weighted_medians(values: Sequence[np.ndarray], counts: np.ndarray) -> np.ndarray:
    """The median of each resample's pooled values, item j's ``values[j]`` drawn ``counts[b, j]``
    times by resample b: np.median's number (the middle value, or the mean of the two middle
    ones) without pooling. With v the values of all items sorted and C[i, j] how many of item j's
    are ≤ v_i, resample b has Σ_j counts[b, j]·C[i, j] values ≤ v_i, nondecreasing in i: its
    k-th smallest value is v_i for the least i where that exceeds k, found by bisection for all
    resamples at once. nan for a resample that draws no value."""
    B = len(counts)
    v = np.sort(np.concatenate(values)) if len(values) else np.zeros(0)
    if not len(v):
        return np.full(B, np.nan)
    C = np.stack([np.searchsorted(np.sort(x), v, side="right") for x in values], axis=1)  # (values, items)
    n = counts @ np.array([len(x) for x in values])

    def kth(k: np.ndarray) -> np.ndarray:
        k = np.where(n > 0, k, -1)  # a resample without values: any index (its median is nan)
        lo, hi = np.zeros(B, dtype=np.int64), np.full(B, len(v) - 1)
        while (lo < hi).any():
            mid = (lo + hi) // 2
            above = (C[mid] * counts).sum(1) > k
            lo, hi = np.where(above, lo, mid + 1), np.where(above, mid, hi)
        return v[lo]

    return np.where(n > 0, (kth((n - 1) // 2) + kth(n // 2)) / 2, np.nan)


def power_law_exponents(n: np.ndarray, lo: np.ndarray, hi: np.ndarray, XtX: np.ndarray, Xty: np.ndarray,
                        min_points: int, exact: Callable[[int], float], unsure: np.ndarray | None = None,
                        max_condition: float = 1e6) -> np.ndarray:
    """The exponent a (coefficient 1) of the least-squares fit ln y ≈ X β of each resample b's
    points from their moments: the number of points ``n`` (B,), the least and largest ln p
    ``lo``, ``hi``, XᵀX (B, 3, 3) and Xᵀ ln y (B, 3) (:func:`summed_moments`), by the normal
    equations XᵀX β = Xᵀ ln y scaled to a unit diagonal. nan where there are fewer than
    ``min_points`` points or they span less than half a unit of ln p (as the scalar statistic
    decides). A resample whose scaled XᵀX has a condition number above ``max_condition`` (the
    normal equations square the design's: above 10⁶ they would keep fewer than 10 digits), or
    that ``unsure`` marks, is fitted by ``exact(b)``, the scalar statistic."""
    out = np.full(len(n), np.nan)
    ok = (n >= min_points) & (hi - lo >= 0.5)
    fallback = np.zeros(len(n), bool) if unsure is None else np.asarray(unsure, bool).copy()
    rows = np.flatnonzero(ok & ~fallback)
    if len(rows):
        A, c = XtX[rows], Xty[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = 1 / np.sqrt(np.diagonal(A, axis1=1, axis2=2))
            As = A * d[:, :, None] * d[:, None, :]
            finite = np.isfinite(As).all(axis=(1, 2)) & np.isfinite(c * d).all(1)
            cond = np.full(len(rows), np.inf)
            cond[finite] = np.linalg.cond(As[finite])
        good = cond <= max_condition
        if good.any():
            beta = np.linalg.solve(As[good], (c[good] * d[good])[:, :, None])[:, :, 0] * d[good]
            out[rows[good]] = beta[:, 1]
        fallback[rows[~good]] = True
    for b in np.flatnonzero(fallback):
        out[b] = exact(int(b))
    return out


def summed_moments(counts: np.ndarray, n: np.ndarray, lo: np.ndarray, hi: np.ndarray, XtX: np.ndarray,
                   Xty: np.ndarray) -> tuple[np.ndarray, ...]:
    """The moments of each resample's pooled points (:func:`power_law_exponents`' first five
    arguments) from each item's, item j drawn ``counts[b, j]`` times: the points and the normal
    equations add up, Σ_j c_bj n_j, Σ_j c_bj X_jᵀX_j, Σ_j c_bj X_jᵀy_j; the range of ln p is that
    of the items drawn at all (±inf for none)."""
    w = counts.astype(float)
    drawn = counts > 0
    return (counts @ n, np.where(drawn, lo, np.inf).min(1), np.where(drawn, hi, -np.inf).max(1),
            np.einsum("bj,jkl->bkl", w, XtX), w @ Xty)


def median_bootstrap(values: Sequence[float], n_resamples: int = 999, seed: int = 0) -> Estimate:
    """``stratified_bootstrap([values], median)`` for one stratum of numbers, with the median of
    every resample taken at once (scipy's vectorized statistic): the same resamples and the same
    interval (tested), without a Python call per resample."""
    x = np.asarray(values, dtype=float)
    if not len(x):
        return NAN
    value = float(np.median(x))
    if len(x) < 2 or not math.isfinite(value):
        return Estimate(value, value, value, len(x))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap((x,), np.median, vectorized=True, paired=False, n_resamples=n_resamples,
                              method="percentile", confidence_level=0.95, random_state=np.random.default_rng(seed))
    return _percentile_estimate(res, value, len(x))


def _percentile_estimate(res, value: float, n: int) -> Estimate:
    """The point ``value`` of ``n`` items with scipy's percentile interval ``res``: a point where
    every resample gives the same value, no interval where some resample gives none."""
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        dist = np.asarray(res.bootstrap_distribution, dtype=float)
        if np.isfinite(dist).all() and np.ptp(dist) == 0:  # every resample gives the same value: a point
            return Estimate(value, value, value, n)
        return Estimate(value, float("nan"), float("nan"), n)  # no interval (resamples without a value)
    return Estimate(value, min(lo, value), max(hi, value), n)


def regression_ci(X: np.ndarray, y: np.ndarray, k: int) -> tuple[float, float, float]:
    """Coefficient k of the least-squares fit y ≈ X β with its 95 % t interval, from the
    residual variance: the uncertainty of a fit to one deterministic run, where there is
    nothing to bootstrap."""
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]
    if dof <= 0:
        return float(beta[k]), float("nan"), float("nan")
    s2 = float(np.sum((y - X @ beta) ** 2)) / dof
    se = math.sqrt(max(s2 * float(np.linalg.pinv(X.T @ X)[k, k]), 0.0))
    half = float(stats.t.ppf(0.975, dof)) * se
    return float(beta[k]), float(beta[k]) - half, float(beta[k]) + half


def with_fit_ci(est: Estimate, X: np.ndarray, y: np.ndarray, k: int) -> Estimate:
    """A bootstrap estimate, or where the bootstrap had nothing to resample (one run per p₀) or
    gave no interval, the same coefficient with its regression interval."""
    point = est.lo == est.hi == est.value
    if not (point or not est.has_interval) or not math.isfinite(est.value):
        return est
    value, lo, hi = regression_ci(X, y, k)
    return Estimate(value, lo, hi, est.n)


RESOLUTION = 1e-20  # mean squared residuals below this (1e-10 in log space) count as a perfect fit


def resolved(rss: float, n: int) -> float:
    """The RSS, or n·RESOLUTION if smaller: fits of exact data that differ only in rounding tie
    (and then the model with fewer parameters wins) instead of being ranked by their rounding."""
    return max(rss, n * RESOLUTION)


def aicc(rss: float, n: int, k: int) -> float:
    """AICc of a least-squares fit of k model parameters (plus the error variance) to n points;
    nan when n < k + 3 (see the module docstring)."""
    K = k + 1
    if n - K - 1 <= 0:
        return float("nan")
    return n * math.log(resolved(rss, n) / n) + 2 * K + 2 * K * (K + 1) / (n - K - 1)


@dataclass
class ModelComparison:
    """Models fitted to the same n points, compared by AICc: the ``winner`` (lowest AICc),
    ``delta_aic`` = AICc(runner-up) − AICc(winner) ≥ 0, ``deltas`` = AICc(model) − AICc(winner)
    for every other model, ``aicc`` every model's value, and ``params`` the winner's (or a
    summary's) parameters. A summary over runs (:func:`majority`) has n = runs and ``params``
    with its "share" and "runs"."""

    winner: str
    delta_aic: float
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 0
    aicc: dict[str, float] = field(default_factory=dict)
    deltas: dict[str, float] = field(default_factory=dict)

    def deltas_text(self) -> str:
        return ", ".join(f"+{d:.1f} {name}" for name, d in sorted(self.deltas.items(), key=lambda kv: kv[1]))

    def fmt(self) -> str:
        if self.n == 0:
            return "n/a"
        if "share" in self.params and self.params["runs"] > 1:
            wins = round(self.params["share"] * self.params["runs"])
            if self.winner == "mixed":
                return f"mixed (no model wins 2/3 of {self.params['runs']} runs)"
            return (f"{self.winner} in {wins}/{self.params['runs']} runs (median ΔAICc: {self.deltas_text()})"
                    if self.deltas else f"{self.winner} in {wins}/{self.params['runs']} runs")
        return f"{self.winner} (ΔAICc: {self.deltas_text()}; n = {self.n})"


NO_COMPARISON = ModelComparison("n/a", float("nan"))


def compare_models(fits: dict[str, tuple[float, int, dict[str, Any]]], n: int) -> ModelComparison:
    """``fits``: model name → (RSS, number of model parameters, fitted parameters), all on the same
    n points. Models whose AICc does not exist for n, or whose fit failed (RSS inf), are left out;
    with fewer than two left there is no comparison."""
    scores = {name: aicc(rss, n, k) for name, (rss, k, _) in fits.items() if math.isfinite(rss)}
    scores = {name: a for name, a in scores.items() if math.isfinite(a)}
    if len(scores) < 2:
        return ModelComparison("n/a", float("nan"), n=0, aicc=scores)
    ranked = sorted(scores, key=scores.get)
    winner = ranked[0]
    deltas = {name: scores[name] - scores[winner] for name in ranked[1:]}
    return ModelComparison(winner, deltas[ranked[1]], dict(fits[winner][2]), n, scores, deltas)


def majority(comps: Sequence[ModelComparison], share_needed: float = 2 / 3) -> ModelComparison:
    """Per-run comparisons, summarised: the model that wins in at least ``share_needed`` of the runs
    (else "mixed"), with the median over runs of each other model's AICc minus the winner's
    (negative where it won that run); one run's comparison is returned as it is."""
    comps = [c for c in comps if c.n > 0]
    if not comps:
        return ModelComparison("n/a", float("nan"), n=0)
    if len(comps) == 1:
        return comps[0]
    wins = [c.winner for c in comps]
    winner = max(sorted(set(wins)), key=wins.count)
    share = wins.count(winner) / len(wins)
    params = {"share": share, "runs": len(comps)}
    if share < share_needed:
        return ModelComparison("mixed", float("nan"), params, len(comps))
    others = sorted({m for c in comps for m in c.aicc} - {winner})
    deltas = {m: float(np.median([c.aicc[m] - c.aicc[winner] for c in comps if m in c.aicc and winner in c.aicc]))
              for m in others}
    deltas = {m: d for m, d in deltas.items() if math.isfinite(d)}
    return ModelComparison(winner, min(deltas.values()) if deltas else float("nan"), params, len(comps), {}, deltas)


def fit_curve(model: Callable[..., np.ndarray], x: np.ndarray, y: np.ndarray, start: Sequence[float],
              bounds: tuple[Any, Any] = (-np.inf, np.inf)) -> tuple[np.ndarray, float]:
    """Least-squares parameters of y ≈ model(x, *params) (``scipy.optimize.curve_fit``) and the
    RSS; a fit that fails has RSS = inf."""
    from scipy import optimize

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # a diverging trial step is no news
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(model, x, y, p0=list(start), bounds=bounds, maxfev=20_000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return np.full(len(start), np.nan), float("inf")
    rss = float(np.sum((y - model(x, *params)) ** 2))
    return params, rss if math.isfinite(rss) else float("inf")
