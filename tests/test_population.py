"""Populations (issue 12): a member's records are the per-run path's, every policy × optimizer,
exact and sampled; members stop on their own; a bad member is stopped and reported while the
others go on; a population too large for memory is refused up front; the study's verdicts are the
same with and without populations.

Tolerances: both paths compute the same float64 expressions in a different order (batched
matmuls, the chain rule through the logits), so each value differs by a few ulps, 1e-16 relative,
and the trajectories by the sum of those over the updates: 1e-12 relative leaves three orders of
magnitude. ``real_delta`` and ``residual`` are differences of values of size |X|, so their
rounding is relative to |X|, not to themselves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ntrl.config import ConfigError
from ntrl.engine.batched import BatchedInverseFisher, StackedPolicy, log_prob_rows, member_gradients
from ntrl.engine.metrics import InverseFisher
from ntrl.engine.tangent import TangentEngine
from ntrl.experiments.bandit import BanditConfig
from ntrl.population import TrackSchedule, train_population
from ntrl.records import read_records
from ntrl.study.grid import DEFAULT_LRS
from ntrl.train import train

LRS = {"single_logit": {"sgd": 2.0, "npg": 0.1, "sign": 0.1, "adam": 0.1},
       "tabular": {"sgd": 2.0, "npg": 0.1, "sign": 0.1, "adam": 0.1},
       "mlp": {"sgd": 0.1, "npg": 0.1, "sign": 2e-4, "adam": 1e-3},
       "escort": {"sgd": 0.5, "npg": 0.1, "sign": 0.1, "adam": 0.1}}
# (p0, seed, reward of "do"): two rewarded members that stop at P = 1/2, one punished
MEMBERS = [(0.01, 0, 1.0), (0.2, 1, -1.0), (1e-4, 2, 1.0)]


def member_configs(out, policy, optimizer, mode, steps=45, width=16, **kw):
    """Three members; the punished one tracked log-spaced and stopped once P has fallen below
    0.15 (the others every 3rd update); Adam with its own β₁, β₂, ε per member."""
    adam = [dict(adam_beta1=b1, adam_beta2=b2, adam_eps=e) for b1, b2, e in
            [(0.9, 0.999, 1e-8), (0.8, 0.99, 1e-6), (0.95, 0.9, 1e-8)]] if optimizer == "adam" else [{}] * 3
    return [BanditConfig(policy=policy, optimizer=optimizer, mode=mode, p0=p0, lr=LRS[policy][optimizer] * (4 if rd > 0 else 1),
                         steps=steps, seed=seed, reward_do=rd, reward_dont=-rd, track_every=3, batch_size=8,
                         width=width, wandb="disabled", stop_at_p=0.5 if rd > 0 else None,
                         stop_below_p=None if rd > 0 else 0.15, track_per_decade=None if rd > 0 else 5,
                         noise_std=0.3 if mode == "sampled" else 0.0, out=str(out), run_name=f"m{i}",
                         price_scales=[1.0, 0.5, 0.25], **adam[i], **kw)
            for i, (p0, seed, rd) in enumerate(MEMBERS)]


def assert_records_equal(a: list[dict], b: list[dict], rtol: float = 1e-12, sign: bool = False,
                         floor: float = 0.0, atol: float = 0.0, inner: float | None = None) -> None:
    """Every field of every record equal to ``rtol``: relative to the value itself, or for the
    differences of values of size |X| (realised changes, residuals, the probe's realised
    changes) relative to |X| before or after the step. ``sign``: sign descent's NTVar in its own metric,
    Σ_k (∂_k X)²/|g_k|, divides by gradient entries that can be rounding-sized (the two paths
    round g differently), so it is held to 1e-9, as are the other forms weighted by M: the expected
    change η·∇X·M∇J and the noise spread η²∇XᵀMΣM∇Y (also Adam's at its first step, where
    M = diag(1/(|g| + ε))). A sampled surrogate's value U sums terms of the
    size of the returns that the leave-one-out baseline makes cancel (U ≈ 0 up to rounding), so it
    is held to 1e-12 of at least 1. ``floor``: an absolute scale below which a value counts as 0
    (the predicted spread of an update whose batch had no variance is rounding, 1e-33); ``atol``:
    an absolute tolerance on top, for values that are rounding-level cancellations. ``inner``: the
    tolerance of NTCov in each metric and of the prediction η·NTCov_M, inner products of two
    gradients whose rounding is relative to Σ_k |∂_k X ∂_k U|, not to the sum (``rtol`` if not given)."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert list(ra) == list(rb)  # the same fields in the same order
        assert rb["backend"] == "population"
        for k, x in ra.items():
            y = rb[k]
            if k == "backend":
                continue
            xs, ys = (x, y) if isinstance(x, list) else ([x], [y])
            assert len(xs) == len(ys), k
            for xi, yi in zip(xs, ys):
                if not isinstance(xi, float):
                    assert xi == yi, (k, x, y)
                    continue
                differences = k.endswith(("real_delta", "residual", "probe_real"))
                if differences:  # X before or after the step, whichever is larger
                    before = abs(ra[k.split("/")[0] + "/value"])
                    after = ra.get(k.split("/")[0] + "/real_delta", 0.0)
                    after = before + (after if isinstance(after, float) else 0.0)
                    scale = max(before, abs(after))
                else:
                    scale = max(abs(xi), abs(yi))
                scale = max(scale, 1.0) if k == "U" else max(scale, floor)
                weighted = k.endswith(("ntvar_opt", "expected_delta", "noise_sd", "noise_sd_iso")) or k.startswith("noise/")
                tol = 1e-9 if sign and weighted else rtol
                if inner is not None and k.endswith(("ntcov_euc", "ntcov_opt", "pred_delta")):
                    tol = max(tol, inner)
                assert abs(xi - yi) <= tol * scale + atol, (ra["update"], k, x, y)


@pytest.mark.parametrize("mode", ["exact", "sampled"])
@pytest.mark.parametrize("optimizer", ["sgd", "npg", "sign", "adam"])
@pytest.mark.parametrize("policy", ["single_logit", "tabular", "mlp", "escort"])
def test_member_records_equal_the_per_run_records(tmp_path, policy, optimizer, mode):
    per = [train(c, progress=False) for c in member_configs(tmp_path / "per", policy, optimizer, mode)]
    pop = train_population(member_configs(tmp_path / "pop", policy, optimizer, mode), progress=False)
    assert not pop.failures
    for i, (r1, r2) in enumerate(zip(per, pop.results)):
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir))
        for key in ("status", "updates", "crossed_half_at", "episodes", "n_probe", "started_above_half"):
            assert r1.summary[key] == r2.summary[key], (i, key)
        for key in ("p_start", "p_end", "return_first", "return_last"):
            assert r2.summary[key] == pytest.approx(r1.summary[key], rel=1e-12, abs=1e-300), (i, key)
    statuses = [r.summary["status"] for r in pop.results]
    # the punished member stops below P = 0.15, or runs all its updates if it gets no lower
    assert statuses[1] in ("stopped_below_p", "finished")
    assert statuses[0] in ("stopped_at_p", "finished") and statuses[2] in ("stopped_at_p", "finished")


@pytest.mark.parametrize("policy, mode", [("tabular", "exact"), ("single_logit", "sampled"), ("escort", "exact")])
def test_damped_npg_members_on_the_general_path_equal_their_runs(tmp_path, policy, mode):
    """NPG with each member's own damping λ (0.1, 0, 0.05) on the batched engine's path (not
    the structured one), where BatchedInverseFisher's damped step and NTVars are taken: the
    damped and undamped members in one population, each equal to its run."""
    def cfgs(out):
        return [dataclasses.replace(c, npg_damping=lam)
                for c, lam in zip(member_configs(out, policy, "npg", mode), (0.1, 0.0, 0.05))]

    per = [train(c, progress=False) for c in cfgs(tmp_path / "per")]
    pop = train_population(cfgs(tmp_path / "pop"), progress=False)
    assert not pop.failures
    for r1, r2 in zip(per, pop.results):
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir))
    damped = read_records(pop.results[0].run_dir)[1]
    assert damped["P/ntvar_opt"] != pytest.approx(damped["P/ntvar_fisher"], rel=1e-6)  # λ changed the metric


