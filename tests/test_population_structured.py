"""The structured population path (ntrl.engine.batched_structured) against the torch.func
reference and the batched engine, in float64; which populations take it; and the record writing
it relies on (record_lines, finite_rows, write_json_many_atomic).

Tolerances: the factored forms sum the same products in another order, so they agree with the
reference to a few ulps of the largest term; 1e-12 relative leaves three orders of magnitude. The
inverse Fisher's K-space form errs by eps·S_max like the per-run QR (module docstring), so its
NTVar and direction agree to 1e-12 relative where the kept singular values are well above the
drop threshold.
"""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from ntrl.agents.policies import make_policy
from ntrl.engine.batched import BatchedInverseFisher, StackedPolicy, log_prob_rows, member_gradients
from ntrl.engine.batched_structured import LogitInverseFisher, StackedSequential, TwoActionFisherNTVar, quad
from ntrl.engine.metrics import InverseFisher
from ntrl.engine.tangent import TangentEngine
from ntrl.experiments.bandit import BanditConfig
from ntrl.records import finite_rows, read_records, record_line, record_lines, write_json_atomic, write_json_many_atomic

F64 = torch.float64


def population(K: int, p0s=(0.3, 1e-3, 1e-8), activation: str = "tanh", width: int = 8):
    obs = torch.ones(1, 1, dtype=F64)
    policies = [make_policy("mlp", 1, K, 1, p0, obs, seed=s, width=width, activation=activation)
                for s, p0 in enumerate(p0s)]
    sp = StackedPolicy(policies[0])
    theta = torch.stack([sp.flatten(p) for p in policies])
    return obs, policies, sp, theta


def reference_jacobian(policy, obs, K: int) -> torch.Tensor:
    """∂z/∂θ of one member, (K, P), from the engine's torch.func reference (jacrev)."""
    engine = TangentEngine(policy, dtype=F64, backend="reference")
    rows = []
    for k in range(K):
        class Logit:
            name = f"z{k}"

            def __call__(self, view, k=k):
                return view.logits(obs)[0, k]
        rows.append(engine.jacobian(Logit())[1].reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("K, activation", [(2, "tanh"), (3, "tanh"), (2, "relu"), (6, "tanh")])
def test_factored_jacobian_agrees_with_the_torch_func_reference(K, activation):
    obs, policies, sp, theta = population(K, activation=activation)
    ss = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    jac = ss.jacobian(fwd)
    J = torch.stack([reference_jacobian(p, obs, K) for p in policies])  # (M, K, P)
    for m, p in enumerate(policies):  # logits near 0 are differences of O(1) terms (the bias shift to p₀)
        want = p(obs)[0].detach()
        assert torch.allclose(z[m], want, rtol=1e-13, atol=1e-13 * (1 + float(want.abs().max())))
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(3, K, dtype=F64, generator=gen)
    v = torch.randn(3, sp.n_params, dtype=F64, generator=gen)
    d = torch.rand(3, sp.n_params, dtype=F64, generator=gen)
    scale = torch.rand(3, dtype=F64, generator=gen)

    def close(a, b):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12 * float(b.abs().max())), (a, b)

    close(jac.gram, J @ J.mT)
    close(jac.gram_diagonal(d), (J * d[:, None]) @ J.mT)
    close(jac.dot(v), (J @ v[:, :, None])[:, :, 0])
    close(jac.materialize(c, sp.n_params), (J * c[:, :, None]).sum(1))
    stepped = theta.clone()
    jac.step_(stepped, c, scale)
    close(stepped - theta, scale[:, None] * (J * c[:, :, None]).sum(1))
    close(quad(c, jac.gram, c), ((J * c[:, :, None]).sum(1) ** 2).sum(1))
    # without its columns (an untracked SGD, sign or Adam step): Jᵀc and the step by the backward
    # pass of c alone; the Gram matrix and products with other vectors are refused, not guessed
    lean = ss.jacobian(fwd, columns=False)
    close(lean.materialize(c, sp.n_params), (J * c[:, :, None]).sum(1))
    stepped = theta.clone()
    lean.step_(stepped, c, scale)
    close(stepped - theta, scale[:, None] * (J * c[:, :, None]).sum(1))
    for product in (lambda: lean.gram, lambda: lean.dot(v), lambda: lean.gram_diagonal(d)):
        with pytest.raises(RuntimeError, match="without its columns"):
            product()


