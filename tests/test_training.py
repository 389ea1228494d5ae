"""Training runs with Price tracking on the bandit (SCIENCE.md §3, exact and sampled)."""

import math

import numpy as np
import pytest
import torch

from ntrl.agents.optimizers import make_optimizer
from ntrl.agents.policies import make_policy
from ntrl.agents.reinforce import exact_gradient, sampled_gradient
from ntrl.experiments.bandit import BanditConfig
from ntrl.envs.bandit import TwoArmedBandit
from ntrl.properties import ActionProbability
from ntrl.records import read_records
from ntrl.engine.tangent import TangentEngine
from ntrl.train import train

OBS = torch.ones(1, 1, dtype=torch.float64)


def run(tmp_path, **kw):
    kw.setdefault("wandb", "disabled")
    cfg = BanditConfig(out=str(tmp_path), **kw)
    return train(cfg, progress=False)


def escape_steps_formula(p0, lr, delta=2.0, kappa=1.0):
    u0 = (1 - p0) / p0
    return (u0 + 2 * math.log(u0) - 1 / u0) / (lr * kappa * delta)


@pytest.mark.parametrize("p0, lr", [(1e-2, 0.05), (1e-3, 0.5)])
def test_vanilla_pg_escape_time_matches_formula(tmp_path, p0, lr):
    res = run(tmp_path, policy="single_logit", optimizer="sgd", p0=p0, lr=lr, steps=10**6,
              stop_at_p=0.5, track_every=10**9, fisher=False)
    T = res.summary["crossed_half_at"]
    assert T == pytest.approx(escape_steps_formula(p0, lr), rel=0.01)


@pytest.mark.parametrize("opt, rate", [("npg", 2.0), ("sign", 1.0)])
def test_npg_and_sign_escape_time_is_log(tmp_path, opt, rate):
    # the logit moves by η·Δ (npg) or η (sign) per step: T = ⌈ln u₀ / (η·rate)⌉ exactly
    p0, lr = 1e-4, 0.1
    res = run(tmp_path, policy="single_logit", optimizer=opt, p0=p0, lr=lr, steps=10**5,
              stop_at_p=0.5, track_every=10**9, fisher=False)
    assert res.summary["crossed_half_at"] == math.ceil(math.log((1 - p0) / p0) / (lr * rate) - 1e-9)


def test_records_hold_the_price_check(tmp_path):
    res = run(tmp_path, policy="mlp", optimizer="sgd", p0=0.05, lr=0.01, steps=20)
    recs = read_records(res.run_dir)
    assert len(recs) == 20 and [r["update"] for r in recs] == list(range(20))
    for r in recs:
        # for SGD the optimizer's metric is the identity: NTCov_M(P, U) = NTCov(P, U)
        assert r["P/ntcov_opt"] == pytest.approx(r["P/ntcov_euc"], rel=1e-12)
        p = r["P/value"]
        assert r["P/ntvar_euc"] == pytest.approx(p**2 * (1 - p) ** 2 * r["kappa"], rel=1e-9)
        assert r["P/ntvar_fisher"] == pytest.approx(p * (1 - p), rel=1e-8)
        # exact bandit: NTCov(P, J) = Δ·NTVar(P)
        assert r["P/ntcov_euc"] == pytest.approx(2.0 * r["P/ntvar_euc"], rel=1e-9)
    assert res.summary["price_check_P"]["r2"] > 0.99


def test_price_error_is_first_order_in_lr():
    """|realised − predicted| / |realised| = O(η): the log–log slope against η is 1."""
    rel = []
    lrs = [1e-2, 1e-3, 1e-4]
    for lr in lrs:
        pol = make_policy("mlp", 1, 2, 1, 0.05, OBS, seed=0, width=32)
        eng = TangentEngine(pol, dtype=torch.float64)
        P = ActionProbability(OBS, 1)
        u = exact_gradient(eng, TwoArmedBandit())
        opt = make_optimizer("sgd", pol, lr)
        plan = opt.plan(u.gradient)
        before = eng.evaluate(P)
        pred = lr * float(eng.stats(P, directions={"d": plan.direction}).ntcov["d"][0])
        opt.apply(plan)
        real = float(eng.evaluate(P) - before)
        rel.append(abs(real - pred) / abs(real))
    slope = np.polyfit(np.log(lrs), np.log(rel), 1)[0]
    assert slope == pytest.approx(1.0, abs=0.05)


def test_sampled_gradient_is_unbiased_for_the_exact_one():
    """E[∇P·g_sampled] = ∇P·∇J: mean over S seeds within 4 standard errors (z = 4)."""
    pol = make_policy("mlp", 1, 2, 1, 0.2, OBS, seed=1, width=16)
    eng = TangentEngine(pol, dtype=torch.float64)
    env = TwoArmedBandit(noise_std=0.5)
    env.reset(seed=0)
    P = ActionProbability(OBS, 1)
    exact = float(eng.stats(P, directions={"g": exact_gradient(eng, env).gradient}).ntcov["g"][0])
    rng = np.random.default_rng(0)
    S = 400
    samples = np.array([
        float(eng.stats(P, directions={"g": sampled_gradient(eng, env, 8, rng).gradient}).ntcov["g"][0])
        for _ in range(S)
    ])
    se = samples.std(ddof=1) / math.sqrt(S)
    assert abs(samples.mean() - exact) < 4 * se
    assert se < 0.2 * abs(exact)  # the test has power: the mean is resolved to 20 %


