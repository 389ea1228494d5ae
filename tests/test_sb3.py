"""NTCovCallback inside SB3's PPO and A2C, and the Gymnasium → SB3 VecEnv adapter."""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
from stable_baselines3 import A2C, PPO  # noqa: E402
from stable_baselines3.common.vec_env import VecMonitor  # noqa: E402

from ntrl.agents.sb3 import NTCovCallback, SB3ActorLogits, rollout_surrogate  # noqa: E402
from ntrl.agents.sb3_vec import GymnasiumVecEnv  # noqa: E402
from ntrl.engine.tangent import TangentEngine  # noqa: E402
from ntrl.wandb_sink import WandbSink, read_offline_run  # noqa: E402

PRICE_KEYS = ("value", "ntvar_euc", "ntcov_euc", "pred_delta", "pred_delta_sgd", "real_delta", "residual")


def small_model(algo, env, lr=3e-4, seed=0, **kw):
    policy_kwargs = kw.pop("policy_kwargs", {"net_arch": [16, 16]})
    if algo is PPO:
        return PPO("MlpPolicy", env, learning_rate=lr, n_steps=32, batch_size=32, n_epochs=2, seed=seed,
                   policy_kwargs=policy_kwargs, device="cpu", **kw)
    return A2C("MlpPolicy", env, learning_rate=lr, n_steps=16, seed=seed, policy_kwargs=policy_kwargs,
               device="cpu", **kw)


@pytest.mark.parametrize("algo", [PPO, A2C], ids=["ppo", "a2c"])
def test_callback_logs_price_keys_to_offline_wandb(algo, tmp_path):
    sink = WandbSink(tmp_path, {"algo": algo.__name__}, mode="offline", name=f"sb3-{algo.__name__}")
    cb = NTCovCallback(properties=["P=action:1", "action:0"], n_probe=8, sink=sink,
                       records_path=str(tmp_path / "records.jsonl"))
    model = small_model(algo, "CartPole-v1")
    model.learn(total_timesteps=4 * model.n_steps, callback=cb)
    wandb_dir = sink.directory
    sink.finish()
    assert len(cb.records) == 4
    rows = read_offline_run(wandb_dir)["history"]
    assert len(rows) == 4
    for row in rows:
        assert "update" in row and "U" in row
        for name in ("P", "action:0"):
            for key in PRICE_KEYS:
                assert f"{name}/{key}" in row, (name, key, sorted(row))
    # π(0) + π(1) = 1 at every probe state: their changes cancel exactly
    for r in cb.records:
        np.testing.assert_allclose(np.add(r["P/real_delta"], r["action:0/real_delta"]), 0, atol=1e-12)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["update"] == 0


def test_callback_uses_active_wandb_run_with_own_step_metric(tmp_path):
    """As under RL Zoo's --track: a global ``wandb.run`` is active and the callback logs to it."""
    import wandb

    run = wandb.init(project="ntrl-test", dir=str(tmp_path), mode="offline",
                     settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True))
    try:
        cb = NTCovCallback(properties=["action:1"], n_probe=4)
        model = small_model(A2C, "CartPole-v1")
        model.learn(total_timesteps=3 * model.n_steps, callback=cb)
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    rows = read_offline_run(run_dir)["history"]
    assert [r["ntrl/update"] for r in rows] == [0, 1, 2]
    assert all("ntrl/action:1/pred_delta" in r and "ntrl/action:1/real_delta" in r for r in rows)


def test_actor_adapter_matches_sb3_distribution_and_loss_gradient():
    """The engine's ∇U on SB3ActorLogits equals autograd's −∇(A2C policy loss) on the SB3 policy."""
    model = small_model(A2C, "CartPole-v1")
    policy = model.policy
    obs = torch.as_tensor(np.random.default_rng(0).normal(size=(20, 4)), dtype=torch.float32)
    actions = torch.as_tensor(np.random.default_rng(1).integers(0, 2, size=20))
    adv = torch.as_tensor(np.random.default_rng(2).normal(size=20))
    actor = SB3ActorLogits(policy)
    with torch.no_grad():
        ref = policy.get_distribution(obs).distribution.logits
    with torch.no_grad():
        mine = torch.log_softmax(actor(obs), -1)
    np.testing.assert_allclose(mine.numpy(), ref.numpy(), atol=1e-6)
    engine = TangentEngine(actor, dtype=torch.float64)
    _, J = engine.jacobian(rollout_surrogate(obs, actions, adv))
    policy.zero_grad()
    _, logp, _ = policy.evaluate_actions(obs, actions)
    (-(adv.float() * logp).mean()).backward()
    g = torch.cat([p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in policy.parameters()])
    np.testing.assert_allclose(J[0].numpy(), -g.double().numpy(), atol=1e-5)


