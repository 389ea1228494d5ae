"""Extinction: how a punished behaviour fades (SCIENCE.md §3, "Extinction and equilibrium rarity").

Under vanilla PG a punished binary behaviour follows dp/dt ≈ −κΔη p², so

    P(t) = 1/(A + B t),   B = κ·Δ·η,   log–log slope −(1 − P/P₀) → −1,

with no floor; under NPG and sign descent it decays exponentially; Adam's late-time rate is set by
its second-moment memory (README, "Adam's late-time decay"). Per punished run, in its asymptotic
window (the records with P ≤ P(0)·10^−WINDOW_DECADES, where the local slope of 1/(A + Bt) is within
1 % of −1; for Adam also t ≥ ADAM_LATE_MEMORIES/(1 − β₂), once the transient has died out):

* the log–log exponent of P(t), least squares of log P on log t;
* B of the 1/t law, against κΔη from the tracked κ (its mean over the window), the run's
  reward gap Δ = |r_do − r_dont| and η;
* three models fitted to log P and compared by AICc (:mod:`ntrl.study.stats`): 1/(A + Bt), an
  exponential C e^{−λt}, and P∞ + 1/(A + Bt) with a floor P∞ ≥ 0;
* the floor's 95 % profile-likelihood interval: the P∞ ≥ 0 whose best fit of P∞ + decay(t) has
  n·log(RSS(P∞)/RSS_min) ≤ χ²₁(0.95) = 3.84, with the decay law (1/t or exponential) that fits
  the window better;
* for Adam, the late-time rate λ (slope of −log P against t), against the derived
  λ = −½ ln β₂.

"No equilibrium rarity" (the seed's claim that ultra-rare features keep getting rarer) is the
verdict when every run's floor interval includes 0 and lies below FLOOR_FRACTION of the run's
final P; a floor interval that excludes 0 is a floor; anything else is inconclusive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy import optimize

from ntrl.study.stats import (
    MIN_DELTA_AIC, NAN, NO_COMPARISON, Estimate, ModelComparison, RunData, by_p0, compare_models, fit_curve, kappa_of,
    majority,
    regression_ci, resolved, stratified_bootstrap,
)

WINDOW_DECADES = 2.0  # the asymptotic window: P ≤ P(0)·10^−2
ADAM_LATE_MEMORIES = 10.0  # Adam's late-time window starts at t = 10/(1 − β₂)
FLOOR_FRACTION = 0.1  # "no equilibrium rarity": the floor's interval lies below 10 % of the final P
CHI2_1_95 = 3.841458820694124  # χ²₁ quantile 0.95 (profile-likelihood interval)
MIN_POINTS = 5
MODELS = ("1/t", "exponential", "floor + 1/t")


def adam_late_rate(beta2: float, lr: float | None = None, beta1: float = 0.9, gain: float = 1.0) -> float:
    """Adam's late-time decay rate λ of log P for a punished behaviour (README, "Adam's late-time
    decay"): the root in (0, −½ ln β₂) of

        λ = η·S·(1 − β₁)/(1 − β₁ e^λ)·√((1 − β₂ e^{2λ})/(1 − β₂)),

    S = ``gain`` the ℓ1 norm of ∇z (1 for the single logit), or, without ``lr``, its limit for
    ηS ≫ (1 − β₂)/2, λ = −½ ln β₂ (the root lies below it by about λ²(1 − β₂)/(2η²S²)). nan where
    β₁ ≥ √β₂: the first moment's sum then diverges before the second's, and the fixed point does
    not exist."""
    limit = -0.5 * math.log(beta2)
    if beta1 >= math.sqrt(beta2):
        return float("nan")
    if lr is None:
        return limit

    def gap(lam: float) -> float:
        return lam - lr * gain * (1 - beta1) / (1 - beta1 * math.exp(lam)) * math.sqrt(
            max(1 - beta2 * math.exp(2 * lam), 0.0) / (1 - beta2))

    hi = limit * (1 - 1e-15)
    return float(optimize.brentq(gap, 1e-300, hi, xtol=1e-300, rtol=1e-14))


def reward_gap(run: RunData) -> float:
    """Δ = |r_do − r_dont| of a bandit run's config (2 for the study's ±1 rewards); nan for other
    environments, whose drift is not κΔη·p² (the juice gridworld's has the visitation's F and
    its own NTCov(P, F) term, SCIENCE.md §2)."""
    if run.spec.env != "bandit":
        return float("nan")
    do, dont = run.config.get("reward_do", -1.0), run.config.get("reward_dont", 1.0)
    return abs(float(do) - float(dont))


def curve(run: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t, P, κ) of a run's records (κ nan where not tracked)."""
    if "curve" not in run.cache:
        t = np.array([r["update"] for r in run.records], dtype=float)
        P = np.array([r.get("P/value", np.nan) for r in run.records], dtype=float)
        k = np.array([kappa_of(r) if r.get("kappa") is not None else np.nan for r in run.records])
        run.cache["curve"] = (t, P, k)
    return run.cache["curve"]