@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_logit_space_inverse_fisher_agrees_with_the_batched_and_per_run_fisher(K, damping):
    """NTVar and direction of the K-space (F + λI)⁻¹ / F⁺ against BatchedInverseFisher (the QR of
    the formed Fisher rows) and, per member, the per-run InverseFisher on the reference engine."""
    obs, policies, sp, theta = population(K)
    ss = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    jac = ss.jacobian(fwd)
    leaves = sp.leaves(theta)
    Z = sp.logits(leaves, obs)
    J = torch.stack(member_gradients([Z[:, 0, k] for k in range(K)], leaves), 1)  # (M, K, P)
    probs = torch.softmax(z, -1)
    lam = torch.full((3,), damping, dtype=F64)
    batched = BatchedInverseFisher.from_log_prob_rows(log_prob_rows(J[:, None], probs[:, None]),
                                                      torch.ones(3, 1, dtype=F64), probs[:, None], lam)
    fisher = LogitInverseFisher.from_jacobian(jac.gram, probs, torch.ones(3, dtype=F64), lam)
    c = torch.randn(3, K, dtype=F64, generator=torch.Generator().manual_seed(1))
    g = (J * c[:, :, None]).sum(1)
    assert torch.equal(fisher.keep, batched.keep)
    assert torch.allclose(fisher.ntvar(c), batched.ntvar(g), rtol=1e-12, atol=0)
    direction = (J * fisher.apply(c)[:, :, None]).sum(1)
    want = batched.apply(g)
    assert torch.allclose(direction, want, rtol=0, atol=1e-12 * float(want.abs().max()))
    if damping == 0:
        for m, policy in enumerate(policies):
            ref = InverseFisher(TangentEngine(policy, dtype=F64, backend="reference"), obs, torch.ones(1, dtype=F64))
            assert float(fisher.ntvar(c)[m]) == pytest.approx(float(g[m] @ ref.apply(g[m][None])[0]), rel=1e-10)


def test_fisher_ntvar_of_p_is_p_times_one_minus_p_down_to_1e_minus_12():
    """SCIENCE.md §1: NTVar_F(P) = p(1 − p) for the two-armed bandit, at every p, here via the
    K-space Fisher with ∇P = Jᵀ c_P, c_P = p(1 − p)(−1, 1)."""
    obs, policies, sp, theta = population(2, p0s=(0.3, 1e-6, 1e-12))
    ss = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    jac = ss.jacobian(fwd)
    logp = torch.log_softmax(z, -1)
    p, q = logp[:, 1].exp(), logp[:, 0].exp()
    c = (p * q)[:, None] * torch.tensor([-1.0, 1.0], dtype=F64)
    fisher = LogitInverseFisher.from_jacobian(jac.gram, logp.exp(), torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64))
    assert torch.allclose(fisher.ntvar(c), p * q, rtol=1e-9, atol=0)
    assert torch.isfinite(fisher.ntvar(c)).all()


@pytest.mark.parametrize("p0s", [(0.3, 0.5, 0.9), (1e-6, 1e-12, 1 - 1e-9)])
def test_the_two_action_fisher_ntvar_is_the_logit_space_inverse_fishers(p0s):
    """A tracked two-action update takes NTVar_F from TwoActionFisherNTVar's closed form, not the
    K-space SVD: the same numbers (to 1e-12, rounding apart) for softmax cotangents (c ⟂ 1, those
    of P, R, U) and any other c, p down to 1e-12; NaN where the SVD's member gets NaN weights (G
    not finite, not positive definite), 0 where π underflows to 0 (nothing kept)."""
    obs, policies, sp, theta = population(2, p0s=p0s)
    ss = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    G = ss.jacobian(fwd).gram
    probs = torch.softmax(z, -1)
    w = torch.tensor([1.0, 0.5, 2.0], dtype=F64)
    svd = LogitInverseFisher.from_jacobian(G, probs, w, torch.zeros(3, dtype=F64))
    closed = TwoActionFisherNTVar.from_jacobian(G, probs, w)
    gen = torch.Generator().manual_seed(3)
    pq = (probs[:, 0] * probs[:, 1])[:, None]
    for c in (pq * torch.tensor([-1.0, 1.0], dtype=F64), torch.randn(3, 2, dtype=F64, generator=gen),
              torch.randn(3, 2, dtype=F64, generator=gen) * pq):
        assert torch.allclose(closed.ntvar(c), svd.ntvar(c), rtol=1e-12, atol=0)
    assert torch.allclose(closed.ntvar(pq * torch.tensor([-1.0, 1.0], dtype=F64)), pq[:, 0] / w, rtol=1e-9, atol=0)  # p(1 − p)/w
    bad = G.clone()
    bad[1, 0, 0] = math.nan
    bad[2] = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # not positive definite
    for fisher in (TwoActionFisherNTVar.from_jacobian(bad, probs, w),
                   LogitInverseFisher.from_jacobian(bad, probs, w, torch.zeros(3, dtype=F64))):
        out = fisher.ntvar(torch.ones(3, 2, dtype=F64))
        assert torch.isfinite(out[0]) and torch.isnan(out[1:]).all()
    zero = torch.tensor([[1.0, 0.0]] * 3, dtype=F64)
    for fisher in (TwoActionFisherNTVar.from_jacobian(G, zero, w),
                   LogitInverseFisher.from_jacobian(G, zero, w, torch.zeros(3, dtype=F64))):
        assert torch.equal(fisher.ntvar(torch.ones(3, 2, dtype=F64)), torch.zeros(3, dtype=F64))


