"""The sampled REINFORCE gradient is an unbiased estimate of the exact one, on an env whose
episodes have different lengths (FrozenLake: a hole or the goal ends an episode early), so the
zero-padded rewards-to-go and the leave-one-out baseline are exercised; and the same for the
juice gridworld's vector-env rollouts.

Check: the mean over S independent batches of v·g_sampled equals v·∇J for the unit vector v
along ∇J, within 4 standard errors of the mean (z = 4: a false alarm about once in 16,000).
"""

import math

import numpy as np
import pytest
import torch

from ntrl.experiments.gym_env import GymConfig
from ntrl.experiments.juice import JuiceConfig
from ntrl.engine.tangent import TangentEngine


def projected(exp_exact, exp_sampled, S, seed=0):
    exp_sampled.policy.load_state_dict(exp_exact.policy.state_dict())  # the same θ in both
    eng_e = TangentEngine(exp_exact.policy, dtype=torch.float64)
    eng_s = TangentEngine(exp_sampled.policy, dtype=torch.float64)
    g_exact = exp_exact.utility(eng_e, np.random.default_rng(seed)).gradient
    v = g_exact / g_exact.norm()  # project on the exact gradient's direction: the most signal
    rng = np.random.default_rng(seed)
    exp_sampled.env.reset(seed=seed)
    samples = np.array([float(v @ exp_sampled.utility(eng_s, rng).gradient) for _ in range(S)])
    return float(v @ g_exact), samples


@pytest.mark.parametrize("baseline, n_envs, slippery, horizon, policy", [
    ("loo", 1, "false", 0, "tabular"), ("none", 1, "false", 0, "tabular"),
    # the vector path: 5 sub-environments share 16 episodes unevenly (4, 3, 3, 3, 3), one batched
    # forward pass per step; and episodes cut at a horizon of 8 steps, against the exact J of 8 steps
    ("loo", 5, "false", 0, "tabular"), ("loo", 4, "false", 8, "mlp")])
def test_frozenlake_variable_length_episodes(baseline, n_envs, slippery, horizon, policy):
    kw = dict(env="FrozenLake-v1", env_kwargs=f'{{"is_slippery": {slippery}}}', policy=policy, gamma=1.0,
              batch_size=16, baseline=baseline, seed=0, wandb="disabled", probe_states="rollout", horizon=horizon,
              width=16)
    exact = GymConfig(mode="exact", **kw).validate().build()
    sampled = GymConfig(mode="sampled", n_envs=n_envs, **kw).validate().build()
    want, samples = projected(exact, sampled, S=300 if horizon == 0 else 800)  # cut episodes: a noisier estimate
    se = samples.std(ddof=1) / math.sqrt(len(samples))
    assert abs(samples.mean() - want) < 4 * se
    assert se < 0.25 * abs(want)  # the test resolves the mean to a quarter of its size


def test_juice_vector_rollouts():
    kw = dict(policy="mlp", p0=0.2, batch_size=32, seed=0, wandb="disabled", decomposition=False)
    exact = JuiceConfig(mode="exact", **kw).build()
    sampled = JuiceConfig(mode="sampled", **kw).build()
    want, samples = projected(exact, sampled, S=150)
    se = samples.std(ddof=1) / math.sqrt(len(samples))
    assert abs(samples.mean() - want) < 4 * se
    assert se < 0.25 * abs(want)


@pytest.mark.parametrize("activation", ["tanh", "relu", "silu", "elu", "softplus", "gelu"])
def test_the_vector_path_draws_from_the_policys_own_probabilities(activation):
    """The rollouts' numpy pass of the MLP (torch's for gelu) gives the torch policy's π to rounding,
    for Box and for one-hot-encoded Discrete observations."""
    from ntrl.agents.policies import make_policy
    from ntrl.agents.reinforce import numpy_policy

    rng = np.random.default_rng(0)
    for obs, kw in [(rng.normal(size=(9, 4)).astype(np.float32) * 10, {}),
                    (np.array([0, 5, 15, 3]), {"one_hot_states": 16})]:
        dim = 16 if kw else 4
        policy = make_policy("mlp", dim, 3, 0, 0.2, torch.as_tensor(obs[:1]), seed=1, activation=activation, width=8, **kw)
        with torch.no_grad():
            want = torch.softmax(policy(torch.as_tensor(obs)).double(), -1).numpy()
        np.testing.assert_allclose(numpy_policy(policy)(obs), want, rtol=1e-12, atol=1e-15)