def window(run: RunData) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The run's asymptotic window (see the module docstring): (t, P, κ, description)."""
    t, P, k = curve(run)
    if not len(P) or not (P[0] > 0):
        return t[:0], P[:0], k[:0], "no records"
    ok = (t > 0) & (P > 0) & np.isfinite(P) & (P <= P[0] * 10.0 ** -WINDOW_DECADES)
    text = f"P ≤ P(0)·10^-{WINDOW_DECADES:g}"
    if run.spec.optimizer == "adam":
        t_late = ADAM_LATE_MEMORIES / (1 - run.spec.adam_beta2)
        ok &= t >= t_late
        text += f", t ≥ {ADAM_LATE_MEMORIES:g}/(1 − β₂) = {t_late:.0f}"
    return t[ok], P[ok], k[ok], text


STALLED_SLOPE = -0.1  # P "stalled" when its log–log slope over the last decade of t is above this


def end_slope(run: RunData) -> float:
    """The log–log slope of P(t) over the run's last decade of t (t ≥ t_end/10): about −1 for a
    1/t decay that goes on, far below for an exponential one, near 0 for a behaviour that has
    stopped fading; nan with fewer than three records there."""
    t, P, _ = curve(run)
    ok = (t > 0) & (P > 0) & np.isfinite(P)
    if ok.sum() < 3:
        return float("nan")
    ok &= t >= t[ok].max() / 10
    if ok.sum() < 3 or np.ptp(np.log(t[ok])) == 0:
        return float("nan")
    return float(np.polyfit(np.log(t[ok]), np.log(P[ok]), 1)[0])


def _log_inv_line(t, A, B):
    return -np.log(np.clip(A + B * t, 1e-300, None))


def _log_exp(t, logC, lam):
    return logC - lam * t


def _log_floor(t, floor, A, B):
    return np.log(np.clip(floor + 1.0 / np.clip(A + B * t, 1e-300, None), 1e-300, None))


def fit_inverse_t(t: np.ndarray, logP: np.ndarray) -> tuple[np.ndarray, float]:
    """(A, B) and RSS of log P ≈ −log(A + B t), started from the straight-line fit of 1/P."""
    B0, A0 = np.polyfit(t, np.exp(-logP), 1)
    return fit_curve(_log_inv_line, t, logP, (A0, B0))


def _floor_of(law: str, floor: float):
    """log(P∞ + decay(t)) with P∞ held at ``floor``: decay 1/(A + Bt) or e^{logC − λt}."""
    if law == "1/t":
        return lambda x, A, B: _log_floor(x, floor, A, B)
    return lambda x, logC, lam: np.log(np.clip(floor + np.exp(np.clip(logC - lam * x, -745.0, 709.0)), 1e-300, None))


def profile_rss(t: np.ndarray, logP: np.ndarray, floor: float, start: tuple[float, float], law: str = "1/t") -> float:
    """The least RSS of log P ≈ log(P∞ + decay(t)) with the floor P∞ held at ``floor``, for the
    decay of ``law`` ("1/t": 1/(A + Bt), "exponential": C e^{−λt}; ``start``: its two parameters)."""
    _, rss = fit_curve(_floor_of(law, floor), t, logP, start)
    return rss