def test_a_non_finite_member_gets_nan_not_an_error():
    obs, policies, sp, theta = population(2)
    ss = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    G = ss.jacobian(fwd).gram.clone()
    G[1, 0, 0] = math.nan
    fisher = LogitInverseFisher.from_jacobian(G, torch.softmax(z, -1), torch.ones(3, dtype=F64), torch.zeros(3, dtype=F64))
    out = fisher.ntvar(torch.ones(3, 2, dtype=F64))
    assert torch.isfinite(out[[0, 2]]).all() and torch.isnan(out[1])


def test_the_finite_gradient_test_is_jtc_tested_entry_by_entry():
    """finite_gradient(c) is whether every entry of Jᵀc is finite, per member: for cotangents from
    ordinary to overflowing (finite factors whose product is not), with ±inf and NaN, on its fast
    path (every factor at most 1e150) and off it (one member's large factors send all members the
    layer-by-layer way), against Jᵀc formed in full."""
    obs, policies, sp, theta = population(2)
    ss = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    seen = set()
    for (scales, big_input), columns in itertools.product((
            ([1.0, 1.0, 1.0], 1.0), ([1.0, 1e140, 1.0], 1.0), ([1.0, 1e160, 1.0], 1.0),
            ([1e300, 1.0, 1e149], 1.0), ([math.inf, 1.0, 1.0], 1.0), ([1.0, math.nan, 1.0], 1.0),
            ([1e308, 1e308, 1.0], 1.0), ([1e220, 1.0, 1e100], 1e100)), (True, False)):
        jac = ss.jacobian(fwd, columns)
        jac.inputs = [jac.inputs[0] * big_input, *jac.inputs[1:]]  # an input of 1e100: products of finite factors overflow
        c = torch.tensor([[1.0, -1.0]] * 3, dtype=F64) * torch.tensor(scales, dtype=F64)[:, None]
        want = torch.isfinite(jac.materialize(c, sp.n_params)).all(1)
        got = jac.finite_gradient(c)
        assert got.tolist() == want.tolist(), (scales, columns)
        bad = jac.nonfinite_members(c)  # None only where every member passes, else the same answer
        assert (bad is None and all(want.tolist())) or (~bad).tolist() == want.tolist(), (scales, columns)
        seen.add(tuple(want.tolist()))
    assert (True, True, True) in seen and len(seen) >= 3  # both answers, on both paths


def test_which_populations_take_the_structured_path(tmp_path):
    """Exact bandit MLPs take the factored Jacobian, single-logit and one-state tabular policies
    (exact or sampled) the selection (so the per-run equality tests of tests/test_population.py
    cover both); sampled MLPs, escort policies and the K-armed bandit's escort keep the batched engine
    (covered there too)."""
    from ntrl.experiments.kbandit import KBanditConfig
    from ntrl.population.trainer import _Population

    def path(config=BanditConfig, **kw):
        cfgs = [config(width=8, seed=i, out=str(tmp_path), run_name=f"m{i}", **kw) for i in range(2)]
        pop = _Population(cfgs, torch.device("cpu"))
        return "structured" if pop.structured is not None else "selection" if pop.selection is not None else "batched"

    assert path(policy="mlp", mode="exact") == "structured"
    assert path(policy="mlp", mode="sampled") == "batched"
    assert path(policy="escort", mode="exact") == "batched"
    for mode in ("exact", "sampled"):
        assert path(policy="tabular", mode=mode) == "selection"
        assert path(policy="single_logit", mode=mode) == "selection"
    well = dict(rewards=[1.0, 0.9, 0.0], start=[0.01, 0.94, 0.05])
    assert path(KBanditConfig, policy="tabular", mode="exact", **well) == "selection"
    assert path(KBanditConfig, policy="escort", mode="exact", **well) == "batched"


@pytest.mark.parametrize("policy, K, target", [("single_logit", 2, 1), ("single_logit", 2, 0), ("tabular", 2, 1),
                                               ("tabular", 5, 3)])
