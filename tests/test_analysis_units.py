"""The analysis on synthetic runs with known answers: no training involved."""

import numpy as np
import pytest

from ntrl.study import RunSpec
from ntrl.study.analysis import (
    NAN, Estimate, ModelComparison, RunData, compare_escape, decide, escape_vote, exponent_estimate, exponent_vote,
    waiting_time,
)
from ntrl.study.extinction import analyse_extinction, extinction_vote, fit_run
from ntrl.study.stats import aicc


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


P0 = np.repeat([5e-2, 5e-3, 5e-4, 5e-5, 5e-6], 3)


def test_escape_laws_pick_the_generating_law():
    u0 = (1 - P0) / P0
    power = (u0 + 2 * np.log(u0) - 1 / u0) / 0.2
    log = np.log(u0) / 0.2
    assert compare_escape(P0, power).winner == "power law"
    assert compare_escape(P0, log).winner == "logarithmic"
    # sampled: the wait for a first success of a batch of 32, with seed-to-seed scatter
    rng = np.random.default_rng(0)
    wait = 1.3 * waiting_time(P0, 32) * np.exp(rng.normal(0, 0.2, P0.size))
    comp = compare_escape(P0, wait, batch_size=32)
    assert comp.winner == "waiting time" and comp.params["c"] == pytest.approx(1.3, rel=0.15)
    assert comp.n == 15 and set(comp.aicc) == {"power law", "logarithmic", "waiting time"}


def test_three_p0_values_are_not_judged():
    p0 = np.array([1e-2, 1e-3, 1e-4])
    comp = compare_escape(p0, 1 / p0)
    assert comp.n == 0 and comp.params["p0s"] == 3
    vote = escape_vote(comp, NAN, 0, 3)
    assert vote[0] == "inconclusive" and "at least 5" in vote[1]


def test_aicc_exists_only_with_enough_points():
    assert np.isnan(aicc(1.0, 4, 2))  # k = 2 model parameters + σ need n ≥ 5
    assert aicc(1.0, 5, 2) == pytest.approx(5 * np.log(0.2) + 6 + 24 / 1)


def punished_run(P: np.ndarray, t: np.ndarray, seed: int = 0) -> RunData:
    recs = [{"update": int(a), "P/value": float(b), "kappa": 1.0, "lr": 1.0} for a, b in zip(t, P)]
    return RunData(RunSpec("bandit", "single_logit", "sgd", "exact", float(P[0]), "punished", seed),
                   {"p_start": float(P[0]), "p_end": float(P[-1])}, recs, {"reward_do": -1.0, "reward_dont": 1.0})


T = np.unique(np.round(np.geomspace(1, 1e5, 250)))


def test_extinction_models_and_the_floor():
    inv = fit_run(punished_run(1 / (5 + 2 * T), T))
    assert inv.comparison.winner == "1/t" and inv.exponent == pytest.approx(-1, abs=0.01)
    assert inv.B == pytest.approx(2.0, rel=1e-6) and inv.B_predicted == pytest.approx(2.0)  # κΔη = 1·2·1
    assert inv.floor[1] == 0.0 and inv.floor[2] < 1e-3 * inv.p_final
    expo = fit_run(punished_run(0.2 * np.exp(-1e-4 * T), T))
    assert expo.comparison.winner == "exponential"
    # a floor at a tenth of the way down: P = 2e-5 + 1/(5 + 2t)
    rng = np.random.default_rng(1)
    runs = [punished_run((2e-5 + 1 / (5 + 2 * T)) * np.exp(rng.normal(0, 0.01, T.size)), T, s) for s in range(3)]
    cell = analyse_extinction(runs)
    assert cell.comparison.winner == "floor + 1/t"
    assert not cell.floor_includes_zero and cell.floor_verdict.startswith("floor")
    assert extinction_vote(cell)[0] == "neither"
    # without a floor, with the same noise: no equilibrium rarity
    runs = [punished_run((1 / (5 + 2 * T)) * np.exp(rng.normal(0, 0.01, T.size)), T, s) for s in range(3)]
    cell = analyse_extinction(runs)
    assert cell.floor_includes_zero and cell.floor_verdict.startswith("no equilibrium rarity")
    assert extinction_vote(cell)[0] == "p²"


