"""Populations: many runs of one architecture trained as one batched computation.

``train_population(configs)`` takes the same :class:`ntrl.config.TrainConfig` objects that
:func:`ntrl.train.train` takes, one per member, and trains them together: the members' parameters
are stacked (M, P), their logits come from one ``torch.func.vmap`` of ``functional_call``, and every
gradient, NTVar, NTCov and inverse Fisher is formed for all members at once
(:mod:`ntrl.engine.batched`). Exact training of an MLP at one shared state (the bandits) takes the
structured path instead (:mod:`ntrl.engine.batched_structured`, :func:`structured_update`): no
per-member gradient is formed where it can be avoided, and the step is taken in place. A
single-logit or one-state tabular policy at one state reads its gradients off the logits'
cotangents (:class:`~ntrl.engine.batched_structured.LogitSelection`) and otherwise updates as the
batched engine does (:func:`general_update`). Each
member writes the run directory its config names, with the same config.json, records.jsonl and
summary.json as the per-run path, so the analysis reads what it reads today. The contract, tested in ``tests/test_population.py``:

* a member's records equal the per-run records of its config to 1e-12 relative in float64 (the
  differences ``real_delta`` and ``residual`` to 1e-12 of the values they are differences of),
  but for ``backend``, which says "population";
* in sampled mode each member draws from its own streams, seeded as the per-run path seeds them
  (:func:`ntrl.train.split_seed`), so its episodes, and therefore its records, are the same;
* a member stops on its own: at ``stop_at_p``, after its ``steps``, or when a value goes
  non-finite (reported by index and run name; the others go on). A stopped member is removed from
  the stacked tensors and costs nothing after.

Members must agree on everything that makes the architecture and the update rule (env, policy,
optimizer, gradient mode, network shape, batch size, baseline, η-probe scales); they may differ in
``MEMBER_FIELDS``: seed, p₀, learning rate, rewards (the direction), reward noise, NPG damping,
Adam's β₁, β₂ and ε, number of updates, stopping rules, tracking schedule and run name.

Each member is tracked on its own schedule (:class:`ntrl.tracker.TrackSchedule`: every k-th
update, ``track_every``, or log-spaced, ``track_per_decade`` updates per decade of t, which keeps
long extinction runs to a few records); an update is tracked for all members when any member's
schedule asks for it, and only the members whose schedule asks for it write a record.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import itertools
import json
import logging
import math
import numbers
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from ntrl.config import ConfigError, TrainConfig, training_settings
from ntrl.engine.batched import (
    BatchedInverseFisher, StackedPolicy, log_prob_rows, member_gradients, member_gradients_through,
)
from ntrl.engine.batched_states import (
    StatesFisherMetric, StatesInverseFisher, StatesJacobian, factored_log_prob_rows, layer_parameters, quadratic_forms,
    states_forward, states_jacobian,
)
from ntrl.engine.batched_structured import (
    LogitInverseFisher, LogitSelection, StackedSequential, fisher_ntvar, quad,
)
from ntrl.engine.metrics import scaled_inner, scaled_norm
from ntrl.population.models import SampledBatch, population_model
from ntrl.population.optimizers import BatchedOptimizer
from ntrl.records import (
    CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, finite_rows, json_file_bytes, nonfinite_field, read_records, record_line,
    record_lines, write_json_atomic, write_json_many_atomic,
)
from ntrl.run_dirs import RunDirLocks, RunLocked, check_out_dir, check_run_dir, is_ntrl_run, ntrl_wandb_dir
from ntrl.termination import sigterm_as_interrupt
from ntrl.tracker import TrackSchedule, first_order
from ntrl.train import (
    COMPLETE, RunInterrupted, RunResult, prepare_run_dirs, price_check, price_check_of_columns, run_summary, split_seed,
)
from ntrl.wandb_sink import WandbSink

log = logging.getLogger(__name__)

# Config fields in which members of one population may differ.
MEMBER_FIELDS = ("axes", "p0", "lr", "seed", "steps", "stop_at_p", "stop_below_p", "reward_do", "reward_dont", "reward", "rewards",
                 "start", "noise_std",
                 "npg_damping", "adam_beta1", "adam_beta2", "adam_eps", "track_every", "track_per_decade", "out",
                 "run_name", "force")
SUPPORTED = {("bandit", "exact"), ("bandit", "sampled"), ("kbandit", "exact"), ("kbandit", "sampled"),
             ("juice", "exact"), ("juice", "sampled")}
DEVICES = ("cpu", "cuda", "auto")


def unsupported_reason(config: TrainConfig) -> str | None:
    """Why the population path cannot train ``config`` (None when it can)."""
    if (config.env, config.mode) not in SUPPORTED:
        return f"populations cover {', '.join(f'{e} {m}' for e, m in sorted(SUPPORTED))}; not {config.env} {config.mode}"
    if config.dtype != "float64":
        return "populations train in float64 only"
    if config.env == "juice":
        if config.decomposition or config.f0 > 0:
            return "juice populations track P, F, R and P_probe; not the F·P decomposition (--no-decomposition) or --f0"
        from ntrl.envs.juice import MAX_TABULAR_STATES, n_model_states

        if n_model_states(config.size, config.hide_prob) > MAX_TABULAR_STATES:
            return (f"juice populations need the exact model (at most {MAX_TABULAR_STATES} states), and a "
                    f"{config.size}×{config.size} grid has {n_model_states(config.size, config.hide_prob)}")
    return None


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (an error without one) or ``auto`` (cuda when available)."""
    if device not in DEVICES:
        raise ConfigError("--device", f"must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda was asked for, but torch sees no CUDA device (this torch is "
                                      f"{torch.__version__}); use --device cpu or auto")
    return torch.device(device)


def member_bytes(n_params: int, n_obs: int, n_actions: int, batch_size: int, sampled: bool, n_outputs: int = 3,
                 model_bytes: int = 0) -> int:
    """An upper estimate of one member's memory (float64): parameters, gradients of the utility,
    of the ``n_outputs`` tracked properties and log-odds and of every logit, the Fisher's factors,
    Adam's moments and the temporaries of a step, about 3 N·K + 13 + outputs vectors of P entries,
    plus the model's own (``model_bytes``: the juice recursion's saved tensors)."""
    vectors = 13 + n_outputs + 3 * n_obs * n_actions
    return 8 * (vectors * n_params + (4 * batch_size if sampled else 0)) + model_bytes


