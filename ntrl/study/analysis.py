"""Fits, bootstrap intervals and verdicts for a rarity study (SCIENCE.md §3–4).

Everything here reads the local run files (records.jsonl, summary.json); nothing re-trains.

1. Static law   NTVar(P) ≈ c · p^a (1 − p)^b, per metric (Euclidean, the optimizer's, Fisher):
                least squares on log NTVar = log c + a log p + b log(1 − p); a is the small-p exponent.
2. Drift law    E[ΔP]/η ≈ c · p^a (1 − p)^b on rewarded runs: realised ΔP/η averaged in bins of
                log p (a quarter decade), then the same fit.
3. Escape       T(p₀) under a power law, log T = α − s log p₀, against a logarithmic law,
                T = A + B ln(1/p₀); both are fitted to log T (on p₀ ≤ 0.05 when the grid has three
                such values: both laws are asymptotic) and compared by AIC.
4. Extinction   punished P(t) under 1/t decay, P = 1/(A + B t), against exponential decay,
                P = C e^{−λt}; both fitted to log P (after P fell below a quarter of its start), AIC.
5. Price check  R² and relative errors of predicted against realised ΔP, and the slope of
                log(relative error) against log η from the one-step probes (1 for first-order).
6. Scale factor κ(t)/κ(0) over each run.

Confidence intervals are 95% percentile bootstraps from ``scipy.stats.bootstrap``, resampling
runs (seeds) within each p₀ stratum. A stratum with a single run (deterministic cells run one
seed) is held fixed; a cell with no resampling freedom gets a point interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from scipy import optimize, stats

from ntrl.config import ConfigError
from ntrl.records import read_records
from ntrl.tracker import price_agreement
from ntrl.study.executor import completed_summary, read_study_file
from ntrl.study.grid import RunSpec, StudyConfig, enumerate_runs

Cell = tuple[str, str, str, str]
LAW_MARGIN = 0.25  # a law is "consistent" when the exponent's whole CI lies within ±0.25 of it
MIN_DELTA_AIC = 2.0  # an AIC difference below 2 is no evidence either way (Burnham & Anderson)
KAPPA_CONSTANT = 0.10  # κ "stays constant" when it moves by less than 10 % over a run


@dataclass
class RunData:
    spec: RunSpec
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    # per-run point arrays, read from the records once (the bootstrap asks for them ~1000 times)
    cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Estimate:
    """A point estimate with its 95 % bootstrap interval."""

    value: float
    lo: float
    hi: float
    n: int = 0

    def within(self, target: float, margin: float) -> bool:
        return all(math.isfinite(x) for x in (self.lo, self.hi)) and target - margin <= self.lo and self.hi <= target + margin

    def fmt(self, digits: int = 3) -> str:
        if not math.isfinite(self.value):
            return "n/a"
        if self.lo == self.hi == self.value:
            return f"{self.value:.{digits}f} (exact)"
        return f"{self.value:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {prefix: self.value, f"{prefix}_lo": self.lo, f"{prefix}_hi": self.hi}


NAN = Estimate(float("nan"), float("nan"), float("nan"))


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
            except (OSError, ValueError) as e:
                raise ConfigError("--out", f"run {run_dir} is complete but its records cannot be read ({e}); "
                                           f"remove that run directory and re-run the study to redo it") from None
            runs.append(RunData(spec, summary, records))
    return study, runs


# ---------------------------------------------------------------------------- fitting
def fit_power_law(p: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(log c, a, b) of y ≈ c p^a (1 − p)^b by least squares in log space."""
    coef, *_ = np.linalg.lstsq(power_law_design(p), np.log(y), rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def stratified_bootstrap(
    strata: Sequence[Sequence[Any]],
    statistic: Callable[[list[Any]], float],
    n_resamples: int = 999,
    seed: int = 0,
) -> Estimate:
    """95 % percentile CI of ``statistic(items)`` resampling items within each stratum (scipy).

    ``strata`` is a list of lists of items (runs); strata of one item are held fixed.
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

    data = tuple(np.arange(len(strata[k])) for k in free)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(data, stat, vectorized=False, paired=False, n_resamples=n_resamples,
                              method="percentile", confidence_level=0.95, random_state=np.random.default_rng(seed))
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # degenerate bootstrap distribution
        lo = hi = value
    return Estimate(value, min(lo, value), max(hi, value), len(items))


def by_p0(runs: Sequence[RunData]) -> list[list[RunData]]:
    groups: dict[float, list[RunData]] = {}
    for r in runs:
        groups.setdefault(r.spec.p0, []).append(r)
    return [groups[k] for k in sorted(groups)]


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
    """A bootstrap estimate, or where the bootstrap had nothing to resample (one run per p₀),
    the same coefficient with its regression interval."""
    if not (est.lo == est.hi == est.value) or not math.isfinite(est.value):
        return est
    value, lo, hi = regression_ci(X, y, k)
    return Estimate(value, lo, hi, est.n)


def power_law_design(p: np.ndarray) -> np.ndarray:
    return np.column_stack([np.ones_like(p), np.log(p), np.log1p(-p)])


def small_p_exponent(runs: Sequence[RunData], points: Callable[[Sequence[RunData]], tuple[np.ndarray, np.ndarray]],
                     min_points: int = 3) -> Estimate:
    """Exponent a of y ≈ c p^a (1 − p)^b fitted to ``points(runs)``, with its bootstrap CI
    (regression CI for deterministic cells; nan when the points span less than half a decade)."""

    def stat(items):
        p, y = points(items)
        if len(p) < min_points or np.ptp(np.log(p)) < 0.5:
            return float("nan")
        return fit_power_law(p, y)[1]

    est = stratified_bootstrap(by_p0(runs), stat)
    p, y = points(runs)
    return with_fit_ci(est, power_law_design(p), np.log(y), 1) if len(p) >= min_points else est


def exponent_estimate(runs: Sequence[RunData], key: str) -> Estimate:
    """Static law: the small-p exponent of the tracked ``key`` (an NTVar) against p."""
    return small_p_exponent(runs, lambda items: law_points(items, key), min_points=4)


def drift_points(runs: Sequence[RunData], bins_per_decade: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(p, E[ΔP]/η) on log-spaced bins of p ≤ ½: the mean realised ΔP/η of the tracked updates
    whose pre-step p falls in each bin (negative ΔP from sampled gradients included), at the
    bin's geometric-mean p. Bins with a non-positive mean are dropped."""
    def point(rec: dict[str, Any]) -> tuple[float, float] | None:
        p, d, lr = rec.get("P/value"), rec.get("P/real_delta"), rec.get("lr")
        ok = isinstance(d, (int, float)) and isinstance(p, (int, float)) and 0 < p <= 0.5 and math.isfinite(d)
        return (p, d / lr) if ok else None

    ps, ys = run_points(runs, "drift", point)
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


def drift_estimate(runs: Sequence[RunData]) -> Estimate:
    """Drift law: the small-p exponent of the binned E[ΔP]/η against p."""
    return small_p_exponent(runs, drift_points)


def aic(rss: float, n: int, k: int) -> float:
    """Akaike information criterion of a least-squares fit with Gaussian errors."""
    return n * math.log(max(rss / n, 1e-300)) + 2 * k


@dataclass
class ModelComparison:
    """Two models fitted to the same response; ``delta_aic`` = AIC(loser) − AIC(winner) ≥ 0."""

    winner: str
    delta_aic: float
    params: dict[str, Any] = field(default_factory=dict)
    n: int = 0

    def fmt(self) -> str:
        if self.n == 0:
            return "n/a"
        if "share" in self.params and self.params["runs"] > 1:
            wins = round(self.params["share"] * self.params["runs"])
            if self.winner == "mixed":
                return f"mixed (no model wins 2/3 of {self.params['runs']} runs)"
            return f"{self.winner} in {wins}/{self.params['runs']} runs (median ΔAIC {self.delta_aic:.1f})"
        return f"{self.winner} (ΔAIC {self.delta_aic:.1f})"


def fit_log_of_line(x: np.ndarray, log_y: np.ndarray, sign: int, start: tuple[float, float]) -> tuple[float, float, float]:
    """(A, B, RSS) of log y ≈ sign · log(A + B x) by nonlinear least squares (``curve_fit``);
    sign = +1 is the logarithmic escape law T = A + B ln(1/p₀) with x = ln(1/p₀), sign = −1 the
    1/t extinction law P = 1/(A + B t). A fit that fails has RSS = inf."""

    def model(x, A, B):
        return sign * np.log(np.clip(A + B * x, 1e-300, None))

    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):  # a diverging trial step is no news
            warnings.simplefilter("ignore")
            (A, B), _ = optimize.curve_fit(model, x, log_y, p0=list(start), maxfev=20_000)
    except (RuntimeError, ValueError, optimize.OptimizeWarning):
        return float("nan"), float("nan"), float("inf")
    return float(A), float(B), float(np.sum((log_y - model(x, A, B)) ** 2))


