"""Training configuration: one dataclass, validated before anything runs.

Every field maps to a CLI flag (``p0`` ↔ ``--p0``, ``track_every`` ↔ ``--track-every``); a bad
value raises :class:`ConfigError` naming the flag and the allowed range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

from ntrl.agents.optimizers import OPTIMIZERS
from ntrl.agents.policies import ACTIVATIONS, POLICY_KINDS
from ntrl.agents.reinforce import BASELINES, GRADIENT_MODES
from ntrl.wandb_sink import WANDB_MODES

if TYPE_CHECKING:
    from ntrl.tracker import TrackSchedule

DTYPES = ("float64", "float32")


def training_settings(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a config (``to_dict()``, or a run's config.json) that say how it trains: all
    but where it is written and logged (:data:`PLACEMENT_FIELDS`) and the torch thread count."""
    return {k: v for k, v in fields.items() if k not in PLACEMENT_FIELDS and k != "threads"}
# Fields that say where a run is written and logged rather than how it trains.
PLACEMENT_FIELDS = ("out", "run_name", "force", "wandb", "group", "wandb_project", "wandb_entity", "tags", "axes")
ADAM_DEFAULTS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8}  # torch.optim.Adam's
ADAM_FIELDS = tuple(ADAM_DEFAULTS)


@dataclass
class Experiment:
    """Everything the training loop needs, built from a config.

    ``utility(engine, rng)`` returns the utility ascended this update and its gradient
    (exact or sampled); ``properties[0]`` is the headline property P.
    ``extra_tracking(engine, utility_gradient, plan, stats) -> dict``, when given, is called
    before each tracked step with the float64 analysis engine, the optimizer's step plan and, if
    it takes a fourth argument, the tracker's :class:`ntrl.engine.tangent.TangentStats` per property
    name (values, and the Jacobian rows where the engine formed them, so extra quantities need
    not differentiate again); its items are added to the record. ``exact_utility``, where the
    environment has an exact model, is J(π) as a property: in sampled mode the tracker records
    the expected change η·∇X·M∇J beside the sampled one.
    """

    env: Any
    policy: Any
    optimizer: Any
    properties: list
    kappa: Any
    utility: Callable[..., Any]
    target_label: str = "target"
    extra_tracking: Callable[..., dict] | None = None
    exact_utility: Any = None  # J(π) as a property, where the env has an exact model (E[ΔX] in sampled mode)


class ConfigError(ValueError):
    """A configuration value outside its allowed range; ``flag`` names the CLI flag."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        self.message = message
        super().__init__(f"{flag}: {message}")

    def __reduce__(self):  # a study's worker sends it back to the parent
        return (type(self), (self.flag, self.message))


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


PolicyKind = Literal[POLICY_KINDS]
OptimizerName = Literal[OPTIMIZERS]
GradientMode = Literal[GRADIENT_MODES]
Baseline = Literal[BASELINES]
Activation = Literal[tuple(ACTIVATIONS)]
DType = Literal[DTYPES]
WandbMode = Literal[WANDB_MODES]


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: bool = True,
           default_factory: Any = dataclasses.MISSING, values: bool = False) -> Any:
    """A config field with its help text (the one source of the CLI flag's help); ``flag=False``
    keeps a field off the command line. A list field's flag is repeated once per value
    (``--price-scales 2 --price-scales 1``), or with ``values=True`` takes them all at once
    (``--rewards 1 0.9 0``: a vector, whose entries belong together)."""
    kw = {"default": default} if default_factory is dataclasses.MISSING else {"default_factory": default_factory}
    return field(metadata={"help": help, "flag": flag, "values": values}, **kw)


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_problem(value: Any, hint: Any) -> str | None:
    """None where ``value`` fits the annotation ``hint``; else what it should be, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or origin is Literal:
        return None
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        problems = [_type_problem(value, a) for a in others]
        if any(p is None for p in problems):
            return None
        return " or ".join(problems) + (" or None" if type(None) in args else "")
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, numbers.Real) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is list:
        item = args[0] if args else typing.Any
        if isinstance(value, (list, tuple)) and all(_type_problem(v, item) is None for v in value):
            return None
        return {int: "a list of integers", float: "a list of numbers", str: "a list of strings"}.get(item, "a list")
    if origin is dict:
        return None if isinstance(value, dict) else "a dict"
    return None


