"""The K-armed bandit experiment: ``ntrl train kbandit`` (SCIENCE.md §3, the softmax gravity well).

REINFORCE on ``ntrl/KArmedBandit-v0`` with the target arm's probability P = π(target), the
expected reward R = J(π) and κ = ‖∇z‖², z = log π_t − log(1 − π_t), tracked as on the two-armed
bandit. The start is the target arm at p₀ and the rest split evenly, or an explicit vector
(``--start``), e.g. the gravity-well start π₀ = (p₀, 0.95 − p₀, 0.05) with rewards (1, 0.9, 0):

    ntrl train kbandit --rewards 1 0.9 0 --start 0.01 0.94 0.05 --optimizer sgd --policy tabular

Under vanilla policy gradient on softmax logits the rare best arm first *loses* probability to
the common second-best (d log π_t/dt = π_t (r_t − J) − Σ_b π_b² (r_b − J) < 0 while π_t is small),
the gravity well of Mei et al. (NeurIPS 2020); NPG (d log π_t/dt = r_t − J > 0) and the escort
policy at q = 2 (d log π_t/dt = (4/‖θ‖²)(r_t − J) > 0) do not dip. The run's summary gives the
minimum of P along the trajectory, the update at which it occurred, and the escape time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym

import ntrl.envs  # noqa: F401  (registers ntrl/KArmedBandit-v0)
from ntrl.agents.policies import ESCORT_Q
from ntrl.config import Experiment, PolicyKind, TrainConfig, option
from ntrl.envs.kbandit import GRAVITY_WELL_REWARDS, start_probabilities
from ntrl.experiments.bandit import bandit_experiment

DEFAULT_P0 = 0.01


def default_rewards(arms: int) -> list[float]:
    """The gravity-well rewards for K arms: (1, 0.9, 0, …, 0); (1, 0.9) for two arms."""
    return list(GRAVITY_WELL_REWARDS[:arms]) + [0.0] * max(0, arms - len(GRAVITY_WELL_REWARDS))


@dataclass
class KBanditConfig(TrainConfig):
    """REINFORCE on ``ntrl/KArmedBandit-v0`` with the target arm's probability tracked."""

    env: str = option("kbandit", "the environment", flag=False)
    policy: PolicyKind = TrainConfig.redefault("policy", "tabular")
    arms: int | None = option(None, "number of arms K >= 2 (default: the length of --rewards, else 3)")
    rewards: list[float] | None = option(None, values=True,
                                  help="reward of each arm, e.g. --rewards 1 0.9 0 (default: 1, 0.9, then 0 for the "
                                       "other arms: the gravity well)")
    start: list[float] | None = option(None, values=True,
                                help="the start π₀, one probability per arm summing to 1, e.g. --start 0.01 0.94 0.05 "
                                     "(default: the target at --p0, the rest split evenly)")
    target: int = option(0, "the tracked arm")
    noise_std: float = option(0.0, "standard deviation of Gaussian reward noise")
    p0: float | None = option(None, f"initial probability of the target arm (default: start[target] with --start, "
                                    f"else {DEFAULT_P0})")
    escort_q: float = option(ESCORT_Q, "the escort exponent q of π_a ∝ |θ_a|^q (--policy escort)")

    def resolve(self) -> "KBanditConfig":
        """Fill in K, the rewards and p₀ from one another (each given value is checked in validate;
        a flag given without values, an empty list, is refused there)."""
        if self.arms is None:
            self.arms = len(self.rewards or self.start or GRAVITY_WELL_REWARDS)
        if self.rewards is None and self.arms >= 2:
            self.rewards = default_rewards(self.arms)
        if self.p0 is None:
            self.p0 = (float(self.start[self.target]) if self.start and 0 <= self.target < len(self.start)
                       else DEFAULT_P0)
        return self

    def validate(self) -> "KBanditConfig":
        self.check_types()  # before this config's own checks read its fields
        self.resolve()
        need = self.need
        need(self.policy != "cnn", "policy", "cnn reads image observations; the bandit's is the constant [1]")
        need(self.rewards != [], "rewards", "needs one value per arm, e.g. --rewards 1 0.9 0")
        need(self.start != [], "start", "needs one probability per arm, e.g. --start 0.01 0.94 0.05")
        need(isinstance(self.arms, int) and self.arms >= 2, "arms", f"must be >= 2, got {self.arms}")
        need(len(self.rewards) == self.arms, "rewards", f"needs one reward per arm ({self.arms}), got {self.rewards}")
        need(all(math.isfinite(r) for r in self.rewards), "rewards", f"must be finite, got {self.rewards}")
        need(0 <= self.target < self.arms, "target", f"must be an arm in [0, {self.arms - 1}], got {self.target}")
        need(math.isfinite(self.noise_std) and self.noise_std >= 0, "noise_std",
             f"must be a finite number >= 0, got {self.noise_std}")
        need(math.isfinite(self.escort_q) and self.escort_q > 0, "escort_q", f"must be a finite number > 0, got {self.escort_q}")
        need(self.policy == "escort" or self.escort_q == ESCORT_Q, "escort_q", f"applies to --policy escort only, not {self.policy}")
        need(self.policy != "single_logit" or self.arms == 2, "policy",
             f"single_logit has 2 actions; this bandit has {self.arms} arms (use tabular, mlp or escort)")
        if self.start:  # checked before --p0, which it gives when --p0 is absent
            need(len(self.start) == self.arms, "start", f"needs one probability per arm ({self.arms}, from --arms or the "
                                                        f"length of --rewards), got {len(self.start)}: {self.start}")
            try:
                start_probabilities(self.start[self.target], self.target, self.arms, self.start)
            except ValueError as e:
                need(False, "start", str(e))
            need(abs(self.start[self.target] - self.p0) <= 1e-12 * max(1.0, self.p0), "start",
                 f"start[{self.target}] = {self.start[self.target]} differs from --p0 {self.p0}; give one of them")
        super().validate()
        return self

    def start_vector(self) -> list[float]:
        """π₀, the start every policy kind is built at."""
        self.resolve()
        return start_probabilities(self.p0, self.target, self.arms, self.start).tolist()

    def default_run_name(self) -> str:
        self.resolve()
        return super().default_run_name()

    def build(self) -> Experiment:
        env = gym.make("ntrl/KArmedBandit-v0", rewards=tuple(self.rewards), noise_std=self.noise_std)
        return bandit_experiment(self, env, f"arm {self.target}", start=self.start_vector(), escort_q=self.escort_q)
