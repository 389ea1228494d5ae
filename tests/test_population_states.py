"""The structured path at several observations (ntrl.engine.batched_states) against the explicit
Jacobian from torch.func (jacrev of every member's logits) and the batched engine's QR inverse
Fisher, in float64.

Tolerances: the factored forms sum the same products in another order, so they agree with the
explicit ones to a few ulps of the largest term; 1e-12 relative leaves three orders of
magnitude. The Fisher's Gram-space form errs by eps times J_F's condition number squared (about
10³ here), still well below 1e-12 of the values compared."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.func import functional_call, jacrev, vmap

from ntrl.agents.policies import make_policy
from ntrl.engine.batched import BatchedInverseFisher, StackedPolicy, log_prob_rows
from ntrl.engine.batched_states import (
    StatesFisherMetric, StatesInverseFisher, layer_parameters, quadratic_forms, states_forward, states_jacobian,
)
from ntrl.engine.batched_structured import StackedSequential
from test_population import assert_records_equal

F64 = torch.float64


def population(activation: str = "tanh", n_obs: int = 5, d: int = 3, K: int = 5, members: int = 3, width: int = 8):
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(n_obs, d, generator=gen, dtype=F64)
    policies = [make_policy("mlp", d, K, 1, p0, obs[:1], seed=s, width=width, activation=activation)
                for s, p0 in enumerate((0.3, 1e-2, 1e-4)[:members])]
    sp = StackedPolicy(policies[0])
    theta = torch.stack([sp.flatten(p) for p in policies])
    return obs, sp, theta


def explicit_jacobian(sp: StackedPolicy, theta: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """∂z(o, k)/∂θ of every member, (M, N·K, P), by jacrev of the flat parameters."""
    def logits(flat):
        return functional_call(sp.module, sp.unflatten(flat), (obs,)).reshape(-1)

    return vmap(jacrev(logits))(theta)


def jacobian_at(net, theta, obs):
    return states_jacobian(net, states_forward(net, layer_parameters(net, theta), obs)[1])


@pytest.mark.parametrize("members", [1, 3, 30])
def test_the_batched_forward_pass_gives_the_bytes_of_vmap(members):
    """states_forward's logits, one batched product per layer, are vmap over functional_call's
    bytes (what the population computed before), from θ's views or from autograd leaves."""
    gen = torch.Generator().manual_seed(5)
    obs = torch.randn(9, 3, generator=gen, dtype=F64)
    policies = [make_policy("mlp", 3, 5, 1, 0.1, obs[:1], seed=s, width=64) for s in range(members)]
    sp = StackedPolicy(policies[0])
    theta = torch.stack([sp.flatten(p) for p in policies]) * 3
    net = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    want = sp.logits(theta, obs)
    assert torch.equal(states_forward(net, layer_parameters(net, theta), obs, trace=False)[0], want)
    leaves = sp.leaves(theta)
    with torch.enable_grad():
        Z, _ = states_forward(net, [(leaves[0], leaves[1]), (leaves[2], leaves[3]), (leaves[4], leaves[5])], obs)
    assert torch.equal(Z, want) and Z.requires_grad


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_the_factored_jacobian_at_several_observations_agrees_with_jacrev(activation):
    obs, sp, theta = population(activation)
    net = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    jac = jacobian_at(net, theta, obs)
    J = explicit_jacobian(sp, theta, obs)
    G = jac.gram()
    torch.testing.assert_close(G, J @ J.mT, rtol=1e-12, atol=1e-12 * float(G.abs().max()))
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(theta.shape, generator=gen, dtype=F64)
    Jv = jac.dot(v)
    torch.testing.assert_close(Jv, (J @ v[:, :, None])[..., 0], rtol=1e-12, atol=1e-12 * float(Jv.abs().max()))
    d = torch.rand(theta.shape, generator=gen, dtype=F64) + 0.1
    GD = jac.gram_diagonal(d)
    torch.testing.assert_close(GD, J @ (d[:, :, None] * J.mT), rtol=1e-12, atol=1e-12 * float(GD.abs().max()))
    C = torch.randn(theta.shape[0], 4, J.shape[1], generator=gen, dtype=F64)
    grads = C @ J  # ∇X = Jᵀc for each row c
    torch.testing.assert_close(quadratic_forms(C, G), grads @ grads.mT, rtol=1e-12, atol=1e-12 * float(G.abs().max()))


