"""The structured tangent backend agrees with the torch.func reference, and falls back cleanly.

Agreement is checked in float64 at relative error 1e-10 with the scale each quantity has:
NTVar entry by entry (a sum of squares, no cancellation), ∇X_i·v against ‖∇X_i‖·‖v‖ and
K_ij against √(K_ii K_jj) (the Cauchy–Schwarz bounds of an inner product).
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from ntrl.agents.policies import ACTIVATIONS, MLPPolicy, SingleLogitPolicy, TabularSoftmaxPolicy
from ntrl.engine.metrics import Diagonal, Euclidean, InverseFisher, Metric
from ntrl.properties import ActionProbability, LogOdds, Property
from ntrl.engine.tangent import TangentEngine
from ntrl.engine.structured import PerState, StructuredUnsupported

TOL = 1e-10
SETTINGS = settings(max_examples=30, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
EXTRA_ACTS = {"sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


def assert_ntvar_close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    err = (a - b).abs()
    assert (err <= TOL * b.abs() + 1e-300).all(), f"max rel err {(err / b.abs().clamp_min(1e-300)).max():.3g}"


def assert_cov_close(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> None:
    assert a.shape == b.shape
    err = (a - b).abs()
    assert (err <= TOL * scale + 1e-300).all(), f"max scaled err {(err / scale.clamp_min(1e-300)).max():.3g}"


def build(data, kind: str) -> tuple[nn.Module, int]:
    """A random float64 network (MLPPolicy or plain, possibly nested, Sequential) and obs_dim."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    obs_dim = data.draw(st.integers(1, 4), label="obs_dim")
    n_actions = data.draw(st.integers(2, 4), label="n_actions")
    depth = data.draw(st.integers(0, 3), label="depth")
    width = data.draw(st.integers(1, 12), label="width")
    torch.manual_seed(seed)
    if kind == "mlp":
        act = data.draw(st.sampled_from(sorted(ACTIVATIONS)), label="activation")
        return MLPPolicy(obs_dim, n_actions, width, depth, act, dtype=torch.float64), obs_dim
    acts = {**{k: v for k, v in ACTIVATIONS.items()}, **EXTRA_ACTS}
    layers: list[nn.Module] = []
    d = obs_dim
    for i in range(depth):
        bias = data.draw(st.booleans(), label=f"bias{i}")
        act = data.draw(st.sampled_from(sorted(acts)), label=f"act{i}")
        layers += [nn.Sequential(nn.Linear(d, width, bias=bias, dtype=torch.float64)), acts[act]()]
        d = width
    layers.append(nn.Linear(d, n_actions, dtype=torch.float64))
    net = nn.Sequential(*layers)
    if data.draw(st.booleans(), label="freeze_first"):
        next(net.parameters()).requires_grad_(False)
    return net, obs_dim


def draw_property(data, obs: torch.Tensor, n_actions: int) -> Property:
    action = data.draw(st.integers(0, n_actions - 1), label="action")
    cls = data.draw(st.sampled_from([ActionProbability, LogOdds]), label="property")
    return cls(obs, action)


