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


@pytest.mark.parametrize("baseline", ["loo", "none"])
def test_frozenlake_variable_length_episodes(baseline):
    kw = dict(env="FrozenLake-v1", env_kwargs='{"is_slippery": false}', policy="tabular", gamma=1.0,
              batch_size=16, baseline=baseline, seed=0, wandb="disabled", probe_states="rollout")
    exact = GymConfig(mode="exact", **kw).validate().build()
    sampled = GymConfig(mode="sampled", **kw).validate().build()
    want, samples = projected(exact, sampled, S=300)
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
