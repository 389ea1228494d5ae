"""Verdicts that hold (issue 13): extinction over four decades and more, Adam's late-time decay,
the Price check's η-slope along a trajectory, and the predicted spread of sampled updates.

Tolerances come from the math:

* single-logit SGD, punished: dz/dt = −ηΔ p(1 − p) exactly, so 1/p grows by ηΔ(1 − p)² + O(η²Δ²p)
  per update: P(t) = 1/(A + Bt) with B = κΔη (κ = 1) up to O(p) in the window p ≤ 2e-3, and a
  local log–log slope −(1 − P/P₀) ∈ [−1, −0.99] there;
* Adam, punished: the late-time rate of log P is the root of λ = η(1 − β₁)/(1 − β₁e^λ)·√((1 − β₂e^{2λ})/(1 − β₂))
  (README, "Adam's late-time decay"), reached to e^{−(t − t_c)/τ} with τ = 2/(1 − β₂);
* the η-probe: the relative error of a first-order prediction is a·s + b·s² + …, so its log–log
  slope over s ∈ [1/8, 1] is 1 + O(b/a), and b/a = O(ηΔ) is below 0.05 where the test reads it;
* the noise: with the baseline "none" the per-episode contributions are independent, so the
  per-batch estimate Σ̂ = Cov_i(h_i)/B is unbiased and E[(ΔP − E[ΔP])²] = E[η² ∇Pᵀ Σ̂ ∇P] to first
  order; the ratio of the two sample means is tested against 1 within four of its delta-method
  standard errors, computed from the same samples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from ntrl.experiments.bandit import BanditConfig
from ntrl.population import train_population
from ntrl.records import read_records
from ntrl.study.extinction import adam_late_rate, fit_run
from ntrl.study.grid import RunSpec
from ntrl.study.price import record_slope
from ntrl.study.stats import RunData
from ntrl.train import train


def punished(out, optimizer, lr, steps, **kw) -> BanditConfig:
    return BanditConfig(policy="single_logit", optimizer=optimizer, p0=0.2, lr=lr, steps=steps, reward_do=-1.0,
                        reward_dont=1.0, track_per_decade=50, wandb="disabled", out=str(out),
                        run_name=f"{optimizer}-{kw.get('adam_beta2', '')}", **kw)


def run_data(result, config, optimizer="sgd", adam_beta2=0.999) -> RunData:
    spec = RunSpec("bandit", "single_logit", optimizer, "exact", 0.2, "punished", 0, adam_beta2=adam_beta2)
    return RunData(spec, result.summary, read_records(result.run_dir), config.to_dict())


def test_single_logit_sgd_extinction_is_1_over_t_with_B_equal_kappa_delta_eta_and_no_floor(tmp_path):
    cfg = punished(tmp_path, "sgd", 2.0, 20_000, stop_below_p=2e-5)  # four decades below 0.2
    res = train(cfg, progress=False)
    assert res.summary["status"] == "stopped_below_p"
    fit = fit_run(run_data(res, cfg))
    assert fit.n >= 50 and fit.decades >= 4.0
    # the exponent: the 1/(A + Bt) law, with the fitted A and B, at the window's own updates
    t = np.array([r["update"] for r in read_records(res.run_dir)], dtype=float)
    t = t[(t > 0) & (np.array([r["P/value"] for r in read_records(res.run_dir)]) <= 0.2e-2)]
    A, B = fit.comparison.params["A"], fit.comparison.params["B"]
    expected = np.polyfit(np.log(t), -np.log(A + B * t), 1)[0]
    assert -1.0 <= expected <= -0.99  # the window's local slopes −(1 − P/P₀)
    assert fit.exponent == pytest.approx(expected, abs=2e-3)
    # B = κΔη with κ = 1 (single logit), Δ = 2, η = 2: within 1 %
    assert fit.B_predicted == pytest.approx(1.0 * 2.0 * 2.0, rel=1e-12)
    assert fit.B == pytest.approx(fit.B_predicted, rel=0.01)
    assert fit.comparison.winner == "1/t" and fit.comparison.deltas["exponential"] > 100
    lo, hi = fit.floor[1], fit.floor[2]
    assert lo == 0.0 and hi < 0.1 * fit.p_final  # the floor's interval includes 0: no equilibrium rarity


@pytest.mark.parametrize("lr, beta2", [(0.1, 0.99), (0.1, 0.999), (0.01, 0.99)])
def test_adam_late_time_decay_is_exponential_at_the_derived_rate(tmp_path, lr, beta2):
    memories = math.ceil(20 / (1 - beta2))
    cfg = punished(tmp_path, "adam", lr, memories, adam_beta2=beta2)
    res = train_population([cfg], progress=False).results[0]
    fit = fit_run(run_data(res, cfg, "adam", beta2))
    assert fit.n >= 10  # the window t ≥ 10/(1 − β₂)
    derived = adam_late_rate(beta2, lr=lr, beta1=0.9, gain=1.0)
    limit = -0.5 * math.log(beta2)
    if lr == 0.1:  # ηS ≫ (1 − β₂)/2: the root lies below −½ ln β₂ by about λ²(1 − β₂)/(2η²), 0.2 % at most
        assert derived < limit and (limit - derived) == pytest.approx(limit**2 * (1 - beta2) / (2 * lr**2), rel=0.1)
    else:  # ηS = 2·(1 − β₂)/2: 16 % below the limit, so only the equation's root passes the 2 % below
        assert derived < 0.9 * limit
    assert fit.rate == pytest.approx(derived, rel=0.02)
    assert fit.comparison.winner == "exponential"


def test_adam_late_rate_needs_the_first_moment_to_converge():
    assert math.isnan(adam_late_rate(0.9, lr=0.1, beta1=0.95))  # β₁ ≥ √β₂: no fixed point
    assert adam_late_rate(0.999, lr=0.1) == pytest.approx(-0.5 * math.log(0.999), rel=1e-4)


def test_eta_slope_is_one_along_a_single_logit_sgd_trajectory(tmp_path):
    cfg = BanditConfig(policy="single_logit", optimizer="sgd", p0=1e-3, lr=0.5, steps=5000, stop_at_p=0.5,
                       track_every=25, price_scales=[1.0, 0.5, 0.25, 0.125], wandb="disabled", out=str(tmp_path),
                       run_name="x")
    records = read_records(train(cfg, progress=False).run_dir)
    early = records[0]
    late = [r for r in records if r["P/value"] <= 0.3][-1]
    mid = min(records, key=lambda r: abs(math.log(r["P/value"]) - 0.5 * (math.log(early["P/value"]) +
                                                                         math.log(late["P/value"]))))
    assert early["P/value"] < mid["P/value"] < late["P/value"]
    for rec in (early, mid, late):
        assert record_slope(rec) == pytest.approx(1.0, abs=0.05), rec["update"]


def variance_ratio(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a)/mean(b) and its delta-method standard error from the same n samples."""
    n = len(a)
    R = a.mean() / b.mean()
    (va, cab), (_, vb) = np.cov(a, b)
    var = (va / a.mean() ** 2 + vb / b.mean() ** 2 - 2 * cab / (a.mean() * b.mean())) / n
    return float(R), float(R * math.sqrt(var))


