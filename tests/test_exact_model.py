"""The exact tabular model: algebra on toy MDPs, the juice model against the sampled env, and
the F·P identity of the juice example."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch

from ntrl.envs.juice import JuiceGridworld, JuiceGridworldVector, MAX_TABULAR_STATES, tabular_model
from ntrl.engine.exact_model import ModelTooLargeError, TabularMDP
from ntrl.experiments.juice import JuiceConfig, JuiceQuantities, JuiceTabularPolicy, decomposition
from ntrl.engine.tangent import PolicyView, TangentEngine



class FixedView:
    """A view with given probabilities per distinct observation (obs = integer state index)."""

    def __init__(self, probs):
        self.p = torch.as_tensor(probs, dtype=torch.float64)

    def log_probs(self, obs):
        return self.p[torch.as_tensor(obs).reshape(-1).long()].log()


def toy_mdp(horizon=None, gamma=None):
    # 3 states, 2 actions; obs = state index
    T = np.zeros((3, 2, 3))
    T[0, 0] = [0.5, 0.5, 0.0]
    T[0, 1] = [0.0, 0.2, 0.8]
    T[1, 0] = [1.0, 0.0, 0.0]
    T[1, 1] = [0.0, 0.0, 1.0]
    T[2, 0] = [0.3, 0.3, 0.4]
    T[2, 1] = [0.0, 1.0, 0.0]
    r = np.array([[0.0, 1.0], [2.0, -1.0], [0.5, 0.0]])
    rho = np.array([0.6, 0.4, 0.0])
    return TabularMDP(T, r, rho, np.arange(3)[:, None], horizon=horizon, gamma=gamma), T, r, rho


PI = np.array([[0.3, 0.7], [0.9, 0.1], [0.5, 0.5]])


def test_finite_horizon_matches_brute_force_enumeration():
    """J = Σ over all (s_0, a_0, …, s_{H−1}, a_{H−1}) of Pr(path)·Σ_t r(s_t, a_t), and
    d(s) = (1/H) Σ_t Pr(s_t = s), by enumerating every path."""
    H = 4
    m, T, r, rho = toy_mdp(horizon=H)
    J, d = 0.0, np.zeros(3)
    for states in itertools.product(range(3), repeat=H):
        for acts in itertools.product(range(2), repeat=H):
            prob = rho[states[0]]
            for t in range(H):
                prob *= PI[states[t], acts[t]]
                if t + 1 < H:
                    prob *= T[states[t], acts[t], states[t + 1]]
            J += prob * sum(r[states[t], acts[t]] for t in range(H))
            for t in range(H):
                d[states[t]] += prob / H
    view = FixedView(PI)
    assert float(m.expected_return(view)) == pytest.approx(J, abs=1e-12)
    assert np.allclose(m.visitation(view).numpy(), d, atol=1e-12)
    assert float(m.expected_reward_per_step(view)) == pytest.approx(J / H, abs=1e-12)


def test_discounted_solves_policy_evaluation():
    g = 0.9
    m, T, r, rho = toy_mdp(gamma=g)
    P = np.einsum("sa,sat->st", PI, T)
    r_pi = (PI * r).sum(1)
    V = np.linalg.solve(np.eye(3) - g * P, r_pi)
    d = (1 - g) * np.linalg.solve(np.eye(3) - g * P.T, rho)
    view = FixedView(PI)
    assert float(m.expected_return(view)) == pytest.approx(rho @ V, abs=1e-12)
    assert np.allclose(m.visitation(view).numpy(), d, atol=1e-12)


def test_dense_and_sparse_transitions_agree_and_validate():
    m, T, r, rho = toy_mdp(horizon=6)
    S, A = 3, 2
    sa, cols = np.nonzero(T.reshape(S * A, S))
    m2 = TabularMDP((sa, cols, T.reshape(S * A, S)[sa, cols]), r, rho, np.arange(3)[:, None], horizon=6)
    view = FixedView(PI)
    assert float(m.expected_return(view)) == float(m2.expected_return(view))
    bad = T.copy()
    bad[0, 0, 0] = 0.9
    with pytest.raises(ValueError, match="sum to 1"):
        TabularMDP(bad, r, rho, np.arange(3)[:, None], horizon=6)
    with pytest.raises(ValueError, match="exactly one"):
        TabularMDP(T, r, rho, np.arange(3)[:, None])


def test_model_sampling_agrees_with_exact_return():
    m, *_ = toy_mdp(horizon=5)
    out = m.sample(PI, 20000, np.random.default_rng(0))
    J = float(m.expected_return(FixedView(PI)))
    se = out["returns"].std(ddof=1) / np.sqrt(len(out["returns"]))
    assert abs(out["returns"].mean() - J) < 4 * se


# ---------------------------------------------------------------- the juice model
def _policy(radius, seed=0, p0=0.2):
    torch.manual_seed(seed)
    pol = JuiceTabularPolicy(radius)
    with torch.no_grad():
        pol.table.logits.normal_(0.0, 1.0)
    return pol


def test_juice_model_size_and_limit():
    m = tabular_model(size=3)
    assert m.n_states == 9 * 8 and m.n_actions == 5
    assert tabular_model(size=3, hide_prob=0.2).n_states == 2 * 9 * 8
    with pytest.raises(ModelTooLargeError, match=f"limit of {MAX_TABULAR_STATES} states"):
        JuiceGridworld(size=12).tabular_model()
    with pytest.raises(ModelTooLargeError, match="limit of 100 states"):
        tabular_model(size=4, max_states=100)


@pytest.mark.parametrize("size, radius, hide", [(5, 1, 0.0), (4, 2, 0.4)])
def test_exact_model_agrees_with_sampled_vector_env(size, radius, hide):
    """Per-episode return, seen count and approach count: exact H·R, H·F, H·F·P within 4 standard
    errors of the sample means over B independent episodes (fixed seeds)."""
    H, B = 20, 6000
    pol = _policy(radius, seed=1)
    view = TangentEngine(pol, dtype=torch.float64).view()
    m = tabular_model(size=size, view_radius=radius, horizon=H, hide_prob=hide)
    q = JuiceQuantities(m).all(view)
    venv = JuiceGridworldVector(num_envs=B, size=size, view_radius=radius, horizon=H, hide_prob=hide)
    obs, _ = venv.reset(seed=123)
    rng = np.random.default_rng(7)
    ret, seen, appr = np.zeros(B), np.zeros(B), np.zeros(B)
    for _ in range(H):
        with torch.no_grad():
            p = pol(torch.as_tensor(obs)).softmax(-1).numpy()
        c = p.cumsum(1)
        a = np.minimum((rng.random(B)[:, None] * c[:, -1:] >= c).sum(1), 4)
        obs, r, _, _, info = venv.step(a)
        ret += r
        seen += info["juice_seen"]
        appr += info["approached"]
    for samples, exact in ((ret, H * float(q["R"])), (seen, H * float(q["F"])), (appr, H * float(q["FP"]))):
        se = samples.std(ddof=1) / np.sqrt(B)
        assert abs(samples.mean() - exact) < 4 * se, (samples.mean(), exact, se)


def test_exact_states_weights_are_the_visitation():
    m = tabular_model(size=4, hide_prob=0.3)
    view = TangentEngine(_policy(1), dtype=torch.float64).view()
    obs, w = m.exact_states(view)
    assert obs.shape == (5, 3) and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(w[0]) == pytest.approx(1 - float(JuiceQuantities(m).all(view)["F"]), abs=1e-12)


def test_expected_return_is_differentiable():
    m = tabular_model(size=3, horizon=10)
    pol = _policy(1, seed=3)
    eng = TangentEngine(pol, dtype=torch.float64)
    _, J = eng.jacobian(m.expected_return)
    theta = eng.flatten(eng.params())
    v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = 1e-6
    f = lambda t: float(m.expected_return(PolicyView(pol, eng.unflatten(t))))  # noqa: E731
    fd = (f(theta + h * v) - f(theta - h * v)) / (2 * h)
    assert float(J[0] @ v) == pytest.approx(fd, rel=1e-6, abs=1e-10)


# ---------------------------------------------------------------- the F·P identity
@pytest.mark.parametrize("policy, hide", [("tabular", 0.0), ("mlp", 0.0), ("mlp", 0.3)])
def test_radius_one_reward_is_F_times_P_and_identity_closes(policy, hide):
    cfg = JuiceConfig(policy=policy, p0=0.05, hide_prob=hide, width=16, seed=2)
    exp = cfg.build()
    eng = TangentEngine(exp.policy, dtype=torch.float64)
    m = tabular_model(**cfg.env_kwargs())
    q = JuiceQuantities(m)
    vals = q.all(eng.view())
    assert abs(float(vals["R"]) - float(vals["F"]) * float(vals["P"])) < 1e-9
    out = decomposition(eng, q)
    scale = abs(out["juice/F_ntvar_P"]) + abs(out["juice/P_ntcov_P_F"])
    assert product_rule_residual(eng, q) <= 1e-12 * scale
    assert abs(out["juice/identity_residual"]) <= 1e-12 * scale
    assert out["juice/c"] == pytest.approx(1.0, abs=1e-12)


def test_larger_radius_reward_is_only_proportional_and_tracker_reports_the_gap():
    cfg = JuiceConfig(policy="tabular", p0=0.3, view_radius=2, size=4)
    exp = cfg.build()
    eng = TangentEngine(exp.policy, dtype=torch.float64)
    q = JuiceQuantities(tabular_model(**cfg.env_kwargs()))
    out = decomposition(eng, q)
    assert 0.0 < out["juice/c"] < 1.0  # approaches from distance 2 pay nothing directly
    scale = abs(out["juice/F_ntvar_P"]) + abs(out["juice/P_ntcov_P_F"])
    assert product_rule_residual(eng, q) <= 1e-12 * scale  # the product rule always holds
    assert abs(out["juice/identity_residual"]) > 1e-3 * scale  # but dP/dt ≠ NTCov(P, F·P)
    assert out["juice/identity_rel"] > 1e-3
    records = exp.extra_tracking(eng, exp.utility(eng, np.random.default_rng(0)))
    assert records["juice/identity_residual"] == pytest.approx(out["juice/identity_residual"], rel=1e-12)


def product_rule_residual(eng: TangentEngine, q: JuiceQuantities) -> float:
    """|NTCov(P, F·P) − F·NTVar(P) − P·NTCov(P, F)| with ∇(F·P) from jacrev through the product
    (SCIENCE.md's product rule, which the tracked decomposition relies on)."""
    (P, F, _, _), (jP, jF, _, jFP) = eng.jacobian(q.stacked)
    return abs(float(jP @ jFP) - float(F * (jP @ jP) + P * (jP @ jF)))


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_decomposition_reuses_the_trackers_jacobians(policy):
    """With the tracker's stats (Jacobian rows of P, F, R) the decomposition differentiates
    nothing again, and gives the numbers it computes on its own."""
    from ntrl.engine.metrics import Euclidean
    from ntrl.engine.tangent import TangentStats

    cfg = JuiceConfig(policy=policy, p0=0.05, view_radius=2, size=4, hide_prob=0.2, width=8)
    exp = cfg.build()
    eng = TangentEngine(exp.policy, dtype=torch.float64)
    q = JuiceQuantities(tabular_model(**cfg.env_kwargs()))
    stats = dict(zip("PFR", eng.stats_many(exp.properties[:3], {"euc": Euclidean()})))
    assert all(s.gradient is not None for s in stats.values())
    reused = decomposition(eng, q, stats)
    alone = decomposition(eng, q)
    assert reused.keys() == alone.keys()
    for k in alone:
        assert reused[k] == pytest.approx(alone[k], rel=1e-12, abs=1e-300), k
    poisoned = {k: TangentStats(value=s.value, gradient=2 * s.gradient) for k, s in stats.items()}
    assert decomposition(eng, q, poisoned)["juice/ntvar_P"] == pytest.approx(4 * alone["juice/ntvar_P"], rel=1e-12)


@pytest.mark.parametrize("horizon", [2, 7])
def test_adjoint_visitation_matches_the_torch_recursion(horizon):
    """The one-node adjoint visitation (compiled sparse products) equals the torch recursion in
    value and in gradient (float64), and jacrev (which cannot trace it) gets the torch recursion."""
    m = tabular_model(size=4, view_radius=2, horizon=horizon, hide_prob=0.3)
    gen = torch.Generator().manual_seed(horizon)
    pi = torch.softmax(torch.randn(m.n_states, m.n_actions, generator=gen, dtype=torch.float64), -1)
    c = torch.randn(m.n_states, generator=gen, dtype=torch.float64)
    pi1, pi2 = pi.clone().requires_grad_(True), pi.clone().requires_grad_(True)
    d1 = m.visitation(None, pi1)
    d2 = m.visitation_torch(pi2)
    assert d1.grad_fn is not None and "FiniteHorizonVisitation" in type(d1.grad_fn).__name__
    assert torch.allclose(d1, d2, rtol=1e-13, atol=1e-16)
    g1, = torch.autograd.grad(d1 @ c, pi1)
    g2, = torch.autograd.grad(d2 @ c, pi2)
    assert torch.allclose(g1, g2, rtol=1e-12, atol=1e-14 * float(g2.abs().max()))
    Jref = torch.func.jacrev(lambda p: m.visitation(None, p) @ c)(pi)
    assert torch.allclose(Jref, g2, rtol=1e-12, atol=1e-14 * float(g2.abs().max()))


@pytest.mark.parametrize("members", [2, 5])
def test_a_members_visitation_and_gradient_are_its_own_runs_bytes_in_a_batch(members):
    """A population runs M members' chains as one block-diagonal node; each member's d and ∇π must
    be the bytes of its own run's (M = 1): a run and its population member agree exactly, and a
    resumed study that re-chunks its members reproduces them."""
    from ntrl.engine.exact_model import FiniteHorizonVisitation

    m = tabular_model(size=4, view_radius=2, horizon=9, hide_prob=0.3)
    gen = torch.Generator().manual_seed(members)
    pi = torch.softmax(torch.randn(members, m.n_states, m.n_actions, generator=gen, dtype=torch.float64) * 3, -1)
    c = torch.randn(members, m.n_states, generator=gen, dtype=torch.float64)
    batch = pi.clone().requires_grad_(True)
    d = FiniteHorizonVisitation.apply(batch, m)
    grad, = torch.autograd.grad((d * c).sum(), batch)
    for i in range(members):
        one = pi[i:i + 1].clone().requires_grad_(True)
        d1 = FiniteHorizonVisitation.apply(one, m)
        g1, = torch.autograd.grad((d1 * c[i:i + 1]).sum(), one)
        assert torch.equal(d[i], d1[0]) and torch.equal(grad[i], g1[0])


def test_adjoint_visitation_with_horizon_one_is_the_initial_distribution():
    m = tabular_model(size=3, horizon=1)
    pi = torch.full((m.n_states, m.n_actions), 1.0 / m.n_actions, dtype=torch.float64, requires_grad=True)
    d = m.visitation(None, pi)
    assert torch.equal(d.detach(), m.initial)
    assert torch.equal(torch.autograd.grad(d.sum(), pi)[0], torch.zeros_like(pi))


@settings(max_examples=15, deadline=None)
@given(size=st.integers(2, 4), radius=st.integers(1, 3), hide=st.sampled_from([0.0, 0.5]),
       horizon=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_reward_is_c_times_F_times_P_with_c_at_most_one(size, radius, hide, horizon, seed):
    """For any configuration R = c·F·P with 0 ≤ c ≤ 1, and c = 1 exactly when the radius is 1."""
    m = tabular_model(size=size, view_radius=radius, horizon=horizon, hide_prob=hide)
    q = JuiceQuantities(m).all(TangentEngine(_policy(radius, seed=seed), dtype=torch.float64).view())
    R, FP = float(q["R"]), float(q["FP"])
    assert R <= FP + 1e-12
    if radius == 1:
        assert abs(R - FP) < 1e-12


def test_sparse_pattern_public_fallback_gives_the_same_products(monkeypatch):
    """Without scipy's private compiled kernel the public csr_matrix product is used, with the
    same result (the pattern keeps duplicate entries, which both sum)."""
    import ntrl.engine.exact_model as em

    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, 7, 40), rng.integers(0, 5, 40)  # duplicates on purpose
    pat = em.SparsePattern(rows, cols, (7, 5))
    data = rng.normal(size=40)
    x = rng.normal(size=5)
    dense = np.zeros((7, 5))
    np.add.at(dense, (rows, cols), data)
    fast = pat.matvec(pat.sorted_data(data), x)
    monkeypatch.setattr(em, "_csr_matvec", None)
    public = pat.matvec(pat.sorted_data(data), x)
    assert np.allclose(fast, dense @ x, rtol=1e-13, atol=1e-13)
    assert np.allclose(public, dense @ x, rtol=1e-13, atol=1e-13)


def test_adjoint_visitation_refuses_second_order_and_batched_cotangents_clearly():
    """The node is first order: a Hessian through plain autograd or a batched cotangent is an
    error naming torch.func (not a silent zero), and torch.func.hessian, which runs the torch
    recursion, gives the same Hessian as the torch recursion itself."""
    m = tabular_model(size=3, horizon=4, hide_prob=0.2)
    gen = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(m.n_states, m.n_actions, generator=gen, dtype=torch.float64), -1)
    c = torch.randn(m.n_states, generator=gen, dtype=torch.float64)
    f = lambda p: (m.visitation(None, p) @ c) ** 2  # noqa: E731
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.autograd.functional.hessian(f, pi)
    with pytest.raises(RuntimeError, match="torch.func"):
        torch.autograd.functional.jacobian(lambda p: m.visitation(None, p), pi, vectorize=True)
    H = torch.func.hessian(f)(pi)
    H_ref = torch.autograd.functional.hessian(lambda p: (m.visitation_torch(p) @ c) ** 2, pi)
    assert torch.allclose(H, H_ref, rtol=1e-12, atol=1e-15)
