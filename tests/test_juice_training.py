"""Training on the juice gridworld: configs, starting rarity, the CLI, and learning from P = 0.01."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ntrl.cli import EXPERIMENTS, main
from ntrl.config import ConfigError
from ntrl.envs.juice import JuiceGridworldVector, tabular_model
from ntrl.experiments.juice import JuiceConfig
from ntrl.engine.tangent import TangentEngine
from ntrl.train import train


REPO = Path(__file__).resolve().parents[1]


def test_registered_in_cli():
    assert EXPERIMENTS["juice"][0] == "ntrl.experiments.juice:JuiceConfig"


@pytest.mark.parametrize("argv, flag", [
    (["--size", "1"], "--size"), (["--view-radius", "0"], "--view-radius"), (["--p0", "0"], "--p0"),
    (["--p0", "1.5"], "--p0"), (["--hide-prob", "1"], "--hide-prob"), (["--policy", "single_logit"], "--policy"),
])
def test_bad_input_is_one_line(argv, flag, capsys, tmp_path):
    assert main(["train", "juice", "--no-wandb", "--quiet", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_too_large_exact_model_is_a_config_error():
    with pytest.raises(ConfigError, match="limit of"):
        JuiceConfig(size=12, mode="exact").build()


def test_too_large_grid_trains_in_sampled_mode_on_probe_states():
    with pytest.warns(UserWarning, match="not tracked"):
        exp = JuiceConfig(size=12, mode="sampled", policy="tabular", batch_size=4, horizon=5).build()
    assert [p.name for p in exp.properties] == ["P"] and exp.extra_tracking is None


@pytest.mark.parametrize("policy", ["tabular", "mlp"])
@pytest.mark.parametrize("mode", ["exact", "sampled"])
@pytest.mark.parametrize("p0", [0.01, 0.2])
def test_policies_start_at_p0(policy, mode, p0):
    exp = JuiceConfig(policy=policy, mode=mode, p0=p0, width=32).build()
    eng = TangentEngine(exp.policy, dtype=torch.float64)
    P = float(eng.evaluate(exp.properties[0])[0])
    assert abs(P - p0) <= 0.1 * p0
    if policy == "tabular":
        assert float(eng.evaluate(exp.properties[3])[0]) == pytest.approx(p0, rel=1e-9)  # P_probe


def test_mlp_p0_out_of_reach_is_a_config_error():
    with pytest.raises(ConfigError, match="--p0"):
        JuiceConfig(policy="mlp", p0=0.6).build()


def test_f0_makes_seeing_rare_independently_of_p():
    cfg = JuiceConfig(policy="tabular", p0=0.1, f0=0.01)
    exp = cfg.build()
    eng = TangentEngine(exp.policy, dtype=torch.float64)
    vals = {p.name: float(eng.evaluate(p)[0]) for p in exp.properties}
    assert vals["F"] == pytest.approx(0.01, rel=1e-6) and vals["P"] == pytest.approx(0.1, rel=1e-9)
    assert 0 < cfg.resolved_hide_prob < 1
    with pytest.raises(ConfigError, match="--f0"):
        JuiceConfig(policy="tabular", p0=0.1, f0=0.9).build()


def test_sampled_mode_uses_native_vector_env_and_unbiased_gradient():
    """The sampled surrogate's gradient averages to the exact ∇J (within 4 standard errors of
    its projection on ∇J, over independent batches)."""
    cfg = JuiceConfig(policy="tabular", mode="sampled", p0=0.2, size=3, horizon=10, batch_size=256, seed=1)
    exp = cfg.build()
    assert isinstance(exp.env.unwrapped, JuiceGridworldVector)
    exp.env.reset(seed=0)
    eng = TangentEngine(exp.policy, dtype=torch.float64)
    rng = np.random.default_rng(0)
    g_exact = eng.jacobian(tabular_model(**cfg.env_kwargs()).expected_return)[1][0]
    proj = np.array([float(exp.utility(eng, rng).gradient @ g_exact) for _ in range(40)])
    target = float(g_exact @ g_exact)
    assert abs(proj.mean() - target) < 4 * proj.std(ddof=1) / np.sqrt(len(proj))


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "npg", "sign"])
@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_every_optimizer_and_mode_runs_and_tracks(optimizer, mode, tmp_path):
    cfg = JuiceConfig(policy="mlp", width=8, optimizer=optimizer, mode=mode, size=3, horizon=8, steps=3,
                      track_every=1, batch_size=16, lr=0.01, p0=0.05, out=str(tmp_path), wandb="disabled")
    result = train(cfg, progress=False)
    recs = [json.loads(line) for line in open(result.run_dir / "records.jsonl")]
    assert len(recs) == 3
    for r in recs:
        for key in ("P/pred_delta", "P/real_delta", "F/value", "R/value", "juice/ntcov_P_R",
                    "juice/F_ntvar_P", "juice/P_ntcov_P_F", "juice/identity_residual"):
            assert np.isfinite(r[key]), key
        assert abs(r["juice/identity_residual"]) <= 1e-10 * (abs(r["juice/F_ntvar_P"]) + abs(r["juice/P_ntcov_P_F"]))
        assert r["juice/ntvar_P"] == pytest.approx(r["P/ntvar_euc"], rel=1e-12)  # the same Jacobian rows


def test_mlp_learns_to_approach_from_p_001(tmp_path):
    """Default 5×5 grid, MLP from P = 0.01 (exact gradients, Adam): P passes 1/2, and the
    predicted and realised ΔP are logged at every update."""
    cfg = JuiceConfig(policy="mlp", p0=0.01, optimizer="adam", lr=0.01, steps=15, track_every=1,
                      out=str(tmp_path), wandb="disabled")
    result = train(cfg, progress=False)
    recs = [json.loads(line) for line in open(result.run_dir / "records.jsonl")]
    P = [r["P/value"] for r in recs]
    assert P[0] == pytest.approx(0.01, rel=0.1)
    assert result.summary["p_end"] > 0.5 and result.summary["crossed_half_at"] is not None
    assert len(recs) == cfg.steps
    assert all(np.isfinite(r["P/pred_delta"]) and np.isfinite(r["P/real_delta"]) for r in recs)
    # the first-order prediction is right in sign whenever P moves appreciably
    moving = [r for r in recs if abs(r["P/real_delta"]) > 1e-3]
    assert moving and all(np.sign(r["P/pred_delta"]) == np.sign(r["P/real_delta"]) for r in moving)
    assert max(abs(r["juice/identity_residual"]) for r in recs) < 1e-12


@pytest.mark.slow
def test_script_runs(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "train_juice.py"), "--steps", "3", "--width", "8",
                          "--out", str(tmp_path), "--wandb", "disabled"], capture_output=True, text=True, cwd=REPO,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "P = π(approach | seen)" in out.stdout