def test_selected_logits_and_gradients_are_autograds_bit_for_bit(policy, K, target):
    """z = Jθ and Jᵀc of the selection, against each member's own forward and autograd's backward
    through it: equal exactly (a selection does no arithmetic)."""
    from ntrl.engine.batched_structured import LogitSelection

    obs = torch.ones(1, 1, dtype=F64)
    policies = [make_policy(policy, 1, K, target, p0, obs, seed=0) for p0 in (0.3, 1e-3, 1e-12)]
    sp = StackedPolicy(policies[0])
    sel = LogitSelection.plan(policies[0], sp.names)
    theta = torch.stack([sp.flatten(p) for p in policies])
    c = torch.randn(len(policies), K, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sel.logits(theta), torch.cat([p(obs) for p in policies]).detach())
    for m, p in enumerate(policies):
        p.zero_grad()
        (p(obs)[0] * c[m]).sum().backward()
        assert torch.equal(sel.gradient(c)[m], torch.cat([q.grad.reshape(-1) for q in p.parameters()]))
    two_states = make_policy("tabular", 1, K, target, 0.1, torch.tensor([[0.0], [1.0]], dtype=F64), seed=0, n_states=2)
    assert LogitSelection.plan(two_states, StackedPolicy(two_states).names) is None


def test_record_lines_are_record_line_character_for_character():
    fields = {"update": 7, "lr": [0.1, 1e-300], "U": [1.5, -2.0], "P/value": [1e-12, 0.25],
              "kappa": [[1.0, 2.5e-7], [3.0, 4.0]], "backend": "population", "P/first_order": [True, False],
              "P/probe_lr": [[0.2, 0.1], [0.4, 0.2]], "odd": [None, 3]}
    lines = record_lines(fields, [0, 1])
    for row, line in enumerate(lines):
        record = {k: (v[row] if isinstance(v, list) else v) for k, v in fields.items()}
        assert line == record_line(record)
        assert json.loads(line) == record
    assert record_lines(fields, [1]) == lines[1:]


def test_record_lines_of_numpy_columns_are_record_line_character_for_character():
    """The population's fields are numpy arrays (record_fields): one orjson call per column,
    split per member. Rows in any order and any subset, floats of every magnitude, 2-D rows (the
    η-probe's, κ of several log-odds), empty rows, booleans, keys that need escaping."""
    rng = np.random.default_rng(0)
    M = 7
    floats = rng.standard_normal(M) * 10.0 ** rng.integers(-300, 300, M)
    floats[:3] = [5e-324, -0.0, 1e16]
    fields = {"update": 12, "lr": np.full(M, 0.1), "P/value": floats, "kappa": rng.random((M, 3)) * 1e-9,
              "empty": np.zeros((M, 0)), "P/first_order": rng.random(M) < 0.5, "backend": "population",
              'odd "key" %s\\': np.arange(M, dtype=np.float64), "one": np.ones((M, 1)), "listed": [[1.5]] * M,
              "label": np.array([f"m{i}, with a comma" for i in range(M)])}
    for rows in ([0, 1, 2, 3, 4, 5, 6], [6, 2], [3]):
        lines = record_lines(fields, rows)
        assert len(lines) == len(rows)
        for row, line in zip(rows, lines):
            record = {k: (v[row].tolist() if isinstance(v, np.ndarray) else v[row] if isinstance(v, list) else v)
                      for k, v in fields.items()}
            assert line == record_line(record)
            assert json.loads(line) == record  # every float reads back as itself
    assert record_lines(fields, []) == []


def test_finite_rows_finds_every_non_finite_number():
    fields = {"update": 3, "a": [1.0, math.nan, 2.0, 3.0], "b": [[1.0], [2.0], [math.inf], [4.0]],
              "flag": [True, False, True, True], "c": [0.0, 1.0, 2.0, -math.inf]}
    assert finite_rows(fields, 4) == [True, False, False, False]
    as_arrays = {k: np.asarray(v) if isinstance(v, list) else v for k, v in fields.items()}
    assert finite_rows(as_arrays, 4) == [True, False, False, False]
    assert finite_rows({"a": np.ones((4, 0)), "b": np.array([1.0, 2.0, 3.0, math.nan])}, 4) == [True, True, True, False]
    # None is no number (record_line writes null): never non-finite, but where it reads as NaN the
    # row is left to the caller's own look (append_records then writes it with record_line)
    assert finite_rows({"a": [1.0, 2.0], "x": [None, 1.0]}, 2) == [True, True]
    assert finite_rows({"a": [1.0, 2.0], "x": [1.0, None]}, 2) == [True, False]
    assert finite_rows({"a": [1.0, 2.0], "x": np.array(["a", "b"])}, 2) == [False, False]


