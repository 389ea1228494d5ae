import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import ntrl.envs  # noqa: F401
from ntrl.agents.policies import make_policy
from ntrl.envs.bandit import DO, DONT, TwoArmedBandit
from ntrl.engine.tangent import TangentEngine


def test_registered_and_passes_check_env():
    env = gym.make("ntrl/TwoArmedBandit-v0")
    check_env(env.unwrapped)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    _, r, terminated, truncated, info = env.step(DO)
    assert (r, terminated, truncated, info["action_name"]) == (1.0, True, False, "do")


def test_configurable_and_noisy_rewards():
    env = TwoArmedBandit(reward_do=3.0, reward_dont=0.5, noise_std=1.0)
    env.reset(seed=1)
    rs = np.array([env.step(DO)[1] for _ in range(4000)])
    # mean 3 ± 4 standard errors (σ/√n = 1/√4000)
    assert abs(rs.mean() - 3.0) < 4 / np.sqrt(4000)
    assert rs.std() == pytest.approx(1.0, rel=0.1)
    assert TwoArmedBandit(reward_do=3.0, reward_dont=0.5).step(DONT)[1] == 0.5


def test_seeded_noise_is_reproducible():
    a, b = TwoArmedBandit(noise_std=1.0), TwoArmedBandit(noise_std=1.0)
    a.reset(seed=5), b.reset(seed=5)
    assert [a.step(DO)[1] for _ in range(5)] == [b.step(DO)[1] for _ in range(5)]


@pytest.mark.parametrize("p", [0.01, 0.5, 0.9])
def test_exact_expected_reward(p):
    env = TwoArmedBandit(reward_do=2.0, reward_dont=-0.5)
    pol = make_policy("single_logit", 1, 2, target=DO, p0=p, reference_obs=torch.ones(1, 1))
    J = float(env.exact_expected_reward(TangentEngine(pol).view()))
    assert J == pytest.approx(p * 2.0 + (1 - p) * -0.5, rel=1e-12)


def test_bad_arguments():
    with pytest.raises(ValueError, match="noise_std"):
        TwoArmedBandit(noise_std=-1)
    with pytest.raises(ValueError, match="action"):
        TwoArmedBandit().step(2)


@pytest.mark.parametrize("p", [1e-20, 1e-14, 1 - 1e-14])
def test_exact_gradient_stays_accurate_for_tiny_probabilities(p):
    # ∂J/∂b = Δ p (1 − p) for the single-logit policy, even where 1 − p rounds to 1
    env = TwoArmedBandit()
    pol = make_policy("single_logit", 1, 2, target=DO, p0=p, reference_obs=torch.ones(1, 1))
    g = TangentEngine(pol).gradient(env.exact_expected_reward)
    assert float(g[0]) == pytest.approx(2.0 * p * (1 - p), rel=1e-12)