def memory_limit(device: torch.device, max_memory: int | None) -> int:
    """Bytes a population may use: ``max_memory``, else half the device's available memory
    (CUDA's free memory; on the host MemAvailable, which counts the page cache the kernel would
    give back, unlike the free pages)."""
    if max_memory is not None:
        if isinstance(max_memory, bool) or not isinstance(max_memory, numbers.Real) or \
                not (math.isfinite(max_memory) and max_memory > 0):
            raise ConfigError("max_memory", f"must be a number of bytes > 0, got {max_memory!r}")
        return int(max_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024 // 2
    except (OSError, StopIteration, ValueError):  # pragma: no cover - not Linux
        return 2**31


def config_member_bytes(config: TrainConfig) -> tuple[int, int]:
    """(parameters, estimated bytes) of one member like ``config`` (:func:`member_bytes`)."""
    sample = config.build()
    sample.env.close()
    n_params = sum(p.numel() for p in sample.policy.parameters() if p.requires_grad)
    model = population_model([config], torch.device("cpu"))
    model.close()
    return n_params, member_bytes(n_params, model.n_states, model.n_actions, config.batch_size,
                                  config.mode == "sampled", len(model.properties) + model.n_z, model.member_bytes())


def members_that_fit(config: TrainConfig, device: str = "cpu", share: float = 1.0) -> int:
    """How many members like ``config`` fit in ``share`` of a population's memory limit on
    ``device`` (:func:`memory_limit`): the study sizes its chunks by it, one chunk per worker."""
    _, per = config_member_bytes(config)
    return max(1, int(share * memory_limit(resolve_device(device), None)) // per)


def check_memory(config: TrainConfig, members: int, device: torch.device, max_memory: int | None) -> None:
    """Refuse, with the estimate and the limit, a population of ``members`` like ``config`` that
    would not fit (:func:`member_bytes`, :func:`memory_limit`)."""
    limit = memory_limit(device, max_memory)
    n_params, per = config_member_bytes(config)
    if members * per > limit:
        fits = limit // per
        advice = f"use at most {fits} members per population" if fits else \
            f"not even one member fits: one needs about {byte_size(per)}"
        raise ConfigError("--population", f"a population of {members} member{'s' if members != 1 else ''} of "
                                          f"{n_params} parameters needs about {byte_size(members * per)}, above the "
                                          f"limit of {byte_size(limit)}; {advice}")


def byte_size(n: float) -> str:
    """``n`` bytes in GiB, MiB or KiB, whichever shows it with a digit before the point."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def validated_members(configs: Sequence[TrainConfig], schedule: TrackSchedule | None = None) -> list[TrainConfig]:
    """Each member's config validated (an error names the member by index and run name), with
    ``schedule`` written into every one where it is given (``track_every``, ``track_per_decade``),
    so that each member's config.json says how its records were tracked (a subclass of
    TrackSchedule with a rule of its own is written as its two fields), and a member without a
    run name gets the default name of those settings, as ``ntrl train`` would give it."""
    if isinstance(configs, TrainConfig):
        raise ConfigError("--population", f"a population takes a list of configs, one per member; got one "
                                          f"{type(configs).__name__} (pass [config])")
    configs = list(configs)
    wrong = sorted({type(c).__name__ for c in configs if not isinstance(c, TrainConfig)})
    if wrong:
        raise ConfigError("--population", f"a population takes a list of configs (BanditConfig, JuiceConfig, ...), "
                                          f"one per member; got {', '.join(wrong)}")
    if schedule is not None:
        if not isinstance(schedule, TrackSchedule):
            raise ConfigError("schedule", f"must be a TrackSchedule (every=k, or per_decade=n), got {schedule!r}")
        configs = [dataclasses.replace(c, track_every=schedule.every, track_per_decade=schedule.per_decade)
                   for c in configs]
    out = []
    for i, c in enumerate(configs):
        try:
            out.append(c.validate())
        except ConfigError as e:
            if len(configs) == 1:
                raise
            raise ConfigError(e.flag, f"member {i} ({c.run_name or 'unnamed'}): {e.message}") from None
    return out


def check_members_run_dirs(configs: Sequence[TrainConfig], locks: RunDirLocks | None = None) -> None:
    """Every member's run directory may take its run (:func:`ntrl.run_dirs.check_run_dir`), and
    (``locks``) is locked there, not trained by another live process; or one ConfigError: the first
    refusal, and how many more members are refused (a rerun of an interrupted population finds
    every one of them)."""
    refusals = []
    for c in configs:
        run_dir = c.run_dir()
        try:
            if locks is not None:
                locks.acquire(run_dir)
            check_run_dir(run_dir, c.force)
        except ConfigError as e:
            refusals.append((run_dir, e))
    if refusals:
        first = refusals[0][1]
        others = [str(d) for d, _ in refusals[1:]]
        more = f" ({len(others)} more member{'s are' if len(others) > 1 else ' is'} refused, each for its own run " \
               f"directory: {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})" if others else ""
        if len(configs) > 1 and any(is_ntrl_run(d) and not isinstance(e, RunLocked) for d, e in refusals):
            more += "; train_population(..., resume=True) trains only the members without a complete run"
        raise ConfigError(first.flag, first.message + more)


def check_compatible(configs: Sequence[TrainConfig]) -> None:
    """Members must agree on every field but :data:`MEMBER_FIELDS` (ConfigError otherwise)."""
    if not configs:
        raise ConfigError("--population", "a population needs at least one member")
    first = configs[0]
    for i, c in enumerate(configs):
        if type(c) is not type(first):
            raise ConfigError("--population", f"member {i} is a {type(c).__name__}, member 0 a {type(first).__name__}")
        for f in dataclasses.fields(first):
            if f.name in MEMBER_FIELDS:
                continue
            if getattr(c, f.name) != getattr(first, f.name):
                raise ConfigError(f"--{f.name.replace('_', '-')}", f"members of one population must share it: member 0 "
                                  f"has {getattr(first, f.name)!r}, member {i} {getattr(c, f.name)!r}")
        reason = unsupported_reason(c)
        if reason:
            raise ConfigError("--population", reason)
    names = [Path(os.path.realpath(c.run_dir())) for c in configs]  # a/../a and links: one directory
    if len(set(names)) != len(names):
        seen: dict[Path, int] = {}
        i, j = next((seen[n], k) for k, n in enumerate(names) if seen.setdefault(n, k) != k)
        repeats = len(names) - len(set(names))
        raise ConfigError("--run-name", f"members of one population need distinct run directories: members {i} and "
                                        f"{j} both write {names[j]}"
                                        + (f" ({repeats - 1} more such repeats)" if repeats > 1 else ""))


@dataclass
class MemberState:
    """What a member accumulates on the host: its records not yet on disk and its summary."""

    config: TrainConfig
    run_dir: Path
    p_start: float = math.nan
    crossed: int | None = None
    p_min: float = math.inf  # the least P so far, after how many updates
    p_min_at: int = 0
    p_back_at: int | None = None  # the update at which P was back at its start after falling below it
    return_first: float | None = None  # the mean return of its first update and of its latest
    return_last: float | None = None
    episodes: int = 0
    lines: list[str] = field(default_factory=list)  # records not yet appended to records.jsonl
    n_records: int = 0
    # what its Price check and W&B curve read of each record (the population's ``kept_keys``), kept
    # so that finishing need not read its records back; None where it must (too many kept in all)
    kept: list[tuple] | None = field(default_factory=list)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (update, P), thinned, once it stopped
    summary: dict[str, Any] | None = None
    written: bool = False  # its summary.json is on disk
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # added to its summary
    before_summary: Callable[[], None] | None = None  # called before its summary.json is written


@dataclass
class PopulationResult:
    """Per member (in the order of the configs): its RunResult; failures as (index, run name, error)."""

    results: list[RunResult]
    failures: list[tuple[int, str, str]]
    wandb_dir: str | None
    updates: int
    seconds: float  # wall time in all
    train_seconds: float = math.nan  # of which the update loop (without building and writing the run dirs)


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks of up to 1 GiB instead of returning them to the system.
    A population allocates (M, P) tensors of tens of MB at every update; with glibc's default
    (blocks above 32 MB go back to the system when freed) each one costs fresh page faults: on the
    benchmark VM a 36 MB ``x * 2`` took 20 ms, and 8 ms with the memory kept (benchmarks/RESULTS.md).
    Process-wide: the memory stays with the process. No-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: and stay there when freed
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _floats(t: Tensor) -> list[float]:
    """``t``'s numbers as Python floats (float64 on the CPU first)."""
    if t.dtype == torch.float64 and t.device.type == "cpu":
        return t.tolist()
    return t.detach().to("cpu", torch.float64).tolist()


def _array(t: Tensor) -> np.ndarray:
    """A float64 numpy copy of ``t`` on the CPU."""
    return t.detach().to("cpu", torch.float64).numpy().copy()


class _Population:
    """The state of the members still training, kept in stacked tensors (row i ↔ ``alive[i]``)."""

    def __init__(self, configs: Sequence[TrainConfig], device: torch.device, built: Callable[[], None] | None = None):
        """``built``: called after each member's policy is built (the setup's progress bar)."""
        first = configs[0]
        self.device = device
        self.sampled = first.mode == "sampled"
        policies = []
        for c in configs:  # each member's own build: its initialisation is the single run's
            exp = c.build()
            exp.env.close()
            policies.append(exp.policy)
            if built is not None:
                built()
        self.stacked = StackedPolicy(policies[0])
        self.theta = torch.stack([self.stacked.flatten(p) for p in policies]).to(device)
        self.stacked.module.to(device)  # only now: Module.to moves member 0's parameters in place
        self.model = population_model(configs, device)
        # exact training at one shared state (the bandits) of a Sequential network: the structured
        # path (ntrl.engine.batched_structured), which never forms a per-member gradient it can avoid
        self.structured = None
        if not self.sampled and self.model.obs.shape[0] == 1:
            self.structured = StackedSequential.plan(self.stacked.module, self.stacked.names, self.stacked.sizes)
        # a single-logit or one-state tabular policy at one state: its logits are entries of θ, and
        # every gradient is its cotangent read at each parameter's logit (no vmap, no per-member pass)
        self.selection = None
        if self.structured is None and self.model.obs.shape[0] == 1:
            self.selection = LogitSelection.plan(self.stacked.module, self.stacked.names)
        # training at several observations (the juice gridworld) of a Sequential network: its
        # tracked updates and its NPG steps read the gradients, the inverse Fisher and the tracked
        # quantities off the logits' factored Jacobian (ntrl.engine.batched_states), without a
        # reverse pass per logit or per property (update_kind)
        self.states = None
        if self.model.obs.shape[0] > 1:
            self.states = StackedSequential.plan(self.stacked.module, self.stacked.names, self.stacked.sizes)
        self.states_slots: list[tuple[int, int | None]] = []  # each Linear layer's (weight, bias) leaf
        if self.states is not None:
            offset = dict(zip(itertools.accumulate([0] + self.stacked.sizes[:-1]), range(len(self.stacked.sizes))))
            self.states_slots = [(offset[step.w0], None if step.b0 is None else offset[step.b0])
                                 for kind, step in self.states.steps if kind == "linear"]
        f64 = dict(dtype=torch.float64, device=device)
        per_member = lambda name: torch.tensor([getattr(c, name) for c in configs], **f64)  # noqa: E731
        self.optimizer = BatchedOptimizer(first.optimizer, per_member("lr"),
                                          betas=(per_member("adam_beta1"), per_member("adam_beta2")),
                                          eps=per_member("adam_eps"), damping=per_member("npg_damping"))
        # an exact update at one state needs only cotangents at the logits, which the bandits'
        # model gives in closed form (output_cotangents), tracked or not: no autograd graph
        self.closed_form = (hasattr(self.model, "cotangents") and not self.sampled
                            and (self.structured is not None or self.selection is not None))
        self.schedules = [c.track_schedule() for c in configs]
        self._distinct: tuple[list, set] | None = None  # (schedules, the distinct ones among them)
        self.alive = list(range(len(configs)))
        # every member's mean return at its first update (by member) and at the latest (the members
        # then alive, and theirs), and how many updates have begun: written into a member's
        # MemberState when it stops. Kept by member, not by row, so that a population interrupted
        # while it drops its finished members (select) still writes every summary.
        self.returns_first: dict[int, float] = {}
        self.returns_last: tuple[list[int], list[float]] | None = None
        self.iterations = 0
        self.action_rngs, self.noise_rngs = [], []
        from gymnasium.utils import seeding

        env_seeds = []
        for c in configs:
            env_seed, rng = split_seed(c.seed)
            env_seeds.append(env_seed)
            self.action_rngs.append(rng)
            self.noise_rngs.append(seeding.np_random(env_seed)[0])  # what env.reset(seed=env_seed) makes
        if self.sampled:
            self.model.start_sampling(configs, env_seeds)

    def forward(self) -> dict[str, Any]:
        """The model's quantities at θ, with the logits Z and the structured path's trace, or the
        parameter leaves. At one state (the structured path, the selection) without autograd's
        graph: :meth:`with_graph` adds it where the update needs it."""
        if self.structured is not None or self.selection is not None:
            fwd = None
            if self.structured is not None:
                z, fwd = self.structured.forward(self.theta, self.model.obs)
            else:
                z = self.selection.logits(self.theta)
            with torch.no_grad():  # one state: the bandits' model, without the log-odds z
                q: dict[str, Any] = self.model.quantities(z[:, None, :], with_z=False)
            q["Z"], q["fwd"] = z[:, None, :], fwd
            return q
        leaves = self.stacked.leaves(self.theta)
        trace = None
        with torch.enable_grad():
            if self.states is not None:  # by one batched product per layer, keeping what the Jacobian needs
                Z, trace = states_forward(self.states, [(leaves[w], None if b is None else leaves[b])
                                                        for w, b in self.states_slots], self.model.obs)
            else:
                Z = self.stacked.logits(leaves, self.model.obs)
            q = self.model.quantities(Z)
        q["Z"], q["leaves"], q["trace"] = Z, leaves, trace
        return q

    def with_graph(self, q: dict[str, Any]) -> dict[str, Any]:
        """``q``, or where it has no autograd graph (the lean forward pass at one state) and the
        model gives no cotangents in ``closed_form`` (sampled mode: the utility is the batch's
        surrogate), all the quantities again (the log-odds z too) from the logits as a leaf: X's
        cotangent ∂X/∂z then comes from autograd."""
        if q["Z"].requires_grad or self.closed_form:
            return q
        with torch.enable_grad():
            Z = q["Z"].detach().requires_grad_(True)
            out: dict[str, Any] = self.model.quantities(Z)
        out["Z"], out["fwd"] = Z, q["fwd"]
        return out

    def logits_at(self, theta: Tensor) -> Tensor:
        """Every member's logits (M, N, K) at the model's observations, for parameters θ (M, P)."""
        if self.structured is not None:
            return self.structured.forward(theta, self.model.obs, trace=False)[0][:, None, :]
        if self.selection is not None:
            return self.selection.logits(theta)[:, None, :]
        if self.states is not None:
            return states_forward(self.states, layer_parameters(self.states, theta), self.model.obs, trace=False)[0]
        return self.stacked.logits(theta, self.model.obs)

    def utility(self, q: dict[str, Any], batch_size: int, baseline: str) -> tuple[Tensor, SampledBatch | None]:
        """The utility each member ascends at this update, and (sampled) the batch of episodes
        behind it, drawn from each member's own streams as the per-run sampler draws them (None
        when exact: the return is then U itself)."""
        if not self.sampled:
            return q["U"], None
        batch = self.model.sample(q, batch_size, baseline, self.action_rngs, self.noise_rngs)
        if batch.weights is not None:  # the Fisher over the batch's states, as the per-run path takes it
            q["weights"] = batch.weights
        return self.model.surrogate(q["logp"], batch), batch

    @staticmethod
    def log_prob_rows(q: dict[str, Any], logit_grads: list[Tensor]) -> Tensor:
        """∇log π(a|o) of every member, Fisher state o and action a, (M, N, K, P), from the
        gradients of the N·K logits (ordered by state, then action)."""
        probs = q["logp"].detach().exp()  # (M, N, K)
        M, N, K = probs.shape
        return log_prob_rows(torch.stack(logit_grads, dim=1).reshape(M, N, K, -1), probs, overwrite=True)

    def fishers(self, q: dict[str, Any], rows: Tensor, npg: bool,
                track: bool) -> tuple[BatchedInverseFisher | None, BatchedInverseFisher | None]:
        """(NPG's metric (F + λI)⁻¹ with each member's λ, the tracked F⁺), from the rows
        ∇log π(a) (:meth:`log_prob_rows`); the second is the first where every λ is 0."""
        if not (npg or track):
            return None, None
        probs = q["logp"].detach().exp()  # (M, N, K)
        w = q["weights"]
        damping = self.optimizer.damping
        fisher = BatchedInverseFisher.from_log_prob_rows(rows, w, probs, damping) if npg else None
        if not track:
            return fisher, None
        if fisher is not None and not bool((damping > 0).any()):
            return fisher, fisher
        return fisher, BatchedInverseFisher.from_log_prob_rows(rows, w, probs, torch.zeros_like(damping))

    def tracking(self, t: int) -> list[bool]:
        """Whether each member's schedule tracks update t (each distinct schedule asked once)."""
        if self._distinct is None or self._distinct[0] is not self.schedules:
            self._distinct = (self.schedules, set(self.schedules))
        answers = {s: s.tracks(t) for s in self._distinct[1]}
        if len(answers) == 1:
            return [next(iter(answers.values()))] * len(self.schedules)
        return [answers[s] for s in self.schedules]

    def note_returns(self, returns: list[float]) -> None:
        """The members' mean returns of the update that begins (row by row)."""
        if not self.returns_first:
            self.returns_first = dict(zip(self.alive, returns))
        self.returns_last = (self.alive, returns)  # select makes a new list of the alive: this one stays
        self.iterations += 1

    def write_returns(self, members: list["MemberState"], indices: Sequence[int], batch_size: int) -> None:
        """Into the MemberState of each member of ``indices`` (indices into ``members``): its first
        and latest mean return, and (sampled) its episodes, ``batch_size`` per update it began."""
        if self.returns_last is None:
            return
        alive, values = self.returns_last
        row = {m: i for i, m in enumerate(alive)}
        for m in indices:
            if m in row:
                st = members[m]
                st.return_first, st.return_last = self.returns_first.get(m), values[row[m]]
                st.episodes = self.iterations * batch_size if self.sampled else 0

    def select(self, keep_rows: list[int]) -> None:
        idx = torch.as_tensor(keep_rows, dtype=torch.long, device=self.device)
        self.theta = self.theta[idx]
        self.model.select(idx)
        self.optimizer.select(idx)
        self.alive = [self.alive[i] for i in keep_rows]
        self.schedules = [self.schedules[i] for i in keep_rows]
        self.action_rngs = [self.action_rngs[i] for i in keep_rows]
        self.noise_rngs = [self.noise_rngs[i] for i in keep_rows]


class SetupProgress:
    """The bar of a population's setup, before its first update: building the members' policies
    and making their run directories, a member at a time, then writing the directories' three
    files each (it goes away when the training's own bar starts). Thousands of members take a
    while: 16384 took 47 s on a GPU machine's host (benchmarks/RESULTS.md, run 15)."""

    def __init__(self, members: int, name: str):
        from tqdm.auto import tqdm

        self.name, self.members = name, members
        self.bar = tqdm(total=members, desc=f"{name}: building members", unit="member", file=sys.stderr,
                        dynamic_ncols=True, leave=False)

    def tick(self) -> None:
        self.bar.update(1)

    def next_phase(self) -> None:
        """From building the members to making their run directories."""
        self.bar.reset()
        self.bar.set_description(f"{self.name}: making run directories")

    def files_phase(self) -> None:
        """From making the run directories to writing their files (marker, config.json, records)."""
        self.bar.unit = "file"
        self.bar.set_description(f"{self.name}: writing their files", refresh=False)
        self.bar.reset(total=3 * self.members)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (where it was on), for a setup that allocates
    thousands of modules and configs: each full collection walks every object alive, and there
    are more of them with every member built. What the setup leaves as cyclic garbage is
    collected once it is on again."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def train_population(
    configs: Sequence[TrainConfig],
    *,
    schedule: TrackSchedule | None = None,
    device: str = "cpu",
    progress: bool = True,
    wandb_parent: str | os.PathLike | None = None,
    wandb_name: str | None = None,
    wandb_config: dict[str, Any] | None = None,
    max_memory: int | None = None,
    flush_seconds: float = 1.0,
    summary_extra: Sequence[dict[str, Any]] | None = None,
    before_summary: Callable[[], None] | None = None,
    resume: bool = False,
) -> PopulationResult:
    """Train every config of ``configs`` as one population; write each member's run directory.

    ``resume``: a member whose run directory already holds a complete run of its settings (its
    summary.json says it finished or stopped at a threshold, its config.json has this config's
    training settings) is not trained again, and its result is read back; a member whose run of
    ntrl's was cut short (interrupted, failed, or no summary) is trained again from the start in
    its place, as ``force`` would; the others train as they would without it
    (:func:`resume_population`). Every member's run directory is locked while the population
    trains (:class:`ntrl.run_dirs.RunDirLocks`): a member that another live process is training
    is refused, with that process's PID, before anything is written. A SIGTERM at its default
    action stops the population as Ctrl-C does and then ends the process, once every member's
    records and summary are written (:mod:`ntrl.termination`).

    Each member is tracked on its config's schedule, or on ``schedule`` when one is given (then
    written into each member's config.json).
    ``wandb_parent``: the directory whose ``wandb/`` (made and marked as ntrl's,
    or already ntrl's) holds the population's one W&B run, in the configs' W&B mode; without it the
    population logs no W&B run. ``max_memory``: bytes the population may use (default: half the
    available memory). Every check (configs, memory, the members' run directories) runs before
    anything is written. A member's summary.json is written when it stops, with the items of its
    entry of ``summary_extra`` added (the study adds its run spec); records are appended at most
    ``flush_seconds`` apart, or :data:`FLUSH_SPACING` times as long as the last appending took
    where that is longer (a thousand members' files take a while to open: at most 1/20 of the time
    goes to appending). ``before_summary`` is called before the summaries of the members that stop
    together are written (a study's worker ends there if its parent has died, so that nothing
    completes after a kill)."""
    with sigterm_as_interrupt():
        configs = validated_members(configs, schedule)
        check_compatible(configs)
        if wandb_parent is None:  # no W&B run: each member's config.json says so, as its summary does
            configs = [c if c.wandb == "disabled" else dataclasses.replace(c, wandb="disabled") for c in configs]
        if resume:
            return resume_population(configs, schedule=schedule, device=device, progress=progress,
                                     wandb_parent=wandb_parent, wandb_name=wandb_name, wandb_config=wandb_config,
                                     max_memory=max_memory, flush_seconds=flush_seconds, summary_extra=summary_extra,
                                     before_summary=before_summary)
        with RunDirLocks() as locks:
            return _train_members(configs, locks, schedule, device, progress, wandb_parent, wandb_name, wandb_config,
                                  max_memory, flush_seconds, summary_extra, before_summary)