def engines(module: nn.Module) -> tuple[TangentEngine, TangentEngine]:
    return TangentEngine(module, backend="structured"), TangentEngine(module, backend="reference")


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["mlp", "sequential"]))
def test_stats_match_reference(data, kind):
    """NTVar (Euclidean and Diagonal) and NTCov with directions g and M·g, for all states."""
    module, obs_dim = build(data, kind)
    n = data.draw(st.integers(1, 40), label="n_states")
    obs = torch.randn(n, obs_dim, dtype=torch.float64) * 2
    n_actions = (module.n_actions if kind == "mlp" else module[-1].out_features)
    X = draw_property(data, obs, n_actions)
    s_eng, r_eng = engines(module)
    P = s_eng.n_params
    d = torch.rand(P, dtype=torch.float64) * 3
    d[torch.rand(P) < 0.2] = 0.0  # sign descent: d = 0 where g = 0
    g = torch.randn(P, dtype=torch.float64)
    metrics = {"euc": Euclidean(), "opt": Diagonal(d)}
    directions = {"g": g, "d": d * g}
    s = s_eng.stats(X, metrics, directions)
    r = r_eng.stats(X, metrics, directions)
    assert s.backend == "structured" and r.backend == "reference"
    assert torch.equal(s.value, r.value) or torch.allclose(s.value, r.value, rtol=1e-14, atol=0)
    for name in metrics:
        assert_ntvar_close(s.ntvar[name], r.ntvar[name])
    grad_norm = r.ntvar["euc"].sqrt()
    for name, v in directions.items():
        assert_cov_close(s.ntcov[name], r.ntcov[name], grad_norm * v.norm())
    assert_ntvar_close(s_eng.ntvar(X, Diagonal(d)), r_eng.ntvar(X, Diagonal(d)))


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["mlp", "sequential"]), diagonal=st.booleans())
def test_gram_matches_reference(data, kind, diagonal):
    """The full NTCov_M matrix of two stacked properties, in blocks that need not divide N."""
    module, obs_dim = build(data, kind)
    n = data.draw(st.integers(1, 25), label="n_states")
    n_actions = (module.n_actions if kind == "mlp" else module[-1].out_features)
    props = [draw_property(data, torch.randn(n, obs_dim, dtype=torch.float64), n_actions),
             draw_property(data, torch.randn(max(1, n // 2), obs_dim, dtype=torch.float64), n_actions)]
    s_eng, r_eng = engines(module)
    s_eng.gram_block = data.draw(st.integers(1, 9), label="block")
    metric = Diagonal(torch.rand(s_eng.n_params, dtype=torch.float64)) if diagonal else Euclidean()
    Ks, Kr = s_eng.ntcov_matrix(props, metric), r_eng.ntcov_matrix(props, metric)
    diag = Kr.diagonal().clamp_min(0)
    assert_cov_close(Ks, Kr, (diag[:, None] * diag[None, :]).sqrt())
    Cs, Cr = s_eng.ntcov(props[0], props[1], metric), r_eng.ntcov(props[0], props[1], metric)
    assert torch.allclose(Cs, Cr, rtol=0, atol=TOL * float(diag.max()) + 1e-300)


@SETTINGS
@given(n_states=st.integers(1, 5), n_actions=st.integers(2, 4), n=st.integers(1, 12),
       seed=st.integers(0, 1000), log_odds=st.booleans())
def test_tabular_and_single_logit_match_reference(n_states, n_actions, n, seed, log_odds):
    torch.manual_seed(seed)
    tab = TabularSoftmaxPolicy(n_states, n_actions)
    with torch.no_grad():
        tab.logits.normal_()
    single = SingleLogitPolicy(target=seed % 2)
    with torch.no_grad():
        single.bias.fill_(float(torch.randn(())))
    cases = [(tab, torch.randint(0, n_states, (n, 1)).to(torch.float64), n_actions),
             (single, torch.zeros(n, 1, dtype=torch.float64), 2)]
    for module, obs, k in cases:
        X = (LogOdds if log_odds else ActionProbability)(obs, seed % k)
        s_eng, r_eng = engines(module)
        d = torch.rand(s_eng.n_params, dtype=torch.float64)
        g = torch.randn(s_eng.n_params, dtype=torch.float64)
        metrics = {"euc": Euclidean(), "opt": Diagonal(d)}
        s, r = s_eng.stats(X, metrics, {"g": g}), r_eng.stats(X, metrics, {"g": g})
        assert s.backend == "structured"
        for name in metrics:
            assert_ntvar_close(s.ntvar[name], r.ntvar[name])
        assert_cov_close(s.ntcov["g"], r.ntcov["g"], r.ntvar["euc"].sqrt() * g.norm())
        for metric in metrics.values():
            s_eng.gram_block = 4
            Ks, Kr = s_eng.ntcov_matrix([X], metric), r_eng.ntcov_matrix([X], metric)
            diag = Kr.diagonal().clamp_min(0)
            assert_cov_close(Ks, Kr, (diag[:, None] * diag[None, :]).sqrt())


def test_kappa_uses_structured_backend():
    torch.manual_seed(0)
    policy = MLPPolicy(2, 3, width=8, depth=2, activation="gelu")
    obs = torch.randn(10, 2, dtype=torch.float64)
    s_eng, r_eng = engines(policy)
    assert_ntvar_close(s_eng.kappa(obs, 1), r_eng.kappa(obs, 1))


# ------------------------------------------------------------------------------ fallbacks
def small_mlp() -> tuple[MLPPolicy, torch.Tensor]:
    torch.manual_seed(1)
    return MLPPolicy(2, 2, width=6, depth=2), torch.randn(7, 2, dtype=torch.float64)


def test_non_per_state_property_falls_back(caplog):
    policy, obs = small_mlp()
    X = Property("mean_p", lambda v: v.probs(obs)[:, 1].mean())
    auto = TangentEngine(policy)
    with caplog.at_level(logging.DEBUG, logger="ntrl.engine.tangent"):
        s = auto.stats(X, {"euc": Euclidean()})
    assert s.backend == "reference"
    assert any("reference backend" in r.getMessage() and "per_state" in r.getMessage() for r in caplog.records)
    with pytest.raises(StructuredUnsupported, match="per_state"):
        TangentEngine(policy, backend="structured").stats(X)


def test_inverse_fisher_is_structured_when_exact_and_falls_back_for_cg():
    policy, obs = small_mlp()
    X = ActionProbability(obs, 1)
    auto = TangentEngine(policy)
    ref = TangentEngine(policy, backend="reference")
    g = torch.randn(auto.n_params, dtype=torch.float64)
    exact = InverseFisher(auto, obs)
    s = auto.stats(X, {"euc": Euclidean(), "fisher": exact}, {"g": g})
    r = ref.stats(X, {"euc": Euclidean(), "fisher": exact}, {"g": g})
    assert s.backend == "structured"  # the exact solve is low rank
    assert torch.allclose(s.ntvar["fisher"], r.ntvar["fisher"], rtol=1e-10)
    cg = InverseFisher(auto, obs, damping=1e-3, method="cg")  # CG has no factorisation: reference
    s = auto.stats(X, {"euc": Euclidean(), "fisher": cg}, {"g": g})
    assert s.backend == "reference"
    damped = InverseFisher(auto, obs, damping=1e-3, method="exact")  # an independent route
    assert torch.allclose(s.ntvar["fisher"], ref.stats(X, {"fisher": damped}).ntvar["fisher"], rtol=1e-6)
    with pytest.raises(StructuredUnsupported, match="neither Euclidean nor diagonal"):
        TangentEngine(policy, backend="structured").stats(X, {"fisher": cg})


def test_unsupported_module_falls_back():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 4, dtype=torch.float64), nn.LayerNorm(4, dtype=torch.float64),
                        nn.Linear(4, 2, dtype=torch.float64))
    X = ActionProbability(torch.randn(5, 2, dtype=torch.float64), 0)
    s = TangentEngine(net).stats(X)
    r = TangentEngine(net, backend="reference").stats(X)
    assert s.backend == "reference"
    assert torch.allclose(s.ntvar["euc"], r.ntvar["euc"])
    with pytest.raises(StructuredUnsupported, match="LayerNorm"):
        TangentEngine(net, backend="structured")


def test_reference_backend_option_and_bad_option():
    policy, obs = small_mlp()
    assert TangentEngine(policy, backend="reference").stats(ActionProbability(obs, 0)).backend == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        TangentEngine(policy, backend="fast")


def test_per_state_tuple_protocol():
    """Any callable with a ``per_state = (obs, fn_of_logits)`` attribute is per-state."""
    policy, obs = small_mlp()

    def X(view):
        return torch.log_softmax(view.logits(obs), -1)[:, 0]

    X.per_state = (obs, lambda z: torch.log_softmax(z, -1)[:, 0])
    s = TangentEngine(policy).stats(X)
    r = TangentEngine(policy, backend="reference").stats(X)
    assert s.backend == "structured"
    assert_ntvar_close(s.ntvar["euc"], r.ntvar["euc"])
    assert isinstance(ActionProbability(obs, 0).per_state, PerState)


@pytest.mark.parametrize("damping", [0.0, 1e-3])
def test_low_rank_inverse_fisher_matches_reference(damping):
    """The exact inverse-Fisher NTVar from r directional derivatives equals the Jacobian route."""
    from ntrl.engine.metrics import InverseFisher

    torch.manual_seed(3)
    pol = MLPPolicy(3, 4, 16, 2, "tanh", dtype=torch.float64)
    obs = torch.randn(7, 3, dtype=torch.float64)
    X = ActionProbability(obs, 2)
    ref = TangentEngine(pol, dtype=torch.float64, backend="reference")
    fast = TangentEngine(pol, dtype=torch.float64, backend="structured")
    M = InverseFisher(ref, obs[:3], damping=damping)
    a = ref.stats(X, metrics={"f": M})
    b = fast.stats(X, metrics={"f": M})
    assert b.backend == "structured" and a.backend == "reference"
    assert torch.allclose(b.ntvar["f"], a.ntvar["f"], rtol=1e-10, atol=0)


@contextlib.contextmanager
def count_calls(obj, method: str):
    """Count the calls of obj.method while active: yields a one-element list."""
    calls = [0]
    original = getattr(obj, method)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(obj, method, counted)
    try:
        yield calls
    finally:
        setattr(obj, method, original)


def assert_rows_close(Js: torch.Tensor, Jr: torch.Tensor) -> None:
    """Jacobian rows agree entry by entry relative to each row's norm."""
    assert Js.shape == Jr.shape
    scale = Jr.norm(dim=1, keepdim=True)
    assert ((Js - Jr).abs() <= TOL * scale + 1e-300).all()


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["mlp", "sequential"]))
def test_structured_jacobian_rows_match_jacrev(data, kind):
    """dense_jacobian of a per-state property assembles ∇X_i = δ_i a_iᵀ layer by layer (on the
    structured backend: checked), and the rows equal jacrev's."""
    module, obs_dim = build(data, kind)
    n = data.draw(st.integers(1, 20), label="n_states")
    obs = torch.randn(n, obs_dim, dtype=torch.float64)
    n_actions = (module.n_actions if kind == "mlp" else module[-1].out_features)
    X = draw_property(data, obs, n_actions)
    s_eng, r_eng = engines(module)
    with count_calls(s_eng.structured, "jacobian") as calls:
        vs, Js = s_eng.dense_jacobian(X)
    assert calls == [1]
    vr, Jr = r_eng.jacobian(X)
    assert torch.allclose(vs, vr, rtol=1e-14, atol=0)
    assert_rows_close(Js, Jr)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_structured_jacobian_rows_tabular_and_single_logit(seed):
    torch.manual_seed(seed)
    tab = TabularSoftmaxPolicy(4, 3)
    with torch.no_grad():
        tab.logits.normal_()
    single = SingleLogitPolicy(target=seed % 2)
    with torch.no_grad():
        single.bias.fill_(0.3 * seed - 0.2)
    for module, obs, k in [(tab, torch.randint(0, 4, (7, 1)).to(torch.float64), 3),
                           (single, torch.zeros(5, 1, dtype=torch.float64), 2)]:
        X = LogOdds(obs, seed % k)
        s_eng, r_eng = engines(module)
        with count_calls(s_eng.structured, "jacobian") as calls:
            _, Js = s_eng.dense_jacobian(X)
        _, Jr = r_eng.jacobian(X)
        assert calls == [1]
        assert_rows_close(Js, Jr)