def point(v):
    return Estimate(v, v - 0.01, v + 0.01)


def test_votes():
    assert exponent_vote("drift", point(2.0))[0] == "p²"
    assert exponent_vote("drift", point(1.1))[0] == "p(1 − p)"
    assert exponent_vote("drift", point(1.5))[0] == "neither"  # meets neither window
    assert exponent_vote("drift", Estimate(1.5, 0.9, 2.1))[0] == "inconclusive"  # too wide to tell
    assert exponent_vote("drift", Estimate(1.2, 1.1, 1.3))[0] == "inconclusive"  # meets 1 ± 0.25, not inside
    assert exponent_vote("drift", NAN) is None
    power = ModelComparison("power law", 50.0, {"p0s": 5}, n=12)
    assert escape_vote(power, point(-1.0), 0, 12)[0] == "p²"
    assert escape_vote(power, point(-0.5), 0, 12)[0] == "neither"
    assert escape_vote(power, point(-1.0), 3, 12)[0] == "inconclusive"  # censored runs: T only bounded
    assert exponent_vote("drift", Estimate(1.0, float("nan"), float("nan")))[0] == "inconclusive"  # no interval
    assert escape_vote(ModelComparison("logarithmic", 0.5, {"p0s": 5}, n=12), NAN, 0, 12)[0] == "inconclusive"
    waiting = ModelComparison("waiting time", 9.0, {"p0s": 5, "c": 1.1}, n=12)
    assert escape_vote(waiting, point(-1.0), 0, 12)[0] == "none"


def test_decide_rules():
    p2, p1 = ("p²", "a"), ("p(1 − p)", "b")
    assert decide([p2, p2, p2])[0] == "consistent with p²"
    assert decide([p1, None, p1])[0] == "consistent with p(1 − p)"
    assert decide([p2, p1])[0] == "neither"  # the evidence disagrees with itself
    assert decide([p2, ("neither", "c")])[0] == "neither"
    assert decide([p2, ("inconclusive", "d"), p2])[0] == "consistent with p²"  # two agree
    assert decide([p2, ("inconclusive", "d")])[0] == "inconclusive"  # one against the undecided
    assert decide([None, None])[0] == "inconclusive"
    verdict, reason = decide([p2, ("none", "escape is the wait for sampled successes"), p2], ["a note"])
    assert verdict == "consistent with p²" and "sampled successes" in reason and "a note" in reason


def test_a_floor_far_below_the_last_P_does_not_vote_neither():
    """On an exact run the floor model can fit the decay's own curvature better (a floor at 0.1 %
    of the last P): the extinction then votes by 1/t against the exponential."""
    from ntrl.study.extinction import CellExtinction

    comp = ModelComparison("floor + 1/t", 74.0, n=100, deltas={"1/t": 74.0, "exponential": 1549.0})
    cell = CellExtinction(1, "P ≤ P(0)·10^-2", 4.0, 100, NAN, NAN, comp, False, 0.0017,
                          "inconclusive (a floor of 0.0011–0.0017·P_final fits better in 1/1 runs: below 0.1·P_final)")
    assert extinction_vote(cell)[0] == "p²"
    cell.floor_verdict = "floor (P∞ > 0 in 1/1 runs, up to 0.77·P_final)"
    assert extinction_vote(cell)[0] == "neither"


def test_median_bootstrap_is_the_stratified_bootstrap_of_the_median():
    """The η-slope of a deterministic cell bootstraps the median of thousands of probed updates;
    the vectorized median_bootstrap must give exactly the per-resample path's estimate: the same
    resamples (seeded), the same interval, points where every resample agrees."""
    import math

    from ntrl.study.stats import median_bootstrap, stratified_bootstrap

    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 57, 400, 3000):
        for kind in ("normal", "ties", "constant"):
            x = rng.standard_normal(n) * 10.0 ** rng.integers(-3, 3)
            x = np.round(x) if kind == "ties" else np.full(n, 1.5) if kind == "constant" else x
            want = stratified_bootstrap([list(x)], lambda xs: float(np.median(xs)), seed=n)
            got = median_bootstrap(x, seed=n)
            np.testing.assert_array_equal([got.value, got.lo, got.hi, got.n], [want.value, want.lo, want.hi, want.n])
    assert math.isnan(median_bootstrap([]).value)


