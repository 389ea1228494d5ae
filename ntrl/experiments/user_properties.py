"""Properties a user defines, probe states, and the guard that turns their failures into clear errors.

A property is any callable ``X(view) -> Tensor`` (scalar or 1-D batch) where ``view`` is a
:class:`ntrl.engine.tangent.PolicyView`; a callable that takes a second argument is called as
``X(view, probe_states)``. The engine differentiates it, so it must be computed from the view
(``view.logits``, ``view.log_probs``, ``view.probs``), not from numpy.

Property specs (CLI ``--property SPEC``, repeatable; also the ``properties`` of
:class:`ntrl.agents.sb3.NTCovCallback`):

    action:A            π(A | s) at every probe state s                      (ActionProbability)
    event:MOD:PRED      Σ_a π(a | s)·1[PRED(s, a)] at every probe state     (EventProbability)
    return              the exact expected return J(π) (tabular envs only)   (ExpectedReward)
    MOD:FUNC            the user's callable FUNC(view[, probe_states])
    NAME=SPEC           any of the above, recorded under NAME

Probe states (``--probe-states``): ``rollout`` (states visited by the agent's own initial policy,
frozen at the start), a ``.npy`` file of shape (N, *obs_shape), or ``MOD:FUNC`` returning such an
array (FUNC() or FUNC(env)).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ntrl.config import ConfigError
from ntrl.properties import ActionProbability, ExpectedReward, Property
from ntrl.engine.tangent import PolicyView
from ntrl.train import TrainingError


class UserPropertyError(TrainingError):
    """A user property failed during a run; the message names the property, the run and the update."""


# ---------------------------------------------------------------------- importing user code
def import_user_module(module: str, flag: str) -> Any:
    """Import ``module``, looking in the working directory too, but only *after* the installed
    packages and only while ``module`` itself is imported: the working directory goes to the end
    of ``sys.path`` and comes off it again, so a ``numpy.py`` or ``wandb.py`` lying there never
    replaces the installed package. A user module whose name is taken by an installed module is
    an error that says so."""
    cwd = os.getcwd()
    top = module.split(".", 1)[0]
    local = [Path(cwd) / f"{top}.py", Path(cwd) / top / "__init__.py"]
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ConfigError(flag, f"no module named {module!r}: put {module.replace('.', '/')}.py in the "
                                    f"working directory or on PYTHONPATH") from None
        raise ConfigError(flag, f"importing {module!r} failed: {e}") from None
    except Exception as e:  # the user's module itself raised
        raise ConfigError(flag, f"importing {module!r} raised {type(e).__name__}: {e}") from None
    finally:  # only while the named module is imported: a library's later lazy import of, say,
        if added:  # tabulate or gmpy2 must not find a file of that name in the working directory
            sys.path.remove(cwd)
    found = Path(getattr(sys.modules.get(top), "__file__", None) or "")
    for path in local:
        if path.exists() and found.resolve() != path.resolve():
            raise ConfigError(flag, f"{path.name} in the working directory has the name of the installed module "
                                    f"{top!r} ({found.parent if found.name else 'built in'}), which ntrl uses instead; "
                                    f"rename your file")
    return mod


def load_object(spec: str, flag: str) -> Any:
    """``module:attr`` → the attribute, or a ConfigError naming ``flag``."""
    if ":" not in spec:
        raise ConfigError(flag, f"expected MODULE:NAME, got {spec!r}")
    module, attr = spec.split(":", 1)
    if not module or not attr:
        raise ConfigError(flag, f"expected MODULE:NAME, got {spec!r}")
    mod = import_user_module(module, flag)
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(flag, f"module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


# ---------------------------------------------------------------------- built-in properties
class EventProbability(Property):
    """X(s) = Σ_a π(a | s)·1[pred(s, a)] for each probe state s: the probability of an event.

    ``pred(obs, action) -> bool`` is evaluated once per (probe state, action) on numpy
    observations when the property is built; the mask is then fixed.
    """

    def __init__(self, obs: Tensor, predicate: Callable[[np.ndarray, int], Any], n_actions: int,
                 name: str = "event", raw_obs: np.ndarray | None = None):
        self.obs = torch.as_tensor(obs)
        raw = np.asarray(self.obs.numpy() if raw_obs is None else raw_obs)
        mask = np.zeros((raw.shape[0], n_actions), dtype=bool)
        for i in range(raw.shape[0]):
            for a in range(n_actions):
                mask[i, a] = bool(predicate(raw[i], a))
        self.mask = torch.as_tensor(mask)
        super().__init__(name, lambda v: (v.probs(self.obs) * self.mask.to(v.dtype)).sum(dim=-1))


# ---------------------------------------------------------------------- the guard
@dataclass
class RunContext:
    """Where a run is, for error messages: its name and the update being computed."""

    run: str = "?"
    step: int | None = None

    def where(self) -> str:
        at = "at the start" if self.step is None else f"at update {self.step}"
        return f"{at} of run {self.run}"


def check_value(out: Any, name: str) -> Tensor:
    """A property's output must be a finite scalar or 1-D torch tensor; raise ValueError otherwise."""
    if not isinstance(out, Tensor):
        raise ValueError(f"returned {type(out).__name__}, not a torch.Tensor computed from the view "
                         f"(ntrl differentiates it; use view.probs/log_probs/logits)")
    if out.ndim > 1:
        raise ValueError(f"returned shape {tuple(out.shape)}; return a scalar or a 1-D batch (one value per state)")
    if out.numel() == 0:
        raise ValueError("returned an empty tensor")
    if not out.is_floating_point():
        raise ValueError(f"returned dtype {out.dtype}; return a floating-point tensor")
    if not bool(torch.isfinite(out).all()):
        raise ValueError("returned a non-finite value (nan or inf)")
    return out