def test_all_log_probs_rows_are_the_fisher_jacobian():
    """InverseFisher's rows (every log π(a|o)) come from one structured trace and equal jacrev's."""
    from ntrl.engine.metrics import AllLogProbs

    torch.manual_seed(3)
    policy = MLPPolicy(3, 4, width=6, depth=2, activation="tanh", dtype=torch.float64)
    obs = torch.randn(5, 3, dtype=torch.float64)
    s_eng, r_eng = engines(policy)
    X = AllLogProbs(obs, 4)
    with count_calls(s_eng.structured, "jacobian") as calls:
        vs, Js = s_eng.dense_jacobian(X)
    assert calls == [1]
    vr, Jr = r_eng.jacobian(lambda v: v.log_probs(obs))
    assert torch.allclose(vs, vr, rtol=1e-14, atol=0)
    assert_rows_close(Js, Jr)


def test_stats_many_returns_reverse_mode_rows_that_match_jacrev():
    """Properties that are not per-state take one reverse-mode pass per entry from a shared
    forward pass; their Jacobian rows come back in TangentStats.gradient."""
    torch.manual_seed(4)
    policy = MLPPolicy(2, 3, width=5, depth=1, activation="tanh", dtype=torch.float64)
    obs = torch.randn(4, 2, dtype=torch.float64)
    A = Property("A", lambda v: v.probs(obs)[:, 0].mean())
    B = Property("B", lambda v: v.log_probs(obs)[:2, 1])
    eng = TangentEngine(policy)
    sa, sb = eng.stats_many([A, B])
    assert sa.backend == sb.backend == "reference"
    for X, st_ in ((A, sa), (B, sb)):
        v, J = eng.jacobian(X)
        assert torch.allclose(st_.value, v, rtol=1e-14, atol=0)
        assert_rows_close(st_.gradient, J)
        assert torch.allclose(st_.ntvar["euc"], (J * J).sum(1), rtol=1e-12, atol=0)