def _estimates(est):
    return [est.value, est.lo, est.hi, est.n]


def test_a_batch_statistic_sees_the_resamples_the_scalar_statistic_sees():
    """stratified_bootstrap's batch_statistic gets, as counts per item, exactly the resamples the
    per-resample statistic gets (strata of several items resampled, strata of one held fixed): a
    statistic that depends on which items are drawn, not just how many, gives the same interval."""
    from ntrl.study.stats import stratified_bootstrap

    rng = np.random.default_rng(1)
    strata = [list(rng.standard_normal(k)) for k in (3, 1, 5, 2, 1)]
    items = [x for s in strata for x in s]
    weight = np.arange(1, len(items) + 1) ** 0.5  # an item's weight depends on where it is

    def scalar(chosen):
        return float(sum(x * weight[items.index(x)] for x in chosen) / len(chosen))

    def batch(all_items, counts):
        assert all_items == items
        return (counts * (np.array(items) * weight)).sum(1) / counts.sum(1)

    want = stratified_bootstrap(strata, scalar, seed=3)
    got = stratified_bootstrap(strata, scalar, seed=3, batch_statistic=batch)
    np.testing.assert_allclose(_estimates(got), _estimates(want), rtol=1e-13)
    assert want.lo < want.value < want.hi


def test_weighted_medians_are_the_medians_of_the_pooled_draws():
    from ntrl.study.stats import resampled, weighted_medians

    rng = np.random.default_rng(2)
    values = [rng.standard_normal(n) for n in (0, 1, 4, 7, 30)] + [np.round(rng.standard_normal(9))]  # ties too
    counts = rng.integers(0, 3, size=(400, len(values)))
    counts[0] = 0  # draws nothing
    counts[1] = [1, 0, 0, 0, 0, 0]  # draws only an item without values
    got = weighted_medians(values, counts)
    for b in range(len(counts)):
        pooled = np.concatenate([np.zeros(0)] + resampled(values, counts[b]))
        if len(pooled):
            assert got[b] == np.median(pooled)  # the very number
        else:
            assert np.isnan(got[b])


def _drift_runs(seed: int, seeds: int = 4, top: float = 0.5) -> list[RunData]:
    """Rewarded runs whose ΔP/η = p^1.5 (1 − p) e^{0.3 ε}: records of P (from p₀ to about
    ``top``), its realised change and η."""
    rng = np.random.default_rng(seed)
    runs = []
    for p0 in (1e-4, 1e-3, 1e-2):
        for s in range(seeds):
            p = np.minimum(np.geomspace(p0, top, 60) * np.exp(rng.normal(0, 0.05, 60)), top)
            d = p**1.5 * (1 - p) * np.exp(0.3 * rng.normal(size=p.size)) * 0.1
            recs = [{"update": i, "P/value": float(a), "P/real_delta": float(b), "lr": 0.1}
                    for i, (a, b) in enumerate(zip(p, d))]
            runs.append(RunData(RunSpec("bandit", "mlp", "sgd", "exact", p0, "rewarded", s), {}, recs))
    return runs


def test_batched_power_law_fits_are_the_per_resample_fits():
    """exponent_estimate and drift_estimate fit every resample at once from the runs' moments;
    the per-resample least-squares fits (small_p_exponent without ``moments``) give the same
    estimate and interval, to the rounding of the normal equations (cond ≤ 10⁶: ~10⁻¹⁰)."""
    from ntrl.study.analysis import drift_estimate, drift_points, law_points, small_p_exponent

    runs = synthetic_runs(1.5, noise=0.2, seeds=4)
    want = small_p_exponent(runs, lambda items: law_points(items, "P/ntvar_euc"), min_points=4)
    got = exponent_estimate(runs, "P/ntvar_euc")
    np.testing.assert_allclose(_estimates(got), _estimates(want), rtol=1e-10)
    for seed in (0, 1):
        runs = _drift_runs(seed)
        want, got = small_p_exponent(runs, drift_points), drift_estimate(runs)
        np.testing.assert_allclose(_estimates(got), _estimates(want), rtol=1e-10)
        assert 1.2 < got.lo < 1.5 < got.hi < 1.8


