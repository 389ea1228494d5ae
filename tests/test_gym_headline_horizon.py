"""Any Gymnasium env (issue 15, items 1 and 2): the headline P is the mean over the probe states
everywhere, and sampled episodes are cut at a horizon, so an env without a time limit cannot hang
a run."""

from __future__ import annotations

import json

import numpy as np

from ntrl.cli import main

FAST = ["--no-wandb", "--quiet"]


def test_headline_p_is_the_mean_over_the_probe_states(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--env", "CartPole-v1", "--steps", "3", "--run-name", "r", *FAST]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "runs" / "r"
    records = [json.loads(x) for x in (run / "records.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    first = np.asarray(records[0]["P/value"])
    assert first.size == summary["n_probe"] == 32
    assert summary["p_start"] == np.mean(first)  # not the first probe state's value
    last = np.asarray(records[-1]["P/value"]) + np.asarray(records[-1]["P/real_delta"])
    assert abs(summary["p_end"] - float(np.mean(last))) < 1e-12
    assert "the mean over 32 probe states" in out


def test_stop_at_p_uses_the_mean(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--env", "CartPole-v1", "--steps", "50", "--lr", "0.5", "--stop-at-p", "0.6",
                 "--run-name", "s", *FAST]) == 0
    summary = json.loads((tmp_path / "runs" / "s" / "summary.json").read_text())
    records = [json.loads(x) for x in (tmp_path / "runs" / "s" / "records.jsonl").read_text().splitlines()]
    means = [float(np.mean(np.asarray(r["P/value"]) + np.asarray(r["P/real_delta"]))) for r in records]
    if summary["status"] == "stopped_at_p":
        assert means[-1] >= 0.6 and all(m < 0.6 for m in means[:-1])
    else:
        assert all(m < 0.6 for m in means)


def test_env_without_a_time_limit_finishes_with_its_episodes_cut(tmp_path, monkeypatch, capsys):
    """CliffWalking-v1 has no time limit and a fresh policy rarely reaches the goal: without a
    horizon a rollout could run for 100,000 steps. Cut at the stated default of 1,000 steps (or
    --horizon), the run finishes and says how many episodes were cut."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--env", "CliffWalking-v1", "--steps", "2", "--run-name", "c", *FAST]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "c" / "summary.json").read_text())
    assert summary["rollout_horizon"] == 1000 and summary["episodes"] == 2 * 8
    assert 0 < summary["episodes_cut"] <= summary["episodes"]
    assert f"{summary['episodes_cut']} of 16 sampled episodes were cut at the horizon of 1000 steps" in out
    assert main(["train", "--env", "CliffWalking-v1", "--steps", "1", "--horizon", "20", "--run-name", "h",
                 *FAST]) == 0
    assert json.loads((tmp_path / "runs" / "h" / "summary.json").read_text())["rollout_horizon"] == 20


def test_cut_episodes_are_counted_by_the_rollout():
    import gymnasium as gym
    import torch

    from ntrl.agents.reinforce import collect_episodes

    env = gym.make("CliffWalking-v1")
    policy = torch.nn.Sequential(torch.nn.Linear(1, 4))  # reads the integer state as a float
    torch.nn.init.zeros_(policy[0].weight)
    torch.nn.init.zeros_(policy[0].bias)

    class Float(torch.nn.Module):
        def forward(self, obs):
            return policy(torch.as_tensor(obs, dtype=torch.float32).reshape(-1, 1))

    batch = collect_episodes(env, Float(), 3, np.random.default_rng(0), baseline="none", max_steps=5)
    assert batch.n_cut == 3 and batch.obs.shape[0] == 15


def test_summary_gives_the_mean_episode_return_and_records_the_undiscounted_one(tmp_path, monkeypatch, capsys):
    """CartPole pays 1 per step: the undiscounted return of an episode is its length, an integer,
    and at least its discounted return (γ = 0.99)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--env", "CartPole-v1", "--steps", "3", "--run-name", "g", *FAST]) == 0
    out = capsys.readouterr().out
    records = [json.loads(x) for x in (tmp_path / "runs" / "g" / "records.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "runs" / "g" / "summary.json").read_text())
    for r in records:
        total = r["return_undiscounted"] * 8  # 8 episodes per update
        assert abs(total - round(total)) < 1e-9 and r["return_undiscounted"] >= r["return"]
    assert summary["return_first"] == records[0]["return_undiscounted"]
    assert summary["return_last"] == records[-1]["return_undiscounted"]
    assert (f"the mean episode return went from {summary['return_first']:.4g} to "
            f"{summary['return_last']:.4g}") in out
    assert main(["train", "bandit", "--steps", "2", "--run-name", "b", *FAST]) == 0
    assert "the expected return J went from" in capsys.readouterr().out