def floor_interval(t: np.ndarray, logP: np.ndarray, start: tuple[float, float],
                   law: str = "1/t") -> tuple[float, float, float]:
    """(best P∞, lower, upper) of the 95 % profile-likelihood interval of the floor P∞ ≥ 0 under
    P∞ + decay(t) (see :func:`profile_rss`), on a grid of P∞ from 10⁻⁶ to 10 times the least P of
    the window, each end refined by bisection (the lower end is 0 when the interval reaches it;
    the upper end inf when it runs off the grid). The χ²₁ threshold 3.84 ignores that P∞ = 0 is
    a boundary (where 2.71 would do), which makes the interval a little wider, not narrower; and
    on an exact run the residuals are the decay law's own curvature, not noise, so the interval
    says how well a floor fits that curve (:func:`floor_verdict` reads it so)."""
    n = len(t)
    p_min = float(np.exp(logP.min()))
    grid = np.concatenate([[0.0], p_min * np.logspace(-6, 1, 36)])
    rss = np.array([profile_rss(t, logP, f, start, law) for f in grid])
    rss_min = resolved(float(rss.min()), n)
    best = int(np.flatnonzero(np.maximum(rss, rss_min) <= rss_min)[0])  # the least floor among exact ties
    def inside(floor: float) -> bool:
        return n * math.log(max(profile_rss(t, logP, floor, start, law), rss_min) / rss_min) <= CHI2_1_95

    def bisect(a: float, b: float) -> float:  # a inside, b outside: the boundary between them
        for _ in range(30):
            mid = math.sqrt(a * b) if a > 0 and b > 0 else (a + b) / 2
            a, b = (mid, b) if inside(mid) else (a, mid)
        return a

    idx = np.flatnonzero(n * np.log(np.maximum(rss, rss_min) / rss_min) <= CHI2_1_95)
    lo_i, hi_i = int(idx.min()), int(idx.max())
    lo = 0.0 if lo_i == 0 else bisect(float(grid[lo_i]), float(grid[lo_i - 1]))
    hi = float("inf") if hi_i == len(grid) - 1 else bisect(float(grid[hi_i]), float(grid[hi_i + 1]))
    return float(grid[best]), lo, hi


@dataclass
class RunExtinction:
    """One punished run's window fits (see the module docstring)."""

    n: int
    decades: float  # log10(P(0)/P_end): how far P fell
    exponent: float = float("nan")
    exponent_ci: tuple[float, float] = (float("nan"), float("nan"))
    B: float = float("nan")
    B_predicted: float = float("nan")  # κΔη
    comparison: ModelComparison = field(default_factory=lambda: NO_COMPARISON)
    floor: tuple[float, float, float] = (float("nan"), float("nan"), float("nan"))  # best, lo, hi
    p_final: float = float("nan")
    rate: float = float("nan")  # late-time exponential rate of log P (Adam)
    rate_ci: tuple[float, float] = (float("nan"), float("nan"))
    window_text: str = ""
    end_slope: float = float("nan")  # log–log slope of P over the last decade of t


def fit_run(run: RunData) -> RunExtinction:
    """The window fits of one punished run (cached on the run)."""
    if "extinction" in run.cache:
        return run.cache["extinction"]
    _, P_all, _ = curve(run)
    first, last = run.summary.get("p_start"), run.summary.get("p_end")  # the run's ends (records are a sample)
    if not (isinstance(first, float) and isinstance(last, float)) and len(P_all):
        first, last = float(P_all[0]), float(P_all[-1])
    decades = float(np.log10(first / last)) if first and last and first > 0 and last > 0 else float("nan")
    t, P, kap, text = window(run)
    out = RunExtinction(n=len(t), decades=decades, window_text=text, end_slope=end_slope(run))
    if len(t) >= MIN_POINTS and np.ptp(np.log(t)) > 0:
        logP, logt = np.log(P), np.log(t)
        X = np.column_stack([np.ones_like(logt), logt])
        value, lo, hi = regression_ci(X, logP, 1)
        out.exponent, out.exponent_ci = value, (lo, hi)
        (A, B), rss_inv = fit_inverse_t(t, logP)
        out.B = float(B)
        out.B_predicted = float(np.nanmean(kap)) * reward_gap(run) * float(run.records[0]["lr"])
        lam, logC = np.polyfit(t, logP, 1)
        rss_exp = float(np.sum((logP - (logC + lam * t)) ** 2))
        start = (A, B) if math.isfinite(rss_inv) else (1.0 / P[0], 1.0)
        under_inv = floor_interval(t, logP, start)  # the third model: a floor under 1/t
        rss_floor = profile_rss(t, logP, under_inv[0], start)
        out.comparison = compare_models({
            "1/t": (rss_inv, 2, {"A": float(A), "B": float(B)}),
            "exponential": (rss_exp, 2, {"rate": float(-lam)}),
            "floor + 1/t": (rss_floor, 3, {"floor": under_inv[0]}),
        }, len(t))
        # the floor's interval under the decay law that fits better, so that an exponential
        # decay is asked about a floor too
        out.floor = (floor_interval(t, logP, (float(logC), float(-lam)), "exponential") if rss_exp < rss_inv
                     else under_inv)
        out.p_final = float(P[-1])
        Xt = np.column_stack([np.ones_like(t), t])
        slope, s_lo, s_hi = regression_ci(Xt, logP, 1)
        out.rate, out.rate_ci = -slope, (-s_hi, -s_lo)
    run.cache["extinction"] = out
    return out