def test_write_json_many_atomic_writes_what_write_json_atomic_writes(tmp_path):
    objs = [{"a": 1, "b": [1.5, math.nan]}, {"status": "finished", "p": 1e-12}]
    write_json_many_atomic([(tmp_path / f"many{i}.json", o) for i, o in enumerate(objs)])
    for i, o in enumerate(objs):
        write_json_atomic(tmp_path / f"one{i}.json", o)
        assert (tmp_path / f"many{i}.json").read_bytes() == (tmp_path / f"one{i}.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many0.json", "many1.json", "one0.json", "one1.json"]


def test_write_json_many_atomic_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A failure while writing leaves the existing files as they were and no temporary file."""
    import ntrl.records as records

    (tmp_path / "a.json").write_text("old\n")

    def fail(paths):
        raise OSError("disk full")

    monkeypatch.setattr(records, "sync_file_systems", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json_many_atomic([(tmp_path / "a.json", {"x": 1}), (tmp_path / "b.json", {"y": 2})])
    assert (tmp_path / "a.json").read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_members_finishing_together_keep_all_their_records(tmp_path):
    """64 exact MLP members stop at the same update and are finished as one batch: each has its
    records (every tracked update) and a summary whose Price check reads them."""
    from ntrl.population import train_population

    cfgs = [BanditConfig(policy="mlp", width=8, p0=0.01, lr=0.1, steps=30, seed=i, track_every=3, wandb="disabled",
                         out=str(tmp_path), run_name=f"m{i}") for i in range(64)]
    pop = train_population(cfgs, progress=False)
    assert not pop.failures
    for r in pop.results:
        recs = read_records(r.run_dir)
        assert [x["update"] for x in recs] == list(range(0, 30, 3))
        assert r.summary["status"] == "finished" and r.summary["price_check_P"]["n"] == 10
        assert json.loads((r.run_dir / "summary.json").read_text())["updates"] == 30


def test_price_checks_from_kept_values_equal_those_read_back(tmp_path, monkeypatch):
    """Finishing members reads their Price check inputs from what the population kept in memory;
    with nothing kept (KEPT_ROWS = 0: a population past its limit) it reads their records back.
    The summaries are the same, η-probe and W&B curve included."""
    import ntrl.population.trainer as trainer
    from ntrl.population import train_population

    def run(out):
        cfgs = [BanditConfig(policy=policy, width=8, p0=0.01, lr=lr, steps=40, seed=i, track_every=3,
                             price_scales=[1.0, 0.5], wandb="disabled", out=str(out), run_name=f"m{i}")
                for i, (policy, lr) in enumerate([("mlp", 0.1), ("mlp", 0.5)])]
        pop = train_population(cfgs, progress=False)
        return [json.loads((r.run_dir / "summary.json").read_text()) for r in pop.results]

    kept = run(tmp_path / "kept")
    monkeypatch.setattr(trainer, "KEPT_ROWS", 0)
    read_back = run(tmp_path / "read")
    for a, b in zip(kept, read_back):
        assert a["price_check_P"] == b["price_check_P"] and "first_order_lr" in a["price_check_P"]


def test_a_sequential_that_ends_in_an_activation():
    """Δ at the last Linear layer is then σ'(y), not the identity: the Jacobian still agrees with
    autograd's, member by member."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Softplus()).double()
    sp = StackedPolicy(net)
    nets = [net]
    for _ in range(2):
        other = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2), torch.nn.Softplus()).double()
        nets.append(other)
    theta = torch.stack([sp.flatten(n) for n in nets])
    obs = torch.randn(1, 3, dtype=F64)
    ss = StackedSequential.plan(net, sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    jac = ss.jacobian(fwd)
    c = torch.randn(3, 2, dtype=F64)
    for m, n in enumerate(nets):
        n.zero_grad()
        (n(obs)[0] * c[m]).sum().backward()
        want = torch.cat([p.grad.reshape(-1) for p in n.parameters()])
        assert torch.allclose(jac.materialize(c, sp.n_params)[m], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "npg", "sign", "adam"])
