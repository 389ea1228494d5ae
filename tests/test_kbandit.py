"""The K-armed bandit, the escort policy and the softmax gravity well (issue 14).

The gravity-well tests iterate the same exact update in numpy, written here independently of
ntrl: softmax logits z ← z + η π⊙(r − J) (vanilla PG), z ← z + η (r − J) (NPG), and the escort
parameters θ ← θ + η (q/θ)⊙π⊙(r − J).
"""

from __future__ import annotations

import csv
import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import ntrl.envs  # noqa: F401
from ntrl.agents.policies import EscortPolicy, make_policy
from ntrl.config import ConfigError
from ntrl.engine.metrics import InverseFisher
from ntrl.engine.tangent import TangentEngine
from ntrl.envs.kbandit import KArmedBandit, gravity_well_start, start_probabilities
from ntrl.experiments.kbandit import KBanditConfig
from ntrl.properties import ActionProbability
from ntrl.records import read_records
from ntrl.train import train

R = np.array([1.0, 0.9, 0.0])
OBS = torch.ones(1, 1)


# ---------------------------------------------------------------------- the environment
def test_env_passes_check_env_and_pays_its_rewards():
    env = gym.make("ntrl/KArmedBandit-v0", rewards=(1.0, 0.9, 0.0, -2.0), noise_std=0.5)
    check_env(env.unwrapped)
    env.reset(seed=3)
    draws = [env.step(3)[1] for _ in range(4000)]
    assert abs(np.mean(draws) + 2.0) < 4 * 0.5 / np.sqrt(4000)  # noise has mean 0
    quiet = KArmedBandit((1.0, 0.9, 0.0))
    quiet.reset(seed=0)
    assert [quiet.step(a)[1] for a in range(3)] == [1.0, 0.9, 0.0]
    with pytest.raises(ValueError, match="arm in"):
        quiet.step(3)


def test_vector_env_steps_all_arms_at_once():
    envs = gym.make_vec("ntrl/KArmedBandit-v0", num_envs=4, vectorization_mode="vector_entry_point", rewards=(1.0, 0.9, 0.0))
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (4, 1)
    obs, reward, terminated, truncated, info = envs.step(np.array([0, 1, 2, 1]))
    assert reward.tolist() == [1.0, 0.9, 0.0, 0.9] and terminated.all() and not truncated.any()
    assert info["arm"].tolist() == [0, 1, 2, 1]
    with pytest.raises(ValueError, match="arms in"):
        envs.step(np.array([0, 1, 2, 3]))


@pytest.mark.parametrize("bad, match", [((1.0,), "at least 2 arms"), ((1.0, float("nan")), "finite")])
def test_bad_rewards_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        KArmedBandit(bad)


def test_exact_expected_reward_and_its_gradient():
    """J = Σ π_a r_a and ∂J/∂z_a = π_a (r_a − J) through the engine, for a tabular policy."""
    pi = np.array([0.2, 0.5, 0.3])
    policy = make_policy("tabular", 1, 3, 0, 0.2, OBS, start=pi)
    engine = TangentEngine(policy, dtype=torch.float64)
    env = KArmedBandit(tuple(R))
    J, g = engine.value_and_gradient(env.exact_expected_reward)
    assert J == pytest.approx(pi @ R, rel=1e-15)
    assert np.allclose(g.numpy(), pi * (R - pi @ R), rtol=1e-13, atol=0)


# ---------------------------------------------------------------------- the start
def test_start_vector_even_split_and_explicit():
    assert start_probabilities(0.1, 2, 4).tolist() == pytest.approx([0.3, 0.3, 0.1, 0.3], rel=1e-15)
    assert gravity_well_start(0.01) == (0.01, 0.94, 0.05)
    with pytest.raises(ValueError, match="sum to 1"):
        start_probabilities(0.1, 0, 3, [0.1, 0.5, 0.5])


@pytest.mark.parametrize("kind", ["tabular", "mlp", "escort"])
@pytest.mark.parametrize("start", [(0.01, 0.94, 0.05), (1e-6, 0.5 - 1e-6, 0.25, 0.25), (0.3, 0.7)])
def test_every_policy_kind_starts_exactly_at_the_start_vector(kind, start):
    policy = make_policy(kind, 1, len(start), 0, start[0], OBS, seed=4, start=start)
    pi = torch.softmax(policy(OBS).to(torch.float64), dim=-1)[0].detach().numpy()
    assert np.allclose(pi, start, rtol=1e-9, atol=0)


def test_single_logit_starts_at_a_two_arm_start():
    policy = make_policy("single_logit", 1, 2, 0, 0.3, OBS, start=(0.3, 0.7))
    assert torch.softmax(policy(OBS), -1)[0, 0].item() == pytest.approx(0.3, rel=1e-12)