def test_predicted_and_realised_changes_agree_in_sign_at_small_lr():
    """Sign agreement of predicted and realised ΔX for X = π(1 | s) at 8 frozen probe states.

    Realised ΔX = ∇X·Δθ + ½ Δθᵀ H_X Δθ + O(‖Δθ‖³). The first-order term sets the sign whenever
    |∇X·Δθ| > ½ |Δθᵀ H_X Δθ|, which holds for every entry with
    ‖Δθ‖ < 2 |cos∠(∇X, Δθ)| ‖∇X‖ / ‖H_X‖. For a plain SGD step on the rollout's surrogate
    (A2C with torch.optim.SGD, one full-batch step, no gradient clipping) Δθ = η ∇U exactly, so
    the prediction η·NTCov(X, U) = η ∇X·∇U has the realised sign whenever
    η < 2 |NTCov(X, U)| / (‖H_X‖ ‖∇U‖²). With η = 1e-4 here ‖Δθ‖ ~ 1e-4 and only entries whose
    |cos∠(∇X, ∇U)| is below ~1e-4·‖H_X‖/‖∇X‖ can flip; there is no sampling noise between the
    prediction and the step (both use the same rollout), so the only failures are such
    near-orthogonal entries, which we exclude by a floor |pred| > 1e-3·max|pred|. We require ≥ 90%
    agreement (the bound gives 100% for the remaining entries); seeds are fixed.

    PPO (Adam, 2 epochs of minibatches, clipping) is checked with ∇X·Δθ, the first-order prediction
    from the step it really took, under the same ‖Δθ‖ condition.
    """

    def agreement(records, pred_key):
        pred = np.concatenate([np.atleast_1d(r[f"P/{pred_key}"]) for r in records])
        real = np.concatenate([np.atleast_1d(r["P/real_delta"]) for r in records])
        keep = np.abs(pred) > 1e-3 * np.abs(pred).max()
        return float(np.mean(np.sign(pred[keep]) == np.sign(real[keep]))), int(keep.sum())

    cb = NTCovCallback(properties=["P=action:1"], n_probe=8, use_wandb=False)
    a2c = small_model(A2C, "CartPole-v1", lr=1e-4, seed=3, max_grad_norm=1e9,
                      policy_kwargs={"net_arch": [16, 16], "optimizer_class": torch.optim.SGD,
                                     "optimizer_kwargs": {}})
    a2c.learn(total_timesteps=8 * a2c.n_steps, callback=cb)
    frac, n = agreement(cb.records, "pred_delta_sgd")
    assert n >= 40 and frac >= 0.9, (frac, n)
    frac, n = agreement(cb.records, "pred_delta")
    assert frac >= 0.9, (frac, n)
    # with SGD the first-order prediction from Δθ and η·NTCov are the same number
    for r in cb.records:
        np.testing.assert_allclose(r["P/pred_delta"], r["P/pred_delta_sgd"], rtol=1e-4, atol=1e-12)

    cb = NTCovCallback(properties=["P=action:1"], n_probe=8, use_wandb=False)
    ppo = small_model(PPO, "CartPole-v1", lr=1e-4, seed=3)
    ppo.learn(total_timesteps=6 * ppo.n_steps, callback=cb)
    frac, n = agreement(cb.records, "pred_delta")
    assert n >= 30 and frac >= 0.9, (frac, n)


def test_callback_rejects_continuous_actions():
    model = A2C("MlpPolicy", "Pendulum-v1", n_steps=8, device="cpu")
    with pytest.raises(ValueError, match="Discrete action space"):
        model.learn(total_timesteps=8, callback=NTCovCallback())


