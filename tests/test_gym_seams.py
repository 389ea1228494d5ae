"""Issue 15, items 4 and 8: the Price sentence when P did not move and when a few steps set R²; the
DQN message; probe states out of a Discrete space's range; default run names that tell settings
apart."""

from __future__ import annotations

import numpy as np
import pytest

from ntrl.config import ConfigError
from ntrl.experiments.bandit import BanditConfig
from ntrl.experiments.gym_env import GymConfig
from ntrl.train import describe, price_check, price_check_text, train


def test_a_run_whose_p_never_moved_says_so_instead_of_an_r2(tmp_path):
    """MountainCar: every episode is cut at the horizon with the same return, so the leave-one-out
    advantages are 0, the gradient is 0 and P does not move; R² would be a number of rounding."""
    config = GymConfig(env="MountainCar-v0", steps=3, batch_size=3, horizon=40, wandb="disabled", out=str(tmp_path))
    result = train(config, progress=False)
    text = describe(result, config)
    assert "P did not change" in text and "R²" not in text.split("Price check")[1].split(".")[0]


def test_r2_set_by_a_few_steps_is_explained():
    records = [{"update": t, "P/value": 0.3, "P/pred_delta": 1e-3, "P/real_delta": 1e-3 * 1.0007} for t in range(100)]
    records[40]["P/real_delta"] = 0.2  # one step far outside the first-order regime
    pc = price_check(records)
    assert pc["r2"] < 0 and pc["median_rel_error"] < 1e-3 and pc["top_miss_updates"] == [40]
    text = price_check_text(pc)
    assert "R² is set by a few large steps: the largest miss (update 40) makes up 100% of the squared error" in text
    # one of a hundred: said as a count, never as "0%" (which a rounded share of 1/300 would print)
    assert "1 of the 100 tracked updates (1.0%) was outside the first-order regime" in text
    one_in_300 = price_check_text(price_check(records + [{**records[0], "update": 100 + t} for t in range(200)]))
    assert "1 of the 300 tracked updates (0.3%) was outside the first-order regime" in one_in_300


def test_dqn_is_told_that_ntrl_tracks_actor_policies():
    from stable_baselines3 import DQN

    from ntrl.agents.sb3 import NTCovCallback

    model = DQN("MlpPolicy", "CartPole-v1", learning_starts=10, train_freq=4)
    with pytest.raises(ValueError, match="tracks policy-gradient .actor. policies.*value-based"):
        model.learn(50, callback=NTCovCallback())


@pytest.mark.parametrize("algo", ["reinforce", "ppo"])
def test_probe_states_out_of_a_discrete_range_name_probe_states(tmp_path, algo):
    path = tmp_path / "probes.npy"
    np.save(path, np.array([0, 3, 99]))
    extra = {"n_steps": 32} if algo == "ppo" else {}
    from ntrl.experiments.sb3_train import train_sb3

    run = train_sb3 if algo == "ppo" else train
    with pytest.raises(ConfigError) as e:
        run(GymConfig(env="FrozenLake-v1", algo=algo, probe_states=str(path), steps=1, wandb="disabled",
                      out=str(tmp_path), **extra), progress=False)
    assert e.value.flag == "--probe-states" and "integers in [0, 15]; got [99]" in e.value.message


def test_default_run_names_differ_with_the_settings():
    a, b, c = BanditConfig(), BanditConfig(steps=500), BanditConfig(lr=0.05)
    assert len({a.default_run_name(), b.default_run_name(), c.default_run_name()}) == 3
    assert a.default_run_name() == BanditConfig(out="elsewhere", wandb="disabled").default_run_name()
    assert c.default_run_name().startswith("bandit-mlp-sgd-exact-p0=0.01-lr=0.05-seed0-")


def test_tuple_observations_are_flattened_with_a_note(tmp_path, capfd):
    config = GymConfig(env="Blackjack-v1", steps=2, batch_size=4, wandb="disabled", out=str(tmp_path), run_name="bj")
    result = train(config, progress=False)
    err = capfd.readouterr().err
    assert "Blackjack-v1's Tuple observations are flattened into one Box of shape (45,)" in err
    assert result.summary["status"] == "finished" and result.summary["n_probe"] >= 1


def test_wrappers_apply_in_order_and_bad_ones_are_one_line(tmp_path, capfd):
    config = GymConfig(env="Blackjack-v1", wrapper=["gymnasium.wrappers:FlattenObservation"], steps=2, batch_size=4,
                       wandb="disabled", out=str(tmp_path), run_name="w")
    assert train(config, progress=False).summary["status"] == "finished"
    assert "flattened" not in capfd.readouterr().err  # the user's wrapper already made it a Box
    for wrapper, match in [("math:sqrt", "math:sqrt raised TypeError"), ("math:pi", "math:pi is not callable"),
                           ("gymnasium.wrappers:RecordEpisodeStatistics", None)]:
        config = GymConfig(env="CartPole-v1", wrapper=[wrapper], steps=1, batch_size=2, wandb="disabled",
                           out=str(tmp_path), run_name="c", force=True)
        if match is None:
            assert train(config, progress=False).summary["status"] == "finished"
            continue
        with pytest.raises(ConfigError) as e:
            train(config, progress=False)
        assert e.value.flag == "--wrapper" and match in e.value.message
    with pytest.raises(ConfigError, match="exact mode reads the env's own tabular model"):
        GymConfig(env="FrozenLake-v1", mode="exact", wrapper=["gymnasium.wrappers:RecordEpisodeStatistics"]).validate()


