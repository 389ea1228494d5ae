"""The rarity study's grid: which runs it holds, and the TrainConfig of each.

Each run is one (environment, policy, optimizer, gradient mode, p₀, direction, seed):

* *rewarded* (escape): r_do = +1, r_dont = −1; train from P = p₀ until P ≥ ½ and record the
  escape time T(p₀) together with the tracked NTVar/ΔP trajectory;
* *punished* (extinction): r_do = −1, r_dont = +1; train from P = ``extinction_p0`` until P has
  fallen ``extinction_decades`` decades (or ``extinction_steps`` updates have passed), tracked
  log-spaced (``extinction_per_decade`` records per decade of t), and record how P fades.

and, when ``well_p0s`` is not empty, the gravity-well runs (direction *well*, SCIENCE.md §3): the
three-armed bandit (``ntrl/KArmedBandit-v0``, rewards (1, 0.9, 0)) from π₀ = (p₀, 0.95 − p₀, 0.05),
trained with exact gradients until the rare best arm reaches ½, for vanilla PG, NPG, sign descent
and Adam on softmax logits (``tabular``) and for vanilla PG on the escort policy (``escort``),
one deterministic run per p₀, tracked log-spaced. Their analysis is :mod:`ntrl.study.well`.

Adam runs are repeated for every combination of the grid's ``adam_beta1``, ``adam_beta2`` and
``adam_eps``; each combination other than torch's defaults is a cell of its own, labelled
``adam(b2=0.99)`` and so on.

A grid comes from a preset (:meth:`StudyConfig.quick`, :meth:`StudyConfig.full`) or a .toml /
.json file whose every key is checked for its type and range before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ntrl.config import ConfigError, TrainConfig

ENVS = ("bandit", "juice")
DIRECTIONS = ("rewarded", "punished")
STUDY_FILE = "study.json"


# Learning rates (env → policy → optimizer) that give escape times of tens to tens of thousands of
# updates for p₀ ≥ 5e-6 and keep the updates first-order (the η-probe's bound: the juice MLP left
# the first-order regime in 12 % of its updates at SGD's former 0.2 and NPG's 0.01, and stays
# inside at 0.05 and 0.005; the juice tabular policy stays inside up to SGD's 8, which its
# T ∝ 1/p₀ needs).
DEFAULT_LRS: dict[str, dict[str, dict[str, float]]] = {
    "bandit": {
        "single_logit": {"sgd": 2.0, "npg": 0.1, "sign": 0.1, "adam": 0.1},
        "tabular": {"sgd": 2.0, "npg": 0.1, "sign": 0.1, "adam": 0.1},
        "mlp": {"sgd": 0.1, "npg": 0.1, "sign": 2e-4, "adam": 1e-3},
    },
    "juice": {
        "tabular": {"sgd": 8.0, "npg": 0.005, "sign": 0.05, "adam": 0.05},
        "mlp": {"sgd": 0.05, "npg": 0.005, "sign": 5e-4, "adam": 1e-3},
    },
}
# The gravity-well cells' learning rates (kbandit → policy → optimizer): escort's q = 2 NTVar is
# 4p(1 − p) at ‖θ‖ = 1, its η = 0.2 escapes from p₀ = 0.01 in about 60 updates.
DEFAULT_LRS["kbandit"] = {"tabular": {"sgd": 2.0, "npg": 0.1, "sign": 0.1, "adam": 0.1}, "escort": {"sgd": 0.2}}
WELL_POLICIES = {"tabular": ("sgd", "npg", "sign", "adam"), "escort": ("sgd",)}  # the cells of the well
QUICK_WELL_P0S = (0.1, 0.03, 0.01)
FULL_WELL_P0S = (0.1, 0.03, 0.01, 0.003, 0.001)  # vanilla PG's escape from 0.001 takes ~360,000 updates
QUICK_P0S = (5e-2, 5e-3, 5e-4, 5e-5, 5e-6)  # five p₀ over four decades, all in the small-p₀ regime (≤ 0.05)
SAMPLED_P0S = (5e-2, 1.6e-2, 5e-3, 1.6e-3, 5e-4)  # five p₀ over two decades, for sampled cells
# Policies each environment supports (a single logit needs exactly two actions).
ENV_POLICIES = {"bandit": ("single_logit", "tabular", "mlp"), "juice": ("tabular", "mlp")}


@dataclass
class StudyConfig:
    """The grid of a rarity study. Presets: :meth:`quick` and :meth:`full`."""

    name: str = "rarity"
    envs: list[str] = field(default_factory=lambda: ["bandit"])
    policies: list[str] = field(default_factory=lambda: ["single_logit", "mlp"])
    optimizers: list[str] = field(default_factory=lambda: ["sgd", "npg", "sign", "adam"])
    modes: list[str] = field(default_factory=lambda: ["exact"])
    p0s: list[float] = field(default_factory=lambda: list(QUICK_P0S))
    # p₀ of the sampled cells (None: p0s): a sampled batch of B episodes waits about 1/(B·p₀)
    # updates for its first sample of a rare action, so their escapes from 5e-6 take 10⁵ updates
    sampled_p0s: list[float] | None = None
    directions: list[str] = field(default_factory=lambda: ["rewarded", "punished"])
    seeds: int = 5
    seed: int = 0  # the grid's base seed: runs use seeds seed, seed + 1, ..., seed + seeds − 1
    extinction_p0: float = 0.2
    extinction_decades: float = 4.0  # a punished run stops once P ≤ extinction_p0 · 10^−decades
    extinction_steps: int = 200_000  # ... or after this many updates
    extinction_per_decade: int = 50  # punished runs are tracked log-spaced, this many records per decade of t
    # Adam's punished runs go on for this many second-moment memories, ⌈k/(1 − β₂)⌉ updates (capped by
    # extinction_steps), not stopping at extinction_decades: the late-time decay holds from ~10 memories
    # until √v̂ nears ε (README, "Adam's late-time decay")
    adam_extinction_memories: float = 20.0
    max_steps: int = 100_000
    track_every: int = 5
    batch_size: int = 32
    width: int = 64
    depth: int = 2
    activation: str = "tanh"
    lrs: dict[str, dict[str, float]] = field(default_factory=lambda: json.loads(json.dumps(DEFAULT_LRS)))
    adam_beta1: list[float] = field(default_factory=lambda: [0.9])
    adam_beta2: list[float] = field(default_factory=lambda: [0.999])
    adam_eps: list[float] = field(default_factory=lambda: [1e-8])
    # the η-probe at every tracked update: the step replayed at η·s (scales ≤ 1 give the error's
    # slope against η; larger ones how far beyond η the update would stay first-order)
    price_scales: list[float] = field(default_factory=lambda: [4.0, 2.0, 1.0, 0.5, 0.25, 0.125])
    # the gravity well (empty: none): p₀ of the rare best arm, and the updates a run may take to reach ½
    well_p0s: list[float] = field(default_factory=list)
    well_steps: int = 500_000

    @classmethod
    def quick(cls) -> "StudyConfig":
        """Bandit, exact gradients, five p₀ over four decades, 5 seeds, extinction over four decades."""
        return cls(name="rarity-quick", p0s=list(QUICK_P0S), seeds=5, extinction_steps=100_000, track_every=10,
                   well_p0s=list(QUICK_WELL_P0S))

    @classmethod
    def full(cls) -> "StudyConfig":
        """The complete grid of the issue: every policy, optimizer and gradient mode, 4 decades."""
        return cls(name="rarity-full", envs=["bandit", "juice"], policies=["single_logit", "tabular", "mlp"],
                   modes=["exact", "sampled"], p0s=list(QUICK_P0S), sampled_p0s=list(SAMPLED_P0S), seeds=5,
                   adam_beta2=[0.99, 0.999], extinction_steps=50_000, well_p0s=list(FULL_WELL_P0S))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "StudyConfig":
        """Read a .toml or .json grid; unknown keys, wrong types and impossible values are errors."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError("--config", f"{path} is a directory; give a .toml or .json grid file")
        if not path.exists():
            raise ConfigError("--config", f"file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError("--config", f"{path} is not valid {path.suffix[1:] or 'JSON'}: {e}") from None
        except OSError as e:
            raise ConfigError("--config", f"cannot read {path}: {e.strerror or e}") from None
        return cls.from_dict(data, f"{path}", "--config")

    @classmethod
    def from_dict(cls, data: Any, source: str, flag: str) -> "StudyConfig":
        """A grid from a table of settings (a grid file, or a study.json): every key known and of
        its type; a partial ``lrs`` table is merged into the defaults."""
        if not isinstance(data, dict):
            raise ConfigError(flag, f"{source} must hold a table of settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(flag, f"unknown key(s) {', '.join(unknown)} in {source}; known keys: {', '.join(sorted(known))}")
        base = cls()
        for key, value in data.items():
            check_type(key, value, getattr(base, key))
        data = dict(data)
        if "lrs" in data:  # merge a partial env → policy → optimizer table into the defaults
            merged = base.lrs
            for env, by_policy in data["lrs"].items():
                if not isinstance(by_policy, dict) or not all(isinstance(t, dict) for t in by_policy.values()):
                    raise ConfigError("config key 'lrs'", f"lrs.{env} must be a table policy → optimizer → learning rate")
                for pol, table in by_policy.items():
                    merged.setdefault(env, {}).setdefault(pol, {}).update(table)
            data["lrs"] = merged
        return dataclasses.replace(base, **data).validate()

    def validate(self) -> "StudyConfig":
        from ntrl.agents.optimizers import OPTIMIZERS
        from ntrl.agents.policies import ACTIVATIONS, POLICY_KINDS
        from ntrl.agents.reinforce import GRADIENT_MODES

        def need(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"config key '{key}'", message)

        def subset(key: str, allowed) -> None:
            values = getattr(self, key)
            need(isinstance(values, list) and len(values) > 0, key, "must be a non-empty list")
            bad = [v for v in values if v not in allowed]
            need(not bad, key, f"unknown value(s) {bad}; allowed: {', '.join(map(str, allowed))}")

        from ntrl.run_dirs import check_name

        check_name(self.name, "config key 'name'")
        subset("envs", ENVS)
        subset("policies", POLICY_KINDS)
        subset("optimizers", OPTIMIZERS)
        subset("modes", GRADIENT_MODES)
        subset("directions", DIRECTIONS)
        for key in ("p0s", "sampled_p0s"):
            values = getattr(self, key)
            if values is None and key == "sampled_p0s":
                continue
            need(isinstance(values, list) and len(values) > 0, key, "must be a non-empty list")
            need(all(isinstance(p, (int, float)) and 0 < p < 0.5 for p in values), key,
                 f"every p0 must be in (0, 0.5) so that an escape to 1/2 exists, got {values}")
        need(0 < self.extinction_p0 < 1, "extinction_p0", f"must be in (0, 1), got {self.extinction_p0}")
        need(isinstance(self.adam_extinction_memories, (int, float)) and self.adam_extinction_memories > 0,
             "adam_extinction_memories", f"must be a number > 0, got {self.adam_extinction_memories!r}")
        need(isinstance(self.extinction_decades, (int, float)) and 0 < self.extinction_decades <= 250,
             "extinction_decades", f"must be a number in (0, 250], got {self.extinction_decades!r}")
        for key in ("adam_beta1", "adam_beta2"):
            values = getattr(self, key)
            need(len(values) > 0 and all(0 <= b < 1 for b in values), key,
                 f"must be a non-empty list of numbers in [0, 1), got {values}")
        need(len(self.adam_eps) > 0 and all(math.isfinite(e) and e >= 0 for e in self.adam_eps), "adam_eps",
             f"must be a non-empty list of finite numbers >= 0, got {self.adam_eps}")
        need(isinstance(self.seeds, int) and self.seeds >= 1, "seeds", f"must be an integer >= 1, got {self.seeds}")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", f"must be an integer >= 0, got {self.seed!r}")
        for key in ("extinction_steps", "extinction_per_decade", "max_steps", "track_every", "batch_size", "width"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) >= 1, key,
                 f"must be an integer >= 1, got {getattr(self, key)!r}")
        need(isinstance(self.depth, int) and self.depth >= 0, "depth", f"must be an integer >= 0, got {self.depth!r}")
        need(self.activation in ACTIVATIONS, "activation", f"must be one of {', '.join(ACTIVATIONS)}")
        need(isinstance(self.well_p0s, list) and all(isinstance(p, (int, float)) and 0 < p < 0.5 for p in self.well_p0s),
             "well_p0s", f"every p0 must be in (0, 0.5), got {self.well_p0s}")
        need(isinstance(self.well_steps, int) and self.well_steps >= 1, "well_steps",
             f"must be an integer >= 1, got {self.well_steps!r}")
        triples = [(env, pol, opt) for env, pol in self.cells_env_policy() for opt in self.optimizers]
        if self.well_p0s:  # the gravity well's cells
            triples += [("kbandit", pol, opt) for pol, opts in WELL_POLICIES.items() for opt in opts]
        for env, pol, opt in triples:
            lr = self.lrs.get(env, {}).get(pol, {}).get(opt)
            need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "lrs",
                 f"needs a finite learning rate > 0 for {env}/{pol}/{opt}, got {lr!r}")
        unknown = sorted(set(self.lrs) - set(ENVS) - {"kbandit"})
        need(not unknown, "lrs", f"names unknown environment(s) {', '.join(unknown)}; known: {', '.join(ENVS)}, kbandit")
        need(all(0 < s <= 64 for s in self.price_scales) and sum(s <= 1 for s in self.price_scales) >= 2,
             "price_scales", f"needs step-size scales in (0, 64], at least two of them <= 1, got {self.price_scales}")
        if not self.cells_env_policy():
            supported = "; ".join(f"{e}: {', '.join(ENV_POLICIES[e])}" for e in self.envs)
            raise ConfigError("config key 'policies'", f"the grid has no runs: no policy in {self.policies} runs on "
                                                       f"{', '.join(self.envs)} (policies each env supports: {supported})")
        return self

    def cells_env_policy(self) -> list[tuple[str, str]]:
        """The (env, policy) pairs of the grid; policies an env cannot run are left out."""
        return [(e, p) for e in self.envs for p in self.policies if p in ENV_POLICIES[e]]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_value(value: Any) -> str:
    """A TOML/JSON value as a person reads it: "the string '3'", "a table", "the number 5"."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return f"the list {value!r}"
    return f"a {type(value).__name__}"


def check_type(key: str, value: Any, default: Any) -> None:
    """A grid key's value must have its default's type (a float key also takes an integer; a
    list key a list of that element type); otherwise a ConfigError naming the key."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = number(value), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, dict):
        ok, want = isinstance(value, dict), "a table env → policy → optimizer → learning rate"
        if ok:
            leaves = [lr for by_p in value.values() if isinstance(by_p, dict)
                      for t in by_p.values() if isinstance(t, dict) for lr in t.values()]
            bad = [lr for lr in leaves if not number(lr)]
            if bad:
                raise ConfigError(f"config key '{key}'", f"learning rates must be numbers, got {describe_value(bad[0])}")
    elif isinstance(default, list):
        if default and isinstance(default[0], str):
            ok, want = isinstance(value, list) and all(isinstance(x, str) for x in value), "a list of strings"
        else:
            ok, want = isinstance(value, list) and all(number(x) for x in value), "a list of numbers"
    else:
        return
    if not ok:
        raise ConfigError(f"config key '{key}'", f"must be {want}, got {describe_value(value)}")


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid (Adam's β₁, β₂, ε matter for Adam runs only)."""

    env: str
    policy: str
    optimizer: str
    mode: str
    p0: float
    direction: str
    seed: int
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8

    @property
    def optimizer_label(self) -> str:
        """The optimizer, with Adam's settings where they are not torch's defaults: adam(b2=0.99)."""
        if self.optimizer != "adam":
            return self.optimizer
        from ntrl.config import ADAM_DEFAULTS

        changed = [f"{short}={getattr(self, name):g}" for name, short in
                   (("adam_beta1", "b1"), ("adam_beta2", "b2"), ("adam_eps", "eps"))
                   if getattr(self, name) != ADAM_DEFAULTS[name]]
        return f"adam({','.join(changed)})" if changed else "adam"

    @property
    def cell(self) -> tuple[str, str, str, str]:
        return (self.env, self.policy, self.optimizer_label, self.mode)

    @property
    def run_id(self) -> str:
        return (f"{self.env}-{self.policy}-{self.optimizer_label}-{self.mode}-{self.direction}-p0={self.p0:g}"
                f"-seed{self.seed}")


def seed_matters(policy: str, mode: str) -> bool:
    """Whether runs with different seeds differ. The seed sets the MLP's initial weights and the
    sampled episodes; a single-logit or tabular policy with exact gradients is deterministic, so
    its cell runs one seed (its bootstrap intervals are then points)."""
    return policy == "mlp" or mode == "sampled"


def enumerate_runs(study: StudyConfig) -> list[RunSpec]:
    """Every run of the grid, in a fixed order (the order the pool starts them)."""
    specs = []
    for env, policy in study.cells_env_policy():
        for opt in study.optimizers:
            variants = ([dict(adam_beta1=float(b1), adam_beta2=float(b2), adam_eps=float(e))
                         for b1 in study.adam_beta1 for b2 in study.adam_beta2 for e in study.adam_eps]
                        if opt == "adam" else [{}])
            for variant in variants:
                for mode in study.modes:
                    for direction in study.directions:
                        p0s = ([study.extinction_p0] if direction == "punished" else
                               study.sampled_p0s if mode == "sampled" and study.sampled_p0s else study.p0s)
                        for p0 in p0s:
                            n_seeds = study.seeds if seed_matters(policy, mode) else 1
                            for seed in range(study.seed, study.seed + n_seeds):
                                specs.append(RunSpec(env, policy, opt, mode, float(p0), direction, seed, **variant))
    for policy, opts in WELL_POLICIES.items():  # deterministic: one run per p₀
        for opt in opts:
            for p0 in study.well_p0s:
                specs.append(RunSpec("kbandit", policy, opt, "exact", float(p0), "well", study.seed))
    return specs


def update_cap(study: StudyConfig, spec: RunSpec) -> int:
    """The most updates a run may take: ``well_steps`` in the well, ``max_steps`` rewarded,
    ``extinction_steps`` punished (Adam's: its ⌈memories/(1 − β₂)⌉ when fewer)."""
    if spec.direction == "well":
        return study.well_steps
    if spec.direction == "rewarded":
        return study.max_steps
    if spec.optimizer == "adam":
        return min(study.extinction_steps, math.ceil(study.adam_extinction_memories / (1 - spec.adam_beta2)))
    return study.extinction_steps


def train_config_for(study: StudyConfig, spec: RunSpec, runs_dir: Path, wandb_mode: str) -> TrainConfig:
    """The TrainConfig of one run: rewards and stopping rule follow its direction."""
    if spec.direction == "well":
        from ntrl.envs.kbandit import gravity_well_start
        from ntrl.experiments.kbandit import KBanditConfig

        return KBanditConfig(
            policy=spec.policy, optimizer=spec.optimizer, mode="exact", start=list(gravity_well_start(spec.p0)),
            lr=float(study.lrs["kbandit"][spec.policy][spec.optimizer]), steps=update_cap(study, spec), stop_at_p=0.5,
            seed=spec.seed, track_per_decade=study.extinction_per_decade, price_scales=list(study.price_scales),
            out=str(runs_dir), run_name=spec.run_id, group=study.name, wandb=wandb_mode, force=True,
            axes={"study": study.name, **asdict(spec)},
        ).validate()
    rewarded = spec.direction == "rewarded"
    common = dict(
        policy=spec.policy, optimizer=spec.optimizer, mode=spec.mode, p0=spec.p0,
        lr=float(study.lrs[spec.env][spec.policy][spec.optimizer]),
        steps=update_cap(study, spec),
        stop_at_p=0.5 if rewarded else None,
        stop_below_p=None if rewarded else spec.p0 * 10.0 ** -study.extinction_decades,
        seed=spec.seed, batch_size=study.batch_size, track_every=study.track_every,
        track_per_decade=None if rewarded else study.extinction_per_decade,
        width=study.width, depth=study.depth, activation=study.activation, price_scales=list(study.price_scales),
        out=str(runs_dir), run_name=spec.run_id, group=study.name, wandb=wandb_mode, force=True,
        axes={"study": study.name, **asdict(spec)},  # every grid axis, in the run's config and W&B's
    )
    if spec.optimizer == "adam":
        common.update(adam_beta1=spec.adam_beta1, adam_beta2=spec.adam_beta2, adam_eps=spec.adam_eps)
        if not rewarded:  # as long as update_cap says, for the late-time decay (README, "Adam's late-time decay")
            common.update(stop_below_p=None)
    if spec.env == "juice":
        from ntrl.experiments.juice import JuiceConfig

        # the behaviour is approaching seen juice; punishing it makes drinking cost −1
        return JuiceConfig(reward=1.0 if rewarded else -1.0, decomposition=False, **common).validate()
    from ntrl.experiments.bandit import BanditConfig

    return BanditConfig(target=1, reward_do=1.0 if rewarded else -1.0, reward_dont=-1.0 if rewarded else 1.0,
                        **common).validate()
