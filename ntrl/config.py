"""Training configuration: one dataclass, validated before anything runs.

Every field maps to a CLI flag (``p0`` ↔ ``--p0``, ``track_every`` ↔ ``--track-every``); a bad
value raises :class:`ConfigError` naming the flag and the allowed range.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

from ntrl.agents.optimizers import OPTIMIZERS
from ntrl.agents.policies import ACTIVATIONS, POLICY_KINDS
from ntrl.agents.reinforce import BASELINES, GRADIENT_MODES
from ntrl.wandb_sink import WANDB_MODES

DTYPES = ("float64", "float32")


@dataclass
class Experiment:
    """Everything the training loop needs, built from a config.

    ``utility(engine, rng)`` returns the utility ascended this update and its gradient
    (exact or sampled); ``properties[0]`` is the headline property P.
    ``extra_tracking(engine, utility_gradient, plan, stats) -> dict``, when given, is called
    before each tracked step with the float64 analysis engine, the optimizer's step plan and, if
    it takes a fourth argument, the tracker's :class:`ntrl.tangent.TangentStats` per property
    name (values, and the Jacobian rows where the engine formed them, so extra quantities need
    not differentiate again); its items are added to the record.
    """

    env: Any
    policy: Any
    optimizer: Any
    properties: list
    kappa: Any
    utility: Callable[..., Any]
    target_label: str = "target"
    extra_tracking: Callable[..., dict] | None = None


class ConfigError(ValueError):
    """A configuration value outside its allowed range; ``flag`` names the CLI flag."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """What every training run shares. Environment configs subclass it and add ``build()``."""

    env: str = "base"
    policy: str = "mlp"
    optimizer: str = "sgd"
    mode: str = "exact"
    p0: float = 0.01
    lr: float = 0.01
    steps: int = 400
    seed: int = 0
    batch_size: int = 64
    baseline: str = "loo"
    track_every: int = 1
    stop_at_p: float | None = None
    width: int = 64
    depth: int = 2
    activation: str = "tanh"
    dtype: str = "float64"
    npg_damping: float = 0.0
    fisher: bool = True
    threads: int = 1
    out: str = "runs"
    run_name: str | None = None
    group: str | None = None
    wandb: str = "offline"
    force: bool = False

    def need(self, ok: bool, name: str, message: str) -> None:
        """Raise a ConfigError for field ``name`` unless ``ok``."""
        if not ok:
            raise ConfigError(flag_of(name), message)

    def validate(self) -> "TrainConfig":
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
        need(math.isfinite(self.lr) and self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        need(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        need(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        need(self.track_every >= 1, "track_every", f"must be >= 1, got {self.track_every}")
        need(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        need(self.depth >= 0, "depth", f"must be >= 0, got {self.depth}")
        need(self.npg_damping >= 0, "npg_damping", f"must be >= 0, got {self.npg_damping}")
        need(self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        if self.stop_at_p is not None:
            need(0.0 < self.stop_at_p < 1.0, "stop_at_p", f"must be in (0, 1), got {self.stop_at_p}")
        from ntrl.run_dirs import check_name, check_out_dir

        if self.run_name is not None:
            check_name(self.run_name, "--run-name")
        check_out_dir(self.out)
        return self

    def default_run_name(self) -> str:
        return f"{self.env}-{self.policy}-{self.optimizer}-{self.mode}-p0={self.p0:g}-seed{self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)

    def build(self) -> "Experiment":
        """The environment, policy, optimizer, properties and utility of this run."""
        raise NotImplementedError(f"{type(self).__name__} does not build an experiment")
