"""Safety (issue 10): every bad input is one line ``ntrl: error: FLAG: ...``, exit 2, no traceback
and no new directory; numbers that go wrong stop the run instead of writing nulls."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntrl.cli import join_negative_numbers, main
from ntrl.train import crossing_text, price_check_text

FAST = ["--steps", "2", "--no-wandb", "--quiet"]


def run_cli(argv, capsys) -> tuple[int, list[str], str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


def assert_one_error(code, err, flag: str, *words: str) -> str:
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith(f"ntrl: error: {flag}"), err
    for w in words:
        assert w in err[0], err
    return err[0]


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------- grid files
@pytest.mark.parametrize("line, key, words", [
    ('extinction_p0 = "0.2"', "extinction_p0", ["a number", "the string '0.2'"]),
    ("price_scales = 5", "price_scales", ["a list of numbers", "the number 5"]),
    ('price_scales = ["a"]', "price_scales", ["a list of numbers"]),
    ("name = 5", "name", ["a string", "the number 5"]),
    ("[name]\nx = 1", "name", ["a string", "a table"]),
    ('seeds = "3"', "seeds", ["an integer", "the string '3'"]),
    ("seeds = true", "seeds", ["an integer", "the boolean true"]),
    ('policies = "mlp"', "policies", ["a list of strings"]),
    ("lrs = 3", "lrs", ["a table"]),
    ('[lrs.bandit.mlp]\nsgd = "fast"', "lrs", ["numbers", "the string 'fast'"]),
])
def test_grid_values_of_the_wrong_type(cwd, capsys, line, key, words):
    (cwd / "g.toml").write_text(line + "\n")
    code, err, _ = run_cli(["rarity", "--config", "g.toml", "--no-wandb", "--quiet"], capsys)
    assert_one_error(code, err, f"config key '{key}'", *words)
    assert sorted(p.name for p in cwd.iterdir()) == ["g.toml"]


def test_grid_with_zero_runs_names_the_policies_each_env_supports(cwd, capsys):
    (cwd / "g.toml").write_text('envs = ["juice"]\npolicies = ["single_logit"]\n')
    code, err, _ = run_cli(["rarity", "--config", "g.toml", "--no-wandb", "--quiet"], capsys)
    assert_one_error(code, err, "config key 'policies'", "no runs", "juice: tabular, mlp")
    assert sorted(p.name for p in cwd.iterdir()) == ["g.toml"]


def test_config_that_is_a_directory(cwd, capsys):
    (cwd / "grids").mkdir()
    code, err, _ = run_cli(["rarity", "--config", "grids", "--no-wandb"], capsys)
    assert_one_error(code, err, "--config", "is a directory")


@pytest.mark.parametrize("content, words", [
    (None, ["no study.json"]),
    ("{not json", ["not valid JSON"]),
    ('{"hello": 1}', ["not an ntrl study file"]),
    ("[1, 2]", ["not an ntrl study file"]),
])
def test_analyse_only_on_missing_malformed_or_foreign_study_file(cwd, capsys, content, words):
    (cwd / "st" / "rarity-quick").mkdir(parents=True)
    if content is not None:
        (cwd / "st" / "rarity-quick" / "study.json").write_text(content)
    before = sorted(cwd.rglob("*"))
    code, err, _ = run_cli(["rarity", "--analyse-only", "--out", "st", "--no-wandb"], capsys)
    assert_one_error(code, err, "--out", *words)
    code, err, _ = run_cli(["rarity", "--analyse-only", "--study-dir", "st/rarity-quick", "--no-wandb"], capsys)
    assert_one_error(code, err, "--study-dir", *words)
    assert sorted(cwd.rglob("*")) == before


# ---------------------------------------------------------------------- flags
def test_unreachable_f0_says_which_range_can_be_reached(cwd, capsys):
    code, err, _ = run_cli(["train", "juice", "--f0", "1e-12", *FAST], capsys)
    line = assert_one_error(code, err, "--f0", "cannot be reached", "between")
    assert not (cwd / "runs").exists(), line


def test_negative_number_in_scientific_notation_is_a_value(cwd, capsys):
    code, err, out = run_cli(["train", "bandit", "--reward-dont", "-1e3", "--run-name", "r", *FAST], capsys)
    assert code == 0, err
    assert json.loads((cwd / "runs" / "r" / "config.json").read_text())["reward_dont"] == -1000.0
    assert join_negative_numbers(["--a", "-1e3", "-v", "--b=-2", "--c", "-.5E-2", "--", "-1e3"]) == \
        ["--a=-1e3", "-v", "--b=-2", "--c=-.5E-2", "--", "-1e3"]


def test_npy_messages_say_what_is_wrong(cwd, capsys):
    (cwd / "states.npy").mkdir()
    code, err, _ = run_cli(["train", "--env", "CartPole-v1", "--probe-states", "states.npy", *FAST], capsys)
    assert_one_error(code, err, "--probe-states", "is a directory")
    (cwd / "text.npy").write_text("1 2 3 4\n")
    code, err, _ = run_cli(["train", "--env", "CartPole-v1", "--probe-states", "text.npy", *FAST], capsys)
    line = assert_one_error(code, err, "--probe-states", "is not a .npy file")
    assert "pickled" not in line
    np.save(cwd / "good.npy", np.zeros((3, 4), dtype=np.float32))
    code, err, _ = run_cli(["train", "--env", "CartPole-v1", "--probe-states", "good.npy", *FAST], capsys)
    assert code == 0, err


def test_crossing_is_not_claimed_when_p_started_above_half():
    s = {"p_start": 0.7, "crossed_half_at": None, "started_above_half": True}
    assert crossing_text(s) == ", having started at or above 1/2"
    assert crossing_text({"p_start": 0.1, "crossed_half_at": 12}) == ", crossing 1/2 at update 12"
    assert crossing_text({"p_start": 0.1, "crossed_half_at": None}) == ", without reaching 1/2"


def test_p0_above_half_is_reported_as_started_above(cwd, capsys):
    code, err, out = run_cli(["train", "bandit", "--p0", "0.7", *FAST], capsys)
    assert code == 0, err
    assert "having started at or above 1/2" in out and "crossing" not in out


# ---------------------------------------------------------------------- numbers that go wrong
def test_non_finite_values_stop_the_run_and_keep_the_records(cwd, capsys):
    """r = 1e300: ‖∇R‖² overflows at the first tracked update (and Adam's g² with it)."""
    code = main(["train", "bandit", "--run-name", "r", "--steps", "5", "--no-wandb", "--quiet",
                 "--reward-do", "1e300", "--optimizer", "adam"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert err[0].startswith("ntrl: training stopped: ") and "became non-finite at update 0" in err[0], err
    summary = json.loads((cwd / "runs" / "r" / "summary.json").read_text())
    assert summary["status"] == "failed"
    lines = (cwd / "runs" / "r" / "records.jsonl").read_text().splitlines()
    assert "null" not in "".join(lines)  # no record holds a non-finite value written as null


def test_adam_state_that_overflows_is_named():
    """g = 1e200 makes Adam's second moment g² = inf: its step is then 0 and the agent would never
    learn, with every tracked quantity finite; the check names the state that overflowed."""
    import torch

    from ntrl.agents.optimizers import make_optimizer

    policy = torch.nn.Linear(2, 2).double()
    opt = make_optimizer("adam", policy, 0.1)
    assert opt.nonfinite_state() is None
    n = sum(p.numel() for p in policy.parameters())
    opt.apply(opt.plan(torch.full((n,), 1e100, dtype=torch.float64)))
    assert opt.nonfinite_state() is None
    opt.apply(opt.plan(torch.full((n,), 1e200, dtype=torch.float64)))
    assert opt.nonfinite_state() == "exp_avg_sq"
    sgd = make_optimizer("sgd", policy, 0.1)
    with torch.no_grad():
        policy.weight[0, 0] = float("nan")
    assert sgd.nonfinite_state() == "parameters"


def test_summary_never_prints_nan_or_inf():
    texts = [
        price_check_text({"n": 5, "r2": float("nan"), "median_rel_error": float("nan")}),
        price_check_text({"n": 1, "r2": float("nan"), "median_rel_error": 0.01}),
        price_check_text({"n": 5, "r2": -float("inf"), "median_rel_error": 5.9e299}),
        price_check_text({"n": 0, "r2": float("nan"), "median_rel_error": float("nan")}),
        price_check_text({"n": 5, "r2": None, "median_rel_error": None}),
    ]
    for t in texts:
        assert "nan" not in t.lower() and "inf" not in t.lower(), t
        assert len(t) < 300, t
    assert "realised ΔP was 0 at every update" in texts[0]
    assert "5.9e+301%" in texts[2]


def test_huge_learning_rate_prints_no_300_digit_percentage(cwd, capsys):
    code, err, out = run_cli(["train", "bandit", "--lr", "1e300", "--steps", "5", "--no-wandb", "--quiet"], capsys)
    assert code in (0, 1), err
    import re

    assert out and not re.search(r"\d{20,}", out), out
    assert "nan" not in out.lower()


# ---------------------------------------------------------------------- property-based bad input
BAD_VALUES = {
    "--p0": st.sampled_from(["0", "1", "-0.5", "2", "nan", "abc", "", "1e400"]),
    "--lr": st.sampled_from(["0", "-1", "-1e3", "nan", "inf", "x"]),
    "--steps": st.sampled_from(["0", "-3", "1.5", "ten", ""]),
    "--batch-size": st.sampled_from(["0", "-1", "2.5"]),
    "--track-every": st.sampled_from(["0", "-2"]),
    "--optimizer": st.text(min_size=1, max_size=6).filter(lambda s: s not in ("sgd", "adam", "npg", "sign")
                                                         and not s.startswith("-")),
    "--policy": st.sampled_from(["cnn", "MLP", "linear"]),
    "--mode": st.sampled_from(["approx", "Exact"]),
    "--run-name": st.sampled_from(["..", ".", "", "a/b", "/etc", "x/../y"]),
    "--out": st.sampled_from(["/proc/ntrl", "/sys/x", "/dev/ntrl-x"]),
    "--stop-at-p": st.sampled_from(["0", "1", "1.5", "-0.1"]),
    "--wandb": st.sampled_from(["maybe", "ON"]),
}
GRID_BAD = {
    "seeds": st.sampled_from(['"3"', "0", "-1", "1.5", "true", "[1]"]),
    "extinction_p0": st.sampled_from(['"0.2"', "0", "1.5", "[0.2]"]),
    "p0s": st.sampled_from(["[]", "[0.7]", '["a"]', "0.1", "[0]"]),
    "price_scales": st.sampled_from(["5", '["a"]', "[1.0]", "[2.0, 1.0]"]),
    "name": st.sampled_from(["5", '".."', '"a/b"', '""', "[1]"]),
    "policies": st.sampled_from(['["cnn"]', '"mlp"', "[]"]),
    "max_steps": st.sampled_from(["0", '"10"']),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flag=st.sampled_from(sorted(BAD_VALUES)), data=st.data())
def test_bad_flag_values_are_one_line_exit_2_and_leave_no_directory(tmp_path_factory, monkeypatch, capsys, flag, data):
    work = tmp_path_factory.mktemp("bad")
    monkeypatch.chdir(work)
    value = data.draw(BAD_VALUES[flag])
    code = main(["train", "bandit", *FAST, f"{flag}={value}"])
    err = capsys.readouterr().err
    assert code == 2, (flag, value, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ntrl"), (flag, value, err)
    assert "Traceback" not in err
    assert list(work.iterdir()) == []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(sorted(GRID_BAD)), data=st.data())
def test_bad_grid_files_are_one_line_exit_2_and_leave_no_directory(tmp_path_factory, monkeypatch, capsys, key, data):
    work = tmp_path_factory.mktemp("badgrid")
    monkeypatch.chdir(work)
    (work / "g.toml").write_text(f"{key} = {data.draw(GRID_BAD[key])}\n")
    code = main(["rarity", "--config", "g.toml", "--no-wandb", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, (key, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ntrl: error: "), (key, err)
    assert "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["g.toml"]


@pytest.mark.parametrize("kw, flag, words", [
    (dict(lr="0.01"), "--lr", "must be a number, got str '0.01'"),
    (dict(seed=1.5), "--seed", "must be an integer, got float 1.5"),
    (dict(steps=True), "--steps", "must be an integer, got bool"),
    (dict(price_scales=[1.0, "a"]), "--price-scales", "must be a list of numbers"),
    (dict(run_name=3), "--run-name", "must be a string or None, got int 3"),
    (dict(axes=["policy"]), "axes", "must be a dict"),  # no flag: named as the field, not as a --axes
])
def test_a_python_caller_s_value_of_the_wrong_type_is_named_before_anything_is_written(tmp_path, kw, flag, words):
    from ntrl.config import ConfigError
    from ntrl.experiments.bandit import BanditConfig
    from ntrl.experiments.kbandit import KBanditConfig
    from ntrl.population import train_population
    from ntrl.train import train

    with pytest.raises(ConfigError, match=f"^{flag}: {words}"):
        train(BanditConfig(**{"out": str(tmp_path / "a"), "steps": 3, "wandb": "disabled", **kw}), progress=False)
    members = [{"out": str(tmp_path / "b"), "steps": 3, "wandb": "disabled", "run_name": f"m{i}", "seed": i}
               for i in range(2)]
    with pytest.raises(ConfigError, match=f"^{flag}: member 1 .*{words}"):
        train_population([BanditConfig(**{**m, **(kw if i == 1 else {})}) for i, m in enumerate(members)],
                         progress=False)
    with pytest.raises(ConfigError, match="^--rewards: must be a list of numbers or None"):
        KBanditConfig(out=str(tmp_path / "c"), rewards=["1", 0]).validate()  # read before the base class's checks
    from ntrl.experiments.gym_env import GymConfig

    with pytest.raises(ConfigError, match="^--property: must be a list of properties .* got str 'action:1'"):
        GymConfig(env="CartPole-v1", out=str(tmp_path / "d"), property="action:1").validate()  # not its characters
    assert not any(tmp_path.iterdir())


def test_a_pathlib_out_is_taken_as_its_string(tmp_path):
    from pathlib import Path

    from ntrl.experiments.bandit import BanditConfig
    from ntrl.population import train_population
    from ntrl.train import train

    result = train(BanditConfig(out=Path(tmp_path), run_name="r", steps=3, wandb="disabled"), progress=False)
    assert json.loads((result.run_dir / "config.json").read_text())["out"] == str(tmp_path)
    configs = [BanditConfig(out=Path(tmp_path), run_name=f"m{i}", seed=i, steps=3, wandb="disabled") for i in range(2)]
    train_population(configs, progress=False)
    train_population(configs, progress=False, resume=True)  # the written config is this config: nothing to redo
    assert json.loads((tmp_path / "m1" / "summary.json").read_text())["status"] == "finished"


def test_numpy_numbers_from_a_sweep_are_taken_as_python_numbers(tmp_path):
    """np.int64 and np.float32 (what np.arange and np.linspace give a sweep) fit an int and a
    float field; they are kept as Python's int and float, so config.json can hold them (they had
    passed the type check, then failed writing it with a half-made run directory left behind)."""
    import numpy as np

    from ntrl.experiments.bandit import BanditConfig
    from ntrl.population import train_population
    from ntrl.train import train

    def cfg(name, seed):
        return BanditConfig(out=str(tmp_path), run_name=name, seed=np.int64(seed), steps=np.int64(3),
                            lr=np.float32(0.5), price_scales=[np.float32(1.0), np.float64(0.5)], wandb="disabled")

    train(cfg("r", 0), progress=False)
    train_population([cfg(f"m{i}", i) for i in range(2)], progress=False)
    for name in ("r", "m1"):
        written = json.loads((tmp_path / name / "config.json").read_text())
        assert (written["steps"], written["lr"], written["price_scales"]) == (3, float(np.float32(0.5)), [1.0, 0.5])
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "finished"
