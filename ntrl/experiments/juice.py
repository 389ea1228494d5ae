"""The juice experiment (SCIENCE.md §2): ``ntrl train juice`` and ``scripts/train_juice.py``.

REINFORCE on ``ntrl/JuiceGridworld-v0`` with the juice example's properties tracked:

    F  = Σ_{s seen} d(s)                              frequency of juice-seen states
    P  = Σ_{s seen} d(s) π(approach|s) / F            approach probability when juice is seen
    R  = Σ_s d(s) Σ_a π(a|s) r(s, a)                  expected reward per step
    P_probe = (1/m) Σ_{o ∈ probes} π(approach|o)     the same behaviour on the m fixed seen
                                                      observations (every offset within the radius)

d is the exact state-visitation distribution of the finite-horizon model
(:mod:`ntrl.engine.exact_model`). In exact mode the utility is J = H·R and its gradient is exact; in
sampled mode it is the REINFORCE surrogate of a batch of episodes from the native vector env.
When the configuration is small enough for the exact model, P, F and R are tracked exactly in both
modes (P is the headline property); otherwise (sampled mode only) the headline P is P_probe.

At each tracked update ``extra_tracking`` adds, from the Jacobian rows of P, F and R that the
tracker has just formed (Euclidean metric):

    juice/ntcov_P_R          NTCov(P, R)
    juice/F_ntvar_P          F·NTVar(P)
    juice/P_ntcov_P_F        P·NTCov(P, F)             (their sum is NTCov(P, F·P) by the
                                                       product rule, which tests check through
                                                       autograd of F·P)
    juice/identity_residual  NTCov(P, R) − F·NTVar(P) − P·NTCov(P, F)       (0 iff ∇R = ∇(F·P))
    juice/identity_rel       identity_residual / |NTCov(P, R)|
    juice/c                  R / (F·P)

Why the identity is exact only for ``view_radius = 1``: reward is paid only for stepping onto
juice. With radius 1 every seen juice is one move away, so an approach is exactly a rewarded
move and R = r·F·P for every θ; the gradients agree and identity_residual is zero to float
precision. With a larger radius, approaches from distance ≥ 2 are counted in P but pay nothing
(they only pay later, through the visitation), so R = c(θ)·r·F·P with c < 1 the share of
approach probability at distance 1; NTCov(P, R) = r·c·NTCov(P, F·P) + r·F·P·NTCov(P, c), and
identity_residual measures both the factor c and its θ-dependence.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Literal

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn

import ntrl.envs  # noqa: F401  (registers ntrl/JuiceGridworld-v0)
from ntrl.agents.optimizers import make_optimizer
from ntrl.agents.policies import make_policy
from ntrl.agents.reinforce import UtilityGradient, aggregate_episodes, exact_gradient, sample_actions
from ntrl.config import ConfigError, Experiment, TrainConfig, OptimizerName, option
from ntrl.envs.juice import (
    MAX_TABULAR_STATES, N_ACTIONS, OBS_DIM, STAY, approach_mask, n_observation_indices,
    observation_index, seen_observations, tabular_model,
)
from ntrl.engine.exact_model import ModelTooLargeError, TabularMDP
from ntrl.properties import Property
from ntrl.engine.tangent import PolicyView, TangentEngine, TangentStats, set_log_odds
from ntrl.engine.structured import PerState


# ---------------------------------------------------------------------- policies
class JuiceTabularPolicy(nn.Module):
    """One softmax per distinct observation: π(·|o) = softmax(θ[index(o)]), with
    index(o) = :func:`ntrl.envs.juice.observation_index` (0 = juice not seen)."""

    def __init__(self, radius: int, dtype: torch.dtype = torch.float64):
        super().__init__()
        self.radius = int(radius)
        self.table = make_policy("tabular", obs_dim=OBS_DIM, n_actions=N_ACTIONS, target=STAY, p0=1.0 / N_ACTIONS,
                                 reference_obs=torch.zeros(1, OBS_DIM), n_states=n_observation_indices(radius),
                                 dtype=dtype)
        self.n_actions = N_ACTIONS

    def forward(self, obs: Tensor) -> Tensor:
        return self.table.logits[observation_index(torch.as_tensor(obs).reshape(-1, OBS_DIM), self.radius)]


def tabular_approach_init(policy: JuiceTabularPolicy, p0: float) -> None:
    """Seen observations: the k approach actions share p₀, the other 5 − k share 1 − p₀.
    Unseen: uniform. So π(approach|o) = p₀ on every seen observation and P = p₀ exactly."""
    r = policy.radius
    obs = seen_observations(10 * r + 2, r)
    idx = observation_index(obs, r)
    mask = approach_mask(obs, r)
    with torch.no_grad():
        logits = policy.table.logits
        logits.zero_()
        for i, m in zip(idx, mask):
            k = int(m.sum())
            row = np.where(m, math.log(p0 / k), math.log((1.0 - p0) / (N_ACTIONS - k)))
            logits[int(i)] = torch.as_tensor(row, dtype=logits.dtype)


# ---------------------------------------------------------------------- properties
def approach_probability(view: PolicyView, obs: Tensor, mask: Tensor) -> Tensor:
    """π(approach|o) = Σ_{a approaches} π(a|o), for each row of obs."""
    return (view.probs(obs) * mask).sum(-1)


class JuiceQuantities:
    """P, F, R and F·P of the exact model as torch functions of a PolicyView. One visitation
    computation per view: properties asked of the same view (the tracker evaluates them
    together) share it."""

    def __init__(self, model: TabularMDP):
        self.model = model
        self.seen = torch.as_tensor(model.seen, dtype=torch.float64)
        self.approach = torch.as_tensor(model.approach, dtype=torch.float64)
        self._last: tuple[PolicyView, dict[str, Tensor]] | None = None

    def all(self, view: PolicyView) -> dict[str, Tensor]:
        if self._last is not None and self._last[0] is view:
            return self._last[1]
        out = self._compute(view)
        self._last = (view, out)
        return out

    def _compute(self, view: PolicyView) -> dict[str, Tensor]:
        m = self.model
        pi = m.policy_matrix(view)
        d = m.visitation(view, pi)
        F = (d * self.seen).sum()
        P = (d * self.seen * (pi * self.approach).sum(-1)).sum() / F
        R = (d * (pi * m.rewards).sum(-1)).sum()
        return {"P": P, "F": F, "R": R, "FP": F * P}

    def stacked(self, view: PolicyView) -> Tensor:
        q = self.all(view)
        return torch.stack([q["P"], q["F"], q["R"], q["FP"]])


def decomposition(engine: TangentEngine, quantities: JuiceQuantities,
                  stats: Mapping[str, TangentStats] | None = None) -> dict[str, float]:
    """The F·P decomposition of dP/dt at the engine's current parameters (Euclidean metric).

    ``stats``: the tracker's stats of P, F and R at these parameters; when they carry Jacobian
    rows, the decomposition reuses them instead of differentiating the exact model again.
    """
    have = stats is not None and all(k in stats and stats[k].gradient is not None for k in "PFR")
    if have:
        P, F, R = (float(stats[k].value[0]) for k in "PFR")
        jP, jF, jR = (stats[k].gradient[0] for k in "PFR")
    else:
        values, J = engine.dense_jacobian(lambda v: quantities.stacked(v)[:3])
        (P, F, R), (jP, jF, jR) = (float(v) for v in values), J
    FP = F * P
    ntcov_P_R = float(jP @ jR)
    ntvar_P = float(jP @ jP)
    ntcov_P_F = float(jP @ jF)
    F_ntvar_P, P_ntcov_P_F = F * ntvar_P, P * ntcov_P_F
    ident = ntcov_P_R - (F_ntvar_P + P_ntcov_P_F)
    return {
        "juice/P": P, "juice/F": F, "juice/R": R, "juice/FP": FP,
        "juice/c": R / FP if FP != 0 else float("nan"),
        "juice/ntcov_P_R": ntcov_P_R,
        "juice/ntvar_P": ntvar_P,
        "juice/ntcov_P_F": ntcov_P_F,
        "juice/F_ntvar_P": F_ntvar_P,
        "juice/P_ntcov_P_F": P_ntcov_P_F,
        "juice/identity_residual": ident,
        "juice/identity_rel": abs(ident) / abs(ntcov_P_R) if ntcov_P_R != 0 else float("nan"),
    }


# ---------------------------------------------------------------------- sampled rollouts
def collect_vector_batch(venv, policy: nn.Module, rng: np.random.Generator, radius: int,
                         baseline: str = "loo") -> dict[str, Any]:
    """One episode in each of the vector env's B sub-environments (all share the horizon H).

    Rewards-to-go, advantages (leave-one-out baseline, or none) and their sums per distinct
    observation o and action a, C(o, a) and each episode's own C_i(o, a), by
    :func:`ntrl.agents.reinforce.aggregate_episodes`; the surrogate U_s = (1/B) Σ_{o,a} C(o, a) log π(a|o)
    equals (1/B) Σ_{i,t} A_{i,t} log π(a_{i,t}|o_{i,t}) exactly.
    """
    B, H = venv.num_envs, venv.horizon
    obs, _ = venv.reset()
    O = np.empty((H, B, OBS_DIM), dtype=np.float32)
    A = np.empty((H, B), dtype=np.int64)
    Rw = np.empty((H, B))
    seen = np.empty((H, B), dtype=bool)
    appr = np.empty((H, B), dtype=bool)
    for t in range(H):
        with torch.no_grad():
            probs = torch.softmax(policy(torch.as_tensor(obs)).to(torch.float64), dim=-1).numpy()
        a = sample_actions(probs, rng)
        O[t], A[t] = obs, a
        obs, r, _, _, info = venv.step(a)
        Rw[t], seen[t], appr[t] = r, info["juice_seen"], info["approached"]
    flatO = O.reshape(-1, OBS_DIM)
    agg = aggregate_episodes(observation_index(flatO, radius).reshape(H, B), A, Rw, N_ACTIONS, baseline)
    counts = agg["counts"]
    return {
        "obs": torch.as_tensor(flatO[agg["first"]]), "C": torch.as_tensor(agg["C"]),
        "C_episode": torch.as_tensor(agg["C_episode"]), "weights": torch.as_tensor(counts / counts.sum()),
        "returns": agg["returns"], "n_episodes": B, "seen_rate": float(seen.mean()),
        "approach_rate": float(appr.sum() / max(seen.sum(), 1)),
    }


# ---------------------------------------------------------------------- config
@dataclass
class JuiceConfig(TrainConfig):
    """REINFORCE on ``ntrl/JuiceGridworld-v0``, tracking P (approach | seen), F, R and the
    decomposition NTCov(P, F·P) = F·NTVar(P) + P·NTCov(P, F)."""

    env: str = option("juice", "the environment", flag=False)
    policy: Literal["tabular", "mlp"] = option("mlp", "policy kind: tabular (softmax per state) or mlp")
    optimizer: OptimizerName = TrainConfig.redefault("optimizer", "adam")
    steps: int = TrainConfig.redefault("steps", 150)
    track_every: int = TrainConfig.redefault("track_every", 5)
    size: int = option(5, "grid side N (>= 2)")
    view_radius: int = option(1, "Manhattan view radius (>= 1)")
    horizon: int = option(50, "episode length H")
    reward: float = option(1.0, "reward for drinking visible juice")
    hide_prob: float = option(0.0, "probability that the juice is hidden on a step")
    f0: float = option(0.0, "solve hide_prob so that the initial F equals f0 (0: off)")
    decomposition: bool = option(True, "track the F·P decomposition")

    def validate(self) -> "JuiceConfig":
        super().validate()
        need = self.need
        need(self.policy in ("tabular", "mlp"), "policy", f"the juice gridworld needs tabular or mlp, got {self.policy!r}")
        need(int(self.size) == self.size and self.size >= 2, "size", f"grid must be at least 2×2, got {self.size}")
        need(int(self.view_radius) == self.view_radius and self.view_radius >= 1, "view_radius", f"must be an integer >= 1, got {self.view_radius}")
        need(self.horizon >= 1, "horizon", f"must be >= 1, got {self.horizon}")
        need(math.isfinite(self.reward), "reward", f"must be finite, got {self.reward}")
        need(0.0 <= self.hide_prob < 1.0, "hide_prob", f"must be in [0, 1), got {self.hide_prob}")
        need(0.0 <= self.f0 < 1.0, "f0", f"must be in (0, 1), or 0 to use --hide-prob as given; got {self.f0}")
        return self

    def env_kwargs(self, hide_prob: float | None = None) -> dict[str, Any]:
        return dict(size=self.size, view_radius=self.view_radius, horizon=self.horizon, reward=self.reward,
                    hide_prob=self.hide_prob if hide_prob is None else hide_prob)

    def build(self) -> Experiment:
        self.validate()
        dtype = torch.float64 if self.dtype == "float64" else torch.float32
        r = self.view_radius
        exact = self.mode == "exact"
        model: TabularMDP | None = None
        try:  # wherever it fits, in both modes: P, F and R are then exact (the module docstring)
            model = tabular_model(**self.env_kwargs(), max_states=MAX_TABULAR_STATES)
        except ModelTooLargeError as e:
            if exact or self.f0 > 0:
                raise ConfigError("--size", str(e)) from None
            warnings.warn(f"{e}: F, R and the F·P decomposition are not tracked, and P is the mean over "
                          f"the probe states", stacklevel=2)
        probe_obs = torch.as_tensor(seen_observations(self.size, r))
        probe_mask = torch.as_tensor(approach_mask(probe_obs.numpy(), r), dtype=torch.float64)

        # -- policy, started at P = p0 (and F = f0 when asked)
        if self.policy == "tabular":
            policy: nn.Module = JuiceTabularPolicy(r, dtype=dtype)
            tabular_approach_init(policy, self.p0)
        else:
            policy = make_policy("mlp", obs_dim=OBS_DIM, n_actions=N_ACTIONS, target=STAY, p0=0.5,
                                 reference_obs=probe_obs, seed=self.seed, width=self.width, depth=self.depth,
                                 activation=self.activation, dtype=dtype)
        hide_prob = self.hide_prob
        for _ in range(2 if self.f0 > 0 else 1):
            if self.f0 > 0:
                hide_prob = solve_hide_prob(self, policy, self.f0)
                model = tabular_model(**self.env_kwargs(hide_prob), max_states=MAX_TABULAR_STATES)
            if self.policy == "mlp":
                target = (JuiceQuantities(model).all if model is not None else None)
                fn = (lambda v: target(v)["P"]) if target is not None else (
                    lambda v: approach_probability(v, probe_obs, probe_mask).mean())
                calibrate_stay_bias(policy, fn, self.p0)
        self.resolved_hide_prob = hide_prob

        optimizer = make_optimizer(self.optimizer, policy, self.lr, **self.optimizer_kwargs())

        # -- properties
        p_probe = Property("P_probe", lambda v: approach_probability(v, probe_obs, probe_mask).mean())
        if model is not None:
            q = JuiceQuantities(model)
            properties = [Property("P", lambda v: q.all(v)["P"]), Property("F", lambda v: q.all(v)["F"]),
                          Property("R", lambda v: q.all(v)["R"]), p_probe]
        else:
            q = None
            properties = [Property("P", p_probe.fn)]

        kappa = Property("z", lambda v: set_log_odds(v.logits(probe_obs), probe_mask))
        kappa.per_state = PerState(probe_obs, lambda z: set_log_odds(z, probe_mask))  # structured backend

        # -- environment and utility
        if exact:
            env = gym.make("ntrl/JuiceGridworld-v0", **self.env_kwargs(hide_prob))

            def utility(engine: TangentEngine, rng) -> UtilityGradient:
                return exact_gradient(engine, model)
        else:
            env = gym.make_vec("ntrl/JuiceGridworld-v0", num_envs=self.batch_size,
                               vectorization_mode="vector_entry_point", **self.env_kwargs(hide_prob))

            def utility(engine: TangentEngine, rng) -> UtilityGradient:
                batch = collect_vector_batch(env, engine.module, rng, r, baseline=self.baseline)
                obs, C, B = batch["obs"], batch["C"], batch["n_episodes"]

                def U(view: PolicyView) -> Tensor:
                    return (C.to(view.dtype) * view.log_probs(obs)).sum() / B

                def U_episodes(view: PolicyView, Ce=batch["C_episode"]) -> Tensor:  # (U_1, …, U_B)
                    return (Ce.to(view.dtype) * view.log_probs(obs)[None]).sum(dim=(1, 2))

                value, g = engine.value_and_gradient(U)
                mean_return = float(batch["returns"].mean())  # undiscounted: γ = 1
                return UtilityGradient(value, g, (obs, batch["weights"]), mean_return, episodes=int(B),
                                       mean_undiscounted_return=mean_return, episode_utilities=U_episodes)

        extra = None
        if q is not None and self.decomposition:
            def extra(engine: TangentEngine, u: UtilityGradient, plan=None, stats=None) -> dict:
                out = decomposition(engine, q, stats)
                out["juice/hide_prob"] = hide_prob
                return out

        return Experiment(env=env, policy=policy, optimizer=optimizer, properties=properties, kappa=kappa,
                          utility=utility, target_label="approach | seen", extra_tracking=extra,
                          exact_utility=None if model is None else model.exact_expected_reward)


def calibrate_stay_bias(policy: nn.Module, P_fn, p0: float) -> float:
    """Shift the MLP's output bias of *stay* by c so that P(θ) = p₀ (Brent's method on log P).

    P decreases in c from its value with 'stay' switched off (c → −∞) to 0 (c → +∞); a p₀ above
    the first is out of reach of this knob and raises a ConfigError naming --p0.
    """
    from scipy.optimize import brentq

    engine = TangentEngine(policy, dtype=torch.float64)
    out = policy.output_layer
    base = out.bias.detach().clone()

    def set_c(c: float) -> None:
        with torch.no_grad():
            b = base.clone()
            b[STAY] = b[STAY] + c
            out.bias.copy_(b)

    def log_gap(c: float) -> float:
        set_c(c)
        return math.log(float(engine.evaluate(P_fn)[0])) - math.log(p0)

    lo, hi = -40.0, 40.0
    if log_gap(lo) <= 0:
        p_max = math.exp(log_gap(lo)) * p0
        set_c(0.0)
        raise ConfigError("--p0", f"an MLP policy starts at P = p0 by biasing 'stay', which reaches P only "
                                  f"below {p_max:.3g}; got {p0} (use --policy tabular for larger p0)")
    if log_gap(hi) >= 0:
        raise ConfigError("--p0", f"p0 = {p0} is too small to reach by the stay bias")
    c = brentq(log_gap, lo, hi, xtol=1e-10, rtol=1e-12)
    set_c(c)
    return c


def solve_hide_prob(config: JuiceConfig, policy: nn.Module, f0: float) -> float:
    """The hide probability h at which the initial policy sees juice with frequency F(h) = f₀
    (Brent's method; F decreases in h from F(0))."""
    from scipy.optimize import brentq

    engine = TangentEngine(policy, dtype=torch.float64)

    def F_of(h: float) -> float:
        return float(JuiceQuantities(tabular_model(**config.env_kwargs(h)))
                     .all(engine.view())["F"])

    h_max = 1.0 - 1e-9
    f_max, f_min = F_of(0.0), F_of(h_max)
    if not f_min < f0 < f_max:
        raise ConfigError("--f0", f"cannot be reached: with this grid and initial policy, hiding the juice gives "
                                  f"frequencies F between {f_min:.3g} (almost always hidden) and {f_max:.3g} "
                                  f"(never hidden); choose f0 in that range, got {f0:g}")
    return float(brentq(lambda h: F_of(h) - f0, 0.0, h_max, xtol=1e-12))