@pytest.mark.parametrize("mode", ["next_step", "same_step"])
def test_vec_adapter_runs_gymnasium_vector_envs(mode):
    from gymnasium.vector import AutoresetMode

    kw = {} if mode == "next_step" else {"vector_kwargs": {"autoreset_mode": AutoresetMode.SAME_STEP}}
    venv = GymnasiumVecEnv(gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync", **kw))
    assert venv.autoreset_mode == mode
    venv.seed(0)
    obs = venv.reset()
    assert obs.shape == (4, 4)
    rng = np.random.default_rng(0)
    n_done = 0
    for _ in range(120):
        obs, rew, done, infos = venv.step(rng.integers(0, 2, size=4))
        assert rew.shape == (4,) and (rew == 1.0).all()  # no zero-reward autoreset steps leak through
        for i in np.flatnonzero(done):
            n_done += 1
            assert infos[i]["terminal_observation"].shape == (4,)
            assert np.abs(obs[i]).max() <= 0.05  # CartPole's reset state, returned in the same step
    assert n_done > 5
    cb = NTCovCallback(properties=["action:0"], n_probe=4, use_wandb=False)
    model = PPO("MlpPolicy", VecMonitor(venv), n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16]})
    model.learn(total_timesteps=3 * 64, callback=cb)
    assert len(cb.records) == 3
    venv.close()


def test_vec_adapter_runs_native_juice_vector_env():
    import ntrl.envs  # noqa: F401

    if "ntrl/JuiceGridworld-v0" not in gym.registry:
        pytest.skip("ntrl/JuiceGridworld-v0 is not registered (yet)")
    try:
        native = gym.make_vec("ntrl/JuiceGridworld-v0", num_envs=4, vectorization_mode="vector_entry_point")
    except Exception as e:  # pragma: no cover - depends on the juice env's native vector form
        pytest.skip(f"no native vector form: {e}")
    venv = GymnasiumVecEnv(native)
    model = PPO("MlpPolicy", VecMonitor(venv), n_steps=16, batch_size=32, n_epochs=1, seed=0, device="cpu",
                policy_kwargs={"net_arch": [16]})
    cb = NTCovCallback(properties=["action:0"], n_probe=4, use_wandb=False)
    model.learn(total_timesteps=2 * 64, callback=cb)
    assert len(cb.records) == 2


def test_user_property_failing_midway_in_sb3_keeps_records(tmp_path):
    from ntrl.experiments.user_properties import UserPropertyError

    calls = {"n": 0}

    def flaky(view, probes):
        calls["n"] += 1
        if calls["n"] > 5:  # check at start (2 calls), then 2 per tracked update
            raise KeyError("gone")
        return view.probs(probes)[:, 0]

    cb = NTCovCallback(properties=[flaky], n_probe=4, use_wandb=False, run_name="flaky-run",
                       records_path=str(tmp_path / "records.jsonl"))
    model = small_model(A2C, "CartPole-v1")
    with pytest.raises(UserPropertyError, match=r"'flaky'.*at update 1 of run flaky-run.*KeyError"):
        model.learn(total_timesteps=5 * model.n_steps, callback=cb)
    cb._writer.close()
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("algo", ["ppo", "a2c"])
def test_sb3_runs_look_like_sb3_runs(tmp_path, algo):
    """Issue 15 item 7: SB3's own metrics in the records and in W&B under SB3's names, the model's
    hyperparameters in the config (and not REINFORCE's fields), and --threads honoured."""
    from ntrl.experiments.gym_env import GymConfig
    from ntrl.experiments.sb3_train import train_sb3

    config = GymConfig(env="CartPole-v1", algo=algo, steps=3, n_steps=64, threads=2, wandb="offline",
                       out=str(tmp_path), run_name="r")
    try:
        result = train_sb3(config, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    records = [json.loads(line) for line in (tmp_path / "r" / "records.jsonl").read_text().splitlines()]
    own = {"train/policy_gradient_loss", "train/approx_kl", "train/clip_fraction"} if algo == "ppo" else {"train/policy_loss"}
    want = {"train/value_loss", "train/entropy_loss", "rollout/ep_rew_mean", "rollout/ep_len_mean",
            "time/total_timesteps"} | own
    assert want <= set(records[-1])
    assert records[-1]["time/total_timesteps"] == records[-1]["timesteps"]
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["sb3"]["algo_class"] == algo.upper() and saved["sb3"]["n_steps"] == 64 and saved["sb3"]["gamma"] == 0.99
    assert not {"optimizer", "p0", "baseline", "batch_size", "policy"} & set(saved)
    logged = read_offline_run(result.wandb_dir)
    assert logged["config"]["sb3"]["algo_class"] == algo.upper()
    assert want <= set(logged["history"][-1])
