"""The Price check across training, and the noise of sampled gradients (SCIENCE.md §1, §4, §5.4, §5.6).

From the records of every run of a cell:

* agreement: R² of predicted against realised ΔP and the relative errors (as
  :func:`ntrl.tracker.price_agreement`);
* the η-probe (:meth:`ntrl.tracker.Tracker.eta_probe`) at every tracked update: the relative error
  e(s) = |ΔP_real(ηs) − ΔP_pred(ηs)| / |ΔP_real(ηs)| at the scales s ≤ 1, whose log–log slope
  against η is 1 for a first-order prediction (its error is O(η²) against a change O(η)); the
  slope of each probed update, their median per cell with a 95 % interval, and per decade of P;
* the first-order regime: the share of tracked updates with |residual| > ½|predicted|, and the
  largest η (a multiple of the run's) at which 95 % of the cell's probed updates stay inside;
* sampled cells: the standardized residual z = (ΔP_real − E[ΔP]) / s, with E[ΔP] = η∇P·M∇J from
  the exact gradient and s the predicted spread η·sqrt(∇Pᵀ M Σ M ∇P) from the batch's per-episode
  gradients (RMS over the records of each decade of P, since each batch's estimate of Σ is itself
  noisy: at small p most batches never sample the rare action and estimate Σ = 0). sd(z) ≈ 1 when
  the prediction holds; the isotropic model (Σ = (tr Σ/P)·I) gets the same test; and the
  correlation of the changes of P and of the second tracked property Y (R on the bandit, where
  R is affine in P and every correlation is ±1; F on the juice gridworld), realised against
  predicted by both models. Only for SGD is this a test: its metric does not depend on the batch,
  so E[ΔP] = η∇P·∇J and the spread are first-order exact; sign descent, Adam (which steps along m̂,
  where this batch's ĝ has weight (1 − β₁)/(1 − β₁ᵗ)) and a sampled-Fisher NPG have a metric of
  the batch's own, and their rows are descriptive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ntrl.study.stats import NAN, Estimate, RunData, by_p0, median_bootstrap, stratified_bootstrap, weighted_medians
from ntrl.tracker import (  # noqa: F401  (record_slope: re-exported)
    FIRST_ORDER_SHARE, FIRST_ORDER_TOLERANCE, first_order_scale, price_agreement, record_slope, record_slopes,
)


def probe_points(run: RunData) -> tuple[np.ndarray, np.ndarray]:
    """(P, η-slope) of every probed record of a run (cached)."""
    if "probe" not in run.cache:
        probed = [r for r in run.records if r.get("P/probe_lr") and isinstance(r.get("P/value"), (int, float))]
        run.cache["probe"] = (np.array([r["P/value"] for r in probed], dtype=float), record_slopes(probed))
    return run.cache["probe"]


def median_slope(runs: Sequence[RunData]) -> float:
    slopes = np.concatenate([probe_points(r)[1] for r in runs]) if runs else np.array([])
    slopes = slopes[np.isfinite(slopes)]
    return float(np.median(slopes)) if len(slopes) else float("nan")


def median_slopes(items: Sequence[RunData], counts: np.ndarray) -> np.ndarray:
    """:func:`median_slope` of every resample at once (item j drawn ``counts[b, j]`` times)."""
    slopes = [probe_points(r)[1] for r in items]
    return weighted_medians([s[np.isfinite(s)] for s in slopes], counts)


def slope_estimate(runs: Sequence[RunData], seed: int = 0) -> Estimate:
    """The median η-slope over every probed update of the cell, with a 95 % bootstrap interval
    over its runs (within p₀), or, where no p₀ has two runs (a deterministic cell), over its
    probed updates."""
    if any(len(s) >= 2 for s in by_p0(runs)):
        return stratified_bootstrap(by_p0(runs), median_slope, seed=seed, batch_statistic=median_slopes)
    slopes = np.concatenate([probe_points(r)[1] for r in runs]) if runs else np.array([])
    slopes = slopes[np.isfinite(slopes)]
    if not len(slopes):
        return NAN
    return median_bootstrap(slopes, seed=seed)


def slopes_by_decade(runs: Sequence[RunData]) -> dict[str, float]:
    """The median η-slope of the probed updates in each decade of P ("1e-05–1e-04": 1.00, ...)."""
    P = np.concatenate([probe_points(r)[0] for r in runs]) if runs else np.array([])
    S = np.concatenate([probe_points(r)[1] for r in runs]) if runs else np.array([])
    ok = np.isfinite(S) & (P > 0)
    out = {}
    if ok.any():
        d = np.floor(np.log10(P[ok]))
        for k in np.unique(d):
            sel = d == k
            out[f"{10 ** k:.0e}–{10 ** (k + 1):.0e}"] = float(np.median(S[ok][sel]))
    return out


@dataclass
class NoiseCalibration:
    """The standardized residuals of a sampled cell (see the module docstring)."""

    n: int
    z_sd: Estimate
    z_skew: float
    z_sd_iso: Estimate
    partner: str  # Y, the second tracked property (R on the bandit, F on the juice gridworld)
    corr_real: float  # of the residual changes of P and Y, over the rewarded runs' records
    corr_pred: float
    corr_pred_iso: float
    exact_in_distribution: bool  # SGD: M does not depend on the batch, so the prediction is a test
    bins: list[dict[str, float]] = field(default_factory=list)  # per decade of P: p, spreads

    def row(self) -> dict[str, Any]:
        out = {"noise_records": self.n, "noise_z_skew": self.z_skew, "noise_partner": self.partner,
               "noise_corr_realised": self.corr_real, "noise_corr_predicted": self.corr_pred,
               "noise_corr_predicted_iso": self.corr_pred_iso, "noise_is_a_test": self.exact_in_distribution}
        out.update(self.z_sd.as_dict("noise_z_sd"))
        out.update(self.z_sd_iso.as_dict("noise_z_sd_iso"))
        return out


NOISE_COLUMNS = ("p", "real", "expected", "sd", "sd_iso", "real_Y", "expected_Y", "sd_Y", "sd_Y_iso", "cov", "cov_iso")


def noise_partner(record: dict[str, Any]) -> str | None:
    """Y of the record's predicted covariance ``noise/cov_P_Y`` (the second tracked property)."""
    for k in record:
        if k.startswith("noise/cov_P_") and not k.endswith("_iso"):
            return k[len("noise/cov_P_"):]
    return None