def test_the_fisher_in_the_space_of_the_logits_equals_the_qr_of_its_rows():
    """NTVar in F⁺ over the first three observations (the others like the juice model's probes),
    for cotangents on every observation, against BatchedInverseFisher of the explicit rows
    √(w π) ∇log π; a member whose G is not finite gets NaN, the others not."""
    obs, sp, theta = population(n_obs=5)
    NF, K = 3, 5
    net = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    jac = jacobian_at(net, theta, obs)
    J = explicit_jacobian(sp, theta, obs)
    M = theta.shape[0]
    Z = torch.stack([functional_call(sp.module, sp.unflatten(t), (obs,)) for t in theta])
    probs = torch.softmax(Z[:, :NF], -1)
    gen = torch.Generator().manual_seed(2)
    weights = torch.rand(M, NF, generator=gen, dtype=F64) + 0.05
    rows = log_prob_rows(J[:, :NF * K].reshape(M, NF, K, -1), probs)
    reference = BatchedInverseFisher.from_log_prob_rows(rows, weights, probs, torch.zeros(M, dtype=F64))
    fisher = StatesInverseFisher.from_gram(jac.gram(), probs, weights)
    C = torch.randn(M, 4, J.shape[1], generator=gen, dtype=F64)
    got = fisher.ntvars(C)
    want = torch.stack(reference.ntvars(list((C @ J).unbind(1))), 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    G = jac.gram().clone()
    G[1, 0, 0] = float("nan")
    bad = StatesInverseFisher.from_gram(G, probs, weights).ntvars(C)
    assert bad[1].isnan().all() and not bad[[0, 2]].isnan().any()


def juice_cell(out, optimizer: str, policy: str = "mlp", mode: str = "exact", steps: int = 7):
    from ntrl.experiments.juice import JuiceConfig
    from ntrl.study.grid import DEFAULT_LRS

    return [JuiceConfig(policy=policy, optimizer=optimizer, mode=mode, p0=p0, lr=DEFAULT_LRS["juice"][policy][optimizer],
                        reward=r, steps=steps, seed=i, track_every=2, width=16, batch_size=8, decomposition=False,
                        wandb="disabled", out=str(out), run_name=f"m{i}", price_scales=[1.0, 0.5])
            for i, (p0, r) in enumerate([(0.01, 1.0), (0.2, -1.0)])]


def counted_updates(monkeypatch) -> dict[str, int]:
    """How many updates each update function of the trainer took (tracked and untracked ones of
    the general path apart), and how many inverse Fishers states_fisher formed each way: "gram"
    in the logits' space, "qr" from rows."""
    from ntrl.population import trainer

    counts = {"states": 0, "factored": 0, "npg": 0, "general": 0, "general untracked": 0, "gram": 0, "qr": 0}

    def counted(name, real):
        def call(*a, **k):
            out = real(*a, **k)
            counts[name] += 1
            return out
        return call

    def count_general(pop, q, U, batch, tracked, first):
        counts["general" if tracked else "general untracked"] += 1
        return general(pop, q, U, batch, tracked, first)

    def count_fisher(*a, **k):
        out = fisher(*a, **k)
        counts["gram" if isinstance(out, trainer.StatesFisherMetric) else "qr"] += 1
        return out

    general, fisher = trainer.general_update, trainer.states_fisher
    for name, attr in (("states", "states_tracked_update"), ("npg", "states_npg_update"),
                       ("factored", "states_factored_update")):
        monkeypatch.setattr(trainer, attr, counted(name, getattr(trainer, attr)))
    monkeypatch.setattr(trainer, "general_update", count_general)
    monkeypatch.setattr(trainer, "states_fisher", count_fisher)
    return counts


NONE = {"states": 0, "factored": 0, "npg": 0, "general": 0, "general untracked": 0, "gram": 0, "qr": 0}
TRACKED = {**NONE, "states": 4, "general untracked": 3}  # 4 of 7 updates tracked
TRACKED_FISHER = {**TRACKED, "gram": 4}
NPG = {**NONE, "factored": 4, "npg": 3, "gram": 7}
SAMPLED = {**NONE, "factored": 4, "general untracked": 3}
GENERAL = {**NONE, "general": 4, "general untracked": 3}


@pytest.mark.parametrize("optimizer, policy, mode, fisher, want", [
    ("sgd", "mlp", "exact", False, TRACKED), ("sgd", "mlp", "exact", True, TRACKED_FISHER),
    ("sign", "mlp", "exact", True, TRACKED_FISHER), ("adam", "mlp", "exact", True, TRACKED_FISHER),
    ("npg", "mlp", "exact", False, NPG), ("npg", "mlp", "sampled", False, NPG),
    ("sgd", "mlp", "sampled", False, SAMPLED), ("adam", "mlp", "sampled", True, {**SAMPLED, "gram": 4}),
    ("sgd", "tabular", "exact", True, GENERAL), ("npg", "tabular", "sampled", True, GENERAL)])
def test_which_juice_populations_take_the_factored_jacobian(tmp_path, monkeypatch, optimizer, policy, mode, fisher,
                                                            want):
    """On the juice MLP: exact SGD, sign and Adam take every tracked update by
    states_tracked_update (4 of 7 here, tracked every 2nd), and its Fisher (where tracked) in the
    logits' space; NPG, exact or sampled, its untracked updates by states_npg_update and its
    tracked ones by states_factored_update (the Fisher in the logits' space at each, NPG's and the
    record's one and the same), as sampled SGD, sign and Adam take their tracked ones; the tabular
    policy every update by the general path, as sampled SGD its untracked ones."""
    from ntrl.population import train_population

    counts = counted_updates(monkeypatch)
    cfgs = [dataclasses.replace(c, fisher=fisher) for c in juice_cell(tmp_path, optimizer, policy, mode)]
    assert not train_population(cfgs, progress=False).failures
    assert counts == want, counts


@pytest.mark.parametrize("optimizer", ["adam", "npg"])
def test_an_ill_conditioned_or_damped_fisher_takes_the_qr_of_rows_from_the_factors(tmp_path, monkeypatch, optimizer):
    """Where some member's κ(G_FF) exceeds STATES_MAX_CONDITION (0 here: every update), or (NPG)
    some member is damped (λ = 0.1, 0), states_fisher forms the Fisher's rows from the factored
    Jacobian and takes their QR, and every record still equals the member's single run to 1e-12
    (exact juice)."""
    from ntrl.population import train_population, trainer
    from ntrl.records import read_records
    from ntrl.train import train

    per = [train(c, progress=False) for c in juice_cell(tmp_path / "per", optimizer)]
    monkeypatch.setattr(trainer, "STATES_MAX_CONDITION", 0.0)
    counts = counted_updates(monkeypatch)
    pop = train_population(juice_cell(tmp_path / "pop", optimizer), progress=False)
    assert counts == ({**TRACKED, "qr": 4} if optimizer == "adam" else {**NPG, "gram": 0, "qr": 7}), counts
    for r1, r2 in zip(per, pop.results):
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir))
    if optimizer == "npg":
        monkeypatch.undo()
        def damped(out):
            return [dataclasses.replace(c, npg_damping=lam) for c, lam in zip(juice_cell(out, "npg"), (0.1, 0.0))]

        per = [train(c, progress=False) for c in damped(tmp_path / "per_damped")]
        counts = counted_updates(monkeypatch)
        pop = train_population(damped(tmp_path / "pop_damped"), progress=False)
        assert counts == {**NPG, "gram": 4, "qr": 7}, counts  # the record's F⁺, undamped, in logit space
        for r1, r2 in zip(per, pop.results):
            assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir))


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_npg_steps_from_the_factored_jacobian_equal_the_runs(tmp_path, monkeypatch, mode):
    """NPG on the juice MLP, its steps F⁺g in the logits' space (untracked: states_npg_update;
    tracked: states_factored_update): every record equal to the member's single run (exact to
    1e-12; sampled to 1e-6, the sampled NPG MLP's tolerance in test_population.py)."""
    from ntrl.population import train_population
    from ntrl.records import read_records
    from ntrl.train import train

    rtol = 1e-12 if mode == "exact" else 1e-6
    per = [train(c, progress=False) for c in juice_cell(tmp_path / "per", "npg", mode=mode)]
    counts = counted_updates(monkeypatch)
    pop = train_population(juice_cell(tmp_path / "pop", "npg", mode=mode), progress=False)
    assert counts == NPG, counts
    for r1, r2 in zip(per, pop.results):
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir), rtol=rtol, floor=1e-20)