PROPS = '''
import torch

def right_at_start(view, probe_states):
    # the env's own observations: integer state indices, on every path
    assert not torch.is_floating_point(probe_states) and probe_states.ndim == 1, probe_states
    return view.probs(torch.tensor([0]))[0, 2]

def going_down(obs, action):
    assert int(obs) == obs, obs
    return action == 1
'''


@pytest.mark.parametrize("policy, algo", [("mlp", "reinforce"), ("tabular", "reinforce"), ("mlp", "ppo")])
def test_properties_see_the_envs_own_observations_on_every_path(tmp_path, monkeypatch, policy, algo):
    """Issue 15 item 5: on a Discrete observation space the REINFORCE MLP one-hot encodes the
    indices itself, so a property, an event and the probe states get raw indices there too."""
    module = f"frozen_props_{policy}_{algo}"  # one module per case: a second import of one name is refused
    (tmp_path / f"{module}.py").write_text(PROPS)
    monkeypatch.chdir(tmp_path)
    extra = {"n_steps": 32} if algo == "ppo" else {"batch_size": 4}
    config = GymConfig(env="FrozenLake-v1", policy=policy, algo=algo, steps=2, wandb="disabled", out=str(tmp_path),
                       property=[f"{module}:right_at_start", f"event:{module}:going_down"], **extra)
    from ntrl.experiments.sb3_train import train_sb3

    result = (train_sb3 if algo == "ppo" else train)(config, progress=False)
    records = result.records
    assert records and {"right_at_start/value", "event_going_down/value"} <= set(records[0])
    with pytest.raises(ConfigError, match="trains through Stable-Baselines3"):
        train(GymConfig(env="FrozenLake-v1", algo="ppo", wandb="disabled", out=str(tmp_path)), progress=False)


def test_the_mlp_on_discrete_observations_matches_its_one_hot_network():
    """The MLP's own encoding equals feeding its network the one-hot vectors (what FlattenObservation
    gave before), and the structured backend agrees with the torch.func reference on it."""
    import torch

    from ntrl.agents.policies import make_policy
    from ntrl.engine.tangent import TangentEngine
    from ntrl.properties import ActionProbability

    idx = torch.tensor([0, 3, 7, 15])
    policy = make_policy("mlp", 16, 4, 1, 0.2, idx[:1], seed=3, n_states=16, width=8, one_hot_states=16)
    direct = policy.net(torch.nn.functional.one_hot(idx, 16).to(torch.float64))
    assert torch.equal(policy(idx), direct)
    X = ActionProbability(idx, 2, "P")
    a, b = TangentEngine(policy, dtype=torch.float64), TangentEngine(policy, dtype=torch.float64, backend="reference")
    assert a.structured is not None
    torch.testing.assert_close(a.ntvar(X), b.ntvar(X), rtol=1e-12, atol=0)


def _dot_image_env():
    """A one-step env whose observation is an 8×8 RGB image with a white dot on the left or the
    right; action 1 is rewarded when the dot is on the right, action 0 when it is on the left."""
    import gymnasium as gym

    class Env(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (8, 8, 3), dtype=np.uint8)
        action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.side = int(self.np_random.integers(2))
            img = np.zeros((8, 8, 3), dtype=np.uint8)
            img[3:5, (1 if self.side == 0 else 6), :] = 255
            return img, {}

        def step(self, action):
            return np.zeros((8, 8, 3), dtype=np.uint8), float(int(action) == self.side), True, False, {}

    return Env()


def test_image_observations_train_a_cnn_through_the_reference_engine(tmp_path):
    import gymnasium as gym

    if "ntrl_test/DotImage-v0" not in gym.registry:
        gym.register(id="ntrl_test/DotImage-v0", entry_point=_dot_image_env)
    config = GymConfig(env="ntrl_test/DotImage-v0", policy="cnn", target=1, steps=4, batch_size=16, lr=0.5, n_envs=4,
                       width=16, wandb="disabled", out=str(tmp_path), run_name="img")
    result = train(config, progress=False)
    records = result.records
    assert len(records) == 4 and records[0]["backend"] == "reference"  # the engine says which backend answered
    assert result.summary["price_check_P"]["r2"] > 0.9
    with pytest.raises(ConfigError, match="use --policy cnn"):
        train(GymConfig(env="ntrl_test/DotImage-v0", wandb="disabled", out=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match=r"cnn reads image .*CartPole-v1 has a Box of shape \(4,\) \(float32\)$"):
        train(GymConfig(env="CartPole-v1", policy="cnn", wandb="disabled", out=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match="cnn reads image"):
        BanditConfig(policy="cnn").validate()


def test_vector_flags_only_where_they_act():
    with pytest.raises(ConfigError, match="exact gradients roll nothing out"):
        GymConfig(env="FrozenLake-v1", mode="exact", n_envs=4).validate()
    with pytest.raises(ConfigError, match="would step for nothing"):
        GymConfig(env="CartPole-v1", n_envs=16, batch_size=4).validate()
    GymConfig(env="CartPole-v1", algo="ppo", n_envs=16).validate()  # SB3's n_envs is its own


def test_async_rollouts_give_the_sync_records(tmp_path):
    """--vector-mode async steps the same envs in processes of their own: same seeds, same episodes,
    the same records."""
    records = {}
    for mode in ("sync", "async"):
        config = GymConfig(env="CartPole-v1", n_envs=3, vector_mode=mode, batch_size=5, steps=3, wandb="disabled",
                           out=str(tmp_path), run_name=mode)
        records[mode] = train(config, progress=False).records
    strip = lambda rs: [{k: v for k, v in r.items() if k != "backend"} for r in rs]  # noqa: E731
    assert strip(records["sync"]) == strip(records["async"])