def test_config_resolves_arms_rewards_and_p0():
    c = KBanditConfig(start=[0.01, 0.94, 0.05], wandb="disabled").validate()
    assert (c.arms, c.rewards, c.p0) == (3, [1.0, 0.9, 0.0], 0.01)
    c = KBanditConfig(arms=5, p0=0.2, wandb="disabled").validate()
    assert c.rewards == [1.0, 0.9, 0.0, 0.0, 0.0] and c.start_vector() == pytest.approx([0.2] * 5)
    for kwargs, flag in [(dict(arms=3, rewards=[1.0, 0.0]), "--rewards"), (dict(start=[0.5, 0.4, 0.2]), "--start"),
                         (dict(p0=0.02, start=[0.01, 0.94, 0.05]), "--start"), (dict(target=3), "--target"),
                         (dict(policy="single_logit"), "--policy"), (dict(escort_q=3.0), "--escort-q")]:
        with pytest.raises(ConfigError) as e:
            KBanditConfig(wandb="disabled", **kwargs).validate()
        assert e.value.flag == flag, kwargs


# ---------------------------------------------------------------------- the K-action formulas
def random_pi(K: int, rng: np.random.Generator) -> np.ndarray:
    pi = rng.dirichlet(np.ones(K)) + 1e-3
    return pi / pi.sum()


@pytest.mark.parametrize("K", [2, 3, 5, 8])
@pytest.mark.parametrize("kind", ["tabular", "escort"])
def test_ntvar_of_each_action_is_pi_squared_e_minus_pi_theta_e_minus_pi(K, kind):
    """‖∇π_a‖² = π_a² (e_a − π)ᵀ Θ (e_a − π), Θ = J_z J_zᵀ the logit kernel: I for tabular logits,
    diag(q²/θ²) for the escort policy, whose θ is here scaled off the simplex (‖θ‖ ≠ 1)."""
    rng = np.random.default_rng(K)
    pi = random_pi(K, rng)
    policy = make_policy(kind, 1, K, 0, float(pi[0]), OBS, start=pi)
    if kind == "escort":
        with torch.no_grad():
            policy.theta.mul_(1.7)
            policy.theta[0, 1].neg_()  # |θ| is what counts
        theta = policy.theta.detach().numpy()[0]
        Theta = np.diag(policy.q**2 / theta**2)
    else:
        Theta = np.eye(K)
    for backend in ("auto", "reference"):
        engine = TangentEngine(policy, dtype=torch.float64, backend=backend)
        for a in range(K):
            e = np.eye(K)[a] - pi
            want = pi[a] ** 2 * e @ Theta @ e
            got = engine.ntvar(ActionProbability(OBS, a)).item()
            assert got == pytest.approx(want, rel=1e-12), (backend, a)


def test_escort_q2_ntvar_is_linear_in_p():
    """At q = 2, θ_b² = ‖θ‖² π_b, so ‖∇π_a‖² = 4 π_a (1 − π_a)/‖θ‖², down to p = 1e-12."""
    for p in (0.3, 1e-4, 1e-12):
        start = (p, (1 - p) / 2, (1 - p) / 2)
        policy = make_policy("escort", 1, 3, 0, p, OBS, start=start)
        engine = TangentEngine(policy, dtype=torch.float64)
        norm2 = float((policy.theta.detach() ** 2).sum())
        assert engine.ntvar(ActionProbability(OBS, 0)).item() == pytest.approx(4 * p * (1 - p) / norm2, rel=1e-10)


def test_escort_fisher_is_derived_and_its_natural_ntvar_is_the_softmax_one():
    """F_ab = (q²/(θ_a θ_b))(π_a δ_ab − π_a π_b), checked against the engine's Fisher-vector
    products; NTVar_F⁺(π_a) = π_a (1 − π_a) in any parametrisation that covers the simplex."""
    pi = np.array([0.05, 0.6, 0.35])
    for q in (2.0, 0.7):
        policy = make_policy("escort", 1, 3, 0, 0.05, OBS, start=pi, escort_q=q)
        with torch.no_grad():
            policy.theta.mul_(1.3)
        engine = TangentEngine(policy, dtype=torch.float64)
        fisher = InverseFisher(engine, OBS, torch.ones(1, dtype=torch.float64))
        F = torch.stack([fisher.fvp(v) for v in torch.eye(3, dtype=torch.float64)]).numpy()
        theta = policy.theta.detach().numpy()[0]
        want = q**2 / np.outer(theta, theta) * (np.diag(pi) - np.outer(pi, pi))
        assert np.allclose(F, want, rtol=1e-12, atol=1e-15)
        assert np.allclose(F @ theta, 0, atol=1e-14)  # scaling θ leaves π unchanged
        for a in range(3):
            assert engine.ntvar(ActionProbability(OBS, a), fisher).item() == pytest.approx(pi[a] * (1 - pi[a]), rel=1e-10)