def kbandit_configs(out, policy, optimizer, mode, steps=40):
    """Three K-armed members from gravity-well starts (p₀, 0.95 − p₀, 0.05) with their own rewards,
    learning rates and stopping rules."""
    from ntrl.envs.kbandit import gravity_well_start
    from ntrl.experiments.kbandit import KBanditConfig

    members = [(0.01, 0, [1.0, 0.9, 0.0]), (0.2, 1, [-1.0, 0.9, 0.0]), (0.05, 2, [1.0, 0.5, 0.2])]
    return [KBanditConfig(policy=policy, optimizer=optimizer, mode=mode, start=list(gravity_well_start(p0)), rewards=r,
                          lr=LRS[policy][optimizer] * (1 + i), steps=steps, seed=seed, track_every=3, batch_size=8, width=16,
                          wandb="disabled", stop_at_p=0.5 if r[0] > 0 else None, noise_std=0.3 if mode == "sampled" else 0.0,
                          out=str(out), run_name=f"m{i}", price_scales=[1.0, 0.5])
            for i, (p0, seed, r) in enumerate(members)]


KBANDIT_CASES = [(o, "exact") for o in ("sgd", "npg", "sign", "adam")] + [("sgd", "sampled"), ("npg", "sampled")]


@pytest.mark.parametrize("optimizer, mode", KBANDIT_CASES)
@pytest.mark.parametrize("policy", ["tabular", "escort", "mlp"])
def test_kbandit_member_records_equal_the_per_run_records(tmp_path, policy, optimizer, mode):
    """The K-armed bandit (issue 14) as a population: rewards (M, K) per member, the log-odds of
    the target against the other arms in log space, the start vector per member; and the least P
    and where it was are the per-run summary's.

    Sampled, an arm that no episode of the batch pulled has the gradient −π_k Σ_i A_i/B, which the
    leave-one-out advantages make zero only up to rounding; NTCov with it is rounding (held to
    1e-15 absolute), and sign descent and Adam turn its rounded sign into a full step, so the two
    paths' sampled sign and Adam trajectories part there and are not compared."""
    per = [train(c, progress=False) for c in kbandit_configs(tmp_path / "per", policy, optimizer, mode)]
    pop = train_population(kbandit_configs(tmp_path / "pop", policy, optimizer, mode), progress=False)
    assert not pop.failures
    for i, (r1, r2) in enumerate(zip(per, pop.results)):
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir), sign=optimizer == "sign",
                             atol=1e-15 if mode == "sampled" else 0.0)
        for key in ("status", "updates", "crossed_half_at", "p_min_at", "p_back_at", "episodes"):
            assert r1.summary[key] == r2.summary[key], (i, key)
        assert r2.summary["p_min"] == pytest.approx(r1.summary["p_min"], rel=1e-12)


JUICE_LRS = DEFAULT_LRS["juice"]


def juice_configs(out, policy, optimizer, steps=12):
    """Three juice members of one exact cell: rewarded (reward +1, stop at ½) and punished (−1)."""
    from ntrl.experiments.juice import JuiceConfig

    return [JuiceConfig(policy=policy, optimizer=optimizer, p0=p0, lr=JUICE_LRS[policy][optimizer], reward=r, steps=steps,
                        seed=seed, track_every=3, width=16, decomposition=False, wandb="disabled", out=str(out),
                        run_name=f"m{i}", price_scales=[1.0, 0.5], stop_at_p=0.5 if r > 0 else None)
            for i, (p0, seed, r) in enumerate([(0.01, 0, 1.0), (0.2, 1, -1.0), (1e-3, 2, 1.0)])]


@pytest.mark.parametrize("optimizer", ["sgd", "npg", "sign", "adam"])
@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_juice_member_records_equal_the_per_run_records(tmp_path, policy, optimizer):
    """The juice gridworld's exact model: P, F, R and P_probe, κ at each probe observation, the
    Fisher over the distinct observations weighted by the visitation, per member reward."""
    per = [train(c, progress=False) for c in juice_configs(tmp_path / "per", policy, optimizer)]
    pop = train_population(juice_configs(tmp_path / "pop", policy, optimizer), progress=False)
    assert not pop.failures
    for r1, r2 in zip(per, pop.results):
        records = read_records(r2.run_dir)
        assert {"P/value", "F/value", "R/value", "P_probe/value"} <= set(records[0]) and len(records[0]["kappa"]) == 4
        assert_records_equal(read_records(r1.run_dir), records, sign=optimizer == "sign")
        assert r2.target_label == r1.target_label == "approach | seen"


def juice_sampled_configs(out, policy, optimizer, steps=12):
    """Three sampled juice members (8 episodes an update, each member from its own vector env)."""
    from ntrl.experiments.juice import JuiceConfig

    return [JuiceConfig(policy=policy, optimizer=optimizer, mode="sampled", batch_size=8, p0=p0,
                        lr=JUICE_LRS[policy][optimizer], reward=r, steps=steps, seed=seed, track_every=3, width=16,
                        decomposition=False, wandb="disabled", out=str(out), run_name=f"m{i}", price_scales=[1.0, 0.5],
                        stop_at_p=0.5 if r > 0 else None)
            for i, (p0, seed, r) in enumerate([(0.05, 0, 1.0), (0.2, 1, -1.0), (0.1, 2, 1.0)])]


@pytest.mark.parametrize("optimizer", ["sgd", "npg", "sign", "adam"])
@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_juice_sampled_member_records_equal_the_per_run_records(tmp_path, policy, optimizer):
    """Each member steps its own native vector env, seeded as its run seeds it, and draws its
    actions from its own stream, so its episodes are its run's; the surrogate sums the same
    advantages per (observation, action), over all of the model's observations at once, so its
    gradient rounds differently where the leave-one-out baseline makes its terms cancel: values
    computed from it agree to 1e-12 above a floor of 1e-20. Sampled NPG on the MLP inverts a
    Fisher of rank ≤ 25 from the batch's 5 observations, whose pseudo-inverse keeps or drops a
    singular value at its threshold on rounding, so there trajectories agree to 1e-6."""
    per = [train(c, progress=False) for c in juice_sampled_configs(tmp_path / "per", policy, optimizer)]
    pop = train_population(juice_sampled_configs(tmp_path / "pop", policy, optimizer), progress=False)
    assert not pop.failures
    rtol = 1e-6 if (policy, optimizer) == ("mlp", "npg") else 1e-12
    for r1, r2 in zip(per, pop.results):
        records = read_records(r2.run_dir)
        assert {"P/noise_sd", "noise/cov_P_F", "F/expected_delta", "return_undiscounted"} <= set(records[0])
        assert_records_equal(read_records(r1.run_dir), records, rtol=rtol, sign=optimizer in ("sign", "adam"),
                             floor=1e-20)
        assert r2.summary["episodes"] == r1.summary["episodes"] > 0


def test_members_stop_on_their_own_and_escape_times_match(tmp_path):
    """Rewarded single-logit SGD members of three p₀ escape at three different updates, each the
    update its own run escapes at; the population ends when the last one has."""
    def configs(out):
        return [BanditConfig(policy="single_logit", optimizer="sgd", p0=p0, lr=2.0, steps=2000, stop_at_p=0.5,
                             track_every=50, wandb="disabled", out=str(out), run_name=f"p{p0:g}")
                for p0 in (1e-1, 1e-2, 1e-3)]
    per = [train(c, progress=False).summary["updates"] for c in configs(tmp_path / "per")]
    pop = train_population(configs(tmp_path / "pop"), progress=False)
    got = [r.summary["updates"] for r in pop.results]
    assert got == per and len(set(got)) == 3
    assert pop.updates == max(per)
    assert all(r.summary["status"] == "stopped_at_p" for r in pop.results)


@pytest.mark.parametrize("policy", ["single_logit", "escort", "mlp"])  # selection, batched engine, structured
def test_a_member_that_goes_non_finite_is_stopped_and_the_rest_continue(tmp_path, policy):
    """An SGD step of lr 1e308 on a reward of 1e10 overflows the logit of member 1 at its first
    update; it is reported by index and run name, and the other members finish."""
    cfgs = [BanditConfig(policy=policy, optimizer="sgd", p0=0.01, lr=lr, steps=20, track_every=1, width=8,
                         reward_do=r, wandb="disabled", out=str(tmp_path), run_name=f"m{i}")
            for i, (lr, r) in enumerate([(1.0, 1.0), (1e308, 1e10), (1.0, 1.0)])]
    with pytest.raises(Exception, match="non-finite"):  # the per-run path stops the same run
        train(cfgs[1].__class__(**{**cfgs[1].to_dict(), "run_name": "alone"}), progress=False)
    pop = train_population(cfgs, progress=False)
    assert [i for i, _, _ in pop.failures] == [1]
    index, name, error = pop.failures[0]
    assert name == "m1" and "non-finite" in error
    assert pop.results[1].summary["status"] == "failed" and pop.results[1].summary["error"] == error
    assert [pop.results[i].summary["status"] for i in (0, 2)] == ["finished", "finished"]
    assert len(read_records(pop.results[0].run_dir)) == 20


