"""The Python API from a notebook (issue 16): the README's "From a notebook" example, run
verbatim; to_dataframe of a run and of a study; RunResult.records; a user's own policy module and
the errors for modules that do not fit."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ntrl.experiments.bandit import BanditConfig
from ntrl.records import read_records, to_dataframe
from ntrl.train import train

ROOT = Path(__file__).resolve().parents[1]


def readme_notebook_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## From a notebook", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_notebook_example_runs_verbatim(tmp_path):
    code = readme_notebook_example()
    assert len(code.strip().splitlines()) <= 12
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "pred_delta" in lines[0] and lines[-1].startswith("200 ")
    assert float(lines[-1].split()[1]) > 0.9  # the Price check explains the changes of the user's own network
    assert (tmp_path / "runs" / "notebook" / "my-net" / "records.jsonl").is_file()


def test_to_dataframe_is_long_over_properties_and_probe_entries(tmp_path):
    from ntrl.experiments.gym_env import GymConfig

    r = train(GymConfig(env="CartPole-v1", steps=3, batch_size=4, wandb="disabled", out=str(tmp_path), run_name="cp"),
              progress=False)
    df = to_dataframe(r.run_dir)
    records = read_records(r.run_dir)
    n_probe = len(records[0]["P/value"])
    P = df[df.property == "P"]
    assert len(P) == len(records) * n_probe and sorted(P.entry.unique()) == list(range(n_probe))
    first = P[P["update"] == 0].sort_values("entry")
    assert first["value"].tolist() == records[0]["P/value"]  # list cells became rows
    assert not any(isinstance(v, list) for v in df.to_numpy().ravel())
    assert (df["run"] == "cp").all() and (df["env"] == "CartPole-v1").all()


def test_to_dataframe_of_a_study_has_its_axes(tmp_path):
    from ntrl.study import StudyConfig
    from ntrl.study.rarity import rarity

    study = StudyConfig(name="df", policies=["single_logit"], optimizers=["sgd", "npg"], p0s=[0.05, 0.005], seeds=1,
                        extinction_steps=100, price_scales=[1.0, 0.5])
    rarity(study, tmp_path / "df", workers=1, wandb_mode="disabled", progress=False)
    df = to_dataframe(tmp_path / "df")
    assert set(df.direction) == {"rewarded", "punished"} and set(df.optimizer) == {"sgd", "npg"}
    assert df.run.nunique() == 6 and set(df.p0) == {0.05, 0.005, 0.2}
    with pytest.raises(FileNotFoundError, match="holds no run"):
        to_dataframe(tmp_path / "nothing-here")


def test_own_policy_is_trained_and_bad_modules_get_one_clear_error(tmp_path):
    net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    before = [p.detach().clone() for p in net.parameters()]
    config = BanditConfig(steps=20, lr=0.05, wandb="disabled", out=str(tmp_path), run_name="own")
    r = train(config, progress=False, policy=net)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the user's module learned
    assert len(r.records) == 20 and r.summary["price_check_P"]["r2"] > 0.99
    with torch.no_grad():
        assert r.summary["p_end"] == pytest.approx(torch.softmax(net(torch.ones(1, 1, dtype=torch.float64)), -1)[0, 1].item())
    saved = json.loads((tmp_path / "own" / "config.json").read_text())
    assert saved["policy"] == "user:torch.nn.modules.container.Sequential" and saved["p0"] is None
    # a float32 module works too, in sampled mode (rollouts hand it the env's observations)
    sampled = BanditConfig(steps=3, mode="sampled", wandb="disabled", out=str(tmp_path), run_name="own32")
    assert train(sampled, progress=False, policy=nn.Linear(1, 2)).summary["status"] == "finished"
    for bad, match in [(nn.Linear(1, 3).double(), r"shape \(1, 2\)"), (nn.Linear(3, 2), r"policy\(obs\) failed"),
                       ("not a module", "must be a torch.nn.Module"), (nn.Identity(), "floating-point parameters")]:
        with pytest.raises((ValueError, TypeError), match=match):
            train(BanditConfig(steps=2, wandb="disabled", out=str(tmp_path), run_name="bad", force=True), progress=False,
                  policy=bad)
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_to_dataframe_keeps_per_scale_probe_lists_off_the_probe_rows(tmp_path):
    """The η-probe's lists have one entry per scale: with as many scales as probe states they must
    still not be spread over the states (they are left to read_records)."""
    from ntrl.experiments.gym_env import GymConfig

    r = train(GymConfig(env="CartPole-v1", n_probe=3, price_scales=[2.0, 1.0, 0.5], steps=2, batch_size=4,
                        wandb="disabled", out=str(tmp_path), run_name="ps"), progress=False)
    df = r.dataframe()
    assert "probe_lr" not in df.columns and len(r.records[0]["P/probe_lr"]) == 3
    assert {"algo", "policy", "optimizer"} <= set(df.columns) and (df["algo"] == "reinforce").all()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "records.jsonl").write_text("")
    assert list(to_dataframe(tmp_path / "empty").columns)[:3] == ["run", "update", "property"]