@SETTINGS
@given(data=st.data(), kind=st.sampled_from(["mlp", "sequential", "tabular", "single_logit"]))
def test_ntcov_many_equals_ntcov_direction_by_direction(data, kind):
    """The batched directional derivatives (the low-rank inverse-Fisher path) equal r separate
    ∇X·v_k, for every module layout (linear, transposed tabular, bias-only single logit)."""
    seed = data.draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    n = data.draw(st.integers(1, 12), label="n_states")
    if kind in ("mlp", "sequential"):
        module, obs_dim = build(data, kind)
        obs = torch.randn(n, obs_dim, dtype=torch.float64)
        k = module.n_actions if kind == "mlp" else module[-1].out_features
    elif kind == "tabular":
        module, k = TabularSoftmaxPolicy(4, 3), 3
        with torch.no_grad():
            module.logits.normal_()
        obs = torch.randint(0, 4, (n, 1)).to(torch.float64)
    else:
        module, k = SingleLogitPolicy(target=seed % 2), 2
        obs = torch.zeros(n, 1, dtype=torch.float64)
    X = draw_property(data, obs, k)
    eng = TangentEngine(module, dtype=torch.float64, backend="structured")
    r = data.draw(st.integers(1, 5), label="r")
    V = torch.randn(r, eng.n_params, dtype=torch.float64)
    tr = eng._trace(eng._per_state(X, {}))
    many = eng.structured.ntcov_many(tr, eng.unflatten(V))
    one = torch.stack([eng.structured.ntcov(tr, eng.unflatten(v)) for v in V], dim=-1)
    scale = eng.ntvar(X).sqrt()[:, None] * V.norm(dim=1)[None, :]
    assert_cov_close(many, one, scale)