# ---------------------------------------------------------------------- the gravity well
def numpy_iteration(p0: float, eta: float, kind: str, steps: int, q: float = 2.0) -> dict:
    """The exact update from the gravity-well start, iterated in numpy: P after each update."""
    pi = np.array(gravity_well_start(p0))
    z, theta = np.log(pi), pi ** (1 / q)
    ps = []
    for _ in range(steps):
        J = pi @ R
        if kind == "sgd":
            z = z + eta * pi * (R - J)
        elif kind == "npg":
            z = z + eta * (R - J)
        else:
            theta = theta + eta * (q / theta) * pi * (R - J)
            z = q * np.log(np.abs(theta))
        pi = np.exp(z - z.max())
        pi = pi / pi.sum()
        ps.append(pi[0])
    ps = np.array(ps)
    escape = int(np.argmax(ps >= 0.5)) + 1 if (ps >= 0.5).any() else None
    i = int(np.argmin(ps))
    return {"escape": escape, "p_min": min(ps[i], p0), "p_min_at": i + 1 if ps[i] < p0 else 0}


def run_well(tmp_path, policy: str, optimizer: str, p0: float, lr: float, steps: int):
    config = KBanditConfig(policy=policy, optimizer=optimizer, lr=lr, steps=steps, start=list(gravity_well_start(p0)),
                           stop_at_p=0.5, track_per_decade=10, wandb="disabled", out=str(tmp_path),
                           run_name=f"{policy}-{optimizer}")
    return train(config, progress=False).summary


def test_vanilla_pg_falls_into_the_gravity_well_and_escapes_as_the_numpy_iteration(tmp_path):
    p0, lr = 0.03, 2.0
    s = run_well(tmp_path, "tabular", "sgd", p0, lr, 2000)
    ref = numpy_iteration(p0, lr, "sgd", 2000)
    assert s["p_min"] < p0 / 2  # a dip: P falls more than 2× below its start before it escapes
    assert s["p_min"] == pytest.approx(ref["p_min"], rel=0.01)
    assert s["p_min_at"] == pytest.approx(ref["p_min_at"], rel=0.01)
    assert s["crossed_half_at"] == pytest.approx(ref["escape"], rel=0.01)
    assert s["p_min_at"] < s["p_back_at"] < s["crossed_half_at"]


def test_npg_does_not_dip(tmp_path):
    s = run_well(tmp_path, "tabular", "npg", 0.01, 0.1, 2000)
    ref = numpy_iteration(0.01, 0.1, "npg", 2000)
    assert s["p_min"] == s["p_start"] == pytest.approx(0.01, rel=1e-12) and s["p_min_at"] == 0 and ref["p_min_at"] == 0
    assert s["crossed_half_at"] == pytest.approx(ref["escape"], rel=0.01)


def test_escort_escapes_without_a_dip_as_the_numpy_iteration(tmp_path):
    p0, lr = 0.01, 0.05
    s = run_well(tmp_path, "escort", "sgd", p0, lr, 2000)
    ref = numpy_iteration(p0, lr, "escort", 2000)
    assert s["crossed_half_at"] == pytest.approx(ref["escape"], rel=0.01)
    assert s["p_min_at"] == 0 and ref["p_min_at"] == 0
    # and far sooner than vanilla PG from the same start (3694 updates at lr 2 in the iteration)
    assert s["crossed_half_at"] < numpy_iteration(p0, 2.0, "sgd", 5000)["escape"] / 10


def test_escort_policy_refuses_bad_q():
    with pytest.raises(ValueError, match="q must be"):
        EscortPolicy(1, 3, q=0.0)