@dataclass
class CellExtinction:
    """A cell's extinction evidence: the per-run fits summarised, with intervals."""

    runs: int
    window: str
    decades: float  # the least, over runs, of how many decades P fell
    points: int  # the least window size over runs
    exponent: Estimate
    B_ratio: Estimate  # B / (κΔη)
    comparison: ModelComparison
    floor_includes_zero: bool
    floor_upper_ratio: float  # the largest over runs of the floor's upper bound / final P
    floor_verdict: str
    rate: Estimate = field(default_factory=lambda: NAN)  # Adam: the late-time rate of log P
    rate_derived: float = float("nan")  # Adam: −½ ln β₂

    def row(self) -> dict[str, Any]:
        out = {"extinction_window": self.window, "extinction_decades": self.decades,
               "extinction_points": self.points, "extinction_winner": self.comparison.winner,
               "extinction_delta_aicc": self.comparison.delta_aic,
               "floor_includes_zero": self.floor_includes_zero, "floor_upper_over_final_p": self.floor_upper_ratio,
               "floor_verdict": self.floor_verdict, "late_rate_derived": self.rate_derived}
        out.update(self.exponent.as_dict("extinction_exponent"))
        out.update(self.B_ratio.as_dict("extinction_B_over_kappa_delta_eta"))
        out.update(self.rate.as_dict("late_rate"))
        return out


NO_EXTINCTION = CellExtinction(0, "", float("nan"), 0, NAN, NAN, NO_COMPARISON, False, float("nan"), "n/a")


def floor_verdict(fits: Sequence[RunExtinction]) -> tuple[bool, float, str]:
    """(every floor interval includes 0, largest upper bound / final P, the verdict text):

    * every interval includes 0 and lies below FLOOR_FRACTION·P_final: **no equilibrium rarity**;
    * some interval lies above 0 and reaches FLOOR_FRACTION·P_final: a **floor**;
    * some interval lies above 0 but below FLOOR_FRACTION·P_final: inconclusive, since a floor far
      below the last P cannot be told from a decay that slows a little more than its law says
      (the exact runs' residuals are that curvature, not noise);
    * an interval that includes 0 but reaches FLOOR_FRACTION·P_final: inconclusive (too wide)."""
    usable = [f for f in fits if math.isfinite(f.floor[1])]
    if not usable:
        return False, float("nan"), "inconclusive (no window to fit)"
    includes_zero = all(f.floor[1] == 0.0 for f in usable)
    ratio = max(f.floor[2] / f.p_final for f in usable)
    above = sum(f.floor[1] > 0 for f in usable)
    if includes_zero and ratio < FLOOR_FRACTION:
        return True, ratio, f"no equilibrium rarity (P∞ ∈ [0, {ratio:.2g}·P_final])"
    if not includes_zero and ratio >= FLOOR_FRACTION:
        return False, ratio, f"floor (P∞ > 0 in {above}/{len(usable)} runs, up to {ratio:.2g}·P_final)"
    if not includes_zero:
        low = max(f.floor[1] / f.p_final for f in usable if f.floor[1] > 0)
        return False, ratio, (f"inconclusive (a floor of {low:.2g}–{ratio:.2g}·P_final fits better in {above}/"
                              f"{len(usable)} runs: below {FLOOR_FRACTION:g}·P_final, the decay's own curvature)")
    return True, ratio, f"inconclusive (the floor's interval reaches {ratio:.2g}·P_final)"