def test_realised_spread_over_seeds_matches_the_minibatch_prediction_and_rejects_isotropic_noise(tmp_path):
    """2000 seeds of one sampled SGD update of an MLP bandit (each seed its own network and its own
    batch of 32 episodes): the realised (ΔP − E[ΔP])² against the predicted η²∇PᵀΣ̂∇P."""
    cfgs = [BanditConfig(policy="mlp", optimizer="sgd", mode="sampled", p0=0.3, lr=5e-4, steps=1, seed=s, width=16,
                         batch_size=32, baseline="none", noise_std=0.5, fisher=False, wandb="disabled",
                         out=str(tmp_path), run_name=f"s{s}") for s in range(2000)]
    recs = [read_records(r.run_dir)[0] for r in train_population(cfgs, progress=False).results]
    resid = np.array([r["P/real_delta"] - r["P/expected_delta"] for r in recs])
    R, se = variance_ratio(resid**2, np.array([r["P/noise_sd"] ** 2 for r in recs]))
    assert abs(R - 1) <= 4 * se, (R, se)
    R_iso, se_iso = variance_ratio(resid**2, np.array([r["P/noise_sd_iso"] ** 2 for r in recs]))
    assert R_iso - 1 > 4 * se_iso, (R_iso, se_iso)  # radially symmetric noise predicts far too little


def test_the_changes_of_two_properties_co_vary_as_the_minibatch_noise_predicts(tmp_path):
    """On the juice gridworld P (approach | seen) and F (how often juice is seen) have different
    gradients, so their changes are not tied as the bandit's P and R are: 600 seeds of one
    sampled SGD update of an MLP, the realised (ΔP − E[ΔP])(ΔF − E[ΔF]) against the predicted
    η²∇PᵀΣ̂∇F, and each spread against its prediction, within four standard errors; the isotropic
    model's spreads are rejected by the same test."""
    from ntrl.experiments.juice import JuiceConfig

    cfgs = [JuiceConfig(policy="mlp", optimizer="sgd", mode="sampled", p0=0.2, lr=2e-3, steps=1, seed=s, width=16,
                        batch_size=16, baseline="none", fisher=False, decomposition=False, wandb="disabled",
                        out=str(tmp_path), run_name=f"s{s}") for s in range(600)]
    recs = [read_records(r.run_dir)[0] for r in train_population(cfgs, progress=False).results]
    resid = {x: np.array([r[f"{x}/real_delta"] - r[f"{x}/expected_delta"] for r in recs]) for x in "PF"}
    R, se = variance_ratio(resid["P"] * resid["F"], np.array([r["noise/cov_P_F"] for r in recs]))
    assert abs(R - 1) <= 4 * se, (R, se)
    for x in "PF":
        R, se = variance_ratio(resid[x] ** 2, np.array([r[f"{x}/noise_sd"] ** 2 for r in recs]))
        assert abs(R - 1) <= 4 * se, (x, R, se)
        R_iso, se_iso = variance_ratio(resid[x] ** 2, np.array([r[f"{x}/noise_sd_iso"] ** 2 for r in recs]))
        assert R_iso - 1 > 4 * se_iso, (x, R_iso, se_iso)