def test_structured_jacobian_fills_zeros_for_parameters_the_network_does_not_use():
    """An MLP policy with an extra parameter outside its net: the structured rows hold zeros there,
    as jacrev's do."""
    torch.manual_seed(5)
    policy = MLPPolicy(2, 3, width=4, depth=1, activation="tanh", dtype=torch.float64)
    policy.unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    obs = torch.randn(6, 2, dtype=torch.float64)
    s_eng, r_eng = engines(policy)
    X = ActionProbability(obs, 1)
    with count_calls(s_eng.structured, "jacobian") as calls:
        _, Js = s_eng.dense_jacobian(X)
    _, Jr = r_eng.jacobian(X)
    assert calls == [1] and "unused" in s_eng.names
    assert_rows_close(Js, Jr)
    assert torch.equal(s_eng.unflatten(Js[0])["unused"], torch.zeros(3, dtype=torch.float64))


def test_integer_observations_reach_the_fisher_rows_of_an_mlp():
    """Integer observations (a discrete env's state ids) are cast to the MLP's dtype on the
    structured path too, so the exact Fisher of an MLP on them works and matches the reference."""
    from ntrl.engine.metrics import InverseFisher

    torch.manual_seed(6)
    policy = MLPPolicy(1, 3, width=5, depth=1, activation="tanh", dtype=torch.float64)
    obs = torch.arange(4).reshape(4, 1)
    fast = InverseFisher(TangentEngine(policy), obs)
    ref = InverseFisher(TangentEngine(policy, backend="reference"), obs)
    V = torch.randn(2, fast.engine.n_params, dtype=torch.float64)
    assert torch.allclose(fast.apply(V), ref.apply(V), rtol=1e-9, atol=1e-9 * float(ref.apply(V).abs().max()))