def test_the_fishers_step_and_the_gradient_from_the_factors_equal_the_explicit_ones():
    """F⁺v (StatesFisherMetric.apply: in the logits' space, then StatesJacobian.materialize)
    against BatchedInverseFisher.apply of the explicit rows, for v = Jᵀc with c on the Fisher's
    observations (a sampled surrogate's gradient) and for a v off the span; and Jᵀc itself."""
    obs, sp, theta = population(n_obs=5)
    NF, K = 3, 5
    net = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    jac = jacobian_at(net, theta, obs)
    J = explicit_jacobian(sp, theta, obs)
    M, P = theta.shape
    Z = torch.stack([functional_call(sp.module, sp.unflatten(t), (obs,)) for t in theta])
    probs = torch.softmax(Z[:, :NF], -1)
    gen = torch.Generator().manual_seed(3)
    weights = torch.rand(M, NF, generator=gen, dtype=F64) + 0.05
    weights[0, 1] = 0.0  # an observation the batch did not see: its rows are zero
    c = torch.zeros(M, J.shape[1], dtype=F64)
    c[:, :NF * K] = torch.randn(M, NF * K, generator=gen, dtype=F64)
    g = (c[:, None, :] @ J)[:, 0]
    torch.testing.assert_close(jac.materialize(c, P), g, rtol=1e-12, atol=1e-12 * float(g.abs().max()))
    rows = log_prob_rows(J[:, :NF * K].reshape(M, NF, K, -1), probs)
    reference = BatchedInverseFisher.from_log_prob_rows(rows, weights, probs, torch.zeros(M, dtype=F64))
    fisher = StatesFisherMetric(StatesInverseFisher.from_gram(jac.gram(), probs, weights), jac, P)
    for v in (g, torch.randn(M, P, generator=gen, dtype=F64)):
        want = reference.apply(v)
        torch.testing.assert_close(fisher.apply(v), want, rtol=1e-12, atol=1e-12 * float(want.abs().max()))


def test_many_products_at_once_equal_one_at_a_time():
    """materialize_many and dot_many (every cotangent of a tracked update at once) against
    materialize and dot of each."""
    obs, sp, theta = population(n_obs=4)
    net = StackedSequential.plan(sp.module, sp.names, sp.sizes)
    jac = jacobian_at(net, theta, obs)
    M, P = theta.shape
    gen = torch.Generator().manual_seed(4)
    C = torch.randn(M, 3, 4 * 5, generator=gen, dtype=F64)
    V = torch.randn(M, 3, P, generator=gen, dtype=F64)
    many = jac.materialize_many(C, P)
    for i in range(3):
        torch.testing.assert_close(many[:, i], jac.materialize(C[:, i], P), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(jac.dot_many(V)[:, i], jac.dot(V[:, i]), rtol=1e-13, atol=1e-13)