# ---------------------------------------------------------------------- command line and study
def test_train_kbandit_from_the_command_line(tmp_path, capsys):
    from ntrl.cli import main

    rc = main(["train", "kbandit", "--arms", "3", "--rewards", "1", "0.9", "0", "--start", "0.03", "0.92", "0.05",
               "--policy", "tabular", "--lr", "2", "--steps", "300", "--stop-at-p", "0.5", "--quiet", "--no-wandb",
               "--out", str(tmp_path), "--run-name", "well"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((tmp_path / "well" / "summary.json").read_text())
    ref = numpy_iteration(0.03, 2.0, "sgd", 300)
    assert summary["p_min_at"] == ref["p_min_at"] and "after falling to its minimum" in out and "π(arm 0)" in out
    rc = main(["train", "kbandit", "--rewards", "1", "0.9", "--start", "0.01", "0.94", "0.05", "--no-wandb",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "--start" in err and "one probability per arm (2, from --arms or the length of --rewards)" in err
    for flag in ("--rewards", "--start"):  # a vector flag given without its values is refused, not defaulted
        assert main(["train", "kbandit", flag, "--no-wandb", "--out", str(tmp_path / "none")]) == 2
        assert f"{flag}: needs one" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_the_study_gives_each_optimizer_its_gravity_well_verdict(tmp_path):
    """Vanilla PG on softmax logits falls into the well; NPG, sign descent, Adam and the escort
    policy do not; the report, well.csv and the study's printed table carry it."""
    from ntrl.study import StudyConfig
    from ntrl.study.rarity import rarity

    study = StudyConfig(name="well", policies=["single_logit"], optimizers=["sgd"], p0s=[0.05, 0.005],
                        directions=["rewarded"], seeds=1, well_p0s=[0.1, 0.03], price_scales=[1.0, 0.5])
    text = rarity(study, tmp_path / "well", workers=1, wandb_mode="disabled", progress=False)
    rows = {(r["policy"], r["optimizer"]): r for r in csv.DictReader(open(tmp_path / "well" / "well.csv"))}
    assert {k: r["verdict"] for k, r in rows.items()} == {
        ("tabular", "sgd"): "gravity well", ("tabular", "npg"): "no well", ("tabular", "sign"): "no well",
        ("tabular", "adam"): "no well", ("escort", "sgd"): "no well"}
    depth = float(rows[("tabular", "sgd")]["depth@0.03"])
    ref = numpy_iteration(0.03, 2.0, "sgd", 2000)
    assert depth == pytest.approx(0.03 / ref["p_min"], rel=0.01)
    assert int(rows[("tabular", "sgd")]["escape@0.03"]) == ref["escape"]
    assert "gravity well" in text and "escort" in text
    page = (tmp_path / "well" / "report.html").read_text()
    assert "The softmax gravity well" in page and page.count("data:image/png;base64") >= 2
    assert (tmp_path / "well" / "gravity_well.png").stat().st_size > 10_000


def test_well_verdict_is_inconclusive_without_the_smallest_p0_or_an_escape():
    from ntrl.study.grid import RunSpec
    from ntrl.study.stats import RunData
    from ntrl.study.well import analyse_well

    def run(p0, p_min, p_min_at, escape, back=None):
        spec = RunSpec("kbandit", "tabular", "sgd", "exact", p0, "well", 0)
        summary = {"p_start": p0, "p_min": p_min, "p_min_at": p_min_at, "p_back_at": back, "crossed_half_at": escape,
                   "updates": escape or 40}
        return RunData(spec, summary, [], {"lr": 2.0})

    deep, shallow = run(0.01, 0.0015, 944, 3694, 3405), run(0.1, 0.092, 8, 63, 30)
    assert analyse_well([deep, shallow], [0.01, 0.1])[0].verdict == "gravity well"
    cell = analyse_well([shallow], [0.01, 0.1])[0]  # the run from 0.01 is missing
    assert cell.verdict == "inconclusive" and "0.01 is not complete" in cell.reason
    cell = analyse_well([run(0.01, 0.008, 40, None)], [0.01])[0]  # still falling when the run ended
    assert cell.verdict == "inconclusive" and "had not escaped after 40 updates" in cell.reason
    assert analyse_well([run(0.01, 0.01, 0, 455)], [0.01])[0].verdict == "no well"


def test_p_back_at_counts_from_the_deepest_dip(tmp_path):
    """P may return to p₀ and then fall deeper (sampled steps): p_back_at is the return after the
    least P, not after an earlier, shallower dip."""
    config = KBanditConfig(mode="sampled", batch_size=2, lr=0.3, start=[0.3, 0.65, 0.05], rewards=[1.0, 0.99, 0.0],
                           steps=300, seed=8, wandb="disabled", out=str(tmp_path), run_name="s", track_every=1)
    s = train(config, progress=False).summary
    ps = [r["P/value"] + r["P/real_delta"] for r in read_records(tmp_path / "s")]  # P after each update
    i = int(np.argmin(ps))
    assert s["p_min_at"] == i + 1 and s["p_min"] == pytest.approx(ps[i], rel=1e-12)
    after = [t + 1 for t in range(i, len(ps)) if ps[t] >= s["p_start"]]
    assert s["p_back_at"] == (after[0] if after else None)
    assert s["p_back_at"] is None or s["p_back_at"] > s["p_min_at"]