def test_sampled_training_agrees_with_exact_in_expectation(tmp_path):
    """Mean P after T sampled SGD steps over seeds matches the exact-gradient run.

    The tolerance is 4 standard errors of the seed mean plus the Jensen bias of a nonlinear
    update, which is O(η²·Var(g)) per step; with η = 0.02 and T = 10 it is below 1e-4 here
    (the exact ΔP over the run is ~1e-2).
    """
    common = dict(policy="single_logit", optimizer="sgd", p0=0.2, lr=0.02, steps=10, fisher=False)
    exact = run(tmp_path / "exact", mode="exact", **common).summary["p_end"]
    ends = np.array([
        run(tmp_path / f"s{s}", mode="sampled", batch_size=16, seed=s, **common).summary["p_end"]
        for s in range(40)
    ])
    se = ends.std(ddof=1) / math.sqrt(len(ends))
    assert abs(ends.mean() - exact) < 4 * se + 1e-4
    assert abs(exact - 0.2) > 5 * se  # the run moved by much more than the tolerance


def test_same_seed_same_records_byte_for_byte(tmp_path):
    kw = dict(policy="mlp", optimizer="adam", mode="sampled", p0=0.1, lr=0.01, steps=15, batch_size=8,
              noise_std=0.3, width=8)
    a = run(tmp_path / "a", seed=3, **kw)
    b = run(tmp_path / "b", seed=3, **kw)
    c = run(tmp_path / "c", seed=4, **kw)
    read = lambda r: (r.run_dir / "records.jsonl").read_bytes()  # noqa: E731
    assert read(a) == read(b)
    assert read(a) != read(c)


@pytest.mark.parametrize("opt", ["adam", "npg", "sign"])
def test_every_optimizer_tracks_its_own_metric(tmp_path, opt):
    res = run(tmp_path, policy="mlp", optimizer=opt, p0=0.05, lr=0.002, steps=6, width=8, mode="sampled",
              batch_size=16)
    recs = read_records(res.run_dir)
    for r in recs:
        # small steps: the first-order prediction is accurate to a few per cent
        if abs(r["P/real_delta"]) > 0:
            assert abs(r["P/residual"]) < 0.1 * abs(r["P/real_delta"])
        if opt == "npg":
            assert r["P/ntvar_opt"] == pytest.approx(r["P/ntvar_fisher"], rel=1e-6)


def test_track_interval(tmp_path):
    res = run(tmp_path, policy="single_logit", steps=25, track_every=10)
    assert [r["update"] for r in read_records(res.run_dir)] == [0, 10, 20]


def test_existing_run_dir_needs_force(tmp_path):
    from ntrl.config import ConfigError

    run(tmp_path, policy="single_logit", steps=2)
    with pytest.raises(ConfigError, match="--force"):
        run(tmp_path, policy="single_logit", steps=2)
    run(tmp_path, policy="single_logit", steps=3, force=True)


@pytest.mark.parametrize("form", ["three_args", "stats_keyword", "fourth_positional", "var_args"])
def test_extra_tracking_in_either_form_reaches_the_records(tmp_path, form):
    """An Experiment's extra tracking written for (engine, u, plan) keeps working; one that takes
    ``stats`` gets the tracker's stats of this update (P's value among them)."""
    from dataclasses import dataclass

    seen = []

    def three_args(engine, u, plan):
        return {"extra/lr": plan.lr}

    def with_stats(engine, u, plan, stats=None):
        seen.append(float(stats["P"].value[0]))
        return {"extra/P": float(stats["P"].value[0])}

    def fourth_positional(engine, u, plan, st):
        return with_stats(engine, u, plan, st)

    def var_args(*args):
        return with_stats(*args)

    @dataclass
    class WithExtra(BanditConfig):
        def build(self):
            exp = super().build()
            exp.extra_tracking = {"three_args": three_args, "stats_keyword": with_stats,
                                  "fourth_positional": fourth_positional, "var_args": var_args}[form]
            return exp

    cfg = WithExtra(policy="single_logit", p0=0.1, lr=0.5, steps=4, track_every=2, wandb="disabled",
                    out=str(tmp_path))
    recs = read_records(train(cfg, progress=False).run_dir / "records.jsonl")
    assert len(recs) == 2
    if form == "three_args":
        assert all(r["extra/lr"] == 0.5 for r in recs)
    else:
        assert [r["extra/P"] for r in recs] == [r["P/value"] for r in recs] == seen