def _train_members(configs: list[TrainConfig], locks: RunDirLocks, schedule: TrackSchedule | None, device: str,
                   progress: bool, wandb_parent: str | os.PathLike | None, wandb_name: str | None,
                   wandb_config: dict[str, Any] | None, max_memory: int | None, flush_seconds: float,
                   summary_extra: Sequence[dict[str, Any]] | None,
                   before_summary: Callable[[], None] | None) -> PopulationResult:
    """:func:`train_population` of validated, compatible ``configs``, their run directories held in
    ``locks``."""
    first = configs[0]
    dev = resolve_device(device)
    torch.set_num_threads(first.threads)
    check_memory(first, len(configs), dev, max_memory)
    RunDirLocks.reserve(len(configs))
    check_members_run_dirs(configs, locks)
    if wandb_parent is not None:
        check_out_dir(wandb_parent, "wandb_parent")
    log.info("tangent engine: population backend (ntrl.engine.batched, %d members on %s) for 'P', 'R' and "
             "'kappa': the chain rule through the logits, one reverse pass for all members", len(configs), dev)
    start = time.time()
    if dev.type == "cpu":
        keep_freed_memory()
    setup = SetupProgress(len(configs), wandb_name or "population") if progress else None
    try:
        with collection_paused():
            pop = _Population(configs, dev, built=setup.tick if setup else None)
            if schedule is not None:  # itself, not only its fields in the configs: a subclass may track otherwise
                pop.schedules = [schedule] * len(configs)
            if setup:
                setup.next_phase()
            run_dirs = prepare_run_dirs(configs, made=setup.tick if setup else None,
                                        files=setup.files_phase if setup else None, locks=locks)
            members = [MemberState(c, run_dir, extra=dict(summary_extra[i]) if summary_extra else {},
                                   before_summary=before_summary) for i, (c, run_dir) in enumerate(zip(configs, run_dirs))]
    finally:
        if setup:
            setup.close()
    sink = population_sink(wandb_parent, first, wandb_name, wandb_config)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(c.steps for c in configs), desc=wandb_name or "population", unit="upd", file=sys.stderr,
                   dynamic_ncols=True)
    curve_points = max(2, CURVE_ROWS // len(configs))  # per member, in the W&B curves table
    pending = PendingRecords(members)
    crash = None  # what stopped the whole population, if an error did
    updates_taken = 0  # t, or t + 1 from update t's step to the end of its iteration
    last_flush = loop_start = time.time()
    flush_interval = flush_seconds
    t = 0
    last_logged = None  # the last update the W&B history logged (history_due)
    interrupted = False
    try:
        q = pop.forward()
        for row, p in enumerate(_floats(q["P"])):
            members[pop.alive[row]].p_start = members[pop.alive[row]].p_min = p
        watch = StopWatch([members[i] for i in pop.alive])
        while pop.alive:
            tracking = pop.tracking(t)
            tracked = any(tracking)
            q = pop.with_graph(q)
            U, batch = pop.utility(q, first.batch_size, first.baseline)
            names = pop.model.properties
            U_val = _floats(U)
            returns = U_val if batch is None else batch.mean_return.tolist()
            pop.note_returns(returns)
            update = update_kind(pop, tracked, first)
            bad_rows, before, take_step = update(pop, q, U, batch, tracked, first)
            take_step()
            updates_taken = t + 1  # as the per-run path counts a step once taken
            p_before = q["P"].detach()
            q = pop.forward()
            p_after = _floats(q["P"])
            done: dict[int, tuple[str, str | None, float, int]] = {}  # row → (status, error, p_end, updates)
            for row in bad_rows:
                done[row] = ("failed", f"non-finite utility gradient at update {t}", float(p_before[row]), t)
            if tracked:
                fields = record_fields(t, before, q, U_val, pop.optimizer.lr, returns, pop.sampled, names)
                append_records(members, pop, pending, fields, t, done, p_after, first.optimizer, tracking)
                recorded = [row for row in range(len(pop.alive)) if tracking[row] and row not in done] \
                    if sink.run is not None and history_due(t, last_logged) else []  # else nothing to log
                if recorded:  # P after the step, as the records of update t give it
                    sink.log({"update": t, "P/median": float(statistics.median_low(
                        fields["P/value"][recorded] + fields["P/real_delta"][recorded])),
                        "members/active": len(pop.alive)})
                    last_logged = t
            for row in watch.rows_to_check(p_after, t):
                if row not in done:
                    st = members[pop.alive[row]]
                    stop = stopping(st, p_after[row], t)
                    watch.refresh(row, st)
                    if stop is not None:
                        done[row] = stop
            t += 1
            if done:
                ending = []
                for row, (status, message, p_end, updates) in sorted(done.items()):
                    st = members[pop.alive[row]]
                    st.error = message
                    ending.append((st, status, updates, p_end))
                    if message and bar is not None:  # said as it happens, not only in the result
                        rest = "; the others go on" if len(pop.alive) > len(done) else ""
                        bar.write(f"ntrl: member {pop.alive[row]} ({st.run_dir.name}) stopped: {message}{rest}",
                                  file=sys.stderr)
                pop.write_returns(members, [pop.alive[row] for row in sorted(done)], first.batch_size)
                finish_members(ending, sink, curve_points, pending)
                keep = [r for r in range(len(pop.alive)) if r not in done]
                pop.select(keep)
                watch.select(keep)
                if pop.alive:
                    q = pop.forward()
            if time.time() - last_flush > flush_interval:
                flush_start = time.time()
                pending.format()
                flush(members)
                last_flush = time.time()
                # appending to a thousand members' files takes a while: spend at most 1/20 of the time on it
                flush_interval = max(flush_seconds, FLUSH_SPACING * (last_flush - flush_start))
            if bar is not None:
                bar.update(1)
                if pop.alive:
                    bar.set_postfix(active=len(pop.alive), P=f"{float(q['P'].detach().median()):.4g}", refresh=False)
    except KeyboardInterrupt:
        interrupted = True
    except BaseException as e:  # stops every member still training: each summary says why
        crash = f"the population stopped at update {t}: {type(e).__name__}: {e}"
        raise
    finally:
        loop_seconds = time.time() - loop_start
        if bar is not None:
            bar.close()
        # still training: interrupted, or stopped with the population by an error
        # (not those whose summary is written: an interrupt while the finished ones are dropped)
        still = [i for i in pop.alive if not members[i].written]
        pop.write_returns(members, still, first.batch_size)
        p_now = current_p(pop) if still else {}
        for i in still:
            members[i].error = members[i].error or crash
        finish_members([(members[i], "interrupted" if interrupted else "failed", updates_taken,
                         p_now.get(i, math.nan)) for i in still], sink, curve_points, pending)
        pop.model.close()
        wandb_dir = sink.directory  # None once finished
        close_population_sink(sink, members, t)
    if interrupted:
        raise RunInterrupted(f"population interrupted at update {updates_taken}; the records so far and each member's "
                             f"summary are kept")
    results = [RunResult(st.run_dir, st.summary, st.summary["wandb_dir"], target_label(st.config)) for st in members]
    failures = [(i, st.run_dir.name, st.error) for i, st in enumerate(members) if st.error]
    return PopulationResult(results, failures, wandb_dir, t, time.time() - start, loop_seconds)


def completed_member(config: TrainConfig) -> dict[str, Any] | None:
    """The summary of a complete run of ``config`` in its run directory, a run directory of
    ntrl's: summary.json with a complete status (:data:`ntrl.train.COMPLETE`) and config.json
    this config's in every training setting (:func:`ntrl.config.training_settings`: not where
    it is written and logged, not the thread count; a field the file lacks, written by an ntrl
    before that field existed, counts as its default, as a study file's does: a new field's
    default keeps the behaviour of the code before it);
    None where there is none (no directory, not ntrl's, no or an incomplete summary). A complete
    run of other settings is a ConfigError (resuming would mix two experiments), or, with
    ``force``, None: it is replaced."""
    run_dir = config.run_dir()
    if not is_ntrl_run(run_dir):  # checked as any other directory is
        return None
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        written = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(summary, dict) and summary.get("status") in COMPLETE and isinstance(written, dict)):
        return None
    written = {**json_defaults(type(config)), **written}
    wanted, written = training_settings(json.loads(json_file_bytes(config.to_dict()))), training_settings(written)
    differ = sorted(k for k in set(wanted) | set(written) if wanted.get(k) != written.get(k))
    if differ and config.force:  # to be replaced, as without resume
        return None
    if differ:
        raise ConfigError("--run-name", f"{run_dir} holds a complete run of other settings ({', '.join(differ[:4])}"
                                        f"{', ...' if len(differ) > 4 else ''} differ), so resuming would mix two "
                                        f"experiments; give this member another run name")
    return summary


