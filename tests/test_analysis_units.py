"""The analysis on synthetic runs with known answers: no training involved."""

import numpy as np
import pytest

from ntrl.study.analysis import (
    NAN, Estimate, ModelComparison, RunData, compare_escape, compare_extinction, decide, exponent_estimate,
)
from ntrl.study import RunSpec


def synthetic_runs(exponent: float, noise: float, seeds: int, seed: int = 0) -> list[RunData]:
    """Rewarded runs whose NTVar(P) = p^exponent · (1 − p)² · e^{noise·ε}, ε ~ N(0, 1), with a
    per-run scale factor (as κ differs between seeds)."""
    rng = np.random.default_rng(seed)
    runs = []
    for p0 in (1e-3, 1e-2, 1e-1):
        for s in range(seeds):
            p = np.geomspace(p0, 0.5, 40)
            kappa = np.exp(rng.normal(0, 0.3))
            y = kappa * p**exponent * (1 - p) ** 2 * np.exp(noise * rng.normal(size=p.size))
            recs = [{"update": i, "P/value": float(a), "P/ntvar_euc": float(b)} for i, (a, b) in enumerate(zip(p, y))]
            runs.append(RunData(RunSpec("bandit", "mlp", "sgd", "exact", p0, "rewarded", s), {}, recs))
    return runs


@pytest.mark.parametrize("exponent", [1.0, 1.5, 2.0])
def test_exponent_interval_covers_the_truth(exponent):
    est = exponent_estimate(synthetic_runs(exponent, noise=0.2, seeds=5), "P/ntvar_euc")
    assert est.lo <= exponent <= est.hi
    assert 0 < est.hi - est.lo < 0.3


def test_deterministic_cell_gets_a_regression_interval_not_a_point():
    est = exponent_estimate(synthetic_runs(2.0, noise=0.05, seeds=1), "P/ntvar_euc")
    assert est.lo < 2.0 < est.hi and est.hi - est.lo < 0.2


def test_model_comparisons_pick_the_generating_law():
    p0 = np.repeat([1e-1, 1e-2, 1e-3, 1e-4], 3)
    u0 = (1 - p0) / p0
    power = (u0 + 2 * np.log(u0) - 1 / u0) / 0.2
    log = np.log(u0) / 0.2
    assert compare_escape(p0, power).winner == "power law"
    assert compare_escape(p0, log).winner == "logarithmic"
    t = np.arange(5.0, 300.0, 5.0)
    assert compare_extinction(t, 1 / (4 + 0.3 * t)).winner == "1/t"
    assert compare_extinction(t, 0.3 * np.exp(-0.05 * t)).winner == "exponential"


def point(v):
    return Estimate(v, v - 0.01, v + 0.01)


def test_decide_rules():
    power = ModelComparison("power law", 50.0, n=12)
    inv = ModelComparison("1/t", 40.0, n=5)
    assert decide(point(2.0), power, inv, point(-1.0), 0, 12)[0] == "consistent with p²"
    # a power law of slope −0.5 is not the p² law
    verdict, reason = decide(point(2.0), power, inv, point(-0.5), 0, 12)
    assert verdict == "neither" and "slope" in reason
    # runs that never escaped make the escape evidence "neither"
    verdict, reason = decide(point(2.0), power, inv, point(-1.0), 3, 12)
    assert verdict == "neither" and "never reached" in reason
    # a ΔAIC below 2 is no vote at all
    weak = ModelComparison("logarithmic", 0.5, n=12)
    verdict, reason = decide(point(2.0), weak, inv, NAN, 0, 12)
    assert verdict == "consistent with p²" and "inconclusive" in reason
    # disagreeing evidence
    assert decide(point(1.0), power, inv, point(-1.0), 0, 12)[0] == "neither"