def compare_escape(p0: np.ndarray, T: np.ndarray) -> ModelComparison:
    """Power law log T = α − s log p₀ against logarithmic law T = A + B ln(1/p₀), on log T."""
    ok = np.isfinite(T) & (T > 0)
    p0, T = p0[ok], T[ok]
    if len(np.unique(p0)) < 3:
        return ModelComparison("n/a", float("nan"), n=0)
    logT, L = np.log(T), np.log(1 / p0)
    slope, intercept = np.polyfit(np.log(p0), logT, 1)
    rss_pow = float(np.sum((logT - (intercept + slope * np.log(p0))) ** 2))
    B0, A0 = np.polyfit(L, T, 1)

    A, B, rss_log = fit_log_of_line(L, logT, +1, (A0, max(B0, 1e-9)))
    n = len(T)
    a_pow, a_log = aic(rss_pow, n, 2), aic(rss_log, n, 2)
    winner = "power law" if a_pow < a_log else "logarithmic"
    return ModelComparison(winner, abs(a_pow - a_log), {"slope": float(slope), "A": float(A), "B": float(B),
                                                         "rss_power": rss_pow, "rss_log": rss_log}, n)


SMALL_P0 = 0.05  # the escape laws are asymptotic in p₀ → 0; fit them where p₀ ≤ 0.05


