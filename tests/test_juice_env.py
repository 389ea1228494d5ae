"""The juice gridworld: rules, observation encoding, gymnasium conformance, native vector form."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from gymnasium.vector import AutoresetMode

import ntrl.envs  # noqa: F401
from ntrl.envs.juice import (
    DOWN, LEFT, RIGHT, STAY, UP, JuiceGridworld, JuiceGridworldVector, approach_mask, observation_index,
    seen_observations,
)



@pytest.mark.parametrize("kwargs", [{}, {"size": 2}, {"size": 4, "view_radius": 2, "hide_prob": 0.3, "horizon": 7}])
def test_check_env_passes(kwargs):
    env = gym.make("ntrl/JuiceGridworld-v0", **kwargs)
    check_env(env.unwrapped, skip_render_check=True)


@pytest.mark.parametrize("kwargs, word", [
    ({"size": 1}, "size"), ({"view_radius": 0}, "view_radius"), ({"hide_prob": 1.0}, "hide_prob"),
    ({"horizon": 0}, "horizon"), ({"reward": float("nan")}, "reward"),
])
def test_bad_arguments_raise(kwargs, word):
    with pytest.raises(ValueError, match=word):
        JuiceGridworld(**kwargs)
    with pytest.raises(ValueError, match=word):
        JuiceGridworldVector(num_envs=2, **kwargs)


def _place(env, agent, juice, visible=True):
    env.reset(seed=0)
    env._agent, env._juice, env._visible = np.array(agent), np.array(juice), visible
    return env._obs()


def test_observation_encoding_and_approach():
    env = JuiceGridworld(size=5, view_radius=2)
    obs, seen = _place(env, (2, 2), (1, 3))  # juice one row up, one column right
    assert seen and np.allclose(obs, [1.0, 0.5, -0.5])
    assert list(np.nonzero(approach_mask(obs[None], 2)[0])[0]) == [UP, RIGHT]
    obs, seen = _place(env, (2, 2), (0, 4))  # Manhattan distance 4 > radius 2
    assert not seen and np.allclose(obs, 0)
    obs, seen = _place(env, (2, 2), (2, 1), visible=False)
    assert not seen and np.allclose(obs, 0)
    assert not approach_mask(obs[None], 2).any()


def test_stepping_onto_visible_juice_pays_and_respawns():
    env = JuiceGridworld(size=3)
    _place(env, (0, 0), (0, 1))
    obs, r, term, trunc, info = env.step(RIGHT)
    assert r == 1.0 and info["approached"] and info["juice_seen"] and info["ate"]
    assert not (env._agent == env._juice).all()
    _place(env, (0, 0), (0, 1), visible=False)
    obs, r, term, trunc, info = env.step(RIGHT)
    assert r == 0.0 and not info["approached"] and info["ate"]  # hidden juice is spoiled
    _place(env, (0, 0), (0, 1))
    obs, r, term, trunc, info = env.step(UP)  # into the wall: stays
    assert r == 0.0 and not info["approached"] and (env._agent == (0, 0)).all()


def test_horizon_truncates():
    env = JuiceGridworld(size=3, horizon=4)
    env.reset(seed=1)
    flags = [env.step(STAY)[3] for _ in range(4)]
    assert flags == [False, False, False, True]


def test_seeded_reset_is_reproducible():
    def run(seed):
        env = JuiceGridworld(size=4, hide_prob=0.3)
        out = [env.reset(seed=seed)[0]]
        rng = np.random.default_rng(0)
        for _ in range(60):
            out.append(env.step(int(rng.integers(5)))[0])
        return np.array(out)

    assert np.array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_observation_index_is_injective_on_seen_observations():
    for r in (1, 2, 3):
        obs = seen_observations(10, r)
        idx = observation_index(obs, r)
        assert len(set(idx.tolist())) == len(obs) == 2 * r * (r + 1)
        assert (idx > 0).all() and observation_index(np.zeros((1, 3), np.float32), r)[0] == 0


# ---------------------------------------------------------------- vector form
def test_make_vec_uses_native_vector_env():
    venv = gym.make_vec("ntrl/JuiceGridworld-v0", num_envs=8, vectorization_mode="vector_entry_point",
                        size=4, horizon=5)
    assert isinstance(venv.unwrapped, JuiceGridworldVector)
    assert venv.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, info = venv.reset(seed=0)
    assert obs.shape == (8, 3) and obs.dtype == np.float32 and venv.observation_space.contains(obs)
    assert np.array_equal(info["juice_seen"], obs[:, 0] > 0.5)
    venv.close()


def test_vector_next_step_autoreset():
    venv = JuiceGridworldVector(num_envs=16, size=4, horizon=3)
    venv.reset(seed=0)
    acts = np.full(16, STAY)
    for t in range(3):
        _, r, term, trunc, _ = venv.step(acts)
        assert not term.any() and trunc.all() == (t == 2)
    obs, r, term, trunc, info = venv.step(acts)  # the reset step
    assert (r == 0).all() and not trunc.any() and (venv.t == 0).all()
    assert not info["approached"].any()
    _, _, _, trunc, _ = venv.step(acts)
    assert not trunc.any() and (venv.t == 1).all()


def test_vector_rules_match_single_env_rules():
    """Radius 1: a step pays iff it approached; the agent is never on the juice; obs flags agree."""
    venv = JuiceGridworldVector(num_envs=256, size=5, hide_prob=0.3, horizon=50)
    obs, _ = venv.reset(seed=2)
    rng = np.random.default_rng(0)
    for _ in range(100):
        a = rng.integers(0, 5, size=256)
        a = np.where(obs[:, 0] > 0.5, np.argmax(approach_mask(obs, 1), axis=1), a)  # approach when seen
        prev_seen = obs[:, 0] > 0.5
        reset_step = venv.prev_done.copy()
        obs, r, _, _, info = venv.step(a)
        assert np.array_equal(r > 0, info["approached"])
        assert np.array_equal(info["juice_seen"], prev_seen & ~reset_step)
        assert not (venv.agent == venv.juice).all(-1).any()
        assert venv.observation_space.contains(obs)


def test_vector_seeding_is_reproducible():
    def run(seed):
        venv = JuiceGridworldVector(num_envs=32, size=5, hide_prob=0.2)
        out = [venv.reset(seed=seed)[0]]
        for _ in range(20):
            out.append(venv.step(np.full(32, LEFT if len(out) % 2 else DOWN))[0])
        return np.array(out)

    assert np.array_equal(run(5), run(5)) and not np.array_equal(run(5), run(6))


def test_blocks_of_one_vector_env_draw_what_vector_envs_of_their_own_draw():
    """A population steps its members' gridworlds as blocks of one vector env: each block, with its
    own generator and reward, gives the observations and rewards a vector env of its own gives."""
    from ntrl.envs.juice import JuiceGridworldVector

    seeds, rewards, B = [11, 22, 33], [1.0, -1.0, 0.5], 4
    kw = dict(size=3, view_radius=1, horizon=6, hide_prob=0.3)
    alone = [JuiceGridworldVector(num_envs=B, reward=r, **kw) for r in rewards]
    obs = [env.reset(seed=s)[0] for env, s in zip(alone, seeds)]
    blocks = JuiceGridworldVector(num_envs=3 * B, **kw)
    blocks.seed_blocks(seeds, rewards)
    assert np.array_equal(blocks.reset()[0], np.concatenate(obs))
    rng = np.random.default_rng(0)
    for _ in range(20):  # several episodes: truncation and autoreset draw too
        actions = rng.integers(0, 5, size=3 * B)
        got = blocks.step(actions)
        want = [env.step(actions[i * B:(i + 1) * B]) for i, env in enumerate(alone)]
        for k in range(4):
            assert np.array_equal(got[k], np.concatenate([w[k] for w in want]))


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_step_keys_is_step_without_the_float_observations(radius):
    """``step_keys`` (the population's rollouts) steps as ``step`` does, from the same draws, and
    gives the keys ``observation_index`` gives of ``step``'s observations, over several episodes
    (truncation and autoreset), with blocks of their own generators."""
    kw = dict(size=5, view_radius=radius, horizon=7, hide_prob=0.3)
    envs = [JuiceGridworldVector(num_envs=12, **kw) for _ in range(2)]
    for env in envs:
        env.seed_blocks([3, 4, 5], [1.0, -1.0, 0.5])
    obs, _ = envs[0].reset()
    envs[1].reset()
    assert np.array_equal(envs[1].observation_keys(), observation_index(obs, radius))
    rng = np.random.default_rng(1)
    seen_any = False
    for _ in range(30):
        actions = rng.integers(0, 5, size=12)
        obs, reward, *_ = envs[0].step(actions)
        keys, reward_k = envs[1].step_keys(actions)
        assert np.array_equal(keys, observation_index(obs, radius)) and np.array_equal(reward, reward_k)
        seen_any |= bool((keys > 0).any())
    assert seen_any
    with pytest.raises(ValueError, match="actions must be integers"):
        envs[1].step_keys(np.full(12, 5))
