"""ntrl's environments, registered with Gymnasium under the ``ntrl/`` namespace.

    import ntrl.envs, gymnasium as gym
    env = gym.make("ntrl/TwoArmedBandit-v0", reward_do=1.0, reward_dont=-1.0)
"""

import gymnasium as gym

from ntrl.envs.bandit import TwoArmedBandit
from ntrl.envs.juice import JuiceGridworld, JuiceGridworldVector

if "ntrl/TwoArmedBandit-v0" not in gym.registry:
    gym.register(id="ntrl/TwoArmedBandit-v0", entry_point="ntrl.envs.bandit:TwoArmedBandit")

if "ntrl/JuiceGridworld-v0" not in gym.registry:
    gym.register(
        id="ntrl/JuiceGridworld-v0",
        entry_point="ntrl.envs.juice:JuiceGridworld",
        vector_entry_point="ntrl.envs.juice:JuiceGridworldVector",
    )

__all__ = ["TwoArmedBandit", "JuiceGridworld", "JuiceGridworldVector"]