def test_drift_resamples_whose_top_point_is_a_bin_edge_are_fitted_one_by_one():
    """drift_points puts the pooled largest p into the bin below when log₁₀ p is a quarter-decade
    edge (numpy's digitize and the clip): a resample whose top point is such an edge must get the
    per-resample fit's bins, not the quarter-decade ones."""
    from ntrl.study.analysis import drift_moments, drift_points, power_law_exponents, small_p_exponent
    from ntrl.study.stats import resampled

    runs = _drift_runs(3, top=0.09)
    assert np.log10(0.1) == -1.0
    for r in (runs[0], runs[5]):  # two runs reach log₁₀ p = −1, an edge, above all the others' points
        r.records.append({"update": 99, "P/value": 0.1, "P/real_delta": 5e-3, "lr": 0.1})
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 2, size=(60, len(runs)))
    *moments, unsure = drift_moments(runs, counts)
    assert unsure.any() and not unsure.all()

    def one(b):
        p, y = drift_points(resampled(runs, counts[b]))
        from ntrl.study.analysis import fit_power_law
        return fit_power_law(p, y)[1] if len(p) >= 3 and np.ptp(np.log(p)) >= 0.5 else np.nan

    got = power_law_exponents(*moments, 3, one, unsure)
    want = np.array([one(b) for b in range(len(counts))])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    # and without the fallback those resamples would differ: the test can tell
    bad = power_law_exponents(*moments, 3, one, None)
    assert not np.allclose(bad[unsure], want[unsure], rtol=1e-10)
    assert small_p_exponent(runs, drift_points).value == pytest.approx(
        small_p_exponent(runs, drift_points, moments=drift_moments).value, rel=1e-12)


def test_record_slopes_are_record_slope_of_each_record():
    """The η-slopes of a cell's probed updates come from one vectorized least-squares fit per
    probe length; each must be np.polyfit's slope (record_slope) to rounding, nan where it is."""
    from ntrl.tracker import record_slope, record_slopes

    rng = np.random.default_rng(4)
    scales = np.array([4.0, 2.0, 1.0, 0.5, 0.25, 0.125])
    records = []
    for i in range(300):
        lr = 10.0 ** rng.uniform(-3, 0)
        real = rng.normal(0, 1, 6) * 10.0 ** rng.uniform(-12, -2)
        pred = real * (1 + rng.normal(0, 1e-3, 6) * scales)
        records.append({"lr": lr, "P/probe_lr": list(lr * scales), "P/probe_real": list(real), "P/probe_pred": list(pred)})
    lr = 0.1
    records += [
        {"lr": lr},  # no probe
        {"lr": lr, "P/probe_lr": [], "P/probe_real": [], "P/probe_pred": []},
        {"lr": lr, "P/probe_lr": [0.4, 0.2, 0.1, 0.05], "P/probe_real": [1.0, 1.0, 1.0, 1.0], "P/probe_pred": [1.0] * 4},  # no error
        {"lr": lr, "P/probe_lr": [0.4, 0.2, 0.1, 0.05], "P/probe_real": [1, 1, 1, 2.0], "P/probe_pred": [1, 1, 1.5, 1]},  # two
        {"lr": lr, "P/probe_lr": [0.4, 0.2, 0.1, 0.05], "P/probe_real": [1, 1, 0, 2.0], "P/probe_pred": [1, 1, 1.5, 1]},  # one
        {"lr": lr, "P/probe_lr": [0.1, 0.1, 0.1], "P/probe_real": [1, 2, 3.0], "P/probe_pred": [1.5, 1, 1]},  # one η: nan
    ]
    ragged = records[:3] + [{"lr": lr, "P/probe_lr": [0.1, 0.05], "P/probe_real": [1.0, 2.0], "P/probe_pred": [1.5, 1.0]}]
    for recs in (records, ragged, records[:300]):
        want = np.array([record_slope(r) for r in recs])
        got = record_slopes(recs)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(want)], want[~np.isnan(want)], rtol=1e-12)
    assert np.isfinite(want).sum() == 300 and not np.isnan(record_slopes(records)[303])
    assert np.isnan(record_slopes(records)[305]) and np.isnan(record_slope(records[305]))  # one η: no slope