def small_p0_runs(runs: Sequence[RunData]) -> list[RunData]:
    """The rewarded runs whose p₀ ≤ SMALL_P0, when they cover at least three p₀ values; else all.

    The p² law's T(p₀) ∝ u₀ + 2 ln u₀ − 1/u₀ only tends to a power law of slope −1 as p₀ → 0:
    between p₀ = 0.1 and 0.01 its log–log slope is −0.91 even in exact theory, and finite steps
    near P = ½ flatten it further, so the comparison uses the small-p₀ end of the grid."""
    small = [r for r in runs if r.spec.p0 <= SMALL_P0]
    return small if len({r.spec.p0 for r in small}) >= 3 else list(runs)


def escape_data(runs: Sequence[RunData]) -> tuple[np.ndarray, np.ndarray]:
    """(p₀, T) of rewarded runs; T is nan for a run that never reached ½."""
    p0, T = [], []
    for r in runs:
        t = r.summary.get("crossed_half_at")
        p0.append(r.spec.p0)
        T.append(float(t) if t else float("nan"))
    return np.array(p0), np.array(T)


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


def extinction_curve(run: RunData, start_fraction: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """(t, P) of a punished run after P fell below ``start_fraction`` of its start value."""
    t = np.array([rec["update"] for rec in run.records], dtype=float)
    P = np.array([rec["P/value"] for rec in run.records], dtype=float)
    ok = (P > 0) & np.isfinite(P) & (P <= start_fraction * P[0])
    return t[ok], P[ok]


def compare_extinction(t: np.ndarray, P: np.ndarray) -> ModelComparison:
    """1/t decay P = 1/(A + B t) against exponential decay P = C e^{−λ t}, both fitted on log P."""
    if len(t) < 5:
        return ModelComparison("n/a", float("nan"), n=0)
    logP = np.log(P)
    lam, c = np.polyfit(t, logP, 1)
    rss_exp = float(np.sum((logP - (c + lam * t)) ** 2))
    B0, A0 = np.polyfit(t, 1 / P, 1)

    A, B, rss_inv = fit_log_of_line(t, logP, -1, (A0, B0))
    n = len(t)
    a_inv, a_exp = aic(rss_inv, n, 2), aic(rss_exp, n, 2)
    winner = "1/t" if a_inv < a_exp else "exponential"
    return ModelComparison(winner, abs(a_inv - a_exp), {"rate": float(-lam), "A": float(A), "B": float(B)}, n)


def extinction_verdict(runs: Sequence[RunData], majority: float = 2 / 3) -> ModelComparison:
    """Per-run comparisons, summarised: the model that wins in at least ``majority`` of the runs
    (else "mixed"), with the median over runs of its ΔAIC (negative where it lost)."""
    comps = [compare_extinction(*extinction_curve(r)) for r in runs]
    comps = [c for c in comps if c.n > 0]
    if not comps:
        return ModelComparison("n/a", float("nan"), n=0)
    wins = [c.winner for c in comps]
    winner = max(sorted(set(wins)), key=wins.count)
    share = wins.count(winner) / len(wins)
    signed = [c.delta_aic if c.winner == winner else -c.delta_aic for c in comps]
    params = {"share": share, "runs": len(comps)}
    if share < majority:
        return ModelComparison("mixed", float(np.median(signed)), params, len(comps))
    return ModelComparison(winner, float(np.median(signed)), params, len(comps))


def price_stats(runs: Sequence[RunData]) -> dict[str, float]:
    """R² of predicted vs realised ΔP, relative-error quantiles, and the error–η slope."""
    rows = [rec for r in runs for rec in r.records if "P/real_delta" in rec]
    agree = price_agreement(np.array([rec["P/pred_delta"] for rec in rows], dtype=float),
                            np.array([rec["P/real_delta"] for rec in rows], dtype=float))
    out = {"n": agree["n"], "r2": agree["r2"], "rel_err_median": agree["median_rel_error"],
           "rel_err_p90": agree["p90_rel_error"], "eta_slope": float("nan")}
    slopes = []
    for r in runs:
        probe = r.summary.get("price_scaling", {})
        lr, err = np.array(probe.get("lr", [])), np.array(probe.get("rel_error", []), dtype=float)
        ok = np.isfinite(err) & (err > 0)
        if ok.sum() >= 2:
            slopes.append(np.polyfit(np.log(lr[ok]), np.log(err[ok]), 1)[0])
    if slopes:
        out["eta_slope"] = float(np.median(slopes))
    return out


def kappa_of(record: dict[str, Any]) -> float:
    """κ of a record: the value, or its mean over probe states when κ was tracked per state."""
    return float(np.mean(record["kappa"]))


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
@dataclass
class CellResult:
    cell: Cell
    static_euc: Estimate
    static_opt: Estimate
    static_fisher: Estimate
    drift: Estimate
    escape: ModelComparison
    escape_slope: Estimate
    extinction: ModelComparison
    price: dict[str, float]
    kappa: dict[str, float]
    verdict: str
    reason: str
    censored: int = 0

    def row(self) -> dict[str, Any]:
        env, policy, opt, mode = self.cell
        row = {"env": env, "policy": policy, "optimizer": opt, "mode": mode, "verdict": self.verdict,
               "reason": self.reason}
        for name, est in (("static_euc", self.static_euc), ("static_opt", self.static_opt),
                          ("static_fisher", self.static_fisher), ("drift", self.drift),
                          ("escape_slope", self.escape_slope)):
            row.update(est.as_dict(name))
        row.update({"escape_censored_runs": self.censored,
                    "escape_winner": self.escape.winner, "escape_delta_aic": self.escape.delta_aic,
                    "extinction_winner": self.extinction.winner, "extinction_delta_aic": self.extinction.delta_aic})
        row.update({f"price_{k}": v for k, v in self.price.items()})
        row.update({f"kappa_{k}": v for k, v in self.kappa.items()})
        return row


def decide(drift: Estimate, escape: ModelComparison, extinction: ModelComparison,
           slope: Estimate = NAN, censored: int = 0, n_escape: int = 0) -> tuple[str, str]:
    """The cell's verdict from its drift exponent (CI within ±LAW_MARGIN of 2 or of 1), the
    escape-time model comparison, and the extinction model comparison. Every piece of evidence
    that exists must agree; otherwise the verdict is "neither" and says why.

    Escape evidence counts only with ΔAIC ≥ MIN_DELTA_AIC; a power-law win supports p² only when
    the slope's CI lies within −1 ± LAW_MARGIN; rewarded runs that never reached ½ (censored)
    make the escape evidence "neither", since their T is only known to exceed the run length."""
    votes: list[tuple[str, str]] = []
    notes: list[str] = []
    if drift.within(2.0, LAW_MARGIN):
        votes.append(("p²", f"drift exponent {drift.fmt(2)} ≈ 2"))
    elif drift.within(1.0, LAW_MARGIN):
        votes.append(("p(1 − p)", f"drift exponent {drift.fmt(2)} ≈ 1"))
    elif math.isfinite(drift.value):
        votes.append(("neither", f"drift exponent {drift.fmt(2)} is within ±{LAW_MARGIN} of neither 1 nor 2"))
    if censored:
        votes.append(("neither", f"{censored} of {n_escape} rewarded runs never reached ½ (escape time censored)"))
    elif escape.n and escape.delta_aic < MIN_DELTA_AIC:
        notes.append(f"escape time inconclusive (ΔAIC {escape.delta_aic:.1f} < {MIN_DELTA_AIC:g})")
    elif escape.n and escape.winner == "power law":
        if slope.within(-1.0, LAW_MARGIN):
            votes.append(("p²", f"escape time is a power law (ΔAIC {escape.delta_aic:.1f}) of slope {slope.fmt(2)}"))
        else:
            votes.append(("neither", f"escape time is a power law (ΔAIC {escape.delta_aic:.1f}) but of slope "
                                     f"{slope.fmt(2)}, not −1 ± {LAW_MARGIN}"))
    elif escape.n:
        votes.append(("p(1 − p)", f"escape time is logarithmic (ΔAIC {escape.delta_aic:.1f})"))
    if extinction.n:
        law = {"1/t": "p²", "exponential": "p(1 − p)"}.get(extinction.winner, "neither")
        votes.append((law, f"extinction: {extinction.fmt()}"))
    if not votes:
        return "neither", "; ".join(["no usable evidence (runs missing or too short)", *notes])
    laws = {v for v, _ in votes}
    reason = "; ".join([*(r for _, r in votes), *notes])
    if len(laws) == 1 and "neither" not in laws:
        return f"consistent with {laws.pop()}", reason
    return "neither", "evidence disagrees: " + reason


def analyse(runs: Sequence[RunData]) -> list[CellResult]:
    """One CellResult per (env, policy, optimizer, mode) present in ``runs``."""
    cells: dict[Cell, list[RunData]] = {}
    for r in runs:
        cells.setdefault(r.spec.cell, []).append(r)
    results = []
    for cell, cell_runs in cells.items():
        rewarded = [r for r in cell_runs if r.spec.direction == "rewarded"]
        punished = [r for r in cell_runs if r.spec.direction == "punished"]
        drift = drift_estimate(rewarded)
        escaping = small_p0_runs(rewarded)
        escape = compare_escape(*escape_data(escaping)) if rewarded else ModelComparison("n/a", float("nan"))
        slope = escape_slope(escaping) if rewarded else NAN
        censored = sum(1 for r in rewarded if not r.summary.get("crossed_half_at"))
        extinction = extinction_verdict(punished)
        verdict, reason = decide(drift, escape, extinction, slope, censored, len(rewarded))
        results.append(CellResult(
            cell=cell,
            static_euc=exponent_estimate(rewarded, "P/ntvar_euc"),
            static_opt=exponent_estimate(rewarded, "P/ntvar_opt"),
            static_fisher=exponent_estimate(rewarded, "P/ntvar_fisher"),
            drift=drift,
            escape=escape,
            escape_slope=slope,
            extinction=extinction,
            price=price_stats(cell_runs),
            kappa=kappa_drift(cell_runs),
            verdict=verdict,
            reason=reason,
            censored=censored,
        ))
    return results