def test_a_members_records_do_not_depend_on_who_else_is_in_its_population(tmp_path, optimizer):
    """Byte for byte, whatever the population's size: a resumed study re-chunks the runs a kill
    left unfinished, and its verdicts must be the uninterrupted study's (test_safety_processes).
    BLAS sums a one-member matrix-vector product (gemv) in another order than a batch (gemm);
    width 64 is where they first differed."""
    from ntrl.population import train_population

    def records(out, seeds):
        cfgs = [BanditConfig(policy="mlp", optimizer=optimizer, p0=0.01, lr=0.1 if optimizer in ("sgd", "npg") else 1e-3,
                             steps=30, seed=s, width=64, track_every=3, price_scales=[1.0, 0.5], wandb="disabled", out=str(out),
                             run_name=f"s{s}", **({"npg_damping": 0.1 * (s % 2)} if optimizer == "npg" else {}))
                for s in seeds]
        train_population(cfgs, progress=False)
        return (out / "s3" / "records.jsonl").read_text()

    alone = records(tmp_path / "one", [3])
    assert records(tmp_path / "two", [3, 4]) == alone
    assert records(tmp_path / "five", [0, 1, 2, 3, 4]) == alone


@pytest.mark.parametrize("optimizer", ["sgd", "npg", "adam"])
def test_a_huge_but_finite_gradient_ends_the_member_as_its_single_run_ends(tmp_path, optimizer):
    """lr = reward = 1e200: every entry of g is finite, ‖g‖² is not. The single run tests g entry by
    entry, takes the step and stops on the non-finite record; so must the member (a test of ‖g‖²
    stopped it one update earlier, with another status line)."""
    from ntrl.population import train_population
    from ntrl.train import train

    def cfg(out, i, big):
        return BanditConfig(policy="mlp", optimizer=optimizer, p0=0.01, lr=1e200 if big else 0.01, steps=5,
                            reward_do=1e200 if big else 1.0, track_every=1, width=8, wandb="disabled", out=str(out),
                            run_name=f"m{i}")

    with pytest.raises(Exception, match="non-finite"):
        train(cfg(tmp_path / "per", 1, True), progress=False)
    single = json.loads((tmp_path / "per" / "m1" / "summary.json").read_text())
    pop = train_population([cfg(tmp_path / "pop", i, i == 1) for i in range(3)], progress=False)
    member = pop.results[1].summary
    assert (member["status"], member["updates"]) == (single["status"], single["updates"]) == ("failed", 1)
    assert [i for i, _, _ in pop.failures] == [1]
    assert pop.failures[0][2].split(" became")[0] == str(single.get("error", member["error"])).split(" became")[0]
    assert [pop.results[i].summary["status"] for i in (0, 2)] == ["finished", "finished"]


def test_finishing_members_syncs_their_records_where_syncfs_is_missing(tmp_path, monkeypatch):
    """Without syncfs (not Linux, or it failed), each summary's temporary file and each member's
    records.jsonl are fsynced before any summary is renamed into place."""
    import os

    import ntrl.records as records
    from ntrl.population import train_population

    monkeypatch.setattr(records.sys, "platform", "darwin")
    synced, renamed_early = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        if str(dst).endswith("summary.json") and not any(p.endswith("records.jsonl") for p in synced):
            renamed_early.append(dst)
        real_replace(src, dst)

    monkeypatch.setattr(records.os, "fsync", fsync)
    monkeypatch.setattr(records.os, "replace", replace)
    cfgs = [BanditConfig(policy="mlp", width=8, steps=6, seed=i, track_every=2, wandb="disabled", out=str(tmp_path),
                         run_name=f"m{i}") for i in range(3)]
    train_population(cfgs, progress=False)
    assert not renamed_early
    assert {p for p in synced if p.endswith("records.jsonl")} == {str(tmp_path / f"m{i}" / "records.jsonl") for i in range(3)}


def test_the_stop_watch_asks_stopping_about_every_member_that_stopping_would_change():
    """StopWatch leaves out a member only where stopping() would return None and change nothing:
    against calling stopping() for every member at every update, in 300 seeded random populations
    (NaN, P equal to its start or its least value, mixed thresholds, members removed as they stop),
    the same members stop, at the same updates, with the same state."""
    import copy
    import random
    from types import SimpleNamespace

    from ntrl.population.trainer import StopWatch, stopping

    rng = random.Random(1)

    def member():
        p0 = rng.random()
        config = SimpleNamespace(stop_at_p=rng.choice([None, 0.5, 0.9]), stop_below_p=rng.choice([None, 0.05, 0.2]),
                                 steps=rng.randint(5, 60))
        return SimpleNamespace(config=config, p_start=p0, p_min=p0, p_min_at=0, p_back_at=None, crossed=None)

    for _ in range(300):
        every = [member() for _ in range(rng.randint(1, 12))]
        watched = copy.deepcopy(every)
        alive, watch, t = list(range(len(every))), StopWatch(watched), 0
        while alive:
            p = [rng.choice([rng.random(), 0.3 * rng.random(), math.nan, every[i].p_start, every[i].p_min]) for i in alive]
            want = {row: s for row, i in enumerate(alive) if (s := stopping(every[i], p[row], t)) is not None}
            got = {}
            for row in watch.rows_to_check(p, t):
                s = stopping(watched[alive[row]], p[row], t)
                watch.refresh(row, watched[alive[row]])
                if s is not None:
                    got[row] = s
            assert repr(got) == repr(want), t
            keep = [r for r in range(len(alive)) if r not in want]
            alive = [alive[r] for r in keep]
            watch.select(keep)
            t += 1
        for a, b in zip(every, watched):
            assert repr((a.p_min, a.p_min_at, a.p_back_at, a.crossed)) == repr((b.p_min, b.p_min_at, b.p_back_at, b.crossed))