class GuardedProperty(Property):
    """Wraps a user callable: any exception or bad value becomes a :class:`UserPropertyError`
    that names the property, its spec, the run and the update; checks the value's shape and
    finiteness on every evaluation."""

    def __init__(self, name: str, fn: Callable, spec: str, context: RunContext,
                 probe_states: Tensor | None = None):
        self.user_fn, self.spec, self.context = fn, spec, context
        self.probe_states = probe_states
        try:
            n_args = len([p for p in inspect.signature(fn).parameters.values()
                          if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
        except (TypeError, ValueError):
            n_args = 1
        self.wants_probes = n_args >= 2
        super().__init__(name, self._guarded)

    def _guarded(self, view: PolicyView) -> Tensor:
        try:
            out = self.user_fn(view, self.probe_states) if self.wants_probes else self.user_fn(view)
            return check_value(out, self.name)
        except UserPropertyError:
            raise
        except Exception as e:
            raise UserPropertyError(
                f"property {self.name!r} ({self.spec}) failed {self.context.where()}: "
                f"{type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------- specs
def parse_property(spec: str, probes: Tensor, n_actions: int, context: RunContext,
                   exact_model: Any = None, raw_probes: np.ndarray | None = None,
                   flag: str = "--property") -> Property:
    """One property from its spec (see the module docstring)."""
    if not isinstance(spec, str):
        if isinstance(spec, Property):
            return spec
        if callable(spec):
            return GuardedProperty(getattr(spec, "__name__", "user"), spec, repr(spec), context, probes)
        raise ConfigError(flag, f"a property is a spec string or a callable, got {type(spec).__name__}")
    name = None
    body = spec
    if "=" in spec.split(":", 1)[0]:
        name, body = spec.split("=", 1)
        if not name or "/" in name:
            raise ConfigError(flag, f"bad property name {name!r} in {spec!r} (non-empty, no '/')")
    if body.startswith("action:"):
        try:
            a = int(body.split(":", 1)[1])
        except ValueError:
            raise ConfigError(flag, f"expected action:A with an integer A, got {spec!r}") from None
        if not 0 <= a < n_actions:
            raise ConfigError(flag, f"action {a} is out of range: the env has actions 0..{n_actions - 1}")
        return ActionProbability(probes, a, name or body)  # named as the user wrote it: "action:1"
    if body.startswith("event:"):
        pred_spec = body[len("event:"):]
        pred = load_object(pred_spec, flag)
        if not callable(pred):
            raise ConfigError(flag, f"{pred_spec} is not callable; an event is pred(observation, action) -> bool")
        pname = name or f"event_{pred_spec.split(':')[-1]}"
        try:
            return EventProbability(probes, pred, n_actions, pname, raw_obs=raw_probes)
        except Exception as e:
            raise ConfigError(flag, f"event predicate {pred_spec} raised {type(e).__name__}: {e}; "
                                    f"it is called as pred(observation, action) on each probe state") from None
    if body == "return":
        if exact_model is None:
            raise ConfigError(flag, "'return' (the exact expected return) needs a tabular model "
                                    "(a toy-text env with env.unwrapped.P); for other envs ntrl records the "
                                    "sampled surrogate U and the mean episode return of each update instead")
        return ExpectedReward(exact_model, name or "R")
    fn = load_object(body, flag)
    if not callable(fn):
        raise ConfigError(flag, f"{body} is not callable; a property is fn(view) -> Tensor")
    return GuardedProperty(name or body.split(":")[-1].split(".")[-1], fn, body, context, probes)


def check_properties(engine, properties: Sequence[Property], flag: str = "--property") -> None:
    """Evaluate each property and its gradient once, before training; a failure is a ConfigError."""
    names = [p.name for p in properties]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(flag, f"property names must be unique, {', '.join(dup)} repeats; name one with NAME=SPEC")
    for X in properties:
        try:
            check_value(engine.evaluate(X), X.name)
            engine.jacobian(X)
        except UserPropertyError as e:
            raise ConfigError(flag, str(e)) from None
        except Exception as e:
            raise ConfigError(flag, f"property {X.name!r} failed on the initial policy: {type(e).__name__}: {e}") from None


# ---------------------------------------------------------------------- probe states
def check_probe_shape(arr: np.ndarray, obs_shape: tuple, source: str, flag: str = "--probe-states") -> np.ndarray:
    """(N, *obs_shape), or a single state of obs_shape (made a batch of one)."""
    arr = np.asarray(arr)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
            or np.issubdtype(arr.dtype, np.bool_)):
        raise ConfigError(flag, f"probe states from {source} are not a real-valued numeric array (dtype {arr.dtype})")
    if tuple(arr.shape) == tuple(obs_shape) and (len(obs_shape) > 0 or arr.ndim == 0):
        arr = arr[None]
    if arr.ndim != len(obs_shape) + 1 or tuple(arr.shape[1:]) != tuple(obs_shape):
        want = "(N,)" if not obs_shape else f"(N, {', '.join(map(str, obs_shape))})"
        raise ConfigError(flag, f"probe states from {source} have shape {tuple(arr.shape)}; expected {want} "
                                f"for observations of shape {tuple(obs_shape)}")
    if arr.shape[0] == 0:
        raise ConfigError(flag, f"probe states from {source} are empty")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise ConfigError(flag, f"probe states from {source} contain nan or inf")
    return arr


def check_probe_range(arr: np.ndarray, space: Any, source: str, flag: str = "--probe-states") -> np.ndarray:
    """Probe states of a Discrete(n) observation space must be integers in [start, start + n)."""
    import gymnasium as gym

    if isinstance(space, gym.spaces.Discrete):
        lo, hi = int(space.start), int(space.start + space.n - 1)
        if not np.all(np.equal(np.mod(arr, 1), 0)) or arr.min() < lo or arr.max() > hi:
            bad = arr[(arr < lo) | (arr > hi) | (np.mod(arr, 1) != 0)].ravel()[:3].tolist()
            raise ConfigError(flag, f"probe states from {source} must be observations of {space}: integers in "
                                    f"[{lo}, {hi}]; got {bad}")
    return arr


def load_probe_states(spec: str | np.ndarray | Callable, obs_shape: tuple, env: Any = None,
                      flag: str = "--probe-states", space: Any = None) -> np.ndarray | None:
    """Probe states from an array, a ``.npy`` path or ``MOD:FUNC``; ``None`` for ``rollout``.
    ``space``: the env's observation space, whose range they are checked against (Discrete)."""
    arr = _load_probe_states(spec, obs_shape, env, flag)
    if arr is None or space is None:
        return arr
    source = "the given array" if not isinstance(spec, str) else spec
    return check_probe_range(arr, space, source, flag)


def _load_probe_states(spec: str | np.ndarray | Callable, obs_shape: tuple, env: Any, flag: str) -> np.ndarray | None:
    if spec is None or (isinstance(spec, str) and spec == "rollout"):
        return None
    if isinstance(spec, np.ndarray) or isinstance(spec, Tensor):
        return check_probe_shape(np.asarray(spec), obs_shape, "the given array", flag)
    if callable(spec):
        fn, source = spec, repr(spec)
    elif isinstance(spec, str) and spec.endswith(".npy"):
        path = Path(spec)
        if path.is_dir():
            raise ConfigError(flag, f"{spec} is a directory, not a .npy file")
        if not path.is_file():
            raise ConfigError(flag, f"probe-state file {spec} does not exist")
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic != b"\x93NUMPY":
            raise ConfigError(flag, f"{spec} is not a .npy file (it does not start with numpy's .npy header); "
                                    f"write it with numpy.save")
        try:
            return check_probe_shape(np.load(path, allow_pickle=False), obs_shape, spec, flag)
        except ConfigError:
            raise
        except Exception as e:
            raise ConfigError(flag, f"cannot read {spec} as a .npy array: {e}") from None
    elif isinstance(spec, str) and ":" in spec:
        fn, source = load_object(spec, flag), spec
        if not callable(fn):
            raise ConfigError(flag, f"{spec} is not callable")
    else:
        raise ConfigError(flag, f"expected rollout, a .npy file or MODULE:FUNCTION, got {spec!r}")
    try:
        n_args = len(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        n_args = 0
    try:
        arr = fn(env) if n_args >= 1 else fn()
    except Exception as e:
        raise ConfigError(flag, f"{source} raised {type(e).__name__}: {e}") from None
    if isinstance(arr, Tensor):
        arr = arr.detach().cpu().numpy()
    return check_probe_shape(np.asarray(arr), obs_shape, source, flag)


def sample_rows(states: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n distinct rows (all when there are fewer), in visiting order, chosen by ``seed``."""
    if states.shape[0] <= n:
        return states
    idx = np.sort(np.random.default_rng(seed).choice(states.shape[0], size=n, replace=False))
    return states[idx]