def test_a_population_too_large_for_memory_is_refused_before_anything_is_written(tmp_path):
    from ntrl.population.trainer import config_member_bytes

    cfgs = member_configs(tmp_path / "pop", "mlp", "sgd", "exact", width=64)
    _, per = config_member_bytes(cfgs[0])
    with pytest.raises(ConfigError, match=r"needs about [\d.]+ MiB, above the limit of [\d.]+ MiB; use at most 2 members"):
        train_population(cfgs, progress=False, max_memory=int(2.5 * per))
    assert not (tmp_path / "pop").exists()


@pytest.mark.parametrize("max_memory", [0, -5, float("nan")])
def test_a_memory_limit_that_is_no_number_of_bytes_is_refused(tmp_path, max_memory):
    cfg = member_configs(tmp_path / "pop", "single_logit", "sgd", "exact")[0]
    with pytest.raises(ConfigError, match="max_memory: must be a number of bytes > 0"):
        train_population([cfg], progress=False, max_memory=max_memory)
    assert not (tmp_path / "pop").exists()


def test_a_limit_that_not_even_one_member_fits_says_so(tmp_path):
    cfg = member_configs(tmp_path / "pop", "mlp", "sgd", "exact", width=64)[0]
    with pytest.raises(ConfigError, match=r"a population of 1 member of \d+ parameters needs about [\d.]+ KiB, above "
                                          r"the limit of 1000 bytes; not even one member fits: one needs about"):
        train_population([cfg], progress=False, max_memory=1000)
    assert not (tmp_path / "pop").exists()


def test_bad_population_input_names_the_member_and_writes_nothing(tmp_path):
    """Each refusal says which member and what to change, before anything is written."""
    out = tmp_path / "pop"
    cfgs = member_configs(out, "single_logit", "sgd", "exact")
    with pytest.raises(ConfigError, match=r"--lr: member 1 \(m1\): must be a finite number > 0, got -1"):
        train_population([cfgs[0], dataclasses.replace(cfgs[1], lr=-1.0), cfgs[2]], progress=False)
    with pytest.raises(ConfigError, match=r"members 0 and 2 both write .*m0"):
        train_population([cfgs[0], cfgs[1], dataclasses.replace(cfgs[2], run_name="m0")], progress=False)
    with pytest.raises(ConfigError, match="--threads: members of one population must share it"):
        train_population([cfgs[0], dataclasses.replace(cfgs[1], threads=2)], progress=False)
    with pytest.raises(ConfigError, match=r"a population takes a list of configs, one per member; got one "
                                          r"BanditConfig \(pass \[config\]\)"):
        train_population(cfgs[0], progress=False)
    with pytest.raises(ConfigError, match="a population takes a list of configs .* got dict"):
        train_population([cfgs[0], cfgs[1].to_dict()], progress=False)
    with pytest.raises(ConfigError, match="schedule: must be a TrackSchedule .* got 'every10'"):
        train_population(cfgs, schedule="every10", progress=False)
    assert not out.exists()


def test_a_schedule_given_to_the_population_is_in_each_members_config(tmp_path):
    """config.json says how the records were tracked: the schedule's fields, not the config's."""
    cfgs = member_configs(tmp_path, "single_logit", "sgd", "exact", steps=30)
    pop = train_population(iter(cfgs), schedule=TrackSchedule(per_decade=3), progress=False)  # any iterable
    for r in pop.results:
        written = json.loads((r.run_dir / "config.json").read_text())
        assert (written["track_every"], written["track_per_decade"]) == (1, 3)
        again = read_records(train(BanditConfig(**{**written, "out": str(tmp_path / "again")}), progress=False).run_dir)
        assert [x["update"] for x in again] == [x["update"] for x in read_records(r.run_dir)]