@pytest.mark.parametrize("K", [2, 3, 5])
def test_the_bandits_closed_form_cotangents_are_autograds_bit_for_bit(K):
    """An exact bandit update takes its cotangents c_X = ∂X/∂z (U; tracked, also P, R and the
    log-odds z) from BanditModel.cotangents instead of reverse passes: they must be what the
    reverse passes give, exactly, for every target action, from logits of every size (at scale 30,
    p reaches 1e-20 and below; at 300, π underflows to 0)."""
    from ntrl.population.models import BanditModel

    gen = torch.Generator().manual_seed(K)
    for target in range(K):
        for scale in (0.1, 3.0, 30.0, 300.0):
            Z = (torch.randn(16, 1, K, dtype=F64, generator=gen) * scale).requires_grad_(True)
            model = BanditModel(torch.randn(16, K, dtype=F64, generator=gen).numpy(), torch.zeros(16).numpy(),
                                target, torch.device("cpu"))
            with torch.enable_grad():
                q = model.quantities(Z)
            want = [torch.autograd.grad(x.sum(), Z, retain_graph=True)[0][:, 0]
                    for x in (q["U"], q["P"], q["R"], q["z"][:, 0])]
            got = model.cotangents(q, tracked=True)
            assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, want))
            assert len(model.cotangents(q, tracked=False)) == 1 and torch.equal(model.cotangents(q, False)[0], want[0])
            # the η-probe's P of many rows at once, and the forward without z, are the same numbers
            assert torch.equal(model.probability(Z.detach()), q["P"].detach())
            lean = model.quantities(Z.detach(), with_z=False)
            assert "z" not in lean and all(torch.equal(lean[k], q[k].detach()) for k in lean)


def test_queued_records_survive_a_ctrl_c_while_they_are_delivered(tmp_path):
    """PendingRecords.format: a Ctrl-C that lands after a line is appended (before the loop has
    counted it) finishes delivering that update and then is raised; no line is lost or doubled, each
    member's kept Price-check values stay one per line, and what is still queued is formatted next."""
    from ntrl.population.trainer import MemberState, PendingRecords

    class Interrupting(list):
        armed = True

        def append(self, item):
            super().append(item)
            if Interrupting.armed:
                Interrupting.armed = False
                raise KeyboardInterrupt

    members = [MemberState(BanditConfig(run_name=f"m{i}", out=str(tmp_path)), tmp_path / f"m{i}") for i in range(3)]
    members[1].lines = Interrupting()
    pending = PendingRecords(members)
    for t in range(3):
        fields = {"update": t, "lr": np.full(3, 0.1), "P/value": np.array([0.1, 0.2, 0.3]) * (t + 1),
                  "P/pred_delta": np.full(3, 1e-3), "P/real_delta": np.full(3, 2e-3)}
        pending.add(members, fields, [0, 1, 2])
    with pytest.raises(KeyboardInterrupt):
        pending.format()
    assert len(pending.blocks) == 2  # the interrupted update is delivered; the later ones stay queued
    pending.format()
    assert not pending.blocks
    for i, st in enumerate(members):
        records = [json.loads(line) for line in st.lines]
        assert [r["update"] for r in records] == [0, 1, 2]
        assert [r["P/value"] for r in records] == [[0.1, 0.2, 0.3][i] * (t + 1) for t in range(3)]
        assert [k[0] for k in st.kept] == [0, 1, 2] and st.n_records == 3