def noise_rows(run: RunData) -> np.ndarray:
    """The records of a run that carry the noise fields, as rows of NOISE_COLUMNS for P and its
    partner Y (cached in ``run.cache``, with Y under "noise_partner")."""
    if "noise" not in run.cache:
        y = next((noise_partner(r) for r in run.records if noise_partner(r)), None)
        keys = ("P/value", "P/real_delta", "P/expected_delta", "P/noise_sd", "P/noise_sd_iso", f"{y}/real_delta",
                f"{y}/expected_delta", f"{y}/noise_sd", f"{y}/noise_sd_iso", f"noise/cov_P_{y}", f"noise/cov_P_{y}_iso")
        rows = [[float(np.mean(r[k])) for k in keys] for r in run.records
                if y is not None and all(isinstance(r.get(k), (int, float, list)) for k in keys)]
        run.cache["noise"] = np.array(rows, dtype=float).reshape(-1, len(NOISE_COLUMNS))
        run.cache["noise_partner"] = y
    return run.cache["noise"]


def standardized(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Residuals standardized per decade of P by the RMS predicted spread there (minibatch and
    isotropic), and the per-decade spreads."""
    col = {k: rows[:, i] for i, k in enumerate(NOISE_COLUMNS)}
    p = col["p"]
    resid = col["real"] - col["expected"]
    resid_Y = col["real_Y"] - col["expected_Y"]
    ok = (p > 0) & np.isfinite(resid)
    decade = np.floor(np.log10(np.where(ok, p, 1.0)))
    z, z_iso = np.full(len(p), np.nan), np.full(len(p), np.nan)
    bins = []
    for k in np.unique(decade[ok]):
        sel = ok & (decade == k)
        s = math.sqrt(np.mean(col["sd"][sel] ** 2))
        s_iso = math.sqrt(np.mean(col["sd_iso"][sel] ** 2))
        if s > 0:
            z[sel] = resid[sel] / s
        if s_iso > 0:
            z_iso[sel] = resid[sel] / s_iso
        bins.append({"p": float(10 ** np.mean(np.log10(p[sel]))), "records": int(sel.sum()), "predicted": s,
                     "predicted_iso": s_iso, "realised": math.sqrt(np.mean(resid[sel] ** 2))})
    return {"z": z, "z_iso": z_iso, "resid": resid, "resid_Y": resid_Y, "bins": bins}


def rms(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return math.sqrt(float(np.mean(x**2))) if len(x) else float("nan")


def noise_calibration(runs: Sequence[RunData]) -> NoiseCalibration | None:
    """The calibration of a sampled cell's predicted spreads, or None without noise records."""
    runs = [r for r in runs if len(noise_rows(r))]
    if not runs:
        return None

    def pooled(items: Sequence[RunData]) -> np.ndarray:
        return np.concatenate([noise_rows(r) for r in items])

    rows = pooled(runs)
    st = standardized(rows)
    z = st["z"][np.isfinite(st["z"])]
    z_sd = stratified_bootstrap(by_p0(runs), lambda items: rms(standardized(pooled(items))["z"]))
    z_sd_iso = stratified_bootstrap(by_p0(runs), lambda items: rms(standardized(pooled(items))["z_iso"]))
    skew = float(np.mean(z**3) / np.mean(z**2) ** 1.5) if len(z) and np.mean(z**2) > 0 else float("nan")
    # the correlation over the rewarded runs: the bandit's ∇R = Δ∇P flips with the reward's sign, so
    # pooling rewarded and punished runs would average correlations of opposite signs
    rewarded = [r for r in runs if r.spec.direction == "rewarded"] or runs
    rows = pooled(rewarded)
    col = {k: rows[:, i] for i, k in enumerate(NOISE_COLUMNS)}
    rp, ry = col["real"] - col["expected"], col["real_Y"] - col["expected_Y"]
    ok = np.isfinite(rp) & np.isfinite(ry)

    def corr(cov, var_a, var_b) -> float:
        den = math.sqrt(var_a * var_b)
        return cov / den if den > 0 else float("nan")

    return NoiseCalibration(
        n=int(len(z)), z_sd=z_sd, z_skew=skew, z_sd_iso=z_sd_iso, partner=runs[0].cache["noise_partner"],
        corr_real=corr(float(np.mean(rp[ok] * ry[ok])), float(np.mean(rp[ok] ** 2)), float(np.mean(ry[ok] ** 2))),
        corr_pred=corr(float(np.mean(col["cov"])), float(np.mean(col["sd"] ** 2)), float(np.mean(col["sd_Y"] ** 2))),
        corr_pred_iso=corr(float(np.mean(col["cov_iso"])), float(np.mean(col["sd_iso"] ** 2)),
                           float(np.mean(col["sd_Y_iso"] ** 2))),
        exact_in_distribution=runs[0].spec.optimizer == "sgd", bins=st["bins"])


@dataclass
class PriceCheck:
    """The Price check of a cell across training (see the module docstring)."""

    n: int
    r2: float
    rel_err_median: float
    rel_err_p90: float
    eta_slope: Estimate
    slope_by_p: dict[str, float]
    outside: float  # share of tracked updates outside the first-order regime
    first_order_lr: float  # the largest multiple of η at which 95 % of the probed updates stay first-order
    probed_scale_max: float  # the largest probed multiple (first_order_lr equal to it: "at least")
    probed_scale_min: float  # the smallest (first_order_lr 0: not even there)
    noise: NoiseCalibration | None = None

    def row(self) -> dict[str, Any]:
        out = {"price_n": self.n, "price_r2": self.r2, "price_rel_err_median": self.rel_err_median,
               "price_rel_err_p90": self.rel_err_p90, "price_outside_first_order": self.outside,
               "price_first_order_lr_multiple": self.first_order_lr,
               "price_slope_by_p": "; ".join(f"{k}: {v:.2f}" for k, v in self.slope_by_p.items())}
        out.update(self.eta_slope.as_dict("price_eta_slope"))
        if self.noise is not None:
            out.update(self.noise.row())
        return out

    def first_order_text(self) -> str:
        """Up to which step 95 % of the probed updates stay first-order: "up to 2η", "up to 4η
        or more" (every probed scale), or "not at 0.125η" (not even the smallest)."""
        if not math.isfinite(self.first_order_lr):
            return "n/a"
        if self.first_order_lr >= self.probed_scale_max:
            return f"up to {self.first_order_lr:g}η or more"
        return f"up to {self.first_order_lr:g}η" if self.first_order_lr > 0 else f"not at {self.probed_scale_min:g}η"

    def note(self) -> str | None:
        """The sentence a verdict carries when the cell's runs left the first-order regime."""
        if not (self.outside > 0):
            return None
        return (f"{self.outside:.1%} of tracked updates left the first-order regime (|residual| > "
                f"{FIRST_ORDER_TOLERANCE:g}·|predicted|); {1 - FIRST_ORDER_SHARE:.0%} of the probed updates stay "
                f"inside {self.first_order_text()}")


def price_check(runs: Sequence[RunData]) -> PriceCheck:
    """The Price check of a cell's runs across training."""
    rows = [rec for r in runs for rec in r.records if "P/real_delta" in rec]
    pred = np.array([float(np.mean(rec["P/pred_delta"])) for rec in rows], dtype=float)
    real = np.array([float(np.mean(rec["P/real_delta"])) for rec in rows], dtype=float)
    agree = price_agreement(pred, real)
    scale, smallest, largest = first_order_scale(rows)
    return PriceCheck(
        n=agree["n"], r2=agree["r2"], rel_err_median=agree["median_rel_error"], rel_err_p90=agree["p90_rel_error"],
        eta_slope=slope_estimate(runs), slope_by_p=slopes_by_decade(runs), outside=agree["outside_first_order"],
        first_order_lr=scale, probed_scale_max=largest, probed_scale_min=smallest,
        noise=noise_calibration(runs) if any(r.spec.mode == "sampled" for r in runs) else None)