def json_defaults(cls: type) -> dict[str, Any]:
    """The default of each field of the dataclass ``cls`` that has one, as config.json holds it."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return json.loads(json_file_bytes(defaults))


def resume_population(configs: list[TrainConfig], **kwargs: Any) -> PopulationResult:
    """:func:`train_population` of the members without a complete run of their settings
    (:func:`completed_member`), each run of ntrl's that was cut short replaced (``force``), and
    the complete ones' results read back; results and failures in the order of ``configs``."""
    start = time.time()
    RunDirLocks.reserve(len(configs))
    with RunDirLocks() as locks:  # every member's directory locked before it is read: none completes meanwhile
        for c in configs:
            locks.acquire(c.run_dir())
        done = {i: s for i, c in enumerate(configs) if (s := completed_member(c)) is not None}
        todo = [i for i in range(len(configs)) if i not in done]
        if kwargs.get("progress", True):
            print(f"ntrl: resume: {len(done)} of {len(configs)} members already complete, read back untouched; "
                  f"training {len(todo)}", file=sys.stderr)
        trained = None
        if todo:
            extra = kwargs.pop("summary_extra")
            again = [dataclasses.replace(configs[i], force=True) if configs[i].run_dir().exists() else configs[i]
                     for i in todo]
            trained = train_population(again, summary_extra=[extra[i] for i in todo] if extra else None, **kwargs)
    results: list[RunResult | None] = [None] * len(configs)
    for i, summary in done.items():
        results[i] = RunResult(configs[i].run_dir(), summary, summary.get("wandb_dir"), target_label(configs[i]))
    failures = []
    if trained is not None:
        for i, r in zip(todo, trained.results):
            results[i] = r
        failures = [(todo[j], name, error) for j, name, error in trained.failures]
    return PopulationResult(results, failures, trained.wandb_dir if trained else None,
                            trained.updates if trained else 0, time.time() - start,
                            trained.train_seconds if trained else 0.0)


def current_p(pop: _Population) -> dict[int, float]:
    """P at the parameters the members still training hold now (member index → P), as the
    per-run path evaluates P for the summary of a run that stops early; {} where it cannot be
    evaluated (the error that stopped the population may be the evaluation's own) or where the
    rows of θ are not yet the members' (an interrupt while :meth:`_Population.select` drops the
    finished ones: it selects θ, the model and the optimizer before the list of members)."""
    if not pop.alive or pop.theta.shape[0] != len(pop.alive):  # an interrupt inside select
        return {}
    try:
        with torch.no_grad():
            return dict(zip(pop.alive, _floats(pop.forward()["P"])))
    except (Exception, KeyboardInterrupt):  # noqa: BLE001 - the summaries are written either way, P unknown
        return {}


def general_update(pop: _Population, q: dict[str, Any], U: Tensor, batch: SampledBatch | None, tracked: bool,
                   first: TrainConfig) -> tuple[list[int], dict[str, Any] | None, Callable[[], None]]:
    """One update by the batched engine (:func:`ntrl.engine.batched.member_gradients`: every
    gradient formed per member; for a policy whose logits are entries of θ, the logits' cotangents
    read at each parameter, :class:`~ntrl.engine.batched_structured.LogitSelection`): (the rows of
    the members whose utility gradient is non-finite, what the tracker records before the step or
    None, the step itself)."""
    K, N, names = pop.model.n_actions, pop.model.n_states, pop.model.properties
    n_z = pop.model.n_z
    noise = pop.sampled and first.noise
    need_fisher = first.optimizer == "npg" or (tracked and (first.fisher or noise))
    if pop.selection is not None:  # one state (N = 1)
        grads = [pop.selection.gradient(c) for c in output_cotangents(pop, q, U, tracked, K if need_fisher else 0)]
    else:
        named = {"U": U, **({x: q[x] for x in names} if tracked else {})}
        derived = derived_gradients(pop, q, names) if tracked and not pop.sampled else {}
        passes = [x for x in named if x not in derived]  # the outputs that take a reverse pass
        outputs = [named[x] for x in passes] + ([q["z"][:, i] for i in range(n_z)] if tracked else [])
        n_logits = N * K if need_fisher else 0
        if pop.theta.shape[0] <= SPLIT_MEMBERS and len(outputs) + n_logits > 1:
            grads = member_gradients_through(outputs, q["Z"], q["leaves"], n_logits)
        else:
            logits = [q["Z"][:, o, a] for o in range(N) for a in range(K)] if n_logits else []
            grads = member_gradients(outputs + logits, q["leaves"])
        if derived:  # back in the order U, the properties, the log-odds, the logits
            by_name = dict(zip(passes, grads))
            by_name.update({x: of(by_name) for x, of in derived.items()})
            grads = [by_name[x] for x in named] + grads[len(passes):]
    g = grads[0]
    prop_grads = dict(zip(names, grads[1:1 + len(names)])) if tracked else {}
    z_grads = grads[1 + len(names):1 + len(names) + n_z] if tracked else []
    bad_g = nonfinite_members(g)
    any_bad = bad_g is not None
    rows = pop.log_prob_rows(q, grads[-N * K:]) if need_fisher else None
    fisher, fisher0 = pop.fishers(q, rows, first.optimizer == "npg", tracked and first.fisher) \
        if need_fisher else (None, None)
    plan = pop.optimizer.plan(torch.where(bad_g[:, None], torch.zeros_like(g), g) if any_bad else g, fisher, tracked)
    before = None
    if tracked:
        before = tracked_stats(q, prop_grads, z_grads, g, plan, pop.optimizer.lr, fisher0,
                               utility_scale=pop.model.utility_scale if pop.sampled else None)
        if first.price_scales:
            before["probe"] = eta_probe(pop, q, plan, before["P"]["ntcov_opt"], first.price_scales)
        if noise:
            before["noise"] = noise_spread(batch, rows, prop_grads, plan, pop.optimizer.lr)

    return rows_where(bad_g) if any_bad else [], before, step_taker(pop, plan, bad_g)


def cotangents_at_logits(pop: _Population, q: dict[str, Any], U: Tensor) -> dict[str, Tensor]:
    """c_X = ∂X/∂Z, flat (M, N·K), of U, each of the model's properties and each log-odds z_i (as
    "z0", "z1", …), in that order: a reverse pass through ``q``'s graph from X to the logits alone,
    each keeping the graph, or where exact training derives X's from others', that
    (:func:`derived_gradients`, which is linear in what it is given)."""
    names, Z = pop.model.properties, q["Z"]
    derived = derived_gradients(pop, q, names) if not pop.sampled else {}
    named = {"U": U, **{x: q[x] for x in names}, **{f"z{i}": q["z"][:, i] for i in range(pop.model.n_z)}}
    cots: dict[str, Tensor] = {}
    for x, value in named.items():
        if x in derived:
            continue
        c = torch.autograd.grad(value.sum(), Z, retain_graph=True, allow_unused=True)[0] \
            if value.requires_grad else None
        cots[x] = (torch.zeros_like(Z) if c is None else c).reshape(Z.shape[0], -1)
    cots.update({x: of(cots) for x, of in derived.items()})
    return {x: cots[x] for x in named}


def update_kind(pop: _Population, tracked: bool, first: TrainConfig) -> Callable:
    """The function that takes this update: :func:`structured_update` at one shared state; at
    several observations (an MLP), :func:`states_tracked_update` for a tracked exact SGD, sign or
    Adam update, :func:`states_factored_update` for another tracked update (sampled, or NPG) and
    :func:`states_npg_update` for an untracked NPG update; else :func:`general_update`."""
    if pop.structured is not None:
        return structured_update
    if pop.states is not None:
        if tracked and not pop.sampled and first.optimizer != "npg":
            return states_tracked_update
        if tracked:
            return states_factored_update
        if first.optimizer == "npg":
            return states_npg_update
    return general_update


