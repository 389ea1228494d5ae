"""The reference engine against closed forms (SCIENCE.md §1, §3) and the NTCov algebra."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ntrl.agents.policies import MLPPolicy, make_policy
from ntrl.engine.metrics import Diagonal, Euclidean, InverseFisher
from ntrl.properties import ActionProbability, LogOdds, Property
from ntrl.engine.tangent import TangentEngine

OBS1 = torch.ones(1, 1, dtype=torch.float64)
PS = [1e-6, 1e-4, 1e-2, 0.1, 0.3, 0.5, 0.7, 0.99, 1 - 1e-4, 1 - 1e-6]


def single_logit(p):
    return make_policy("single_logit", 1, 2, target=1, p0=p, reference_obs=OBS1)


def bandit_J(delta=2.0, r_dont=-1.0):
    # J = p r_do + (1 - p) r_dont with r_do - r_dont = delta
    return Property("J", lambda v: (v.probs(OBS1)[0] * torch.tensor([r_dont, r_dont + delta], dtype=torch.float64)).sum())


@pytest.mark.parametrize("p", PS)
def test_single_logit_ntvar_is_p2_1mp2(p):
    eng = TangentEngine(single_logit(p), dtype=torch.float64)
    P = ActionProbability(OBS1, 1)
    got = float(eng.ntvar(P)[0])
    want = p**2 * (1 - p) ** 2
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("p", PS)
@pytest.mark.parametrize("delta", [2.0, 0.5])
def test_single_logit_ntcov_with_J(p, delta):
    eng = TangentEngine(single_logit(p), dtype=torch.float64)
    got = float(eng.ntcov(ActionProbability(OBS1, 1), bandit_J(delta))[0, 0])
    assert got == pytest.approx(delta * p**2 * (1 - p) ** 2, rel=1e-10)


@pytest.mark.parametrize("p", PS)
def test_single_logit_fisher_ntvar_is_bernoulli(p):
    eng = TangentEngine(single_logit(p), dtype=torch.float64)
    F = InverseFisher(eng, OBS1)
    got = float(eng.ntvar(ActionProbability(OBS1, 1), F)[0])
    assert got == pytest.approx(p * (1 - p), rel=1e-10)


@pytest.mark.parametrize("p", [1e-12, 1e-8, 1e-3, 0.5])
@pytest.mark.parametrize("kind", ["mlp", "tabular"])
def test_ntvar_equals_p2_1mp2_kappa(p, kind):
    pol = make_policy(kind, 1, 2, target=1, p0=p, reference_obs=OBS1, seed=3, width=16, depth=2)
    eng = TangentEngine(pol, dtype=torch.float64)
    P = ActionProbability(OBS1, 1)
    ntvar = float(eng.ntvar(P)[0])
    kappa = float(eng.kappa(OBS1, 1)[0])
    assert math.isfinite(ntvar) and ntvar > 0
    assert ntvar == pytest.approx(p**2 * (1 - p) ** 2 * kappa, rel=1e-10)
    # in the Fisher metric the network's κ cancels: NTVar_F⁻¹(p) = p(1 - p)
    fisher = float(eng.ntvar(P, InverseFisher(eng, OBS1))[0])
    assert fisher == pytest.approx(p * (1 - p), rel=1e-8)


def test_tabular_softmax_ntvar_closed_form():
    # ‖∇π_a‖² = π_a²(1 − 2π_a + ‖π‖²) for tabular logits (Θ = I)
    pol = make_policy("tabular", 1, 4, target=2, p0=0.03, reference_obs=OBS1)
    with torch.no_grad():
        pol.logits.add_(torch.tensor([[0.3, -0.2, 0.0, 0.5]], dtype=torch.float64))
    eng = TangentEngine(pol, dtype=torch.float64)
    pi = eng.view().probs(OBS1)[0]
    for a in range(4):
        got = float(eng.ntvar(ActionProbability(OBS1, a))[0])
        want = float(pi[a] ** 2 * (1 - 2 * pi[a] + (pi**2).sum()))
        assert got == pytest.approx(want, rel=1e-12)


def test_tiny_probability_is_finite_in_float64_even_from_float32_policy():
    pol = make_policy("mlp", 1, 2, target=1, p0=1e-12, reference_obs=OBS1, dtype=torch.float32, width=8)
    eng = TangentEngine(pol, dtype=torch.float64)
    s = eng.stats(ActionProbability(OBS1, 1), metrics={"euc": Euclidean(), "f": InverseFisher(eng, OBS1)})
    for v in [s.value, *s.ntvar.values()]:
        assert torch.isfinite(v).all() and (v > 0).all()


# ------------------------------------------------------------------ algebra on random networks
nets = st.fixed_dictionaries(
    {
        "width": st.integers(1, 12),
        "depth": st.integers(0, 3),
        "act": st.sampled_from(["tanh", "relu", "gelu", "softplus"]),
        "k": st.integers(2, 4),
        "n": st.integers(1, 5),
        "seed": st.integers(0, 10_000),
    }
)


def random_setup(d):
    torch.manual_seed(d["seed"])
    pol = MLPPolicy(3, d["k"], d["width"], d["depth"], d["act"], dtype=torch.float64)
    obs = torch.randn(d["n"], 3, dtype=torch.float64)
    eng = TangentEngine(pol, dtype=torch.float64)
    return pol, obs, eng


def close(a, b, tol=1e-9):
    scale = max(1.0, float(torch.as_tensor(b).abs().max()))
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max()) <= tol * scale


@settings(max_examples=25, deadline=None, derandomize=True)
@given(nets, st.floats(-3, 3), st.floats(-3, 3))
def test_bilinearity_and_symmetry(d, a, b):
    _, obs, eng = random_setup(d)
    X = ActionProbability(obs, 0)
    Y = LogOdds(obs, d["k"] - 1)
    Z = Property("Z", lambda v: v.log_probs(obs)[:, 1].exp().sum() + v.logits(obs)[:, 0].pow(2).mean())
    aXbY = Property("aXbY", lambda v: a * X(v) + b * Y(v))
    for metric in (Euclidean(), Diagonal(torch.rand(eng.n_params, dtype=torch.float64))):
        lhs = eng.ntcov(aXbY, Z, metric)
        rhs = a * eng.ntcov(X, Z, metric) + b * eng.ntcov(Y, Z, metric)
        assert close(lhs, rhs)
        assert close(eng.ntcov(X, Y, metric), eng.ntcov(Y, X, metric).T)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(nets)
def test_chain_rule(d):
    # NTCov(f(X), g(Y)) = f'(X) g'(Y) NTCov(X, Y) with f = log, g = tanh
    _, obs, eng = random_setup(d)
    X = ActionProbability(obs, 0)
    Y = LogOdds(obs, 1)
    fX = Property("fX", lambda v: torch.log(X(v)))
    gY = Property("gY", lambda v: torch.tanh(Y(v)))
    x, y = eng.evaluate(X), eng.evaluate(Y)
    want = (1 / x)[:, None] * (1 - torch.tanh(y) ** 2)[None, :] * eng.ntcov(X, Y)
    assert close(eng.ntcov(fX, gY), want)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(nets)
def test_product_rule_juice_identity(d):
    # NTCov(X, F·P) = F·NTCov(X, P) + P·NTCov(X, F)
    _, obs, eng = random_setup(d)
    Pp = Property("P", lambda v: v.probs(obs)[0, 0])
    Fp = Property("F", lambda v: v.probs(obs)[-1, 1])
    FP = Property("FP", lambda v: Pp(v) * Fp(v))
    F, P = eng.evaluate(Fp), eng.evaluate(Pp)
    assert close(eng.ntcov(Pp, FP), F * eng.ntcov(Pp, Pp) + P * eng.ntcov(Pp, Fp))


def test_ntcov_matrix_stacks_properties():
    _, obs, eng = random_setup({"width": 5, "depth": 1, "act": "tanh", "k": 3, "n": 4, "seed": 1})
    X, Y = ActionProbability(obs, 0), LogOdds(obs, 2)
    K = eng.ntcov_matrix([X, Y])
    assert K.shape == (8, 8)
    assert close(K[:4, 4:], eng.ntcov(X, Y))
    assert close(torch.diagonal(K)[:4], eng.ntvar(X))
    assert torch.linalg.eigvalsh(K).min() > -1e-10  # a Gram matrix is PSD


def test_fisher_cg_matches_exact_solve():
    torch.manual_seed(0)
    pol = MLPPolicy(3, 3, 8, 2, "tanh", dtype=torch.float64)
    obs = torch.randn(6, 3, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64)
    eng = TangentEngine(pol, dtype=torch.float64)
    V = torch.randn(3, eng.n_params, dtype=torch.float64)
    exact = InverseFisher(eng, obs, w / w.sum(), damping=1e-3, method="exact").apply(V)
    cg = InverseFisher(eng, obs, w / w.sum(), damping=1e-3, method="cg", cg_max_iter=500, cg_tol=1e-12).apply(V)
    assert torch.allclose(cg, exact, rtol=1e-6, atol=1e-8 * float(exact.abs().max()))


def test_fisher_pseudo_inverse_acts_as_inverse_on_its_range():
    torch.manual_seed(1)
    pol = MLPPolicy(2, 3, 4, 1, "tanh", dtype=torch.float64)
    obs = torch.randn(2, 2, dtype=torch.float64)
    eng = TangentEngine(pol, dtype=torch.float64)
    M = InverseFisher(eng, obs)
    _, J = eng.jacobian(lambda v: v.log_probs(obs))
    A = J * M.row_scale[:, None]
    F = A.T @ A
    u = A.T @ torch.randn(A.shape[0], dtype=torch.float64)  # a vector in range(F)
    assert torch.allclose(F @ M.apply(u[None])[0], u, rtol=1e-7, atol=1e-10)


def test_cg_requires_damping():
    pol = MLPPolicy(1, 2, 4, 1, "tanh", dtype=torch.float64)
    eng = TangentEngine(pol)
    with pytest.raises(ValueError, match="damping"):
        InverseFisher(eng, OBS1, method="cg")


@settings(max_examples=15, deadline=None, derandomize=True)
@given(nets)
def test_scalar_gradient_matches_the_jacrev_reference(d):
    _, obs, eng = random_setup(d)
    U = Property("U", lambda v: (v.log_probs(obs)[:, 0] * torch.arange(d["n"], dtype=torch.float64)).sum())
    value, g = eng.value_and_gradient(U)
    ref_value, J = eng.jacobian(U)
    assert value == pytest.approx(float(ref_value[0]), rel=1e-14)
    assert close(g, J[0], tol=1e-12)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(nets)
def test_dense_jacobian_matches_the_jacrev_reference(d):
    _, obs, eng = random_setup(d)
    X = ActionProbability(obs, 0)
    v1, J1 = eng.dense_jacobian(X)
    v2, J2 = eng.jacobian(X)
    assert close(v1, v2, tol=1e-14) and close(J1, J2, tol=1e-12)


def test_inverse_fisher_does_not_amplify_rounding_noise():
    """F⁺ (g + δ) ≈ F⁺ g for δ of relative size 1e-15, even where some states are visited with
    weight down to 1e-24 and some actions are nearly impossible (singular values of A over many
    decades): a natural-gradient step must not blow up on rounding noise."""
    torch.manual_seed(0)
    pol = MLPPolicy(3, 5, 32, 2, "tanh", dtype=torch.float64)
    with torch.no_grad():
        pol.net[-1].weight.mul_(8.0)  # sharp softmax: probabilities down to ~1e-20 in places
    obs = torch.randn(12, 3, dtype=torch.float64)
    eng = TangentEngine(pol, dtype=torch.float64)
    w = torch.logspace(0, -24, 12, dtype=torch.float64)
    M = InverseFisher(eng, obs, w / w.sum())
    _, J = eng.jacobian(lambda v: v.log_probs(obs))
    A = J * M.row_scale[:, None]
    g = A.T @ torch.randn(A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(g.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    step = M.apply(g[None])[0]
    noisy = M.apply((g + 1e-15 * g.norm() * noise / noise.norm())[None])[0]
    assert (noisy - step).norm() < 1e-6 * step.norm()


@pytest.mark.parametrize("shape", [(3, 6, 40), (2, 25, 300), (2, 9, 5)])
def test_householder_svd_applies_the_right_singular_vectors_it_never_forms(shape):
    """HouseholderSVD (the population's inverse Fisher) keeps Vh as reflectors: its S are
    right_singular's, and Vh v and Vhᵀ c, applied through the reflectors, are the products with
    right_singular's formed Vh, for batches of short, wide and tall matrices with singular values
    over 14 decades (the QR and the small SVD are the same; only Q's application differs)."""
    from ntrl.engine.metrics import HouseholderSVD, right_singular

    g = torch.Generator().manual_seed(sum(shape))
    M, m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(M, m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(M, n, k, generator=g, dtype=torch.float64))
    A = U @ torch.diag_embed(torch.logspace(0, -14, k, dtype=torch.float64).expand(M, k)) @ V.mT
    f = HouseholderSVD(A)
    S, Vh = right_singular(A)
    assert torch.allclose(f.S, S, rtol=1e-14, atol=0)
    X = torch.randn(M, n, 3, generator=g, dtype=torch.float64)
    C = torch.randn(M, k, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(f.project(X), Vh @ X, rtol=0, atol=1e-13 * float(X.abs().max()))
    assert torch.allclose(f.lift(C), Vh.mT @ C, rtol=0, atol=1e-13 * float(C.abs().max()))
    assert torch.allclose(f.project(f.lift(C)), C, rtol=0, atol=1e-13 * float(C.abs().max()))  # orthonormal rows


@pytest.mark.parametrize("shape", [(6, 40), (25, 300), (9, 5)])
def test_right_singular_matches_a_direct_svd(shape):
    """The QR route gives the singular values and the projector onto the row space that
    torch.linalg.svd gives, on a matrix with singular values over 14 decades."""
    from ntrl.engine.metrics import right_singular

    g = torch.Generator().manual_seed(sum(shape))
    m, n = shape
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -14, k, dtype=torch.float64)
    A = U @ torch.diag(s) @ V.T
    S, Vh = right_singular(A)
    S_ref, Vh_ref = torch.linalg.svd(A, full_matrices=False)[1:]
    assert torch.allclose(S, S_ref, rtol=0, atol=1e-14)
    keep = S_ref > 1e-10
    # Davis–Kahan: a backward-stable factorisation moves the kept subspace by about
    # eps·‖A‖ / gap, and the gap to the first dropped value is at least 7e-11 here (≤ 3e-6)
    proj, proj_ref = Vh[keep].T @ Vh[keep], Vh_ref[keep].T @ Vh_ref[keep]
    assert torch.allclose(proj, proj_ref, rtol=0, atol=1e-5)
    assert torch.allclose((A.T @ A) @ Vh.T, Vh.T * S**2, rtol=0, atol=1e-12)  # AᵀA v = S² v
