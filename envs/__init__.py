"""ntrl's environments, registered with Gymnasium under the ``ntrl/`` namespace.

    import ntrl.envs, gymnasium as gym
    env = gym.make("ntrl/TwoArmedBandit-v0", reward_do=1.0, reward_dont=-1.0)
    env = gym.make("ntrl/KArmedBandit-v0", rewards=(1.0, 0.9, 0.0))
    envs = gym.make_vec("ntrl/KArmedBandit-v0", num_envs=8, vectorization_mode="vector_entry_point")
"""

import gymnasium as gym

from ntrl.envs.bandit import TwoArmedBandit
from ntrl.envs.juice import JuiceGridworld, JuiceGridworldVector
from ntrl.envs.kbandit import KArmedBandit, KArmedBanditVector

if "ntrl/TwoArmedBandit-v0" not in gym.registry:
    gym.register(id="ntrl/TwoArmedBandit-v0", entry_point="ntrl.envs.bandit:TwoArmedBandit")

if "ntrl/KArmedBandit-v0" not in gym.registry:
    gym.register(
        id="ntrl/KArmedBandit-v0",
        entry_point="ntrl.envs.kbandit:KArmedBandit",
        vector_entry_point="ntrl.envs.kbandit:KArmedBanditVector",
    )

if "ntrl/JuiceGridworld-v0" not in gym.registry:
    gym.register(
        id="ntrl/JuiceGridworld-v0",
        entry_point="ntrl.envs.juice:JuiceGridworld",
        vector_entry_point="ntrl.envs.juice:JuiceGridworldVector",
    )

__all__ = ["TwoArmedBandit", "KArmedBandit", "KArmedBanditVector", "JuiceGridworld", "JuiceGridworldVector"]