def states_factored_update(pop: _Population, q: dict[str, Any], U: Tensor, batch: SampledBatch | None,
                           tracked: bool, first: TrainConfig) -> tuple[list[int], dict[str, Any] | None,
                                                                       Callable[[], None]]:
    """A tracked update at several observations (the juice MLP) that :func:`states_tracked_update`
    does not take (sampled, or NPG): :func:`general_update`'s, with every
    gradient Jᵀc_X formed from its cotangent at the logits (a reverse pass through the model or the
    sampled surrogate alone) and the logits' factored Jacobian, the inverse Fisher in the space of
    the logits, or the QR of rows formed from the factors (:func:`states_fisher`), and the noise
    model's rows ∇log π in factored form (:func:`~ntrl.engine.batched_states.factored_log_prob_rows`): no
    reverse pass per logit."""
    names, n_z = pop.model.properties, pop.model.n_z
    cots = cotangents_at_logits(pop, q, U)
    jac = states_jacobian(pop.states, q["trace"])
    G = jac.gram()
    npg, noise = first.optimizer == "npg", pop.sampled and first.noise
    fisher = fisher0 = None
    if npg:
        fisher = states_fisher(pop, q, jac, G, pop.optimizer.damping)
    if first.fisher:  # undamped, for the record
        fisher0 = fisher if fisher is not None and not bool((pop.optimizer.damping > 0).any()) else \
            states_fisher(pop, q, jac, G, torch.zeros_like(pop.optimizer.lr))
    grads = dict(zip(cots, jac.materialize_many(torch.stack(list(cots.values()), 1), pop.stacked.n_params).unbind(1)))
    g = grads["U"]
    bad_g = nonfinite_members(g)
    any_bad = bad_g is not None
    plan = pop.optimizer.plan(torch.where(bad_g[:, None], torch.zeros_like(g), g) if any_bad else g,
                              fisher if npg else None, tracked)
    prop_grads = {x: grads[x] for x in names}
    before = tracked_stats(q, prop_grads, [grads[f"z{i}"] for i in range(n_z)], g, plan, pop.optimizer.lr, fisher0,
                           utility_scale=pop.model.utility_scale if pop.sampled else None)
    if first.price_scales:
        before["probe"] = eta_probe(pop, q, plan, before["P"]["ntcov_opt"], first.price_scales)
    if noise:
        rows_gram, rows_times = factored_log_prob_rows(jac, G, q["logp"].detach().exp())
        before["noise"] = noise_from_rows(batch, rows_gram, rows_times, pop.stacked.n_params, prop_grads, plan,
                                          pop.optimizer.lr)

    return rows_where(bad_g) if any_bad else [], before, step_taker(pop, plan, bad_g)


def states_npg_update(pop: _Population, q: dict[str, Any], U: Tensor, batch: SampledBatch | None, tracked: bool,
                      first: TrainConfig) -> tuple[list[int], dict[str, Any] | None, Callable[[], None]]:
    """An untracked NPG update at several observations (the juice MLP, exact or sampled): U's
    cotangent c_U = ∂U/∂Z by a reverse pass through the model (or the sampled surrogate) alone,
    g = Jᵀc_U from the logits' factored Jacobian, and the step (F + λI)⁻¹g by :func:`states_fisher`,
    without a reverse pass per logit. Returns what :func:`general_update` returns."""
    Z = q["Z"]
    c = torch.autograd.grad(U.sum(), Z, retain_graph=False, allow_unused=True)[0] if U.requires_grad else None
    cU = (torch.zeros_like(Z) if c is None else c).reshape(Z.shape[0], -1)
    jac = states_jacobian(pop.states, q["trace"])
    fisher = states_fisher(pop, q, jac, jac.gram(), pop.optimizer.damping)
    g = jac.materialize(cU, pop.stacked.n_params)
    bad_g = nonfinite_members(g)
    plan = pop.optimizer.plan(torch.where(bad_g[:, None], torch.zeros_like(g), g) if bad_g is not None else g, fisher,
                              tracked)
    return rows_where(bad_g) if bad_g is not None else [], None, step_taker(pop, plan, bad_g)


def states_fisher(pop: _Population, q: dict[str, Any], jac: StatesJacobian, G: Tensor,
                  damping: Tensor) -> StatesFisherMetric | BatchedInverseFisher:
    """Each member's (F + λI)⁻¹, or F⁺ where λ = 0, over the model's observations, acting on
    parameter vectors: in the space of the logits (:class:`StatesFisherMetric`) where no member is
    damped and every member's κ(G_FF) is at most :data:`STATES_MAX_CONDITION`; otherwise by the QR
    of the rows √(w π) ∇log π (:class:`BatchedInverseFisher`, the general path's), formed from the
    factored Jacobian (``materialize_many`` of the logits' unit cotangents), not by a reverse pass
    per logit."""
    probs, weights = q["logp"].detach().exp(), q["weights"].detach()
    M, NF, K = probs.shape
    nf = NF * K
    if not bool((damping > 0).any()) and bool((gram_condition(G[:, :nf, :nf]) <= STATES_MAX_CONDITION).all()):
        return StatesFisherMetric(StatesInverseFisher.from_gram(G, probs, weights), jac, pop.stacked.n_params)
    units = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)[:nf].expand(M, nf, -1)
    rows = log_prob_rows(jac.materialize_many(units, pop.stacked.n_params).reshape(M, NF, K, -1), probs,
                         overwrite=True)
    return BatchedInverseFisher.from_log_prob_rows(rows, weights, probs, damping)


STATES_MAX_CONDITION = 1e4  # the largest κ(G_FF) = κ(J_F)² at which states_fisher takes the inverse Fisher from
# the Gram matrix: its rounding then adds at most about eps·κ(G_FF) ≈ 2e-12 relative, near the per-run QR's
# accuracy (measured far less: benchmarks/RESULTS.md, run 22)


def gram_condition(G: Tensor) -> Tensor:
    """The condition number of each member's Gram matrix (M, n, n), σ_max/σ_min (inf where σ_min is
    0; NaN where G is not finite)."""
    s = torch.linalg.svdvals(torch.where(torch.isfinite(G), G, torch.zeros_like(G)))
    cond = s[:, 0] / s[:, -1]
    return torch.where(torch.isfinite(G).flatten(1).all(1), cond, torch.full_like(cond, float("nan")))


def states_tracked_update(pop: _Population, q: dict[str, Any], U: Tensor, batch: SampledBatch | None,
                          tracked: bool, first: TrainConfig) -> tuple[list[int], dict[str, Any] | None,
                                                                      Callable[[], None]]:
    """A tracked exact SGD, sign or Adam update at several observations (the juice MLP,
    :attr:`_Population.states`): the step as :func:`general_update` takes it, from g = Jᵀc_U by one
    reverse pass of U's cotangent c_U = ∂U/∂Z through the network; every tracked quantity from the
    cotangents c_X = ∂X/∂Z (a reverse pass through the model alone per property that is not derived
    from others, :func:`derived_gradients`) and the logits' factored Jacobian at the model's
    observations and probes (:mod:`ntrl.engine.batched_states`): ∇X·∇Y = c_Xᵀ G c_Y, ∇X·d = c_X·(J d),
    ∇X·D∇Y = c_Xᵀ (J D Jᵀ) c_Y and the Fisher's NTVar in the space of the logits, without forming any
    property's gradient or the Fisher's rows (:func:`states_fisher` says where it takes them, from
    the factors). Returns what :func:`general_update` returns."""
    names, n_z = pop.model.properties, pop.model.n_z
    Z = q["Z"]
    M = Z.shape[0]
    cots = cotangents_at_logits(pop, q, U)
    jac = states_jacobian(pop.states, q["trace"])
    G = jac.gram()
    leaves = q["leaves"]
    parts = torch.autograd.grad(Z, leaves, grad_outputs=cots["U"].reshape(Z.shape), allow_unused=True)
    g = torch.cat([(p if p is not None else torch.zeros_like(leaf)).reshape(M, -1) for p, leaf in zip(parts, leaves)],
                  dim=1)
    bad_g = nonfinite_members(g)
    any_bad = bad_g is not None
    plan = pop.optimizer.plan(torch.where(bad_g[:, None], torch.zeros_like(g), g) if any_bad else g, None, True)
    n_x = len(names)
    C = torch.stack([cots[x] for x in names] + [cots[f"z{i}"] for i in range(n_z)] + [cots["U"]], 1)
    D = quadratic_forms(C, G)
    props = C[:, :n_x]
    along = (props * jac.dot(plan.direction)[:, None, :]).sum(2)  # ∇X·d, (M, n_x)
    in_opt = None if plan.diagonal is None else \
        torch.diagonal(quadratic_forms(props, jac.gram_diagonal(plan.diagonal)), dim1=1, dim2=2)
    in_fisher = None
    if first.fisher:  # F⁺ over the model's observations, weighted by the visitation
        fisher = states_fisher(pop, q, jac, G, torch.zeros_like(pop.optimizer.lr))
        if isinstance(fisher, StatesFisherMetric):
            in_fisher = fisher.fisher.ntvars(props)
        else:  # ill-conditioned: the properties' gradients, for the QR's metric
            grads = jac.materialize_many(props, pop.stacked.n_params).unbind(1)
            in_fisher = torch.stack(fisher.ntvars(list(grads)), 1)
    lr = pop.optimizer.lr
    before: dict[str, Any] = {}
    for i, name in enumerate(names):
        euc = D[:, i, i]
        before[name] = stat_fields(q[name], euc, euc if in_opt is None else in_opt[:, i],
                                   None if in_fisher is None else in_fisher[:, i], D[:, i, -1], along[:, i], lr)
    before["kappa"] = kappa_field([D[:, n_x + k, n_x + k] for k in range(n_z)])
    if first.price_scales:
        before["probe"] = eta_probe(pop, q, plan, before["P"]["ntcov_opt"], first.price_scales)

    return rows_where(bad_g) if any_bad else [], before, step_taker(pop, plan, bad_g)


def step_taker(pop: _Population, plan, bad_g: Tensor | None) -> Callable[[], None]:
    """The step of ``plan`` for every member, as a function to call once the update's record is
    formed: θ ← θ + η·d, where the members of ``bad_g`` (a non-finite gradient) keep their θ."""
    def take_step() -> None:
        stepped = pop.optimizer.apply(pop.theta.detach(), plan)
        pop.theta = torch.where(bad_g[:, None], pop.theta, stepped) if bad_g is not None else stepped

    return take_step


def nonfinite_members(g: Tensor) -> Tensor | None:
    """Which members' gradient g (M, P) has a NaN or ±inf entry, (M,) bool, tested entry by entry
    as the per-run path tests g (a sum overflows sooner); None where none has, which one number
    tells (max |g| is finite; a NaN is not)."""
    if math.isfinite(float(g.abs().amax())):
        return None
    return ~torch.isfinite(g).all(dim=1)


def rows_where(mask: Tensor) -> list[int]:
    """The rows where ``mask`` (M,) is true."""
    return torch.nonzero(mask).flatten().tolist()


def derived_gradients(pop: _Population, q: dict[str, Any], names: Sequence[str]) -> dict[str, Callable]:
    """The exact model's properties whose gradients follow from others' (name → a function of the
    gradients by name), so that a tracked update takes no reverse pass for them (each one through
    the juice model's visitation): U = c·R (the model's utility_scale c: 1 on the bandits, H on the
    juice gridworld), so ∇R = ∇U/c; and where each member's reward is paid exactly for an approach
    (:meth:`~ntrl.population.models.JuiceModel.approach_reward`), U = H·r·F·P, so
    ∇P = (∇U/(H·r) − P·∇F)/F, taken while every member's P ≤ ½ (the study's runs stop at ½):
    ∇U/(H·r) = F·∇P + P·∇F, and the subtraction loses digits as P·∇F outgrows F·∇P, which happens
    as P → 1 (∇P ∝ P(1 − P)); below ½ it agrees with the reverse pass for P to a few 10⁻¹⁴
    (normwise, in float64; 3·10⁻¹³ at P = 0.92)."""
    derived: dict[str, Callable] = {}
    if "R" in names:
        derived["R"] = lambda g: g["U"] / pop.model.utility_scale
    r = pop.model.approach_reward() if hasattr(pop.model, "approach_reward") else None
    if r is not None and "P" in names and "F" in names:
        P, F, Hr = q["P"].detach()[:, None], q["F"].detach()[:, None], (pop.model.utility_scale * r)[:, None]
        if bool((F > 0).all() & (P <= 0.5).all()):
            derived["P"] = lambda g: (g["U"] / Hr - P * g["F"]) / F
    return derived