def _plain_numbers(value: Any, hint: Any) -> Any:
    """``value`` (which fits ``hint``) with a number of another type (numpy's int64 or float32, as a
    sweep over ``np.linspace`` gives them) as Python's int or float, so that config.json can hold
    it; a list's numbers too."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool) and type(value) not in (int, float):
        return int(value) if isinstance(value, numbers.Integral) else float(value) \
            if isinstance(value, numbers.Real) else value
    if isinstance(value, (list, tuple)) and any(isinstance(v, numbers.Number) and type(v) not in (int, float, bool)
                                                 for v in value):
        return type(value)(_plain_numbers(v, typing.Any) for v in value)
    return value


@dataclass
class TrainConfig:
    """What every training run shares. Environment configs subclass it and add ``build()``."""

    env: str = option("base", "the environment", flag=False)
    policy: PolicyKind = option("mlp", "policy kind: single_logit (p = σ(b)), tabular (softmax over K logits), "
                                             "mlp, or escort (π_a ∝ |θ_a|^q, Mei et al. 2020)")
    optimizer: OptimizerName = option("sgd", "sgd, adam, npg (natural policy gradient) or sign (sign descent)")
    mode: GradientMode = option("exact", "exact (analytic ∇J) or sampled (REINFORCE on a batch of episodes)")
    p0: float = option(0.01, "initial probability of the target action, in (0, 1)")
    lr: float = option(0.01, "learning rate η > 0")
    steps: int = option(400, "number of updates")
    seed: int = option(0, "seed for initialisation, sampling and reward noise")
    batch_size: int = option(64, "episodes per update in sampled mode")
    baseline: Baseline = option("loo", "sampled-mode baseline: loo (leave-one-out mean) or none")
    track_every: int = option(1, "track every k-th update")
    track_per_decade: int | None = option(None, "track log-spaced instead: update 0 and round(10^(i/n)) for "
                                                "i = 0, 1, ..., n per decade of t (long extinction runs)")
    stop_at_p: float | None = option(None, "stop once P reaches this value")
    stop_below_p: float | None = option(None, "stop once P falls to this value (extinction runs)")
    width: int = option(64, "MLP hidden width")
    depth: int = option(2, "MLP hidden layers")
    activation: Activation = option("tanh", "MLP activation")
    dtype: DType = option("float64", "policy dtype (tracking always runs in float64)")
    npg_damping: float = option(0.0, "λ in (F + λI)⁻¹ for npg (0: pseudo-inverse)")
    adam_beta1: float = option(0.9, "Adam's β₁, the first-moment memory (--optimizer adam)")
    adam_beta2: float = option(0.999, "Adam's β₂, the second-moment memory (--optimizer adam)")
    adam_eps: float = option(1e-8, "Adam's ε (--optimizer adam)")
    fisher: bool = option(True, "also record NTVar in the Fisher metric")
    price_scales: list[float] = option(default_factory=list, help="at every tracked update, also replay the step "
                                       "at η·s for each scale s (repeat the flag): how the Price error scales "
                                       "with η, and the largest η that stays first-order")
    noise: bool = option(True, "sampled mode: record the predicted spread of ΔX from the batch's per-episode "
                               "gradients (and the isotropic model's)")
    threads: int = option(1, "torch threads (1 is fastest for these small networks)")
    out: str = option("runs", "parent directory of the run directory")
    run_name: str | None = option(None, "name of the run directory under --out (None: from the config)")
    group: str | None = option(None, "W&B group")
    wandb_project: str | None = option(None, "W&B project (without it: WANDB_PROJECT, else ntrl)")
    wandb_entity: str | None = option(None, "W&B entity, a user or team (without it: WANDB_ENTITY, else W&B's own)")
    tags: list[str] = option(default_factory=list, help="W&B tags (repeat the flag; without it: WANDB_TAGS, comma-separated)")
    axes: dict[str, Any] = option(default_factory=dict, help="a study's grid axes of this run (W&B config)", flag=False)
    wandb: WandbMode = option("offline", "W&B mode (default: WANDB_MODE from the environment, else offline)")
    force: bool = option(False, "replace an existing run directory that ntrl made")
    # fields that take more from Python than their flag's type, each checked where it is read
    TYPES_CHECKED_ELSEWHERE: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def redefault(cls, name: str, default: Any) -> Any:
        """The field ``name`` of this config with another default and the same help, for a
        subclass whose experiment has a default of its own (``lr: float = TrainConfig.redefault("lr", 0.5)``)."""
        base = next(f for f in dataclasses.fields(cls) if f.name == name)
        return field(default=default, metadata=base.metadata)

    def need(self, ok: bool, name: str, message: str) -> None:
        """Raise a ConfigError for field ``name`` unless ``ok``."""
        if not ok:
            raise ConfigError(flag_of(name), message)

    def check_types(self) -> None:
        """A ConfigError for the first field whose value is not of its annotated type (a number
        where a float is, an integer where an int is, a list of them, or None where allowed), as a
        Python caller can pass anything; ``out`` may be any path (``pathlib.Path``), kept as its
        string. The values of a ``Literal`` field are checked by :meth:`validate`."""
        if isinstance(self.out, os.PathLike):
            self.out = os.fspath(self.out)
        hints = _type_hints(type(self))
        for f in dataclasses.fields(self):
            if f.name in self.TYPES_CHECKED_ELSEWHERE:
                continue
            value = getattr(self, f.name)
            hint = hints.get(f.name, typing.Any)
            kind = _type_problem(value, hint)
            if kind is not None:  # a field with no flag (a study's ``axes``) by its own name
                raise ConfigError(flag_of(f.name) if f.metadata.get("flag", True) else f.name,
                                  f"must be {kind}, got {type(value).__name__} {value!r}")
            setattr(self, f.name, _plain_numbers(value, hint))



    def validate(self) -> "TrainConfig":
        self.check_types()
        need = self.need

        def choice(name: str, allowed) -> None:
            value = getattr(self, name)
            need(value in allowed, name, f"must be one of {', '.join(map(str, allowed))}, got {value!r}")

        choice("policy", POLICY_KINDS)
        choice("optimizer", OPTIMIZERS)
        choice("mode", GRADIENT_MODES)
        choice("baseline", BASELINES)
        choice("activation", tuple(ACTIVATIONS))
        choice("dtype", DTYPES)
        choice("wandb", WANDB_MODES)
        need(0.0 < self.p0 < 1.0, "p0", f"must be in (0, 1), got {self.p0}")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be a finite number > 0, got {self.lr}")
        if self.dtype == "float32":
            need(self.lr < 1e30, "lr", f"must be below 1e30 with --dtype float32 (whose largest number is 3.4e38), "
                                       f"got {self.lr:g}")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.track_every >= 1, "track_every", f"must be >= 1, got {self.track_every}")
        need(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        need(self.depth >= 0, "depth", f"must be >= 0, got {self.depth}")
        need(self.npg_damping >= 0, "npg_damping", f"must be >= 0, got {self.npg_damping}")
        need(self.optimizer == "npg" or self.npg_damping == 0, "npg_damping",
             f"applies to --optimizer npg only, not {self.optimizer}")
        for name, lo, hi in (("adam_beta1", 0.0, 1.0), ("adam_beta2", 0.0, 1.0)):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and lo <= value < hi, name, f"must be in [0, 1), got {value}")
        need(isinstance(self.adam_eps, (int, float)) and math.isfinite(self.adam_eps) and self.adam_eps >= 0,
             "adam_eps", f"must be a finite number >= 0, got {self.adam_eps}")
        if self.optimizer != "adam":
            for name in ADAM_FIELDS:
                need(getattr(self, name) == ADAM_DEFAULTS[name], name,
                     f"applies to --optimizer adam only, not {self.optimizer}")
        if self.track_per_decade is not None:
            need(self.track_per_decade >= 1, "track_per_decade", f"must be >= 1, got {self.track_per_decade}")
        need(all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in self.price_scales),
             "price_scales", f"must be finite numbers > 0, got {self.price_scales}")
        need(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        if self.stop_at_p is not None:
            need(0.0 < self.stop_at_p < 1.0, "stop_at_p", f"must be in (0, 1), got {self.stop_at_p}")
        if self.stop_below_p is not None:
            need(0.0 < self.stop_below_p < 1.0, "stop_below_p", f"must be in (0, 1), got {self.stop_below_p}")
        from ntrl.run_dirs import check_name, check_out_dir

        if self.run_name is not None:
            check_name(self.run_name, "--run-name")
        check_out_dir(self.out)
        return self

    def optimizer_kwargs(self) -> dict[str, Any]:
        """The settings of this run's optimizer beyond its learning rate (``make_optimizer``'s kwargs)."""
        if self.optimizer == "npg":
            return {"damping": self.npg_damping}
        if self.optimizer == "adam":
            return {"betas": (self.adam_beta1, self.adam_beta2), "eps": self.adam_eps}
        return {}

    def wandb_settings(self) -> dict[str, Any]:
        """The W&B run's project, entity and tags (:class:`ntrl.wandb_sink.WandbSink`'s keywords)."""
        return {"project": self.wandb_project, "entity": self.wandb_entity, "tags": list(self.tags)}

    def track_schedule(self) -> TrackSchedule:
        """Which updates this run tracks (--track-every, or log-spaced with --track-per-decade)."""
        from ntrl.tracker import TrackSchedule

        return TrackSchedule(every=self.track_every, per_decade=self.track_per_decade)

    def settings_hash(self) -> str:
        """Six hex digits of a hash of every training setting (not where the run is written or
        logged): runs that differ in any setting get different default names."""
        import hashlib
        import json

        text = json.dumps(training_settings(self.to_dict()), sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:6]

    def default_run_name(self) -> str:
        """The run directory's name without --run-name: the main axes, the learning rate, the seed,
        and :meth:`settings_hash` (so that a run with other settings is not refused as a re-run)."""
        return (f"{self.env}-{self.policy}-{self.optimizer}-{self.mode}-p0={self.p0:g}-lr={self.lr:g}-seed{self.seed}"
                f"-{self.settings_hash()}")

    def run_dir(self) -> Path:
        """Where the run is written: ``out``/(``run_name`` or :meth:`default_run_name`)."""
        return Path(self.out) / (self.run_name or self.default_run_name())

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self) -> "Experiment":
        """The environment, policy, optimizer, properties and utility of this run."""
        raise NotImplementedError(f"{type(self).__name__} does not build an experiment")
