"""``ntrl train --env ID``: any Gymnasium env, user properties, probe states, exact toy-text models,
and the one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

from ntrl.cli import main
from ntrl.config import ConfigError
from ntrl.experiments.gym_env import GymConfig, toy_text_model
from ntrl.records import read_records
from ntrl.engine.tangent import PolicyView, TangentEngine
from ntrl.train import train
from ntrl.experiments.user_properties import EventProbability, UserPropertyError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_env"


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


def run_cli(args, tmp_path, capsys):
    code = main(["train", *args, "--out", str(tmp_path / "runs"), "--no-wandb", "--quiet"])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------- a plain gymnasium env
def test_cartpole_reinforce_with_builtin_and_user_properties(tmp_path, capsys, example_on_path):
    code, out, err = run_cli(["--env", "CartPole-v1", "--steps", "4", "--run-name", "cp",
                              "--property", "action:1", "--property", "left=action:0"], tmp_path, capsys)
    assert code == 0, err
    assert "P = π(a=0)" in out
    recs = read_records(tmp_path / "runs" / "cp")
    assert len(recs) == 4
    for r in recs:
        for name in ("P", "action:1", "left"):
            for key in ("value", "ntvar_euc", "ntcov_euc", "pred_delta", "real_delta"):
                assert f"{name}/{key}" in r
        np.testing.assert_allclose(np.add(r["action:1/value"], r["left/value"]), 1.0, atol=1e-12)
        assert len(r["P/value"]) == 32  # one entry per probe state (--n-probe 32)


def test_python_api_with_callable_property_and_event(tmp_path):
    def push_right(view, probes):
        return view.probs(probes)[:, 1].mean()

    cfg = GymConfig(env="CartPole-v1", steps=3, out=str(tmp_path), wandb="disabled", n_probe=5,
                    property=[push_right, "event:operator:is_not"])  # is_not(obs, a): true for every (s, a), Σ_a π = 1
    res = train(cfg, progress=False)
    recs = read_records(res.run_dir)
    assert len(recs) == 3 and "push_right/real_delta" in recs[0]
    np.testing.assert_allclose(recs[0]["event_is_not/value"], 1.0, atol=1e-12)
    np.testing.assert_allclose(recs[0]["event_is_not/ntvar_euc"], 0.0, atol=1e-20)
    assert json.loads((res.run_dir / "config.json").read_text())["property"][0].endswith("push_right")


def test_event_probability_is_sum_of_action_probabilities():
    policy = torch.nn.Linear(3, 4, dtype=torch.float64)
    obs = torch.randn(6, 3, dtype=torch.float64)
    X = EventProbability(obs, lambda o, a: a in (1, 3) and o[0] > 0, 4)
    view = PolicyView(policy, dict(policy.named_parameters()))
    p = view.probs(obs)
    want = (p[:, 1] + p[:, 3]) * (obs[:, 0] > 0)
    np.testing.assert_allclose(X(view).detach().numpy(), want.detach().numpy(), atol=1e-14)


def test_probe_states_from_file_and_callable(tmp_path, capsys, example_on_path):
    probes = np.random.default_rng(0).normal(scale=0.05, size=(5, 4)).astype(np.float32)
    np.save(tmp_path / "probes.npy", probes)
    code, _, err = run_cli(["--env", "CartPole-v1", "--steps", "2", "--run-name", "f",
                            "--probe-states", str(tmp_path / "probes.npy")], tmp_path, capsys)
    assert code == 0, err
    assert len(read_records(tmp_path / "runs" / "f")[0]["P/value"]) == 5
    code, _, err = run_cli(["--env", "my_env:Corridor-v0", "--env-kwargs", '{"length": 9}', "--steps", "2",
                            "--run-name", "c", "--probe-states", "my_env:every_cell"], tmp_path, capsys)
    assert code == 0, err
    assert len(read_records(tmp_path / "runs" / "c")[0]["P/value"]) == 7  # the 7 inner cells of 9
    np.save(tmp_path / "bad.npy", np.zeros((5, 3)))
    code, _, err = run_cli(["--env", "CartPole-v1", "--probe-states", str(tmp_path / "bad.npy")], tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "--probe-states" in err and "(5, 3)" in err and "(N, 4)" in err


# ---------------------------------------------------------------------- exact toy-text models
def test_frozenlake_exact_model_matches_monte_carlo():
    env = gym.make("FrozenLake-v1")
    model = toy_text_model(env, horizon=100, one_hot=False)
    policy = torch.nn.Embedding(16, 4, dtype=torch.float64)
    torch.nn.init.zeros_(policy.weight)  # uniform policy
    view = PolicyView(policy, dict(policy.named_parameters()))
    J = float(model.exact_expected_reward(view).detach())
    rng = np.random.default_rng(0)
    env.reset(seed=0)
    returns = []
    for _ in range(4000):
        env.reset()
        total, done = 0.0, False
        while not done:
            _, r, term, trunc, _ = env.step(int(rng.integers(4)))
            total += r
            done = term or trunc
        returns.append(total)
    mc, se = np.mean(returns), np.std(returns) / np.sqrt(len(returns))
    assert abs(J - mc) < 4 * se + 1e-3, (J, mc, se)


def test_frozenlake_exact_mode_price_check(tmp_path, capsys):
    code, out, err = run_cli(["--env", "FrozenLake-v1", "--env-kwargs", '{"is_slippery": false}', "--mode", "exact",
                              "--policy", "tabular", "--property", "return", "--steps", "5", "--lr", "0.5",
                              "--target", "2", "--run-name", "fl"], tmp_path, capsys)
    assert code == 0, err
    recs = read_records(tmp_path / "runs" / "fl")
    assert all(r["R/value"] == pytest.approx(r["U"], rel=1e-12) for r in recs)  # the utility is J itself
    assert all(r["R/real_delta"] > 0 for r in recs)  # exact gradient ascent on J raises J
    for r in recs:  # ΔJ ≈ η ‖∇J‖² under SGD with exact gradients
        assert r["R/pred_delta"] == pytest.approx(r["R/real_delta"], rel=0.2)


def test_exact_mode_without_a_model_is_refused(tmp_path, capsys):
    code, _, err = run_cli(["--env", "CartPole-v1", "--mode", "exact"], tmp_path, capsys)
    assert code == 2 and "--mode" in err and "tabular" in err
    code, _, err = run_cli(["--env", "CartPole-v1", "--property", "return"], tmp_path, capsys)
    assert code == 2 and "--property" in err and "surrogate" in err


# ---------------------------------------------------------------------- bad input
class _NoObsSpaceCheck(gym.Env):
    """Fails check_env: reset returns an observation outside its space."""

    observation_space = gym.spaces.Box(0.0, 1.0, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.full(2, 5.0, dtype=np.float32), {}

    def step(self, action):
        return np.zeros(2, dtype=np.float32), 0.0, True, False, {}


def _bad_props():
    return {
        "raises": lambda view: 1 / 0,
        "matrix": lambda view: view.probs(torch.zeros(2, 4)),
        "nan": lambda view: view.probs(torch.zeros(1, 4))[0, 0] * float("nan"),
        "numpy": lambda view: 0.5,
    }


@pytest.mark.parametrize(
    "args, words",
    [
        (["--env", "NoSuchEnv-v3"], ["--env", "unknown environment", "NoSuchEnv"]),
        (["--env", "no_such_module_xyz:Thing-v0"], ["--env", "no module named 'no_such_module_xyz'"]),
        (["--env", "Pendulum-v1"], ["--env", "Box action space", "not supported yet"]),
        (["--env", "CartPole-v1", "--env-kwargs", "[1]"], ["--env-kwargs", "JSON object"]),
        (["--env", "CartPole-v1", "--property", "no_such_module_xyz:f"], ["--property", "no module"]),
        (["--env", "CartPole-v1", "--property", "my_env:no_such_function"], ["--property", "no attribute"]),
        (["--env", "CartPole-v1", "--property", "action:7"], ["--property", "out of range"]),
        (["--env", "CartPole-v1", "--algo", "dqn"], ["--algo", "ppo"]),
        (["--env", "ntrl-test/BrokenEnv-v0"], ["--env", "check_env", "--check-env false"]),
        (["--env", "CartPole-v1", "--property", "test_custom_env_props:raises"], ["--property", "ZeroDivisionError"]),
        (["--env", "CartPole-v1", "--property", "test_custom_env_props:matrix"], ["--property", "scalar or a 1-D"]),
        (["--env", "CartPole-v1", "--property", "test_custom_env_props:nan"], ["--property", "non-finite"]),
        (["--env", "CartPole-v1", "--property", "test_custom_env_props:numpy"], ["--property", "torch.Tensor"]),
    ],
    ids=["unknown-id", "unknown-module", "box-actions", "kwargs", "prop-module", "prop-attr", "prop-action",
         "algo", "check-env", "prop-raises", "prop-shape", "prop-nan", "prop-numpy"],
)
def test_bad_input_gets_one_line(args, words, tmp_path, capsys, example_on_path, monkeypatch):
    import sys
    import types

    if "ntrl-test/BrokenEnv-v0" not in gym.registry:
        gym.register("ntrl-test/BrokenEnv-v0", entry_point=_NoObsSpaceCheck)
    mod = types.ModuleType("test_custom_env_props")
    for k, v in _bad_props().items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, "test_custom_env_props", mod)
    code, out, err = run_cli(args, tmp_path, capsys)
    assert code == 2, (out, err)
    assert err.startswith("ntrl: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # nothing half-made


def test_property_failing_midway_names_run_and_update_and_keeps_records(tmp_path, capsys, example_on_path):
    code, out, err = run_cli(["--env", "my_env:Corridor-v0", "--target", "2", "--lr", "0.1", "--steps", "30",
                              "--property", "my_env:broken_after_a_while", "--run-name", "breaks"], tmp_path, capsys)
    assert code == 1
    assert err.startswith("ntrl: training stopped: property 'broken_after_a_while'") and err.count("\n") == 1
    assert "of run breaks" in err and "RuntimeError" in err
    step = int(err.split("at update ")[1].split(" ")[0])
    assert step >= 1
    run = tmp_path / "runs" / "breaks"
    assert len(read_records(run)) == step  # every update before the failing one was written
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


def test_user_property_error_type_from_python(example_on_path):
    import my_env

    cfg = GymConfig(env="my_env:Corridor-v0", target=2, lr=0.1, steps=30, wandb="disabled", out="/tmp/ntrl-unused",
                    property=["my_env:broken_after_a_while"])
    exp = cfg.validate().build()
    X = exp.properties[1]
    engine = TangentEngine(exp.policy)
    with torch.no_grad():
        for p in exp.policy.parameters():
            p.zero_()
        exp.policy.net[-1].bias[my_env.RIGHT] = 3.0
    with pytest.raises(UserPropertyError, match="broken_after_a_while"):
        engine.evaluate(X)
    with pytest.raises(ConfigError):
        GymConfig(env="CartPole-v1", n_probe=0).validate()