@pytest.mark.parametrize("optimizer", ["adam", "sign"])
def test_an_overflowing_gradient_ends_an_adam_or_sign_member_as_its_single_run_ends(tmp_path, optimizer):
    """reward = 1e308: some entries of g = Jᵀc_U overflow. Adam and sign descent form g in full,
    and the member's test reads it there: it must stop the member where, and as, its single run
    stops, the other members untouched."""
    from ntrl.population import train_population
    from ntrl.train import train

    def cfg(out, i, big):
        return BanditConfig(policy="mlp", optimizer=optimizer, p0=0.01, lr=0.01, steps=5,
                            reward_do=1e308 if big else 1.0, reward_dont=-1e308 if big else 0.0, track_every=1,
                            width=8, wandb="disabled", out=str(out), run_name=f"m{i}")

    with pytest.raises(Exception, match="non-finite"):
        train(cfg(tmp_path / "per", 1, True), progress=False)
    single = json.loads((tmp_path / "per" / "m1" / "summary.json").read_text())
    pop = train_population([cfg(tmp_path / "pop", i, i == 1) for i in range(3)], progress=False)
    member = pop.results[1].summary
    assert (member["status"], member["updates"]) == (single["status"], single["updates"])
    assert member["status"] == "failed" and "gradient" in member["error"]
    assert [pop.results[i].summary["status"] for i in (0, 2)] == ["finished", "finished"]
    assert [len(read_records(pop.results[i].run_dir)) for i in (0, 1, 2)] == [5, member["updates"], 5]


def test_a_sequential_that_begins_with_an_activation():
    """An activation before the first Linear layer holds no parameter: the backward passes stop
    at that layer (they had multiplied by its derivative, of the input's shape, and crashed), and
    the Jacobian, with or without its columns, agrees with autograd's, member by member."""
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
            for _ in range(3)]
    sp = StackedPolicy(nets[0])
    theta = torch.stack([sp.flatten(n) for n in nets])
    obs = torch.randn(1, 3, dtype=F64)
    ss = StackedSequential.plan(nets[0], sp.names, sp.sizes)
    z, fwd = ss.forward(theta, obs)
    c = torch.randn(3, 2, dtype=F64)
    for columns in (True, False):
        jac = ss.jacobian(fwd, columns)
        for m, n in enumerate(nets):
            n.zero_grad()
            (n(obs)[0] * c[m]).sum().backward()
            want = torch.cat([p.grad.reshape(-1) for p in n.parameters()])
            assert torch.allclose(jac.materialize(c, sp.n_params)[m], want, rtol=1e-12, atol=1e-14)


def test_the_structured_updates_kept_views_and_buffers_change_no_number():
    """The structured update keeps, between calls, θ's layer views, the encoded observation and
    row_times' padded rows, and steps Adam and sign descent in place. Each must give the bytes of
    what it replaced: a stale view or buffer (θ replaced, members dropped, a new shape) would be a
    wrong number, not an error."""
    from ntrl.engine.batched_structured import row_times
    from ntrl.population.optimizers import BatchedOptimizer

    gen = torch.Generator().manual_seed(1)
    pads: dict = {}
    for M, n, m in ((5, 64, 64), (30, 64, 64), (5, 64, 64), (4, 9, 3), (5, 64, 64)):  # kept rows, shapes changing
        x = torch.randn(M, n, dtype=F64, generator=gen)
        A = torch.randn(M, n, m, dtype=F64, generator=gen)
        assert torch.equal(row_times(x, A, pads), row_times(x, A))

    obs, _, sp, theta = population(3, width=16)
    ss = StackedSequential.plan(sp.module, sp.names, sp.sizes)

    def fresh(t):  # a StackedSequential that has kept nothing yet
        return StackedSequential.plan(sp.module, sp.names, sp.sizes).forward(t, obs)[0]

    assert torch.equal(ss.forward(theta, obs)[0], fresh(theta))
    theta.mul_(1.5)  # stepped in place: the kept views see it
    assert torch.equal(ss.forward(theta, obs)[0], fresh(theta))
    other = theta.flip(0).contiguous()  # another θ (Adam's out-of-place step, or select)
    assert torch.equal(ss.forward(other, obs)[0], fresh(other))
    fewer = theta[[0, 2]]  # members dropped: new M
    assert torch.equal(ss.forward(fewer, obs)[0], fresh(fewer))
    probe = theta.repeat(4, 1) * 1.01  # the η-probe's rows in between, then θ again
    assert torch.equal(ss.forward(probe, obs, trace=False)[0], fresh(probe))
    assert torch.equal(ss.forward(theta, obs)[0], fresh(theta))

    for name in ("sgd", "sign", "adam"):
        g = torch.randn(3, theta.shape[1], dtype=F64, generator=gen)
        outs = []
        for in_place in (False, True):
            opt = BatchedOptimizer(name, torch.tensor([0.1, 0.01, 1e-3], dtype=F64))
            t = theta.clone()
            for _ in range(3):
                t = opt.apply(t, opt.plan(g, tracked=False), in_place=in_place)
            outs.append(t)
        assert torch.equal(outs[0], outs[1]), name