def logit_cotangents(outputs: list[Tensor], Z: Tensor) -> list[Tensor]:
    """c_X = ∂X_m/∂z_m (M, K) of each output X (M,), from the logits at the one state Z (M, 1, K),
    a leaf: one reverse pass per output through the model's quantities only."""
    cots = []
    for k, x in enumerate(outputs):
        c = torch.autograd.grad(x.sum(), Z, retain_graph=k < len(outputs) - 1, allow_unused=True)[0] \
            if x.requires_grad else None
        cots.append(torch.zeros_like(Z[:, 0]) if c is None else c[:, 0].detach())
    return cots


def output_cotangents(pop: _Population, q: dict[str, Any], U: Tensor, tracked: bool, n_logits: int = 0) -> list[Tensor]:
    """The cotangents ∂X/∂z (M, K) at the one state of the outputs X an update differentiates: U,
    then where ``tracked`` each of the model's properties and each log-odds z, then the first
    ``n_logits`` logits z_a (whose cotangents are the unit vectors e_a). In closed form where the
    population has it (:attr:`_Population.closed_form`: the bandits' exact updates,
    :meth:`~ntrl.population.models.BanditModel.cotangents`, autograd's numbers bit for bit),
    without a reverse pass; otherwise by :func:`logit_cotangents` on ``q``'s graph."""
    Z = q["Z"]
    if pop.closed_form:
        cots = pop.model.cotangents(q, tracked)
        if n_logits:
            units = torch.eye(Z.shape[-1], dtype=Z.dtype, device=Z.device)
            cots += [units[a].expand(Z.shape[0], -1) for a in range(n_logits)]
        return cots
    outputs = [U] + ([q[x] for x in pop.model.properties] + [q["z"][:, i] for i in range(pop.model.n_z)]
                     if tracked else []) + [Z[:, 0, a] for a in range(n_logits)]
    return logit_cotangents(outputs, Z)


def structured_update(pop: _Population, q: dict[str, Any], U: Tensor, batch: SampledBatch | None, tracked: bool,
                      first: TrainConfig) -> tuple[list[int], dict[str, Any] | None, Callable[[], None]]:
    """One exact update at one shared state by the structured path
    (:mod:`ntrl.engine.batched_structured`): the cotangents c_X = ∂X/∂z at the logits
    (:func:`output_cotangents`), the logits' Jacobian in factored form from one backward pass,
    every tracked quantity in the K-dimensional space of the logits, and the step in place,
    θ += η·Jᵀβ, where the direction lies in the span (SGD, NPG); Adam and sign descent form
    g = Jᵀc_U and step as :func:`general_update` does. Returns what :func:`general_update`
    returns."""
    names = pop.model.properties
    n_z = pop.model.n_z
    cots = output_cotangents(pop, q, U, tracked)
    opt = pop.optimizer
    # J's K columns where the update reads its Gram matrix (tracked, or NPG's metric); an untracked
    # SGD, sign or Adam step reads only Δ_l c, formed by the backward pass of c alone
    jac = pop.structured.jacobian(q["fwd"], columns=tracked or opt.name == "npg")
    cU = cots[0]
    G = jac.gram if tracked or opt.name == "npg" else None  # an untracked SGD, Adam or sign step needs none
    # whether g = Jᵀc_U is finite entry by entry, as the per-run path tests g (‖g‖² overflows
    # sooner): read off g itself where the step forms it (Adam, sign descent), else from the factors
    g = jac.materialize(cU, pop.stacked.n_params) if opt.name in ("adam", "sign") else None
    bad_g = nonfinite_members(g) if g is not None else jac.nonfinite_members(cU)  # else from the factors
    any_bad = bad_g is not None and bool(bad_g.any())
    c_step = torch.where(bad_g[:, None], torch.zeros_like(cU), cU) if any_bad else cU
    fisher = fisher0 = None
    if opt.name == "npg" or (tracked and first.fisher):  # F at the one state, from π and its weight
        probs, weights = q["logp"].detach().exp()[:, 0], q["weights"].detach()[:, 0]
        if opt.name == "npg":
            fisher = LogitInverseFisher.from_jacobian(G, probs, weights, opt.damping)
        if tracked and first.fisher:  # undamped, for the record
            fisher0 = fisher if fisher is not None and not bool((opt.damping > 0).any()) else \
                fisher_ntvar(G, probs, weights)
    beta, plan = None, None  # the step: Jᵀβ (SGD, NPG) or a dense plan (Adam, sign descent)
    if opt.name == "sgd":
        beta = c_step
    elif opt.name == "npg":
        beta = fisher.apply(c_step)
        if any_bad:  # a bad member's Fisher is NaN: it takes no step (it is stopped below)
            beta = torch.where(bad_g[:, None], torch.zeros_like(beta), beta)
    else:  # a bad member's g is zero: its moments stay finite (it is stopped below)
        plan = opt.plan(torch.where(bad_g[:, None], torch.zeros_like(g), g) if any_bad else g, tracked=tracked)
    before = None
    if tracked:
        lr = opt.lr
        if plan is not None:
            G_opt, J_dir = jac.gram_diagonal(plan.diagonal), jac.dot(plan.direction)
        # every product c_iᵀ G c_j of the tracked cotangents (the properties', the log-odds', U's and
        # the step's β) from one batched product: D (M, n, n)
        n_x = len(names)
        C = torch.stack(cots[1:1 + n_x + n_z] + [cU] + ([beta] if beta is not None else []), 1)
        D = torch.bmm(C, torch.bmm(G, C.mT))
        i_U, i_beta = n_x + n_z, n_x + n_z + 1
        before = {}
        for i, (name, c) in enumerate(zip(names, cots[1:1 + n_x])):
            euc = D[:, i, i]
            if fisher is not None:
                ntvar_opt = fisher.ntvar(c)
            elif plan is not None:
                ntvar_opt = quad(c, G_opt, c)
            else:
                ntvar_opt = euc
            ntcov_opt = D[:, i, i_beta] if beta is not None else (c * J_dir).sum(1)
            before[name] = stat_fields(q[name], euc, ntvar_opt, None if fisher0 is None else fisher0.ntvar(c),
                                       D[:, i, i_U], ntcov_opt, lr)
        before["kappa"] = kappa_field([D[:, n_x + k, n_x + k] for k in range(n_z)])
        if first.price_scales:
            direction = jac.materialize(beta, pop.stacked.n_params) if beta is not None else plan.direction
            before["probe"] = eta_probe(pop, q, SimpleNamespace(direction=direction), before["P"]["ntcov_opt"],
                                        first.price_scales)

    def take_step() -> None:
        if beta is not None:
            jac.step_(pop.theta, beta, opt.lr)
            return
        if not any_bad:  # in place, as the step along Jᵀβ: the forward pass's views into θ stay
            opt.apply(pop.theta, plan, in_place=True)
            return
        pop.theta = torch.where(bad_g[:, None], pop.theta, opt.apply(pop.theta, plan))

    return rows_where(bad_g) if any_bad else [], before, take_step


def close_population_sink(sink: WandbSink, members: Sequence[Any], updates: int) -> None:
    """The end of a population's W&B run: the members' summaries and P curves as tables
    (:func:`members_table`, :func:`curves_table`), and its size and length as its summary."""
    if sink.run is not None:  # tables of a few hundred thousand rows: built only where they are logged
        sink.log_table("members", *members_table(members))
        sink.log_table("curves", *curves_table(members))
    sink.finish({"members": len(members), "updates": updates})


def log_finished_population(configs: Sequence[TrainConfig], summaries: Sequence[dict[str, Any]],
                            wandb_parent: str | os.PathLike | None, wandb_name: str | None,
                            wandb_config: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Log a population that trained elsewhere (a Ray worker, W&B off) to its one W&B run from
    the members' files, as :func:`train_population` logs while it trains: at the tracked updates
    :func:`history_due` picks, the median (the lower middle value) of P after the step over the
    members it recorded, and how many members were training, then the members' tables. Writes
    each member's summary (``summaries``, with the W&B run's directory and mode) as its
    summary.json, the last file of a complete run, and returns them."""
    sink = population_sink(wandb_parent, configs[0], wandb_name, wandb_config)
    records = [read_records(Path(c.out) / c.run_name) for c in configs]
    after: dict[int, list[float]] = {}
    for recs in records:
        for r in recs:
            after.setdefault(r["update"], []).append(r["P/value"] + r["P/real_delta"])
    last_logged = None
    for t in sorted(after):
        if history_due(t, last_logged):
            sink.log({"update": t, "P/median": statistics.median_low(after[t]),
                      "members/active": sum(s["updates"] > t for s in summaries)})
            last_logged = t
    curve_points = max(2, CURVE_ROWS // len(configs))
    members, written = [], []
    for config, summary, recs in zip(configs, summaries, records):
        run_dir = Path(config.out) / config.run_name
        summary = {**summary, "wandb_dir": sink.directory, "wandb_mode": sink.mode}
        write_json_atomic(run_dir / SUMMARY_FILE, summary)
        written.append(summary)
        members.append(SimpleNamespace(run_dir=run_dir, config=config, summary=summary,
                                       curve=thin_curve([(r["update"], r["P/value"]) for r in recs], curve_points)))
    close_population_sink(sink, members, max((s["updates"] for s in summaries), default=0))
    return written


HISTORY_SPACING = 100  # a population's W&B history: tracked updates about 1/100 of t apart


def history_due(t: int, last: int | None) -> bool:
    """Whether a population's W&B history logs tracked update t (the median P and the members
    training), ``last`` the update it logged last: every tracked update up to update
    :data:`HISTORY_SPACING`, then the first at least last/HISTORY_SPACING updates after the last,
    about HISTORY_SPACING rows per e-fold of t (about 460 for a member tracked every 10th update
    over 50,000, instead of 5,000: each row costs W&B about 0.7 ms here and its service process
    more, on the cores the population trains on). Every member's curve is in the ``curves``
    table in full, up to :data:`CURVE_ROWS` rows."""
    return last is None or t >= last + max(1, last // HISTORY_SPACING)


def target_label(config: TrainConfig) -> str:
    """What P is the probability of, as the per-run path's experiment names it."""
    if config.env == "juice":
        return "approach | seen"
    if config.env == "kbandit":
        return f"arm {config.target}"
    return "do" if getattr(config, "target", 1) == 1 else "dont"


def population_sink(wandb_parent: str | os.PathLike | None, config: TrainConfig, name: str | None,
                    wandb_config: dict[str, Any] | None) -> WandbSink:
    """The population's one W&B run, in ``wandb_parent/wandb`` (ntrl's own, see
    :func:`ntrl.run_dirs.ntrl_wandb_dir`); a sink that logs nothing without a parent, with W&B
    disabled, or when that directory is not ntrl's."""
    if wandb_parent is None or config.wandb == "disabled":
        return WandbSink(".", {}, mode="disabled")
    Path(wandb_parent).mkdir(parents=True, exist_ok=True)  # checked with the rest, before anything was written
    if ntrl_wandb_dir(Path(wandb_parent)) is None:  # it has said why
        return WandbSink(".", {}, mode="disabled")
    return WandbSink(wandb_parent, wandb_config or {}, mode=config.wandb, name=name, group=config.group,
                     **config.wandb_settings(),
                     job_type="population")


def metric_apply(plan, v: Tensor) -> Tensor:
    """M_m v_m for every member, in the metric of the step about to be taken."""
    if plan.fisher is not None:
        return plan.fisher.apply(v)
    if plan.diagonal is not None:
        return plan.diagonal * v
    return v