def analyse_extinction(punished: Sequence[RunData]) -> CellExtinction:
    """The extinction evidence of a cell's punished runs (see the module docstring)."""
    fits = [fit_run(r) for r in punished]
    if not fits:
        return NO_EXTINCTION
    usable = [(r, f) for r, f in zip(punished, fits) if f.comparison.n]
    decades = float(np.nanmin([f.decades for f in fits])) if any(math.isfinite(f.decades) for f in fits) else float("nan")
    text = fits[0].window_text
    if not usable:
        slope = float(np.nanmedian([f.end_slope for f in fits])) if any(math.isfinite(f.end_slope) for f in fits) \
            else float("nan")
        verdict = (f"stalled: P stopped falling after {decades:.1f} decades (log–log slope {slope:.2f} over the "
                   f"last decade of t), an equilibrium rarity or a very slow decay" if slope > STALLED_SLOPE else
                   f"inconclusive (P fell only {decades:.1f} decades, and was still falling at a log–log slope of "
                   f"{slope:.2f} when the runs ended)")
        return CellExtinction(len(fits), text, decades, min(f.n for f in fits), NAN, NAN, NO_COMPARISON, False,
                              float("nan"), verdict)
    runs, rfits = [r for r, _ in usable], [f for _, f in usable]

    def median_of(attr):
        def stat(items):
            vals = [getattr(fit_run(r), attr) for r in items]
            vals = [v for v in vals if math.isfinite(v)]
            return float(np.median(vals)) if vals else float("nan")
        return stat

    def ratio_stat(items):
        vals = [fit_run(r).B / fit_run(r).B_predicted for r in items if fit_run(r).B_predicted > 0]
        return float(np.median(vals)) if vals else float("nan")

    def estimate(stat, ci_attr: str | None) -> Estimate:
        est = stratified_bootstrap(by_p0(runs), stat)
        if est.lo == est.hi and len(runs) == 1 and ci_attr is not None:  # one deterministic run: the fit's interval
            lo, hi = getattr(rfits[0], ci_attr)
            return Estimate(est.value, lo, hi, 1)
        return est

    exponent = estimate(median_of("exponent"), "exponent_ci")
    b_ratio = estimate(ratio_stat, None)
    includes_zero, upper, verdict = floor_verdict(rfits)
    cell = CellExtinction(len(fits), text, decades, min(f.n for f in rfits), exponent, b_ratio,
                          majority([f.comparison for f in rfits]), includes_zero, upper, verdict)
    if punished[0].spec.optimizer == "adam":
        cell.rate = estimate(median_of("rate"), "rate_ci")
        cell.rate_derived = adam_late_rate(punished[0].spec.adam_beta2)
    return cell


def extinction_vote(ext: CellExtinction) -> tuple[str, str]:
    """The extinction evidence as a vote: 1/t → p², exponential → p(1 − p), a floor → neither;
    a ΔAICc below MIN_DELTA_AIC, a split between runs, or no window → inconclusive."""
    c = ext.comparison
    if not c.n:
        return "inconclusive", f"extinction: no asymptotic window ({ext.window}): {ext.floor_verdict}"
    text = (f"extinction over {ext.decades:.1f} decades ({ext.window}): {c.fmt()}, log–log exponent "
            f"{ext.exponent.fmt(2)}")
    if c.winner == "mixed":
        return "inconclusive", text
    winner, delta = c.winner, c.delta_aic
    if winner == "floor + 1/t" and not ext.floor_verdict.startswith("floor"):
        # a floor far below the last P is the decay's own curvature (see floor_verdict): the laws
        # are judged against each other
        others = {m: d for m, d in c.deltas.items() if m in ("1/t", "exponential")}
        if len(others) < 2:
            return "inconclusive", text + "; its floor lies far below the last P"
        winner = min(others, key=others.get)
        delta = others[max(others, key=others.get)] - others[winner]
        text += f"; its floor lies far below the last P, and {winner} fits better than the other law by {delta:.1f}"
    if delta < MIN_DELTA_AIC:
        return "inconclusive", text + f" (ΔAICc < {MIN_DELTA_AIC:g})"
    law = {"1/t": "p²", "exponential": "p(1 − p)"}.get(winner, "neither")
    return law, text