def test_values_do_not_alias_parameters_that_a_step_overwrites():
    """A property that is a view of a parameter: the value stats return is X(θ) at query time,
    not a window onto the parameter that the optimizer's in-place step then changes."""
    policy = TabularSoftmaxPolicy(1, 2)
    X = Property("z1", lambda v: v.params["logits"][:, 1])
    eng = TangentEngine(policy)
    values = [eng.stats(X, {"euc": Euclidean()}).value, eng.evaluate(X), eng.jacobian(X)[0],
              eng.dense_jacobian(X)[0]]
    before = [v.clone() for v in values]
    with torch.no_grad():
        policy.logits.add_(1.0)
    for v, b in zip(values, before):
        assert torch.equal(v, b)


def test_verbose_announcements_once_per_property_backend_and_reason(caplog):
    """INFO lines say which backend answers: once per (property, backend, reason), again when
    the reason changes; every query is at DEBUG."""
    torch.manual_seed(7)
    policy = MLPPolicy(2, 3, width=4, depth=1, activation="tanh", dtype=torch.float64)
    obs = torch.randn(3, 2, dtype=torch.float64)
    eng = TangentEngine(policy)
    P = ActionProbability(obs, 0)
    Q = Property("Q", lambda v: v.probs(obs)[:, 1].mean())
    with caplog.at_level(logging.INFO, logger="ntrl.engine.tangent"):
        for _ in range(3):
            eng.stats_many([P, Q])
        for _ in range(2):  # two different reasons for the same property and backend
            eng.stats(P, {"m": InverseFisher(eng, obs, method="cg", damping=1e-3)})  # CG: no low-rank form
            eng.stats(P, {"m": Doubled()})
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info.count("tangent engine: structured backend for 'P'") == 1
    assert sum(m.startswith("tangent engine: reference backend for 'Q' (") for m in info) == 1
    for metric in ("InverseFisher", "Doubled"):
        assert sum(m.startswith("tangent engine: reference backend for 'P' (") and metric in m for m in info) == 1


class Doubled(Metric):
    """M = 2I, declared as a general (not diagonal) metric."""

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        return 2 * V