def tracked_stats(q: dict[str, Any], prop_grads: dict[str, Tensor], z_grads: list[Tensor], g: Tensor, plan,
                  lr: Tensor, fisher0: BatchedInverseFisher | None, utility_scale: float | None = None) -> dict[str, Any]:
    """What the tracker records before the step (see :mod:`ntrl.tracker`), per member, for each
    property X (its gradients ``prop_grads[X]``) and κ = ‖∇z‖² per log-odds z (``z_grads``):
    X, NTVar in the Euclidean, optimizer and Fisher metrics, NTCov with g and with d, η·NTCov_M,
    and in sampled mode (``utility_scale`` c given, J = c·R) the expected change η·∇X·M∇J."""
    before: dict[str, Any] = {}
    j = metric_apply(plan, utility_scale * prop_grads["R"]) if utility_scale is not None else None
    grads = list(prop_grads.values())
    # NTVar in a Fisher metric: every property's at once (one pass over the metric's factors)
    in_opt = plan.fisher.ntvars(grads) if plan.fisher is not None else None
    in_fisher = None if fisher0 is None else in_opt if fisher0 is plan.fisher else fisher0.ntvars(grads)
    for i, (name, Gx) in enumerate(prop_grads.items()):
        euc = (Gx**2).sum(1)
        if in_opt is not None:
            opt = in_opt[i]
        elif plan.diagonal is not None:
            opt = (Gx**2 * plan.diagonal).sum(1)
        else:
            opt = euc
        ntcov_opt = (Gx * plan.direction).sum(1)
        before[name] = stat_fields(q[name], euc, opt, None if in_fisher is None else in_fisher[i], (Gx * g).sum(1),
                                   ntcov_opt, lr, None if j is None else lr * (Gx * j).sum(1))
    before["kappa"] = kappa_field([(Gz**2).sum(1) for Gz in z_grads])
    return before


def stat_fields(value: Tensor, ntvar_euc: Tensor, ntvar_opt: Tensor, ntvar_fisher: Tensor | None, ntcov_euc: Tensor,
                ntcov_opt: Tensor, lr: Tensor, expected_delta: Tensor | None = None) -> dict[str, Tensor | None]:
    """One property's record fields before the step, per member, in the per-run records' order:
    X, NTVar in the three metrics, NTCov with g and with the step's direction d, the prediction
    η·NTCov_M and (sampled) the expected change; None fields are left out of the record."""
    return {"value": value.detach(), "ntvar_euc": ntvar_euc, "ntvar_opt": ntvar_opt, "ntvar_fisher": ntvar_fisher,
            "ntcov_euc": ntcov_euc, "ntcov_opt": ntcov_opt, "pred_delta": lr * ntcov_opt,
            "expected_delta": expected_delta}


def kappa_field(kappas: list[Tensor]) -> Tensor:
    """κ = ‖∇z‖² per member: (M,) for one log-odds, (M, n_z) for several."""
    kappa = torch.stack(kappas, 1)
    return kappa[:, 0] if kappa.shape[1] == 1 else kappa


def eta_probe(pop: "_Population", q: dict[str, Any], plan, ntcov: Tensor,
              scales: Sequence[float]) -> dict[str, Tensor]:
    """The tracker's η-probe (:meth:`ntrl.tracker.Tracker.eta_probe`) for every member: the step
    replayed from θ at η·s per scale s, realised P(θ + η s d) − P(θ) and predicted η s NTCov_M(P, U),
    each (M, scales)."""
    lr, d = pop.optimizer.lr, plan.direction
    M = pop.theta.shape[0]
    with torch.no_grad():
        base = q["P"].detach()
        lrs = lr[:, None] * torch.tensor(scales, dtype=lr.dtype, device=lr.device)  # (M, S): η·s
        # the logits at every scale from one forward pass of the members stacked scale by scale,
        # θ + (η s) d in one broadcast product (on the structured path each member's logits are the
        # same bytes in a stack of any size: batched_structured.row_times; tested with the η-probe on)
        Z = pop.logits_at((pop.theta + lrs.T[:, :, None] * d).reshape(len(scales) * M, -1))
        probability = getattr(pop.model, "probability", None)  # P alone, of all the scales' rows at once
        P = probability(Z).reshape(len(scales), M) if probability is not None else \
            torch.stack([pop.model.quantities(z)["P"] for z in Z.split(M)])
        real = (P - base).T
    return {"P/probe_lr": lrs, "P/probe_real": real, "P/probe_pred": lrs * ntcov[:, None]}


def noise_spread(batch: SampledBatch, rows: Tensor, prop_grads: dict[str, Tensor], plan, lr: Tensor) -> dict[str, Tensor]:
    """The tracker's predicted spread of each property's change
    (:meth:`ntrl.tracker.Tracker.noise_spread`) for every member, from its batch: episode i
    contributes h_i = Σ_r C_{i,r} ∇log π_r over the (state, action) rows r (``batch.C_episode``,
    ``rows``: ∇log π, (M, N, K, P)), so with D_i = C_i − C̄ and v_X = M∇X

        c_{X,i} − c̄_X = D_i·(L v_X),     Var[ΔX] = η² Σ_i (c_{X,i} − c̄_X)² / (B(B − 1)),
        tr Σ = Σ_i ‖h_i − h̄‖² / (B(B − 1)) = Σ_i D_iᵀ G D_i / (B(B − 1)),   G = L Lᵀ,

    and the covariance of the first two properties' changes, minibatch and isotropic."""
    M = rows.shape[0]
    L = rows.reshape(M, -1, rows.shape[-1])
    return noise_from_rows(batch, torch.einsum("mrp,msp->mrs", L, L), lambda v: torch.einsum("mrp,mp->mr", L, v),
                           L.shape[-1], prop_grads, plan, lr)


def noise_from_rows(batch: SampledBatch, G: Tensor, rows_times: Callable[[Tensor], Tensor], n_params: int,
                    prop_grads: dict[str, Tensor], plan, lr: Tensor) -> dict[str, Tensor]:
    """:func:`noise_spread` from the rows' Gram matrix G = L Lᵀ (M, N·K, N·K) and v ↦ L v, whichever
    way they were formed (:func:`ntrl.engine.batched_states.factored_log_prob_rows`: without the rows)."""
    M, B = batch.C_episode.shape[:2]
    if B < 2:
        return {}
    C = batch.C_episode.reshape(M, B, -1).to(G.dtype)
    D = C - C.mean(1, keepdim=True)
    trace = (torch.einsum("mbr,mrs,mbs->m", D, G, D) / (B * (B - 1))).clamp_min(0)  # ≥ 0 but for rounding
    out = {"noise/trace_sigma": trace}
    cs, vs = [], []
    for name, Gx in prop_grads.items():
        v = metric_apply(plan, Gx)
        c = torch.einsum("mbr,mr->mb", D, rows_times(v))
        cs.append(c)
        vs.append(v)
        out[f"{name}/noise_sd"] = lr * ((c**2).sum(1) / (B * (B - 1))).sqrt()
        out[f"{name}/noise_sd_iso"] = lr * (trace / n_params).sqrt() * scaled_norm(v)  # as the per-run tracker
    if len(cs) >= 2:
        a, b = list(prop_grads)[:2]
        out[f"noise/cov_{a}_{b}"] = lr**2 * (cs[0] * cs[1]).sum(1) / (B * (B - 1))
        out[f"noise/cov_{a}_{b}_iso"] = lr**2 * scaled_inner(trace / n_params, vs[0], vs[1])
    return out


def record_fields(t: int, before: dict[str, Any], q: dict[str, Tensor], U: list[float], lr: Tensor,
                  returns: list[float], sampled: bool, names: Sequence[str] = ("P", "R")) -> dict[str, Any]:
    """Every field of this update's records, in the per-run path's order, as a float64 numpy
    array over members (rows; a row of several values for a list field) or one value for all:
    X(θ + Δθ) from ``q``, the rest from :func:`tracked_stats`, :func:`eta_probe` and
    :func:`noise_spread`. The fields of one value per member come to the host as one array."""
    tensors: dict[str, Tensor | None] = {"lr": lr}
    for name in names:
        for key, value in before[name].items():
            if value is not None:
                tensors[f"{name}/{key}"] = value
    tensors["kappa"] = before["kappa"]
    for part in ("probe", "noise"):
        tensors.update(before.get(part, {}))
    for name in names:
        real = q[name].detach() - before[name]["value"]
        tensors[f"{name}/real_delta"] = real
        tensors[f"{name}/residual"] = real - before[name]["pred_delta"]
        tensors[f"{name}/first_order"] = None  # from the host's real and predicted changes, below
    M = lr.shape[0]
    flat = [k for k, v in tensors.items() if v is not None and v.shape == (M,) and v.dtype.is_floating_point]
    rows = dict(zip(flat, _array(torch.stack([tensors[k] if tensors[k].dtype == torch.float64 else
                                              tensors[k].to(torch.float64) for k in flat]))))
    fields: dict[str, Any] = {"update": t, "lr": rows["lr"], "U": np.asarray(U, dtype=np.float64)}
    for key, value in tensors.items():
        if key in rows:
            fields[key] = rows[key]
        elif value is None:
            name = key.split("/")[0]
            fields[key] = first_order(rows[f"{name}/real_delta"], rows[f"{name}/pred_delta"])
        else:
            fields[key] = _array(value)
        if key == "kappa":
            fields["backend"] = "population"
    fields["return"] = np.asarray(returns, dtype=np.float64)
    if sampled:
        fields["return_undiscounted"] = fields["return"]
    return fields


def _member_values(value: Any, rows: list[int]) -> list[Any]:
    """Members ``rows``' values of a record field of :func:`record_fields` (Python values): the
    rows of an array, the entries of a list, or the one value for all."""
    if isinstance(value, np.ndarray):
        return value[rows].tolist()
    return [value[r] for r in rows] if isinstance(value, list) else [value] * len(rows)


class PendingRecords:
    """Tracked updates' record fields (:func:`record_fields`), queued as they are, and written
    out as record lines (:func:`ntrl.records.record_lines`) only when the lines are due
    (:meth:`format`: before each flush, when members stop), all queued updates in one loop rather
    than each at its own update among the untracked ones, whose work evicts formatting's code
    and data from the caches (a 256-member update's lines take about half the time there; the
    updates are formatted one by one: merged into one call they took longer). Each member's
    lines keep their update order. Formatting also keeps each member's ``kept`` Price-check
    values (``PRICE_KEYS``), until more than ``KEPT_ROWS`` are kept in all; beyond that every
    member reads its records back when it stops."""

    def __init__(self, members: Sequence[MemberState]) -> None:
        self.members = members
        self.blocks: list[tuple[list[MemberState], dict[str, Any], list[int]]] = []
        self.kept_rows: int | None = 0  # records kept for the members' Price checks (None: too many)
        self.kept_keys: tuple[str, ...] = ()

    def add(self, states: list[MemberState], fields: dict[str, Any], rows: list[int]) -> None:
        """Queue the records of members ``states``: rows ``rows`` of one update's ``fields``."""
        self.blocks.append((states, fields, rows))
        for st in states:
            st.n_records += 1

    def format(self) -> None:
        """Every queued record as its line, appended to its member's ``lines``, update by update.
        A Ctrl-C while an update's lines are computed leaves them queued; once they are, they are
        all delivered, and the interrupt is raised after."""
        while self.blocks:
            states, fields, rows = self.blocks[0]
            lines = record_lines(fields, rows)
            kept = self._kept(fields, rows, len(states))
            queued, delivered, interrupt = len(self.blocks), 0, None
            while delivered < len(states) or len(self.blocks) == queued:
                try:  # every step below can be retried after a Ctrl-C without doing it twice
                    if len(self.blocks) == queued:
                        del self.blocks[0]
                    while delivered < len(states):
                        st, line = states[delivered], lines[delivered]
                        if not (st.lines and st.lines[-1] is line):
                            st.lines.append(line)
                        if kept is not None and st.kept is not None and not (st.kept and st.kept[-1] is kept[delivered]):
                            st.kept.append(kept[delivered])
                        delivered += 1
                except KeyboardInterrupt as e:
                    interrupt = e
            if interrupt is not None:
                raise interrupt

    def _kept(self, fields: dict[str, Any], rows: list[int], n: int) -> list[tuple] | None:
        """The Price-check values (``PRICE_KEYS``) of rows ``rows`` of ``fields``, or None once
        more than ``KEPT_ROWS`` are kept in all (then every member reads its records back)."""
        if self.kept_rows is None:
            return None
        self.kept_keys = tuple(k for k in PRICE_KEYS if k in fields)
        self.kept_rows += n
        if self.kept_rows > KEPT_ROWS:
            self.kept_rows = None
            for st in self.members:
                st.kept = None
            return None
        return list(zip(*[_member_values(fields[k], rows) for k in self.kept_keys]))


