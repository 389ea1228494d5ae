"""Fits, bootstrap intervals and verdicts for a rarity study (SCIENCE.md §3–5).

Everything here reads the local run files (config.json, records.jsonl, summary.json); nothing
re-trains.

1. Static law   NTVar(P) ≈ c · p^a (1 − p)^b, per metric (Euclidean, the optimizer's, Fisher):
                least squares on log NTVar = log c + a log p + b log(1 − p); a is the small-p exponent.
2. Drift law    E[ΔP]/η ≈ c · p^a (1 − p)^b on rewarded runs: realised ΔP/η averaged in bins of
                log p (a quarter decade), then the same fit.
3. Escape       T(p₀) over at least MIN_P0S values of p₀ (a law is not judged on fewer): a power
                law, log T = α − s log p₀, against a logarithmic law, T = A + B ln(1/p₀), and in
                sampled cells the waiting time for sampled successes, T = c/(1 − (1 − p₀)^B),
                all fitted to log T and compared by AICc (:mod:`ntrl.study.stats`), n shown.
4. Extinction   :mod:`ntrl.study.extinction`: the asymptotic exponent, B against κΔη, 1/t against
                exponential against a floor (AICc), the floor's interval, Adam's late-time rate.
5. Price check  :mod:`ntrl.study.price`: agreement, the η-slope along the whole trajectory, the
                first-order regime, and in sampled cells the calibration of the predicted spread.
6. Scale factor κ(t)/κ(0) over each run.

Confidence intervals are 95% percentile bootstraps from ``scipy.stats.bootstrap``, resampling
runs (seeds) within each p₀ stratum. A stratum with a single run (deterministic cells run one
seed) is held fixed; a cell with no resampling freedom gets its fit's t interval.

Each piece of evidence votes "p²", "p(1 − p)", "neither" (it disagrees with both laws) or
"inconclusive" (too little data, or an interval too wide, to tell); :func:`decide` combines them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ntrl.config import ConfigError
from ntrl.records import CONFIG_FILE, read_records
from ntrl.study.executor import completed_summary, read_study_file
from ntrl.study.extinction import NO_EXTINCTION, CellExtinction, analyse_extinction, extinction_vote
from ntrl.study.grid import StudyConfig, enumerate_runs
from ntrl.study.price import PriceCheck, price_check
from ntrl.study.stats import (  # noqa: F401  (re-exported: the analysis's vocabulary)
    MIN_DELTA_AIC, NAN, NO_COMPARISON, Estimate, ModelComparison, RunData, by_p0, compare_models, fit_curve,
    kappa_of, power_law_exponents, regression_ci, resampled, stratified_bootstrap, summed_moments, with_fit_ci,
)

Cell = tuple[str, str, str, str]
LAW_MARGIN = 0.25  # a law is "consistent" when the exponent's whole CI lies within ±0.25 of it
KAPPA_CONSTANT = 0.10  # κ "stays constant" when it moves by less than 10 % over a run
MIN_P0S = 5  # escape laws are compared on at least five values of p₀


# ---------------------------------------------------------------------------- loading
def load_study(study_dir: str | Path) -> tuple[StudyConfig, list[RunData]]:
    """The study config and every completed run in ``study_dir``."""
    study_dir = Path(study_dir)
    study = read_study_file(study_dir)
    runs = []
    for spec in enumerate_runs(study):
        run_dir = study_dir / "runs" / spec.run_id
        summary = completed_summary(run_dir)
        if summary is not None:
            try:
                records = read_records(run_dir)
                config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise ConfigError("--out", f"run {run_dir} is complete but its records cannot be read ({e}); "
                                           f"remove that run directory and re-run the study to redo it") from None
            runs.append(RunData(spec, summary, records, config))
    return study, runs


# ---------------------------------------------------------------------------- fitting
def fit_power_law(p: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(log c, a, b) of y ≈ c p^a (1 − p)^b by least squares in log space."""
    coef, *_ = np.linalg.lstsq(power_law_design(p), np.log(y), rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def run_points(runs: Sequence[RunData], name: str,
               point: Callable[[dict[str, Any]], tuple[float, float] | None]) -> tuple[np.ndarray, np.ndarray]:
    """The (p, y) pairs ``point(record)`` gives (None: no pair) over every run's records,
    concatenated. Each run's pairs are read from its records once and kept in its ``cache`` under
    ``name``: the bootstrap asks for them about a thousand times."""
    for r in runs:
        if name not in r.cache:
            pairs = [xy for xy in map(point, r.records) if xy is not None]
            r.cache[name] = (np.array([p for p, _ in pairs], dtype=float), np.array([y for _, y in pairs], dtype=float))
    if not runs:
        return np.array([]), np.array([])
    return np.concatenate([r.cache[name][0] for r in runs]), np.concatenate([r.cache[name][1] for r in runs])


def law_points(runs: Sequence[RunData], key: str, p_max: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(p, y) pairs from tracked records with 0 < p ≤ p_max and y > 0 (y from ``key``)."""
    def point(rec: dict[str, Any]) -> tuple[float, float] | None:
        p, y = rec.get("P/value"), rec.get(key)
        ok = (isinstance(p, (int, float)) and isinstance(y, (int, float)) and 0 < p <= p_max and y > 0
              and math.isfinite(y))
        return (p, y) if ok else None

    return run_points(runs, f"law:{key}:{p_max}", point)


def power_law_design(p: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(p), np.log(p), np.log1p(-p)])


def small_p_exponent(runs: Sequence[RunData], points: Callable[[Sequence[RunData]], tuple[np.ndarray, np.ndarray]],
                     min_points: int = 3,
                     moments: Callable[[Sequence[RunData], np.ndarray], tuple] | None = None) -> Estimate:
    """Exponent a of y ≈ c p^a (1 − p)^b fitted to ``points(runs)``, with its bootstrap CI
    (regression CI for deterministic cells; nan when the points span less than half a decade).
    ``moments(items, counts)``, where given, gives every resample's fit at once instead of one
    Python fit per resample: the moments of each resample's points (n, lo, hi, XᵀX, Xᵀy; see
    :func:`ntrl.study.stats.power_law_exponents`) and which resamples to fit one by one after all
    (None: none)."""

    def stat(items):
        p, y = points(items)
        if len(p) < min_points or np.ptp(np.log(p)) < 0.5:
            return float("nan")
        return fit_power_law(p, y)[1]

    def batch(items, counts):
        *summed, unsure = moments(items, counts)
        return power_law_exponents(*summed, min_points, lambda b: stat(resampled(items, counts[b])), unsure)

    est = stratified_bootstrap(by_p0(runs), stat, batch_statistic=batch if moments is not None else None)
    p, y = points(runs)
    return with_fit_ci(est, power_law_design(p), np.log(y), 1) if len(p) >= min_points else est


def design_moments(p: np.ndarray, y: np.ndarray) -> tuple[int, float, float, np.ndarray, np.ndarray]:
    """(n, least ln p, largest ln p, XᵀX, Xᵀ ln y) of points (p, y) and the power law's design X."""
    if not len(p):
        return 0, np.inf, -np.inf, np.zeros((3, 3)), np.zeros(3)
    X, logp = power_law_design(p), np.log(p)
    return len(p), float(logp.min()), float(logp.max()), X.T @ X, X.T @ np.log(y)


def stacked_moments(rows: Sequence[tuple]) -> tuple[np.ndarray, ...]:
    """The items' :func:`design_moments` as arrays: n, lo, hi, XᵀX (items, 3, 3), Xᵀy (items, 3)."""
    n, lo, hi, XtX, Xty = zip(*rows) if rows else ((), (), (), (), ())
    return (np.array(n, dtype=np.int64), np.array(lo, dtype=float), np.array(hi, dtype=float),
            np.array(XtX, dtype=float).reshape(-1, 3, 3), np.array(Xty, dtype=float).reshape(-1, 3))


def exponent_estimate(runs: Sequence[RunData], key: str) -> Estimate:
    """Static law: the small-p exponent of the tracked ``key`` (an NTVar) against p."""
    def moments(items, counts):  # each run's points enter the fit as they are: moments add up
        return (*summed_moments(counts, *stacked_moments([design_moments(*law_points([r], key)) for r in items])), None)

    return small_p_exponent(runs, lambda items: law_points(items, key), min_points=4, moments=moments)


def _drift_point(rec: dict[str, Any]) -> tuple[float, float] | None:
    p, d, lr = rec.get("P/value"), rec.get("P/real_delta"), rec.get("lr")
    ok = isinstance(d, (int, float)) and isinstance(p, (int, float)) and 0 < p <= 0.5 and math.isfinite(d)
    return (p, d / lr) if ok else None


def drift_points(runs: Sequence[RunData], bins_per_decade: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(p, E[ΔP]/η) on log-spaced bins of p ≤ ½: the mean realised ΔP/η of the tracked updates
    whose pre-step p falls in each bin (negative ΔP from sampled gradients included), at the
    bin's geometric-mean p. Bins with a non-positive mean are dropped."""
    ps, ys = run_points(runs, "drift", _drift_point)
    if not len(ps):
        return np.array([]), np.array([])
    logp, y = np.log10(ps), ys
    edges = np.arange(np.floor(logp.min() * bins_per_decade), np.ceil(logp.max() * bins_per_decade) + 1) / bins_per_decade
    idx = np.clip(np.digitize(logp, edges) - 1, 0, len(edges) - 2)
    bp, by = [], []
    for b in np.unique(idx):
        sel = idx == b
        mean = y[sel].mean()
        if mean > 0:
            bp.append(10 ** logp[sel].mean())
            by.append(mean)
    return np.array(bp), np.array(by)


def drift_moments(items: Sequence[RunData], counts: np.ndarray, bins_per_decade: int = 4) -> tuple:
    """:func:`drift_points` of every resample (item j drawn ``counts[b, j]`` times) at once, as
    the moments of its fit (see :func:`small_p_exponent`): a point in quarter decade
    k = ⌊4 log₁₀ p⌋ (the bins of :func:`drift_points`, whose edges fall on those multiples) adds to
    the bin's count, Σ y and Σ log₁₀ p, so each resample's bins are count-weighted sums of the
    runs'; its fit's points are the bins of positive mean. Where a resample's largest log₁₀ p is
    itself an edge, :func:`drift_points` puts it in the bin below: that resample is fitted one by
    one (``unsure``)."""
    pairs = [run_points([r], "drift", _drift_point) for r in items]
    logs = [np.log10(p) for p, _ in pairs]
    k = [np.floor(lg * bins_per_decade).astype(np.int64) for lg in logs]
    B = len(counts)
    if not any(len(x) for x in k):
        return (np.zeros(B, np.int64), np.full(B, np.inf), np.full(B, -np.inf), np.zeros((B, 3, 3)), np.zeros((B, 3)),
                None)
    k0 = min(int(x.min()) for x in k if len(x))
    nb = max(int(x.max()) for x in k if len(x)) - k0 + 1
    by_bin = lambda weights: np.array([np.bincount(x - k0, weights=wt, minlength=nb)  # noqa: E731
                                       for x, wt in zip(k, weights)], dtype=float).reshape(len(items), nb)
    w = counts.astype(float)
    N, Y, L = w @ by_bin([None] * len(k)), w @ by_bin([y for _, y in pairs]), w @ by_bin(logs)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean, log_bin = Y / N, L / N
    keep = (N > 0) & (mean > 0)
    bp = 10 ** np.where(keep, log_bin, 0.0)  # 1 where a bin is left out (weighted 0 below)
    lnp = np.log(bp)
    X = np.stack([np.ones_like(bp), lnp, np.log1p(-np.where(keep, bp, 0.0))], axis=2) * keep[:, :, None]
    logy = np.log(np.where(keep, mean, 1.0))
    top = np.array([lg.max() if len(lg) else -np.inf for lg in logs])
    pooled_top = np.where(counts > 0, top, -np.inf).max(1)
    unsure = np.isfinite(pooled_top) & (pooled_top * bins_per_decade == np.floor(pooled_top * bins_per_decade))
    return (keep.sum(1), np.where(keep, lnp, np.inf).min(1), np.where(keep, lnp, -np.inf).max(1),
            np.einsum("bki,bkj->bij", X, X), np.einsum("bki,bk->bi", X, logy), unsure)


def drift_estimate(runs: Sequence[RunData]) -> Estimate:
    """Drift law: the small-p exponent of the binned E[ΔP]/η against p."""
    return small_p_exponent(runs, drift_points, moments=drift_moments)


SMALL_P0 = 0.05  # the escape laws are asymptotic in p₀ → 0; fit them where p₀ ≤ 0.05


def small_p0_runs(runs: Sequence[RunData]) -> list[RunData]:
    """The rewarded runs whose p₀ ≤ SMALL_P0, when they cover at least MIN_P0S p₀ values; else all.

    The p² law's T(p₀) ∝ u₀ + 2 ln u₀ − 1/u₀ only tends to a power law of slope −1 as p₀ → 0:
    between p₀ = 0.1 and 0.01 its log–log slope is −0.91 even in exact theory, and finite steps
    near P = ½ flatten it further, so the comparison uses the small-p₀ end of the grid."""
    small = [r for r in runs if r.spec.p0 <= SMALL_P0]
    return small if len({r.spec.p0 for r in small}) >= MIN_P0S else list(runs)


def escape_data(runs: Sequence[RunData]) -> tuple[np.ndarray, np.ndarray]:
    """(p₀, T) of rewarded runs; T is nan for a run that never reached ½."""
    p0, T = [], []
    for r in runs:
        t = r.summary.get("crossed_half_at")
        p0.append(r.spec.p0)
        T.append(float(t) if t else float("nan"))
    return np.array(p0), np.array(T)


def waiting_time(p0: np.ndarray, batch_size: int) -> np.ndarray:
    """The expected number of updates until a batch of ``batch_size`` episodes first samples an
    action of probability p₀: 1/(1 − (1 − p₀)^B) ≈ 1/(B p₀)."""
    return 1.0 / -np.expm1(batch_size * np.log1p(-p0))


def compare_escape(p0: np.ndarray, T: np.ndarray, batch_size: int | None = None) -> ModelComparison:
    """Escape-time laws fitted to log T and compared by AICc: the power law log T = α − s log p₀,
    the logarithmic law T = A + B ln(1/p₀), and (``batch_size`` given: sampled gradients) the
    waiting-time law T = c/(1 − (1 − p₀)^B). Needs MIN_P0S distinct p₀ (else n = 0, "n/a")."""
    ok = np.isfinite(T) & (T > 0)
    p0, T = p0[ok], T[ok]
    n_p0 = len(np.unique(p0))
    if n_p0 < MIN_P0S:
        return ModelComparison("n/a", float("nan"), {"p0s": n_p0}, n=0)
    logT, L = np.log(T), np.log(1 / p0)
    slope, intercept = np.polyfit(np.log(p0), logT, 1)
    rss_pow = float(np.sum((logT - (intercept + slope * np.log(p0))) ** 2))
    B0, A0 = np.polyfit(L, T, 1)
    (A, B), rss_log = fit_curve(lambda x, A, B: np.log(np.clip(A + B * x, 1e-300, None)), L, logT, (A0, max(B0, 1e-9)))
    fits = {"power law": (rss_pow, 2, {"slope": float(slope), "intercept": float(intercept)}),
            "logarithmic": (rss_log, 2, {"A": float(A), "B": float(B)})}
    if batch_size is not None:
        log_wait = np.log(waiting_time(p0, batch_size))
        log_c = float(np.mean(logT - log_wait))
        fits["waiting time"] = (float(np.sum((logT - log_c - log_wait) ** 2)), 1,
                                {"c": math.exp(log_c), "batch_size": batch_size})
    out = compare_models(fits, len(T))
    out.params.setdefault("slope", float(slope))
    out.params["p0s"] = n_p0
    return out


def escape_slope(runs: Sequence[RunData]) -> Estimate:
    """Log–log slope of T(p₀) (−1 for the p² law), bootstrapped over seeds within p₀."""

    def stat(items):
        p0, T = escape_data(items)
        ok = np.isfinite(T) & (T > 0)
        if len(np.unique(p0[ok])) < 2:
            return float("nan")
        return float(np.polyfit(np.log(p0[ok]), np.log(T[ok]), 1)[0])

    est = stratified_bootstrap(by_p0(runs), stat)
    p0, T = escape_data(runs)
    ok = np.isfinite(T) & (T > 0)
    X = np.column_stack([np.ones(ok.sum()), np.log(p0[ok])])
    return with_fit_ci(est, X, np.log(T[ok]), 1) if ok.sum() >= 3 else est


def kappa_drift(runs: Sequence[RunData]) -> dict[str, float]:
    """Median over runs of max_t |κ(t)/κ(0) − 1|, and whether κ stayed constant (lazy)."""
    drifts = []
    for r in runs:
        k = np.array([kappa_of(rec) for rec in r.records if "kappa" in rec])
        if len(k) >= 2 and k[0] > 0:
            drifts.append(float(np.max(np.abs(k / k[0] - 1))))
    if not drifts:
        return {"median_drift": float("nan"), "constant": float("nan")}
    med = float(np.median(drifts))
    return {"median_drift": med, "constant": float(med < KAPPA_CONSTANT)}


# ---------------------------------------------------------------------------- verdicts
LAWS = ("p²", "p(1 − p)")
VERDICTS = ("consistent with p²", "consistent with p(1 − p)", "neither", "inconclusive")


@dataclass
class CellResult:
    cell: Cell
    static_euc: Estimate
    static_opt: Estimate
    static_fisher: Estimate
    drift: Estimate
    escape: ModelComparison
    escape_slope: Estimate
    extinction: CellExtinction
    price: PriceCheck
    kappa: dict[str, float]
    verdict: str
    reason: str
    censored: int = 0

    def row(self) -> dict[str, Any]:
        """Every number of the cell, one flat row (verdicts.csv)."""
        env, policy, opt, mode = self.cell
        row = {"env": env, "policy": policy, "optimizer": opt, "mode": mode, "verdict": self.verdict,
               "reason": self.reason}
        for name, est in (("static_euc", self.static_euc), ("static_opt", self.static_opt),
                          ("static_fisher", self.static_fisher), ("drift", self.drift),
                          ("escape_slope", self.escape_slope)):
            row.update(est.as_dict(name))
        row.update({"escape_censored_runs": self.censored, "escape_p0s": self.escape.params.get("p0s", 0),
                    "escape_points": self.escape.n, "escape_winner": self.escape.winner,
                    "escape_delta_aicc": self.escape.delta_aic,
                    **{f"escape_aicc_{k.replace(' ', '_')}": v for k, v in self.escape.aicc.items()}})
        row.update(self.extinction.row())
        row.update(self.price.row())
        row.update({f"kappa_{k}": v for k, v in self.kappa.items()})
        return row


def exponent_vote(name: str, est: Estimate) -> tuple[str, str] | None:
    """An exponent's vote: p² when its interval lies within 2 ± LAW_MARGIN, p(1 − p) within
    1 ± LAW_MARGIN, neither when it meets neither window, inconclusive when it meets a window
    without lying inside it (too wide to decide); None without an estimate."""
    if not math.isfinite(est.value):
        return None
    text = f"{name} {est.fmt(2)}"
    if not est.has_interval:
        return "inconclusive", f"{text}: without an interval it decides nothing"
    if est.within(2.0, LAW_MARGIN):
        return "p²", f"{text} ≈ 2"
    if est.within(1.0, LAW_MARGIN):
        return "p(1 − p)", f"{text} ≈ 1"
    if not est.overlaps(2.0, LAW_MARGIN) and not est.overlaps(1.0, LAW_MARGIN):
        return "neither", f"{text} is within ±{LAW_MARGIN} of neither 1 nor 2"
    return "inconclusive", f"{text}: its interval is too wide to tell 1 from 2 (±{LAW_MARGIN})"


def escape_vote(escape: ModelComparison, slope: Estimate, censored: int, n_escape: int) -> tuple[str, str] | None:
    """The escape evidence as a vote (see :func:`decide`); ("none", note) when it says nothing
    about the law (sampling-limited), None without rewarded runs."""
    if censored:
        return "inconclusive", (f"{censored} of {n_escape} rewarded runs never reached ½ within the run length "
                                f"(escape time censored)")
    if not escape.n:
        if "p0s" in escape.params:
            return "inconclusive", (f"escape: only {escape.params['p0s']} p₀ values; a law is judged on at least "
                                    f"{MIN_P0S}")
        return None
    shown = f"ΔAICc {escape.delta_aic:.1f}, n = {escape.n} over {escape.params.get('p0s')} p₀"
    if escape.delta_aic < MIN_DELTA_AIC:
        return "inconclusive", f"escape time: {escape.winner} ({shown}), ΔAICc below {MIN_DELTA_AIC:g}"
    if escape.winner == "waiting time":
        return "none", (f"escape time has the shape of the wait for sampled successes, T = c/(1 − (1 − p₀)^B) "
                        f"with c = {escape.params['c']:.3g} ({shown}), T ∝ 1/p₀ for small p₀; in sampled mode that "
                        f"shape is the p² law's (c ≈ B/(ηκΔ)) and sampling-limited jumps' alike (c ≈ 1 for NPG), "
                        f"so it casts no vote")
    if escape.winner == "power law":
        if slope.within(-1.0, LAW_MARGIN):
            return "p²", f"escape time is a power law ({shown}) of slope {slope.fmt(2)}"
        if slope.overlaps(-1.0, LAW_MARGIN) or not slope.has_interval:
            return "inconclusive", f"escape time is a power law ({shown}), slope {slope.fmt(2)} too uncertain"
        return "neither", f"escape time is a power law ({shown}) but of slope {slope.fmt(2)}, not −1 ± {LAW_MARGIN}"
    return "p(1 − p)", f"escape time is logarithmic ({shown})"


def decide(votes: Sequence[tuple[str, str] | None], notes: Sequence[str] = ()) -> tuple[str, str]:
    """The cell's verdict from the votes of its pieces of evidence (drift exponent, escape time,
    extinction), each "p²", "p(1 − p)", "neither", "inconclusive", or "none" (a note that casts
    no vote):

    * any "neither", or votes for both laws: **neither** (the evidence disagrees with both laws,
      or with itself);
    * votes for one law only, and either no inconclusive piece or at least two agreeing ones:
      **consistent with** that law;
    * otherwise (no usable evidence, or one agreeing piece against inconclusive ones):
      **inconclusive**."""
    cast = [v for v in votes if v is not None]
    notes = list(notes) + [text for law, text in cast if law == "none"]
    cast = [(law, text) for law, text in cast if law != "none"]
    laws = [law for law, _ in cast]
    reason = "; ".join([*(text for _, text in cast), *notes])
    if not cast:
        return "inconclusive", "; ".join(["no usable evidence (runs missing or too short)", *notes])
    agreeing = {law for law in laws if law in LAWS}
    if "neither" in laws or len(agreeing) > 1:
        return "neither", "evidence disagrees: " + reason
    if len(agreeing) == 1:
        law = agreeing.pop()
        if "inconclusive" not in laws or laws.count(law) >= 2:
            return f"consistent with {law}", reason
    return "inconclusive", reason


def analyse(runs: Sequence[RunData], batch_size: int | None = None) -> list[CellResult]:
    """One CellResult per (env, policy, optimizer, mode) present in ``runs``; ``batch_size`` is the
    grid's episodes per update (the waiting-time law of sampled cells)."""
    cells: dict[Cell, list[RunData]] = {}
    for r in runs:
        if r.spec.direction != "well":  # the gravity well's cells: ntrl.study.well
            cells.setdefault(r.spec.cell, []).append(r)
    results = []
    for cell, cell_runs in cells.items():
        rewarded = [r for r in cell_runs if r.spec.direction == "rewarded"]
        punished = [r for r in cell_runs if r.spec.direction == "punished"]
        drift = drift_estimate(rewarded)
        escaping = small_p0_runs(rewarded)
        sampled = cell[3] == "sampled" and batch_size is not None
        escape = compare_escape(*escape_data(escaping), batch_size if sampled else None) if rewarded else NO_COMPARISON
        slope = escape_slope(escaping) if rewarded else NAN
        censored = sum(1 for r in rewarded if not r.summary.get("crossed_half_at"))
        extinction = analyse_extinction(punished) if punished else NO_EXTINCTION
        price = price_check(cell_runs)
        votes = [exponent_vote("drift exponent", drift),
                 escape_vote(escape, slope, censored, len(rewarded)) if rewarded else None,
                 extinction_vote(extinction) if punished else None]
        note = price.note()
        verdict, reason = decide(votes, [note] if note else [])
        results.append(CellResult(
            cell=cell,
            static_euc=exponent_estimate(rewarded, "P/ntvar_euc"),
            static_opt=exponent_estimate(rewarded, "P/ntvar_opt"),
            static_fisher=exponent_estimate(rewarded, "P/ntvar_fisher"),
            drift=drift,
            escape=escape,
            escape_slope=slope,
            extinction=extinction,
            price=price,
            kappa=kappa_drift(cell_runs),
            verdict=verdict,
            reason=reason,
            censored=censored,
        ))
    return results