def test_an_error_that_stops_the_population_is_in_every_summary(tmp_path, monkeypatch):
    """A member's summary says what stopped the population, with P where its parameters are."""
    from ntrl.population import trainer

    cfgs = [dataclasses.replace(c, stop_below_p=None)
            for c in member_configs(tmp_path, "single_logit", "sgd", "exact", steps=100)]
    calls = {"n": 0}
    original = trainer._Population.utility

    def fails_at_the_fourth(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return original(self, *a, **k)

    monkeypatch.setattr(trainer._Population, "utility", fails_at_the_fourth)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train_population(cfgs, progress=False)
    for c in cfgs:
        summary = json.loads((tmp_path / c.run_name / "summary.json").read_text())
        assert summary["status"] == "failed" and summary["updates"] == 3
        assert summary["error"] == "the population stopped at update 3: RuntimeError: disk on fire"
        alone = train(dataclasses.replace(c, steps=3, out=str(tmp_path / "alone")), progress=False)
        assert summary["p_end"] == pytest.approx(alone.summary["p_end"], rel=1e-12)  # P after its 3 updates


def test_a_member_that_fails_is_said_as_it_happens(tmp_path, capsys):
    cfgs = [BanditConfig(policy="single_logit", optimizer="sgd", p0=0.01, lr=lr, steps=20, track_every=1,
                         reward_do=r, wandb="disabled", out=str(tmp_path), run_name=f"m{i}")
            for i, (lr, r) in enumerate([(1.0, 1.0), (1e308, 1e10)])]
    train_population(cfgs, progress=True)
    err = capsys.readouterr().err
    assert "ntrl: member 1 (m1) stopped:" in err and "non-finite" in err and "the others go on" in err


def test_members_must_share_the_architecture(tmp_path):
    a, b = member_configs(tmp_path, "mlp", "sgd", "exact")[:2]
    b.width = 8
    with pytest.raises(ConfigError, match="--width: members of one population must share it"):
        train_population([a, b], progress=False)


def small_population(out, members=4, steps=6):
    return [BanditConfig(policy="mlp", optimizer="sgd", p0=0.01, lr=0.1, steps=steps, width=8, track_every=2, seed=i,
                         wandb="disabled", out=str(out), run_name=f"m{i}") for i in range(members)]


def test_the_setup_of_a_population_has_a_progress_bar(tmp_path, capsys):
    """Thousands of members take a while to build and to get their run directories (16384: 47 s
    on a GPU machine's host): the bar says which of the two it is doing, a member at a time."""
    train_population(small_population(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert "population: building members" in err and "population: making run directories" in err
    assert "population: writing their files" in err


@pytest.mark.parametrize("env, policy", [("bandit", "mlp"), ("bandit", "single_logit"), ("juice", "mlp"),
                                         ("juice", "tabular")])
def test_a_population_is_built_on_another_device_without_mixing_devices(tmp_path, env, policy):
    """The members' parameters are read on the host before the stacked module moves to the
    device (``nn.Module.to`` moves member 0's in place): the first CUDA run failed there, with
    member 0's θ on the GPU and the others' on the host. Checked here on torch's meta device,
    which has no data and no GPU: everything the population holds is on it."""
    from ntrl.experiments.juice import JuiceConfig
    from ntrl.population.trainer import _Population

    cls = BanditConfig if env == "bandit" else JuiceConfig
    configs = [cls(policy=policy, optimizer="sgd", p0=0.01, lr=0.1, steps=3, width=8, seed=i, wandb="disabled",
                   out=str(tmp_path), run_name=f"m{i}") for i in range(3)]
    pop = _Population(configs, torch.device("meta"))
    assert pop.theta.device.type == "meta" and pop.theta.shape[0] == 3
    assert {p.device.type for p in pop.stacked.module.parameters()} == {"meta"}
    assert not any(tmp_path.iterdir())  # building writes nothing


KILL_AT_SYNC = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import ntrl.records
from test_population import small_population
from ntrl.population import train_population
syncs = []
real = ntrl.records.sync_file_systems
def sync(paths):
    paths = list(paths)
    syncs.append(1)
    if len(syncs) == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(paths)
ntrl.records.sync_file_systems = sync
train_population(small_population({out!r}), progress=False)
"""


@pytest.mark.parametrize("kill_at", [1, 2])  # while the markers are written, then the configs and records
def test_a_population_killed_while_writing_its_run_directories_is_resumed(tmp_path, kill_at):
    """A hard kill (no cleanup runs) during the first sync leaves every directory with temporary
    files of its marker at most, during the second with its marker in place: a resumed population
    trains every member either way. (With one batch for all three files, a kill left the
    config's temporary file beside no marker, which ntrl refuses even with --force.)"""
    import subprocess
    import sys

    code = KILL_AT_SYNC.format(tests=str(Path(__file__).parent), kill_at=kill_at, out=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    left = {p.name for d in tmp_path.iterdir() for p in d.iterdir()}
    assert left and all(name.endswith(".tmp") for name in left - {".ntrl-run"}), left
    result = train_population(small_population(tmp_path), progress=False, resume=True)
    assert not result.failures and [r.summary["status"] for r in result.results] == ["finished"] * 4


def test_two_members_that_reach_one_directory_by_different_paths_are_refused(tmp_path):
    """``out`` and ``out/../out`` (or a link to ``out``) name one run directory: refused before
    anything is written, as two members of the same run name are."""
    from ntrl.config import ConfigError

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for other in (tmp_path / "real" / ".." / "real", tmp_path / "link"):
        a, b = small_population(tmp_path / "real", members=1) + small_population(other, members=1)
        with pytest.raises(ConfigError, match="distinct run directories: members 0 and 1"):
            train_population([a, b], progress=False)
        assert not any((tmp_path / "real").iterdir())


def test_run_directories_are_told_apart_by_the_directory_not_the_path(tmp_path):
    """prepare_run_dirs compares the directories it made (device and inode), which catches what a
    path comparison cannot (a bind mount, a case-insensitive file system): here a link, given to
    it directly, past the population's own check of the paths. The directory it made is removed
    again."""
    from ntrl.config import ConfigError
    from ntrl.train import prepare_run_dirs

    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    configs = small_population(tmp_path / "real", members=1) + small_population(tmp_path / "link", members=1)
    with pytest.raises(ConfigError, match=r"members 0 and 1 both write .* \(by different paths"):
        prepare_run_dirs(configs)
    assert not any((tmp_path / "real").iterdir())


def test_run_directories_made_for_a_population_that_fails_are_removed_again(tmp_path, monkeypatch):
    """Directories ``prepare_run_dirs`` made (the run directories and a missing ``out``) are
    removed again when writing the markers fails, where they are still empty; a directory that
    was there before stays."""
    from ntrl.train import prepare_run_dirs

    (tmp_path / "kept").mkdir()
    configs = small_population(tmp_path / "new" / "out") + small_population(tmp_path / "kept")

    def failing(items, sync_also=(), written=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("ntrl.train.write_bytes_many_atomic", failing)
    with pytest.raises(OSError, match="No space"):
        prepare_run_dirs(configs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_population_without_a_wandb_parent_says_in_each_config_that_it_logs_no_wandb_run(tmp_path):
    """Without ``wandb_parent`` a population logs no W&B run: config.json says ``wandb: disabled``,
    as the summary's ``wandb_mode`` does, whatever mode the configs asked for."""
    configs = [dataclasses.replace(c, wandb="offline") for c in small_population(tmp_path, members=2)]
    result = train_population(configs, progress=False)
    for r in result.results:
        assert json.loads((r.run_dir / "config.json").read_text())["wandb"] == "disabled"
        assert r.summary["wandb_mode"] == "disabled" and r.summary["wandb_dir"] is None


def test_the_garbage_collector_is_paused_for_the_setup_alone(tmp_path, monkeypatch):
    """Python's collector is off while the members are built (each full collection walks every
    object alive) and as it was afterwards: on again, or still off where the caller had it off."""
    import gc

    from ntrl.population import trainer

    during = []
    original = trainer._Population.__init__

    def init(self, *args, **kwargs):
        during.append(gc.isenabled())
        original(self, *args, **kwargs)

    monkeypatch.setattr(trainer._Population, "__init__", init)
    assert gc.isenabled()
    train_population(small_population(tmp_path / "a"), progress=False)
    assert during == [False] and gc.isenabled()
    gc.disable()
    try:
        train_population(small_population(tmp_path / "b"), progress=False)
        assert not gc.isenabled()
    finally:
        gc.enable()


@pytest.mark.skipif(__import__("sys").platform != "linux", reason="one syncfs stands for the fsyncs on Linux only")
def test_a_populations_run_directories_are_complete_before_it_trains(tmp_path, monkeypatch):
    """Each member's directory holds its marker, its config.json and an empty records file before
    the first update, written with two syncs in all (no fsync of each file)."""
    from ntrl.population import trainer
    from ntrl.run_dirs import MARKER, marker_kind

    fsyncs = []
    monkeypatch.setattr("ntrl.records.os.fsync", lambda fd: fsyncs.append(fd))
    seen = {}
    original = trainer._Population.forward

    def forward(self):
        if not seen:
            for i in range(4):
                d = tmp_path / f"m{i}"
                seen[i] = (marker_kind(d), json.loads((d / "config.json").read_text())["seed"],
                           (d / "records.jsonl").read_bytes(), (d / MARKER).is_file())
            seen["fsyncs before training"] = len(fsyncs)
        return original(self)

    monkeypatch.setattr(trainer._Population, "forward", forward)
    train_population(small_population(tmp_path), progress=False)
    assert seen.pop("fsyncs before training") == 0  # syncfs once (Linux), not an fsync a file
    assert seen == {i: ("run", i, b"", True) for i in range(4)}


def test_a_population_stopped_while_writing_its_run_directories_can_be_run_again(tmp_path, monkeypatch):
    """The files go into place markers first: an error (or a kill) part-way leaves directories
    that are empty or marked as ntrl's, never a config.json without a marker, which would be a
    directory ntrl refuses as not its own. Resuming then trains every member."""
    import os

    from ntrl.run_dirs import MARKER

    renames = []
    real = os.replace

    def failing(src, dst):
        if len(renames) == 6:  # the 4 markers and 2 of the config.json files
            raise OSError(28, "No space left on device")
        renames.append(dst)
        real(src, dst)

    monkeypatch.setattr("ntrl.records.os.replace", failing)
    with pytest.raises(OSError, match="No space"):
        train_population(small_population(tmp_path), progress=False)
    assert [Path(d).name for d in renames] == [MARKER] * 4 + ["config.json"] * 2
    monkeypatch.setattr("ntrl.records.os.replace", real)
    result = train_population(small_population(tmp_path), progress=False, resume=True)
    assert not result.failures and [r.summary["status"] for r in result.results] == ["finished"] * 4
    assert [len(read_records(r.run_dir)) for r in result.results] == [3] * 4


def test_log_spaced_tracking_schedule(tmp_path):
    cfg = BanditConfig(policy="single_logit", optimizer="sgd", p0=0.2, lr=0.5, steps=1000, reward_do=-1.0,
                       reward_dont=1.0, wandb="disabled", out=str(tmp_path), run_name="x")
    pop = train_population([cfg], schedule=TrackSchedule(per_decade=4), progress=False)
    updates = [r["update"] for r in read_records(pop.results[0].run_dir)]
    want = sorted({0} | {round(10 ** (i / 4)) for i in range(13)} - {1000})
    assert updates == want  # 0, 1, 2, 3, 6, 10, 18, 32, 56, 100, 178, 316, 562


def test_p_down_to_1e_minus_12_stays_finite(tmp_path):
    cfg = BanditConfig(policy="mlp", optimizer="npg", p0=1e-12, lr=0.1, steps=5, width=8, track_every=1,
                       wandb="disabled", out=str(tmp_path), run_name="x")
    pop = train_population([cfg], progress=False)
    recs = read_records(pop.results[0].run_dir)
    assert not pop.failures and len(recs) == 5
    assert recs[0]["P/value"] == pytest.approx(1e-12, rel=1e-9)
    # NTVar in the Fisher geometry is p(1 − p) (SCIENCE.md §1), also at p = 1e-12
    assert recs[0]["P/ntvar_fisher"] == pytest.approx(1e-12 * (1 - 1e-12), rel=1e-6)


def test_batched_engine_agrees_with_the_torch_func_reference():
    """∇P per member (chain rule through the logits, one reverse pass for all members) and the
    batched inverse Fisher against the per-run engine's jacrev reference, in float64."""
    from ntrl.agents.policies import make_policy
    from ntrl.properties import ActionProbability

    obs = torch.ones(1, 1, dtype=torch.float64)
    policies = [make_policy("mlp", 1, 2, 1, p0, obs, seed=s, width=8) for s, p0 in enumerate([0.3, 1e-3, 1e-8])]
    sp = StackedPolicy(policies[0])
    theta = torch.stack([sp.flatten(p) for p in policies])
    leaves = sp.leaves(theta)
    Z = sp.logits(leaves, obs)
    P = torch.log_softmax(Z[:, 0], -1)[:, 1].exp()
    gP, z0, z1 = member_gradients([P, Z[:, 0, 0], Z[:, 0, 1]], leaves)
    probs = torch.softmax(Z.detach(), -1)
    fisher = BatchedInverseFisher.from_log_prob_rows(log_prob_rows(torch.stack([z0, z1], 1)[:, None], probs),
                                                     torch.ones(3, 1, dtype=torch.float64), probs,
                                                     torch.zeros(3, dtype=torch.float64))
    for m, policy in enumerate(policies):
        engine = TangentEngine(policy, dtype=torch.float64, backend="reference")
        X = ActionProbability(obs, 1)
        _, J = engine.jacobian(X)
        assert torch.allclose(gP[m], J[0], rtol=1e-12, atol=0)
        ref = InverseFisher(engine, obs, torch.ones(1, dtype=torch.float64))
        want = (J * ref.apply(J)).sum()
        assert float(fisher.ntvar(gP)[m]) == pytest.approx(float(want), rel=1e-10)


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_gradients_through_the_logits_equal_one_reverse_pass_per_output(policy):
    """The gradients of an update of a few members split at the logits (each output's
    cotangent at Z, then one batched pass through the network for all of them and for every
    logit) equal one reverse pass per output, to 1e-12 in float64, on a juice model with three
    members of different rewards."""
    from ntrl.engine.batched import member_gradients_through
    from ntrl.population.models import JuiceModel

    cfgs = juice_configs("unused", policy, "sgd")
    policies = []
    for c in cfgs:
        exp = c.build()
        exp.env.close()
        policies.append(exp.policy)
    model = JuiceModel.from_configs(cfgs, torch.device("cpu"))
    sp = StackedPolicy(policies[0])
    theta = torch.stack([sp.flatten(p) for p in policies])
    N, K = model.n_states, model.n_actions

    def outputs_and_leaves():
        leaves = sp.leaves(theta)
        with torch.enable_grad():
            Z = sp.logits(leaves, model.obs)
            q = model.quantities(Z)
        return [q["U"], q["P"], q["F"], q["P_probe"], q["z"][:, 0]], Z, leaves

    outputs, Z, leaves = outputs_and_leaves()
    got = member_gradients_through(outputs, Z, leaves, N * K)
    outputs, Z, leaves = outputs_and_leaves()
    want = member_gradients(outputs + [Z[:, o, a] for o in range(N) for a in range(K)], leaves)
    assert len(got) == len(want) == len(outputs) + N * K
    for g, w in zip(got, want):
        assert g.shape == w.shape == theta.shape
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-300)
    assert all(float(w.abs().max()) > 0 for w in want[:3])


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
def test_the_juice_p_gradient_from_u_and_f_equals_its_reverse_pass(tmp_path, policy, monkeypatch):
    """Where every member's reward is paid exactly for an approach (view radius 1), a tracked
    exact update forms ∇P = (∇U/(H·r) − P·∇F)/F instead of a reverse pass through the
    visitation (the MLP's: the same of the cotangents at the logits, ∂P/∂z, for
    :func:`~ntrl.population.trainer.states_tracked_update`). Each time, against that reverse pass:
    U/(H·r) = F·P is a product, and the subtraction's rounding is a few ulps of
    |∇(F·P)|/F = |∇P + P·∇F/F|, which for P ≤ ½ stays within a few times |∇P| here (measured: at
    most 3.4·10⁻¹⁴ normwise): 1e-12 leaves more than an order of magnitude. Rewards +1, −1 and
    2.5, P from 10⁻⁹ to 10⁻²."""
    from ntrl.experiments.juice import JuiceConfig
    from ntrl.population import trainer

    derive, compared = trainer.derived_gradients, []

    def checked(pop, q, names):
        derived = derive(pop, q, names)
        if "P" in derived:
            M = len(q["P"])
            at_logits = pop.states is not None  # the MLP: cotangents at the logits
            wrt = [q["Z"]] if at_logits else q["leaves"]
            parts = torch.autograd.grad(q["P"].sum(), wrt, retain_graph=True, allow_unused=True)
            want = torch.cat([(g if g is not None else torch.zeros_like(x)).reshape(M, -1)
                              for g, x in zip(parts, wrt)], dim=1)
            of = derived["P"]

            def compare(grads):
                got = of(grads)
                assert got.shape == want.shape
                compared.append(float(((got - want).norm(dim=1) / want.norm(dim=1)).max()))
                return got
            derived["P"] = compare
        return derived

    monkeypatch.setattr(trainer, "derived_gradients", checked)
    cfgs = [JuiceConfig(policy=policy, optimizer="sgd", p0=p0, lr=JUICE_LRS[policy]["sgd"], reward=r, steps=9,
                        seed=i, track_every=1, width=16, decomposition=False, wandb="disabled", out=str(tmp_path),
                        run_name=f"m{i}", price_scales=[])
            for i, (p0, r) in enumerate([(0.01, 1.0), (1e-4, -1.0), (1e-9, 2.5)])]
    assert not train_population(cfgs, progress=False).failures
    assert len(compared) == 9 and max(compared) < 1e-12, compared


def test_juice_members_that_stop_early_leave_the_rest_equal_to_their_runs(tmp_path):
    """A member that reaches ½ in its first updates leaves the population (the model keeps the
    other members' rewards, and with them r of the derived ∇P): the others' records still equal
    their runs'."""
    from ntrl.experiments.juice import JuiceConfig

    def configs(out):
        return [JuiceConfig(policy="tabular", optimizer="sgd", p0=p0, lr=JUICE_LRS["tabular"]["sgd"], reward=r,
                            steps=10, seed=i, track_every=1, decomposition=False, wandb="disabled", out=str(out),
                            run_name=f"m{i}", price_scales=[], stop_at_p=0.5 if r > 0 else None)
                for i, (p0, r) in enumerate([(1e-3, 1.0), (0.45, 1.0), (1e-2, -2.0), (1e-4, 3.0)])]

    per = [train(c, progress=False) for c in configs(tmp_path / "per")]
    pop = train_population(configs(tmp_path / "pop"), progress=False)
    assert not pop.failures
    assert per[1].summary["updates"] < 10 and per[1].summary["status"] == "stopped_at_p"  # it stops early
    for r1, r2 in zip(per, pop.results):
        assert r2.summary["updates"] == r1.summary["updates"]
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir))


def test_the_juice_p_gradient_is_derived_only_where_the_reward_is_paid_for_approaches():
    """r(s, a) = r·approach(s, a) holds at view radius 1 for every r ≠ 0; not at radius 2 (an
    approach from two cells away pays nothing), and not for r = 0 (∇U says nothing of ∇P)."""
    from ntrl.experiments.juice import JuiceConfig
    from ntrl.population.models import JuiceModel

    def rewards_of(radius, rewards):
        cfgs = [JuiceConfig(policy="tabular", p0=0.1, reward=r, view_radius=radius, wandb="disabled", out="unused")
                for r in rewards]
        r = JuiceModel.from_configs(cfgs, torch.device("cpu")).approach_reward()
        return None if r is None else r.tolist()

    assert rewards_of(1, [1.0, -1.0, 2.5]) == [1.0, -1.0, 2.5]
    assert rewards_of(1, [1.0, 0.0]) is None
    assert rewards_of(2, [1.0, -1.0]) is None


def test_the_juice_p_gradient_is_derived_only_while_every_p_is_at_most_a_half():
    """Above ½ the subtraction in ∇P = (∇U/(H·r) − P·∇F)/F loses digits as P → 1: the update then
    takes P's reverse pass (∇R = ∇U/H is derived at any P)."""
    from types import SimpleNamespace

    from ntrl.population.trainer import derived_gradients

    pop = SimpleNamespace(model=SimpleNamespace(approach_reward=lambda: torch.tensor([1.0, -1.0], dtype=torch.float64),
                                                utility_scale=50.0))
    names = ("P", "F", "R", "P_probe")

    def derived(P):
        q = {"P": torch.tensor(P, dtype=torch.float64), "F": torch.tensor([0.3, 0.2], dtype=torch.float64)}
        return list(derived_gradients(pop, q, names))

    assert sorted(derived([0.5, 1e-6])) == ["P", "R"]
    assert derived([0.51, 1e-6]) == ["R"]
    assert derived([float("nan"), 1e-6]) == ["R"]


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_a_few_juice_members_take_the_split_gradients_and_equal_their_runs(tmp_path, mode, split, monkeypatch):
    """Populations of at most SPLIT_MEMBERS members take their gradients through the logits
    (spied on here), larger ones a pass per output (SPLIT_MEMBERS set to 0 here, so that the same
    two members take that path): NPG on the juice MLP, tracked with the Fisher, held to the general
    path (which the juice MLP itself no longer takes: tests/test_population_states.py; the tabular
    policy does), every record equal to its run's either way."""
    import ntrl.population.trainer as trainer

    monkeypatch.setattr(trainer, "update_kind", lambda pop, tracked, first: trainer.general_update)
    if not split:
        monkeypatch.setattr(trainer, "SPLIT_MEMBERS", 0)
    calls = []
    real = trainer.member_gradients_through
    monkeypatch.setattr(trainer, "member_gradients_through", lambda *a, **k: calls.append(1) or real(*a, **k))
    configs = juice_sampled_configs if mode == "sampled" else juice_configs
    per = [train(c, progress=False) for c in configs(tmp_path / "per", "mlp", "npg")[:2]]
    pop = train_population(configs(tmp_path / "pop", "mlp", "npg")[:2], progress=False)
    assert not pop.failures and (len(calls) >= 12 if split else not calls)
    rtol = 1e-6 if mode == "sampled" else 1e-12  # sampled NPG on the MLP: see the sampled test above
    for r1, r2 in zip(per, pop.results):
        assert_records_equal(read_records(r1.run_dir), read_records(r2.run_dir), rtol=rtol, floor=1e-20)


def test_study_verdicts_are_the_same_with_and_without_populations(tmp_path):
    """A four-cell grid: the verdict table ntrl rarity prints, by population chunks and by single
    runs."""
    from ntrl.study.grid import StudyConfig
    from ntrl.study.executor import run_study
    from ntrl.study.rarity import analyse_and_report
    from ntrl.study.report import verdict_rows

    study = StudyConfig(name="v", policies=["single_logit", "mlp"], optimizers=["sgd", "npg"], p0s=[1e-2, 1e-3],
                        seeds=2, extinction_steps=40, max_steps=3000, track_every=5, width=8,
                        price_scales=[1.0, 0.5]).validate()
    tables = []
    for population in (True, False):
        out = tmp_path / str(population)
        run_study(study, out, workers=2, wandb_mode="disabled", progress=False, population=population)
        cells = analyse_and_report(out, "disabled")["cells"]
        tables.append([row[:8] for row in verdict_rows(cells)])  # the table ntrl rarity prints
    assert tables[0] == tables[1]
    assert len(tables[0]) == 4


def test_a_batch_of_identical_episodes_gives_no_step(tmp_path):
    """At p₀ = 1e-6 every one of the 8 sampled episodes takes the common action: the leave-one-out
    gradient is exactly 0, so sign descent (which would turn rounding noise into a step of η)
    does not move, per run and in a population. (P(some episode samples the rare action in 10
    updates) = 8e-5.)"""
    from ntrl.agents.reinforce import advantages

    G = np.array([[1.0, 0.3], [1.2, 0.1], [0.9, 0.7]])  # 3 episodes × 2 members
    A = advantages(G, "loo", np.array([True, False]))
    assert (A[:, 0] == 0).all() and (A[:, 1] == G[:, 1] - (G[:, 1].sum() - G[:, 1]) / 2).all()

    def cfg(out):
        return BanditConfig(policy="single_logit", optimizer="sign", mode="sampled", p0=1e-6, lr=0.1, steps=10,
                            batch_size=8, noise_std=0.3, track_every=1, wandb="disabled", out=str(out), run_name="r")
    for records in (read_records(train(cfg(tmp_path / "per"), progress=False).run_dir),
                    read_records(train_population([cfg(tmp_path / "pop")], progress=False).results[0].run_dir)):
        assert len(records) == 10
        assert all(r["P/real_delta"] == 0.0 and r["P/ntcov_euc"] == 0.0 for r in records)


def test_a_foreign_run_directory_refuses_the_population_before_anything_is_written(tmp_path):
    cfgs = member_configs(tmp_path, "single_logit", "sgd", "exact")
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="m2 holds files that ntrl did not write"):
        train_population(cfgs, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m2"]
    assert [p.name for p in (tmp_path / "m2").iterdir()] == ["notes.txt"]


class _InterruptAt(TrackSchedule):
    def tracks(self, t: int) -> bool:
        if t == 5:
            raise KeyboardInterrupt
        return True


def test_an_interrupted_population_keeps_every_members_records_and_summary(tmp_path):
    from ntrl.train import RunInterrupted

    cfgs = [dataclasses.replace(c, stop_below_p=None)
            for c in member_configs(tmp_path, "single_logit", "sgd", "exact", steps=100)]
    with pytest.raises(RunInterrupted, match="interrupted at update 5"):
        train_population(cfgs, schedule=_InterruptAt(), progress=False)
    with pytest.raises(ConfigError, match=r"m0 already holds a run; pass --force .* \(2 more members are refused, "
                                          r"each for its own run directory: \S*/m1, \S*/m2\)"):  # every one
        train_population(cfgs, progress=False)
    for c in cfgs:
        run_dir = tmp_path / c.run_name
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["updates"] == 5
        records = read_records(run_dir)
        assert [r["update"] for r in records] == [0, 1, 2, 3, 4]
        # P where its parameters are, as the per-run path's interrupted summary gives it
        assert summary["p_end"] == pytest.approx(records[-1]["P/value"] + records[-1]["P/real_delta"], rel=1e-12)


def test_ctrl_c_after_a_step_counts_it_as_the_per_run_path_does(tmp_path, monkeypatch):
    """Ctrl-C between update 6's step and its records: the summary counts the step taken (7
    updates, as the per-run path counts a step once taken) and gives P after it."""
    from ntrl.population import trainer
    from ntrl.train import RunInterrupted

    cfgs = [dataclasses.replace(c, stop_below_p=None)
            for c in member_configs(tmp_path, "single_logit", "sgd", "exact", steps=100)]
    original = trainer.record_fields

    def interrupted_at_6(t, *a, **k):
        if t == 6:
            raise KeyboardInterrupt
        return original(t, *a, **k)

    monkeypatch.setattr(trainer, "record_fields", interrupted_at_6)
    with pytest.raises(RunInterrupted):
        train_population(cfgs, progress=False)
    for c in cfgs:
        summary = json.loads((tmp_path / c.run_name / "summary.json").read_text())
        alone = train(dataclasses.replace(c, steps=7, out=str(tmp_path / "alone")), progress=False)
        assert summary["status"] == "interrupted" and summary["updates"] == 7
        assert summary["p_end"] == pytest.approx(alone.summary["p_end"], rel=1e-12)


def test_resume_trains_only_the_members_a_population_left_unfinished(tmp_path, capsys):
    """An interrupted population, resumed: the members that had finished are read back, not
    trained (their files untouched); the others train from the start in their run directories,
    and every member's records and summary equal an uninterrupted population's."""
    from ntrl.train import RunInterrupted

    def cfgs(out):
        return [BanditConfig(policy="single_logit", optimizer="sgd", p0=p0, lr=2.0, steps=60, seed=i, track_every=3,
                             stop_at_p=0.5, wandb="disabled", out=str(out), run_name=f"m{i}")
                for i, p0 in enumerate([0.3, 0.01, 0.2, 1e-3])]

    whole = train_population(cfgs(tmp_path / "whole"), progress=False)
    crossed = [r.summary["updates"] for r in whole.results]
    assert min(crossed) < 10 < max(crossed)  # some stop before update 10, some after
    class InterruptAt5(TrackSchedule):  # the configs' own schedule, and Ctrl-C at update 5
        def tracks(self, t: int) -> bool:
            if t == 5:
                raise KeyboardInterrupt
            return super().tracks(t)

    with pytest.raises(RunInterrupted):
        train_population(cfgs(tmp_path / "pop"), schedule=InterruptAt5(every=3), progress=False)
    finished = [i for i, n in enumerate(crossed) if n <= 5]
    assert finished and len(finished) < 4
    before = {i: (tmp_path / "pop" / f"m{i}" / "summary.json").stat().st_mtime_ns for i in finished}
    with pytest.raises(ConfigError, match="already holds a run.*resume=True"):  # without resume: refused, as before
        train_population(cfgs(tmp_path / "pop"), progress=False)
    resumed = train_population(cfgs(tmp_path / "pop"), progress=False, resume=True)
    assert not resumed.failures
    for i, (r, w) in enumerate(zip(resumed.results, whole.results)):
        assert r.run_dir == tmp_path / "pop" / f"m{i}"
        if i in finished:
            assert (r.run_dir / "summary.json").stat().st_mtime_ns == before[i]
        assert read_records(r.run_dir) == [{**x} for x in read_records(w.run_dir)]
        for key in ("status", "updates", "p_end", "crossed_half_at"):
            assert r.summary[key] == w.summary[key], (i, key)
    again = train_population(cfgs(tmp_path / "pop"), progress=True, resume=True)  # all complete: nothing trains
    assert again.updates == 0 and [r.summary for r in again.results] == [r.summary for r in resumed.results]
    assert "ntrl: resume: 4 of 4 members already complete, read back untouched; training 0" in capsys.readouterr().err


def test_resume_refuses_a_complete_run_of_other_settings(tmp_path):
    cfg = BanditConfig(policy="single_logit", optimizer="sgd", p0=0.3, lr=2.0, steps=5, wandb="disabled",
                       out=str(tmp_path), run_name="m0")
    train_population([cfg], progress=False)
    records = (tmp_path / "m0" / "records.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"m0 holds a complete run of other settings \(lr differ\)"):
        train_population([dataclasses.replace(cfg, lr=1.0)], progress=False, resume=True)
    assert (tmp_path / "m0" / "records.jsonl").read_bytes() == records
    same = train_population([dataclasses.replace(cfg, threads=2)], progress=False, resume=True)  # no training setting
    assert same.updates == 0 and (tmp_path / "m0" / "records.jsonl").read_bytes() == records
    # a config.json written before a field existed lacks it: it trained as the field's default says ...
    written = (tmp_path / "m0" / "config.json").read_bytes()
    old = json.loads(written)
    del old["stop_below_p"], old["noise_std"]
    (tmp_path / "m0" / "config.json").write_text(json.dumps(old))
    assert train_population([cfg], progress=False, resume=True).updates == 0
    # ... so a run that sets it otherwise is of other settings
    with pytest.raises(ConfigError, match=r"other settings \(noise_std differ\)"):
        train_population([dataclasses.replace(cfg, noise_std=0.5)], progress=False, resume=True)
    (tmp_path / "m0" / "config.json").write_bytes(written)
    # a member that fails while others are read back is reported by its index among the configs
    bad = BanditConfig(policy="single_logit", optimizer="sgd", p0=0.01, lr=1e308, reward_do=1e10, steps=5,
                       track_every=1, wandb="disabled", out=str(tmp_path), run_name="m1")
    mixed = train_population([cfg, bad], progress=False, resume=True)
    assert [(i, name) for i, name, _ in mixed.failures] == [(1, "m1")] and mixed.results[0].summary == same.results[0].summary
    forced = train_population([dataclasses.replace(cfg, lr=1.0, force=True)], progress=False, resume=True)
    assert forced.results[0].summary["updates"] == 5 and json.loads((tmp_path / "m0" / "config.json").read_text())["lr"] == 1.0
    # a directory that looks like a complete run but is not ntrl's (no marker) is not read back
    theirs = tmp_path / "theirs" / "m0"
    theirs.mkdir(parents=True)
    for name in ("config.json", "summary.json"):
        (theirs / name).write_bytes((tmp_path / "m0" / name).read_bytes())
    with pytest.raises(ConfigError, match="holds files that ntrl did not write"):
        train_population([dataclasses.replace(cfg, lr=1.0, out=str(tmp_path / "theirs"))], progress=False, resume=True)
    assert sorted(p.name for p in theirs.iterdir()) == ["config.json", "summary.json"]


@pytest.mark.parametrize("policy", ["single_logit", "mlp"])
def test_ctrl_c_while_finished_members_are_dropped_keeps_every_summary(tmp_path, monkeypatch, policy):
    """Ctrl-C lands while the population drops the member that just finished (select): the
    population is interrupted, that member keeps the summary it finished with, the others get an
    interrupted one, and every summary has its returns (kept by member, not by row)."""
    from ntrl.population import models
    from ntrl.train import RunInterrupted

    cfgs = [BanditConfig(policy=policy, optimizer="sgd", p0=0.01, lr=0.1, steps=steps, seed=i, width=8, track_every=3,
                         wandb="disabled", out=str(tmp_path), run_name=f"m{i}") for i, steps in enumerate([3, 20, 20])]

    def interrupted(self, keep):
        raise KeyboardInterrupt

    monkeypatch.setattr(models.BanditModel, "select", interrupted)
    with pytest.raises(RunInterrupted):
        train_population(cfgs, progress=False)
    summaries = [json.loads((tmp_path / f"m{i}" / "summary.json").read_text()) for i in range(3)]
    assert [s["status"] for s in summaries] == ["finished", "interrupted", "interrupted"]
    assert [s["updates"] for s in summaries] == [3, 3, 3]
    assert all(isinstance(s["return_first"], float) and isinstance(s["return_last"], float) for s in summaries)
    # θ's rows were half selected: P is not read from rows that are not the members' own
    assert [s["p_end"] is None for s in summaries] == [False, True, True]


def test_wandb_goes_only_into_a_wandb_directory_of_ntrls(tmp_path, capfd):
    cfg = BanditConfig(policy="single_logit", optimizer="sgd", p0=0.2, lr=0.5, steps=3, wandb="offline",
                       out=str(tmp_path / "runs"), run_name="x")
    (tmp_path / "theirs" / "wandb").mkdir(parents=True)
    pop = train_population([cfg], wandb_parent=tmp_path / "theirs", progress=False)
    assert pop.wandb_dir is None and list((tmp_path / "theirs" / "wandb").iterdir()) == []
    assert "was not made by ntrl; W&B runs are not logged there" in capfd.readouterr().err
    cfg.force = True
    pop = train_population([cfg], wandb_parent=tmp_path / "ours", progress=False)
    assert pop.wandb_dir is not None and Path(pop.wandb_dir).parent == tmp_path / "ours" / "wandb"
    assert (tmp_path / "ours" / "wandb" / ".ntrl-run").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_rarity_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    from ntrl.cli import main

    assert main(["rarity", "--quick", "--device", "cuda", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("ntrl: error: --device: cuda was asked for, but torch sees no CUDA")
    assert not (tmp_path / "s").exists()


def test_study_chunks_are_sized_to_fit_each_workers_share_of_memory(monkeypatch, tmp_path):
    from ntrl.population import trainer
    from ntrl.study.executor import work_units
    from ntrl.study.grid import StudyConfig, enumerate_runs, train_config_for

    study = StudyConfig(name="c", policies=["mlp"], optimizers=["sgd"], seeds=4, width=8).validate()
    specs = enumerate_runs(study)  # one cell: 5 p₀ × 4 seeds rewarded, 4 punished
    _, per = trainer.config_member_bytes(train_config_for(study, specs[0], tmp_path, "disabled"))
    monkeypatch.setattr(trainer, "memory_limit", lambda device, max_memory: 10 * per)  # 10 members, 5 a worker
    units = work_units(study, specs, tmp_path, workers=2, population=True)
    assert all(kind == "population" and len(u) <= 5 for kind, u in units)
    assert sorted(s.run_id for _, u in units for s in u) == sorted(s.run_id for s in specs)
    monkeypatch.setattr(trainer, "memory_limit", lambda device, max_memory: 10**6 * per)
    assert len(work_units(study, specs, tmp_path, workers=2, population=True)) == 2  # one per worker


def test_study_units_start_longest_first(tmp_path):
    """The pool starts the units that may run longest first (their most updates times the seconds
    an update of their kind took), so that no long chunk starts last and leaves the study waiting
    for it alone; equals keep the grid's order. The 760-run grid's sampled NPG juice MLP chunk
    started 233 s in, behind every bandit cell, and the study ended with it at 834 s."""
    from ntrl.study.executor import estimated_seconds, work_units
    from ntrl.study.grid import StudyConfig, enumerate_runs

    study = StudyConfig(name="o", envs=["bandit", "juice"], policies=["single_logit", "mlp"], optimizers=["sgd", "npg"],
                        modes=["exact", "sampled"], p0s=[0.01], seeds=1, well_p0s=[0.01]).validate()
    specs = enumerate_runs(study)
    for population in (True, False):
        units = work_units(study, specs, tmp_path, workers=2, population=population)
        assert sorted(s.run_id for _, u in units for s in u) == sorted(s.run_id for s in specs)
        costs = [estimated_seconds(study, u) for _, u in units]
        assert costs == sorted(costs, reverse=True)
        kinds = [(u[0].env, u[0].policy) for _, u in units if u[0].env != "kbandit"]  # the well: by its 500,000
        assert kinds[0] == ("juice", "mlp") and kinds[-1] == ("bandit", "single_logit")
        assert kinds.index(("bandit", "mlp")) > max(i for i, k in enumerate(kinds) if k[0] == "juice")
        index = {s: i for i, s in enumerate(specs)}  # equals in the grid's order
        ties = [(a[1][0], b[1][0]) for a, b, ca, cb in zip(units, units[1:], costs, costs[1:]) if ca == cb]
        assert len(ties) >= 8 and all(index[a] < index[b] for a, b in ties)


def test_a_runs_update_cap_is_the_steps_of_its_config(tmp_path):
    """How many updates each run of the full grid may take, as its config says: 100,000 rewarded,
    50,000 punished, Adam's punished runs 20 second-moment memories (20,000 at β₂ = 0.999, 2,000
    at 0.99), the well's 500,000; update_cap (the units' order) says the same."""
    from ntrl.study.grid import StudyConfig, enumerate_runs, train_config_for, update_cap

    study = StudyConfig.full()
    expected = {"rewarded": 100_000, "punished": 50_000, "well": 500_000}
    seen = set()
    for spec in enumerate_runs(study):
        want = expected[spec.direction]
        if spec.direction == "punished" and spec.optimizer == "adam":
            want = {0.999: 20_000, 0.99: 2_000}[spec.adam_beta2]
        seen.add(want)
        assert train_config_for(study, spec, tmp_path, "disabled").steps == want == update_cap(study, spec), spec
    assert seen == {100_000, 50_000, 500_000, 20_000, 2_000}


def test_the_wandb_history_of_a_long_population_is_thinned_log_evenly():
    """history_due: every tracked update up to HISTORY_SPACING, then rows about 1 % of t apart; a
    member tracked every 10th update over 50,000 gives ~460 rows rather than 5,000, the spacing
    never below the tracking's and never above about 1 % of t."""
    from ntrl.population.trainer import HISTORY_SPACING, history_due

    logged, last = [], None
    for t in range(0, 50_000, 10):
        if history_due(t, last):
            logged.append(t)
            last = t
    assert logged[:10] == list(range(0, 100, 10))  # at first every tracked update
    assert 400 < len(logged) < 600
    gaps = [b - a for a, b in zip(logged, logged[1:])]
    assert all(g <= max(10, 10 + a // HISTORY_SPACING) for a, g in zip(logged, gaps))  # at most a step past 1 %
    assert all(g >= min(10, a // HISTORY_SPACING) for a, g in zip(logged, gaps))


def test_the_stop_watch_asks_the_same_rows_in_python_as_in_numpy(monkeypatch):
    """StopWatch.rows_to_check compares a few members in Python and more with numpy: both must pick
    the same rows, NaN and ±inf included, as members move, are refreshed and are dropped."""
    import math
    import random
    from types import SimpleNamespace

    from ntrl.population import trainer

    rng = random.Random(0)
    members = []
    for _ in range(8):
        p0 = rng.choice([1e-3, 0.2, 0.6])
        members.append(SimpleNamespace(
            p_start=p0, p_min=p0 * rng.choice([1, 0.5]), crossed=rng.choice([None, 3]), p_back_at=rng.choice([None, 7]),
            config=SimpleNamespace(stop_at_p=rng.choice([None, 0.5]), stop_below_p=rng.choice([None, 1e-4]),
                                   steps=rng.choice([10, 1000]))))
    watch = trainer.StopWatch(members)
    values = [math.nan, math.inf, -math.inf, 0.0, 1e-5, 1e-4, 5e-4, 1e-3, 0.1, 0.2, 0.3, 0.5, 0.6, 0.9]
    picked = set()

    def both(p, t):
        python = watch.rows_to_check(p, t)
        monkeypatch.setattr(trainer, "FEW_MEMBERS", 0)  # numpy for any number of members
        numpy = watch.rows_to_check(p, t)
        monkeypatch.setattr(trainer, "FEW_MEMBERS", 8)
        assert python == numpy, (p, t)
        return python

    for t in range(60):
        rows = both([rng.choice(values) for _ in watch.rows], t)
        picked.update(rows)
        for r in rows[:2]:  # as the trainer does: the member's state moves, then its row is refreshed
            st = members[r]
            st.p_min, st.crossed, st.p_back_at = st.p_min / 2, st.crossed or t, None
            watch.refresh(r, st)
        if t == 30:
            watch.select([0, 3, 5, 7])
            members = [members[i] for i in (0, 3, 5, 7)]
    assert 0 < len(picked) and len(watch.rows) == 4


def test_isotropic_noise_of_a_huge_metric_direction_is_finite_where_it_should_be():
    """The isotropic spread η·sqrt(tr Σ / P)·‖v‖ and covariance η²·(tr Σ / P)·v_X·v_Y, with v = M∇X
    near 10¹⁸⁹ (the inverse Fisher of a nearly deterministic policy: a sampled NPG juice run of the
    full grid whose P fell to 0): 0 where tr Σ = 0, where before 0·inf made it NaN and stopped the
    run; finite where the result is; the plain formula where nothing overflows. The per-run
    tracker and the population use the same helpers."""
    from types import SimpleNamespace

    from ntrl.engine.metrics import scaled_inner, scaled_norm
    from ntrl.population.trainer import noise_spread

    v = torch.tensor([[3e188, -4e188], [3.0, 4.0]], dtype=torch.float64)
    assert torch.equal(scaled_norm(v), torch.tensor([5e188, 5.0], dtype=torch.float64))
    assert torch.equal(scaled_norm(torch.zeros(2, 3, dtype=torch.float64)), torch.zeros(2, dtype=torch.float64))
    c = torch.tensor([0.0, 2.0], dtype=torch.float64)
    assert torch.equal(scaled_inner(c, v, v)[:1], torch.zeros(1, dtype=torch.float64))
    assert float(scaled_inner(c, v, v)[1]) == pytest.approx(50.0, rel=1e-15)
    assert float(scaled_inner(1e-300, v[:1], v[:1])[0]) == pytest.approx(2.5e77, rel=1e-12)
    assert not torch.isfinite(torch.sqrt((v[:1] ** 2).sum() * 0.0))  # what the plain formula gave

    M, B, N, K, P = 2, 4, 1, 2, 2
    batch = SimpleNamespace(C_episode=torch.zeros(M, B, N, K, dtype=torch.float64))  # every episode alike: tr Σ = 0
    rows = torch.ones(M, N, K, P, dtype=torch.float64)
    plan = SimpleNamespace(fisher=None, diagonal=torch.full((M, P), 1e189, dtype=torch.float64))
    grads = {"P": torch.ones(M, P, dtype=torch.float64), "F": torch.ones(M, P, dtype=torch.float64)}
    out = noise_spread(batch, rows, grads, plan, torch.full((M,), 0.1, dtype=torch.float64))
    for key in ("P/noise_sd_iso", "F/noise_sd_iso", "noise/cov_P_F_iso", "P/noise_sd", "noise/trace_sigma"):
        assert torch.equal(out[key], torch.zeros(M, dtype=torch.float64)), key


def test_a_sampled_juice_observation_outside_the_exact_model_is_an_error(tmp_path):
    """The rollout reads π by each observation's row of the exact model; an observation with no
    row (a key the model lacks) is a RuntimeError naming it, not the policy of another row."""
    from ntrl.population.trainer import _Population

    configs = [c.validate() for c in juice_sampled_configs(tmp_path, "tabular", "sgd")]
    pop = _Population(configs, torch.device("cpu"))
    try:
        q = pop.forward()
        pop.model.key_rows[0] = -1  # "juice not seen", the commonest observation
        with pytest.raises(RuntimeError, match="observation the juice gridworld's exact model does not have"):
            pop.model.sample(q, configs[0].batch_size, configs[0].baseline, pop.action_rngs, pop.noise_rngs)
    finally:
        pop.model.close()