def append_records(members: list[MemberState], pop: "_Population", pending: PendingRecords, fields: dict[str, Any],
                   t: int, done: dict[int, tuple], p_after: list[float], optimizer: str, tracking: list[bool]) -> None:
    """The record of update t of each training member whose schedule tracks t (``tracking``),
    queued for its records.jsonl (:class:`PendingRecords`); a member whose record or optimizer
    state went non-finite is stopped instead (into ``done``), as the per-run path stops
    (:func:`ntrl.train.train`)."""
    opt_bad = pop.optimizer.nonfinite().tolist()
    finite = finite_rows(fields, len(pop.alive))
    rows = [row for row, tracks in enumerate(tracking) if tracks and row not in done]
    good = [row for row in rows if finite[row] and not opt_bad[row]]
    if good:
        pending.add([members[pop.alive[row]] for row in good], fields, good)
    if len(good) == len(rows):
        return
    for row in rows:
        if finite[row] and not opt_bad[row]:
            continue
        st = members[pop.alive[row]]
        record = {k: _member_values(v, [row])[0] for k, v in fields.items()}
        bad = nonfinite_field(record)
        kept = f"stopped, the {st.n_records} records before it are kept"
        if bad is not None:
            done[row] = ("failed", f"{bad} became non-finite at update {t}; {kept}", p_after[row], t + 1)
        elif opt_bad[row]:
            done[row] = ("failed", f"the {optimizer} optimizer's state became non-finite at update {t} (reward or "
                                   f"learning rate too large?); {kept}", p_after[row], t + 1)
        else:  # finite after all (a field finite_rows could not read as numbers)
            pending.format()  # the records queued before it go first
            st.lines.append(record_line(record))
            st.n_records += 1
            st.kept = None  # it reads its records back when it stops


class StopWatch:
    """Which members :func:`stopping` must look at after an update, decided for all at once: a
    member whose P is finite, did not cross ½ for the first time, set no new least P, did not
    climb back to its start, reached no stopping threshold and has updates left changes nothing
    there. Row i is ``members[i]``, as the population's rows are; :meth:`refresh` after each call."""

    def __init__(self, members: Sequence[MemberState]):
        inf = math.inf
        self.p_start = np.array([st.p_start for st in members], dtype=float)
        self.p_min = np.array([st.p_min for st in members], dtype=float)
        self.uncrossed = np.array([st.crossed is None for st in members])
        self.not_back = np.array([st.p_back_at is None for st in members])
        self.stop_at = np.array([inf if st.config.stop_at_p is None else st.config.stop_at_p for st in members], dtype=float)
        self.stop_below = np.array([-inf if st.config.stop_below_p is None else st.config.stop_below_p
                                    for st in members], dtype=float)
        self.steps = np.array([st.config.steps for st in members])
        self._rows()

    FIELDS = ("p_start", "p_min", "uncrossed", "not_back", "stop_at", "stop_below", "steps")

    def _rows(self) -> None:
        """The same values as Python numbers, row by row (for a few members)."""
        self.rows = [list(r) for r in zip(*(getattr(self, name).tolist() for name in self.FIELDS))]

    def rows_to_check(self, p: Sequence[float], t: int) -> list[int]:
        if len(p) <= FEW_MEMBERS:  # numpy's cost per call is more than Python's comparisons here
            return [i for i, (x, r) in enumerate(zip(p, self.rows)) if self.changes(float(x), t, *r)]
        p = np.asarray(p, dtype=float)
        with np.errstate(invalid="ignore"):
            check = (~np.isfinite(p) | (self.uncrossed & (p >= 0.5) & (self.p_start < 0.5)) | (p < self.p_min)
                     | (self.not_back & (self.p_min < self.p_start) & (self.p_start <= p))
                     | (p >= self.stop_at) | (p <= self.stop_below) | (t + 1 >= self.steps))
        return np.flatnonzero(check).tolist()

    @staticmethod
    def changes(x: float, t: int, p_start: float, p_min: float, uncrossed: bool, not_back: bool, stop_at: float,
                stop_below: float, steps: int) -> bool:
        """:meth:`rows_to_check`'s test of one member, P = x after update t."""
        return (not math.isfinite(x) or (uncrossed and x >= 0.5 and p_start < 0.5) or x < p_min
                or (not_back and p_min < p_start <= x) or x >= stop_at or x <= stop_below or t + 1 >= steps)

    def refresh(self, row: int, st: MemberState) -> None:
        self.p_min[row] = st.p_min
        self.uncrossed[row] = st.crossed is None
        self.not_back[row] = st.p_back_at is None
        self.rows[row][1:4] = [st.p_min, st.crossed is None, st.p_back_at is None]

    def select(self, keep: list[int]) -> None:
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name)[keep])
        self._rows()


FEW_MEMBERS = 8  # up to this many members, StopWatch compares in Python
# up to this many members, an update's gradients come from one batched pass through the network
# (member_gradients_through; benchmarks/bench_juice_population.py, the juice MLP, two runs: 3.1–3.8×
# for one member's untracked sampled NPG update, 1.2–1.3× at eight, 1.0–1.2× at sixteen, 0.73–0.77× at thirty)
SPLIT_MEMBERS = 8


def stopping(st: MemberState, p: float, t: int) -> tuple[str, str | None, float, int] | None:
    """After update t, with P = p: how the member ends (status, error, p_end, updates), or None
    while it goes on. Notes the update at which P first reached ½."""
    if not math.isfinite(p):
        return "failed", f"P became non-finite at update {t}", p, t + 1
    if st.crossed is None and p >= 0.5 and st.p_start < 0.5:
        st.crossed = t + 1
    if p < st.p_min:  # a new least P: the return to p_start is counted from it
        st.p_min, st.p_min_at, st.p_back_at = p, t + 1, None
    elif st.p_back_at is None and st.p_min < st.p_start <= p:
        st.p_back_at = t + 1
    if st.config.stop_at_p is not None and p >= st.config.stop_at_p:
        return "stopped_at_p", None, p, t + 1
    if st.config.stop_below_p is not None and p <= st.config.stop_below_p:
        return "stopped_below_p", None, p, t + 1
    if t + 1 >= st.config.steps:
        return "finished", None, p, t + 1
    return None


def finish_members(ending: Sequence[tuple[MemberState, str, int, float]], sink: WandbSink, curve_points: int,
                   pending: PendingRecords) -> None:
    """These members have stopped, each with (status, updates, p_end): append their last records
    (every queued record formatted first: ``pending``),
    write each one's summary.json (the per-run path's, :func:`ntrl.train.run_summary`, with the
    Price check read back from its records as that path reads it, plus ``population`` and its
    ``error`` if it failed, from what :func:`price_and_curve` gives), and keep at most
    ``curve_points`` of each P curve for W&B. The
    records and summaries reach the disk together (:func:`ntrl.records.write_json_many_atomic`:
    one sync for all, not one per file); a summary is never half-written, and never there before
    its records."""
    if not ending:
        return
    pending.format()
    kept_keys = pending.kept_keys
    flush([st for st, *_ in ending])
    for st, status, updates, p_end in ending:
        price, st.curve = price_and_curve(st, kept_keys, curve_points)
        st.summary = run_summary(st.config, st.run_dir, sink, status=status, updates=updates, p_start=st.p_start,
                                 p_end=p_end, crossed=st.crossed, n_probe=1, episodes=st.episodes, episodes_cut=0,
                                 return_first=st.return_first, return_last=st.return_last,
                                 p_min=st.p_min, p_min_at=st.p_min_at, p_back_at=st.p_back_at,
                                 price=price)
        st.summary["population"] = True
        if st.error:
            st.summary["error"] = st.error
        st.summary.update(st.extra)
        st.kept = None  # done with: its memory goes back
    for before_summary in {id(st.before_summary): st.before_summary for st, *_ in ending}.values():
        if before_summary is not None:
            before_summary()
    write_json_many_atomic([(st.run_dir / SUMMARY_FILE, st.summary) for st, *_ in ending],
                           sync_also=[st.run_dir / RECORDS_FILE for st, *_ in ending])
    for st, *_ in ending:
        st.written = True


PRICE_KEYS = ("update", "lr", "P/value", "P/pred_delta", "P/real_delta", "P/probe_lr", "P/probe_real", "P/probe_pred")
KEPT_ROWS = 2_000_000  # records whose PRICE_KEYS a population keeps in memory, in all (about 0.5 GiB)


def price_and_curve(st: MemberState, keys: Sequence[str], curve_points: int) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """The member's Price check (:func:`ntrl.train.price_check`, of the values it kept of each
    record, ``keys``, as columns: the floats its records.jsonl holds, each of which reads back as
    itself; or of its records read back where it kept none) and its thinned P curve
    (:func:`thin_curve`)."""
    if st.kept is None or not st.kept:
        records = read_records(st.run_dir) if st.kept is None else []
        return price_check(records, "P"), thin_curve([(r["update"], r["P/value"]) for r in records], curve_points)
    columns = dict(zip(keys, map(list, zip(*st.kept))))
    return price_check_of_columns(columns, "P"), thin_curve(list(zip(columns["update"], columns["P/value"])), curve_points)


def thin_curve(points: Sequence[tuple[int, float]], curve_points: int) -> list[tuple[int, float]]:
    """Every k-th of the (update, P) ``points``, k = ⌈len/curve_points⌉, the last always kept."""
    stride = max(1, -(-len(points) // curve_points))
    return list(points[::stride]) + (list(points[-1:]) if points and (len(points) - 1) % stride else [])


FLUSH_SPACING = 20  # records are appended at most flush_seconds apart, or 20 times as long as appending took


def flush(members: Sequence[MemberState], force: bool = False) -> None:
    """Append the members' queued record lines to their records.jsonl (``force``: and fsync)."""
    for st in members:
        if st.lines:
            with open(st.run_dir / RECORDS_FILE, "a", encoding="utf-8") as f:
                f.write("\n".join(st.lines) + "\n")
                if force:
                    f.flush()
                    os.fsync(f.fileno())
            st.lines.clear()


CURVE_ROWS = 200_000  # rows of a population's W&B curves table, at most


def curves_table(members: Sequence[MemberState]) -> tuple[list[str], list[list[Any]]]:
    """The members' P curves in long form (run, update, P): every tracked update, or, beyond
    :data:`CURVE_ROWS` in all, every k-th of each member's (its last always kept)."""
    return ["run", "update", "P"], [[st.run_dir.name, u, p] for st in members for u, p in st.curve]


def members_table(members: Sequence[MemberState]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the members' summaries (for the W&B table)."""
    cols = ["run", "seed", "p0", "lr", "reward_do", "status", "updates", "p_start", "p_end", "crossed_half_at"]
    rows = []
    for st in members:
        s = st.summary or {}
        rows.append([st.run_dir.name, st.config.seed, st.config.p0, st.config.lr, getattr(st.config, "reward_do", None),
                     s.get("status"), s.get("updates"), s.get("p_start"), s.get("p_end"), s.get("crossed_half_at")])
    return cols, rows
