"""Populations: many runs of one architecture trained as one batched computation.

``train_population(configs)`` takes the same :class:`ntrl.config.TrainConfig` objects that
:func:`ntrl.train.train` takes, one per member, and trains them together: the members' parameters
are stacked (M, P), their logits come from one ``torch.func.vmap`` of ``functional_call``, and every
gradient, NTVar, NTCov and inverse Fisher is formed for all members at once
(:mod:`ntrl.engine.batched`). Each member writes the run directory its config names, with the
same config.json, records.jsonl and summary.json as the per-run path, so the analysis reads what
it reads today. The contract, tested in ``tests/test_population.py``:

* a member's records equal the per-run records of its config to 1e-12 relative in float64 (the
  differences ``real_delta`` and ``residual`` to 1e-12 of the values they are differences of),
  but for ``backend``, which says "population";
* in sampled mode each member draws from its own streams, seeded as the per-run path seeds them
  (:func:`ntrl.train.split_seed`), so its episodes, and therefore its records, are the same;
* a member stops on its own: at ``stop_at_p``, after its ``steps``, or when a value goes
  non-finite (reported by index and run name; the others go on). A stopped member is removed from
  the stacked tensors and costs nothing after.

Members must agree on everything that makes the architecture and the update rule (env, policy,
optimizer, gradient mode, network shape, batch size, baseline, tracking); they may differ in
``MEMBER_FIELDS``: seed, p₀, learning rate, rewards (the direction), reward noise, NPG damping,
number of updates, stopping rule and run name.

Tracking follows ``TrackSchedule``: every k-th update (the configs' ``track_every``) or
log-spaced, ``per_decade`` updates per decade of t (long extinction runs keep few records).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from ntrl.config import ConfigError, TrainConfig
from ntrl.engine.batched import BatchedInverseFisher, StackedPolicy, log_prob_rows, member_gradients
from ntrl.population.models import BanditModel
from ntrl.population.optimizers import BatchedOptimizer
from ntrl.records import CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, write_json_atomic
from ntrl.tracker import price_agreement
from ntrl.train import RunInterrupted, RunResult, prepare_run_dir, split_seed
from ntrl.wandb_sink import WandbSink

log = logging.getLogger("ntrl.engine.batched")

# Config fields in which members of one population may differ.
MEMBER_FIELDS = ("p0", "lr", "seed", "steps", "stop_at_p", "reward_do", "reward_dont", "noise_std", "npg_damping",
                 "out", "run_name", "force", "threads")
SUPPORTED = {("bandit", "exact"), ("bandit", "sampled")}
DEVICES = ("cpu", "cuda", "auto")


def unsupported_reason(config: TrainConfig) -> str | None:
    """Why the population path cannot train ``config`` (None when it can)."""
    if (config.env, config.mode) not in SUPPORTED:
        return f"populations cover {', '.join(f'{e} {m}' for e, m in sorted(SUPPORTED))}; not {config.env} {config.mode}"
    if config.dtype != "float64":
        return "populations train in float64 only"
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


@dataclass(frozen=True)
class TrackSchedule:
    """Which updates are tracked: every ``every``-th, or (``per_decade``) log-spaced,
    t ∈ {0} ∪ {round(10^(i/per_decade)) : i ≥ 0}."""

    every: int = 1
    per_decade: int | None = None

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError("--track-every", f"must be >= 1, got {self.every}")
        if self.per_decade is not None and self.per_decade < 1:
            raise ConfigError("--track-per-decade", f"must be >= 1, got {self.per_decade}")

    def tracked_updates(self, steps: int) -> set[int] | None:
        """The tracked updates below ``steps`` for a log schedule (None: every k-th)."""
        if self.per_decade is None:
            return None
        n = int(math.ceil(self.per_decade * math.log10(max(steps, 1)))) + 1
        return {0} | {int(round(10 ** (i / self.per_decade))) for i in range(n + 1)}


def member_bytes(n_params: int, n_obs: int, n_actions: int, batch_size: int, sampled: bool) -> int:
    """An upper estimate of one member's memory (float64): parameters, gradients of the utility,
    of every tracked property and of every logit, the Fisher's factors, Adam's moments and the
    temporaries of a step, about 3 N·K + 16 vectors of P entries."""
    vectors = 16 + 3 * n_obs * n_actions
    return 8 * (vectors * n_params + (4 * batch_size if sampled else 0) + 64)


def memory_limit(device: torch.device, max_memory: int | None) -> int:
    """Bytes a population may use: ``max_memory``, else half the device's free memory."""
    if max_memory is not None:
        return int(max_memory)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 2**31


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
    names = [Path(c.out) / (c.run_name or c.default_run_name()) for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError("--run-name", "members of one population need distinct run directories")


@dataclass
class MemberState:
    """What a member accumulates on the host: its records not yet on disk and its summary."""

    config: TrainConfig
    run_dir: Path
    p_start: float = math.nan
    crossed: int | None = None
    returns: list[float] = field(default_factory=list)
    episodes: int = 0
    lines: list[str] = field(default_factory=list)
    n_records: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)  # (update, P) of each tracked update
    pred: list[float] = field(default_factory=list)
    real: list[float] = field(default_factory=list)
    probe: dict[str, list[float]] | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None


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
    (blocks above 32 MB go back to the system when freed) each one costs fresh page faults, which
    measured 5–10× slower than reusing the memory (benchmarks/bench_population.py). No-op
    elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 31 - 1)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # pragma: no cover - not glibc
        pass


def _floats(t: Tensor) -> list[float]:
    return t.detach().to("cpu", torch.float64).tolist()


class _Population:
    """The state of the members still training, kept in stacked tensors (row i ↔ ``alive[i]``)."""

    def __init__(self, configs: Sequence[TrainConfig], device: torch.device):
        self.configs = list(configs)
        first = configs[0]
        self.device = device
        self.sampled = first.mode == "sampled"
        self.optimizer_name = first.optimizer
        self.policies = []
        for c in configs:
            exp = c.build()
            exp.env.close()
            self.policies.append(exp.policy)
        self.stacked = StackedPolicy(self.policies[0].to(device))
        self.theta = torch.stack([self.stacked.flatten(p) for p in self.policies]).to(device)
        rewards = np.array([[c.reward_dont, c.reward_do] for c in configs])
        self.model = BanditModel(rewards, np.array([c.noise_std for c in configs]), first.target, device)
        f64 = dict(dtype=torch.float64, device=device)
        self.optimizer = BatchedOptimizer(first.optimizer, torch.tensor([c.lr for c in configs], **f64),
                                          damping=torch.tensor([c.npg_damping for c in configs], **f64))
        self.alive = list(range(len(configs)))
        self.action_rngs, self.noise_rngs = [], []
        from gymnasium.utils import seeding

        for c in configs:
            env_seed, rng = split_seed(c.seed)
            self.action_rngs.append(rng)
            self.noise_rngs.append(seeding.np_random(env_seed)[0])  # what env.reset(seed=env_seed) makes

    def forward(self) -> dict[str, Any]:
        leaves = self.stacked.leaves(self.theta)
        with torch.enable_grad():
            Z = self.stacked.logits(leaves, self.model.obs)
            q: dict[str, Any] = self.model.quantities(Z)
        q["Z"], q["leaves"] = Z, leaves
        return q

    def select(self, keep_rows: list[int]) -> None:
        idx = torch.as_tensor(keep_rows, dtype=torch.long, device=self.device)
        self.theta = self.theta[idx]
        self.model.select(idx)
        self.optimizer.select(idx)
        self.alive = [self.alive[i] for i in keep_rows]
        self.action_rngs = [self.action_rngs[i] for i in keep_rows]
        self.noise_rngs = [self.noise_rngs[i] for i in keep_rows]


def train_population(
    configs: Sequence[TrainConfig],
    *,
    schedule: TrackSchedule | None = None,
    device: str = "cpu",
    progress: bool = True,
    probe_scales: Sequence[float] | None = None,
    wandb_parent: str | os.PathLike | None = None,
    wandb_name: str | None = None,
    wandb_config: dict[str, Any] | None = None,
    max_memory: int | None = None,
    flush_seconds: float = 1.0,
) -> PopulationResult:
    """Train every config of ``configs`` as one population; write each member's run directory.

    ``probe_scales``: also measure, per member, the relative Price error of one step of size η·s
    from the initial state for each scale s (the study's η-scaling probe), into its summary's
    ``price_scaling``. ``wandb_parent``: a directory of ntrl's that holds the population's one W&B
    run (none without it). ``max_memory``: bytes the population may use (default: half the free
    memory); a population above it is refused before anything is built."""
    configs = [c.validate() for c in configs]
    check_compatible(configs)
    first = configs[0]
    dev = resolve_device(device)
    torch.set_num_threads(first.threads)
    schedule = schedule or TrackSchedule(every=first.track_every)
    sample = first.build()
    sample.env.close()
    n_params = sum(p.numel() for p in sample.policy.parameters() if p.requires_grad)
    need = len(configs) * member_bytes(n_params, 1, 2, first.batch_size, first.mode == "sampled")
    limit = memory_limit(dev, max_memory)
    if need > limit:
        per = need // len(configs)
        raise ConfigError("--population", f"a population of {len(configs)} members of {n_params} parameters needs about "
                                          f"{need / 2**30:.2f} GiB, above the limit of {limit / 2**30:.2f} GiB; use at "
                                          f"most {max(1, limit // per)} members per population")
    log.info("tangent engine: population backend (ntrl.engine.batched, %d members on %s) for 'P', 'R' and "
             "'kappa': the chain rule through the logits, one reverse pass for all members", len(configs), dev)
    start = time.time()
    if dev.type == "cpu":
        keep_freed_memory()
    pop = _Population(configs, dev)
    members = []
    for c in configs:
        run_dir = prepare_run_dir(c)
        write_json_atomic(run_dir / CONFIG_FILE, c.to_dict())
        (run_dir / RECORDS_FILE).touch()
        members.append(MemberState(c, run_dir))
    sink = WandbSink(wandb_parent, wandb_config or {}, mode=first.wandb, name=wandb_name, group=first.group,
                     job_type="population") if wandb_parent is not None else WandbSink(".", {}, mode="disabled")
    log_set = schedule.tracked_updates(max(c.steps for c in configs))
    fisher_on, npg = first.fisher, first.optimizer == "npg"
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(c.steps for c in configs), desc=wandb_name or "population", unit="upd", file=sys.stderr,
                   dynamic_ncols=True)
    last_flush = time.time()
    t = 0
    interrupted = False

    loop_start = time.time()
    try:
        q = pop.forward()
        for row, p in enumerate(_floats(q["P"])):
            members[pop.alive[row]].p_start = p
        while pop.alive:
            tracked = (t in log_set) if log_set is not None else (t % schedule.every == 0)
            need_fisher = npg or (tracked and fisher_on)
            if pop.sampled:
                batch = pop.model.sample(torch.softmax(q["Z"].detach()[:, 0], dim=-1).cpu().numpy(), first.batch_size, first.baseline,
                                         pop.action_rngs, pop.noise_rngs)
                U = pop.model.surrogate(q["logp"], batch)
                mean_return = batch.mean_return
            else:
                U = q["R"]
                mean_return = None
            outputs = [U] + ([q["P"], q["R"], q["z"]] if tracked else [])
            K = pop.model.n_actions
            if need_fisher:
                outputs += [q["Z"][:, 0, a] for a in range(K)]
            grads = member_gradients(outputs, q["leaves"])
            g = grads[0]
            U_val = _floats(U)
            ret = U_val if mean_return is None else mean_return.tolist()
            for row, r in enumerate(ret):
                st = members[pop.alive[row]]
                st.returns.append(r)
                st.episodes += first.batch_size if pop.sampled else 0
            bad_g = ~torch.isfinite(g.sum(dim=1))  # one NaN or ±inf entry makes the row's sum non-finite
            any_bad = bool(bad_g.any())
            fisher = fisher0 = None
            if need_fisher:
                probs = q["logp"].detach().exp()[:, None, :]  # (M, 1, K)
                J = torch.stack(grads[-K:], dim=1)[:, None]  # (M, 1, K, P)
                rows = log_prob_rows(J, probs)
                w = pop.model.fisher_weights.expand(len(pop.alive), -1)
                if npg:
                    fisher = BatchedInverseFisher.from_log_prob_rows(rows, w, probs, pop.optimizer.damping)
                if tracked and fisher_on:
                    zero = torch.zeros_like(pop.optimizer.damping)
                    fisher0 = (fisher if npg and not bool((pop.optimizer.damping > 0).any())
                               else BatchedInverseFisher.from_log_prob_rows(rows, w, probs, zero))
            plan = pop.optimizer.plan(torch.where(bad_g[:, None], torch.zeros_like(g), g) if any_bad else g, fisher)
            d = plan.direction
            lr = pop.optimizer.lr
            before: dict[str, Any] = {}
            if tracked:
                G = {"P": grads[1], "R": grads[2]}
                for name, Gx in G.items():
                    euc = (Gx**2).sum(1)
                    if plan.fisher is not None:
                        opt = plan.fisher.ntvar(Gx)
                    elif plan.diagonal is not None:
                        opt = (Gx**2 * plan.diagonal).sum(1)
                    else:
                        opt = euc
                    ntcov_opt = (Gx * d).sum(1)
                    before[name] = {
                        "value": q[name].detach(), "ntvar_euc": euc, "ntvar_opt": opt,
                        "ntvar_fisher": fisher0.ntvar(Gx) if fisher0 is not None else None,
                        "ntcov_euc": (Gx * g).sum(1), "ntcov_opt": ntcov_opt, "pred_delta": lr * ntcov_opt,
                    }
                before["kappa"] = (grads[3] ** 2).sum(1)
                if t == 0 and probe_scales:
                    with torch.no_grad():
                        base = q["P"].detach()
                        errs = []
                        for s in probe_scales:
                            eta = lr * s
                            Zs = pop.stacked.logits(pop.theta + eta[:, None] * d, pop.model.obs)
                            real = pop.model.quantities(Zs)["P"] - base
                            pred = eta * before["P"]["ntcov_opt"]
                            errs.append(torch.where(real != 0, (real - pred).abs() / real.abs(),
                                                    torch.full_like(real, math.nan)))
                        err_rows = torch.stack(errs, 1).tolist()
                        for row, e in enumerate(err_rows):
                            cfg = members[pop.alive[row]].config
                            members[pop.alive[row]].probe = {"lr": [cfg.lr * s for s in probe_scales], "rel_error": e}
            stepped = pop.optimizer.apply(pop.theta.detach(), plan)
            pop.theta = torch.where(bad_g[:, None], pop.theta, stepped) if any_bad else stepped
            p_now = q["P"].detach()
            q = pop.forward()
            p_after = q["P"].detach()
            p_list = _floats(p_after)
            done: dict[int, tuple[str, str | None, float, int]] = {}  # row → (status, error, p_end, updates)
            for row in torch.nonzero(bad_g).flatten().tolist():
                done[row] = ("failed", f"non-finite utility gradient at update {t}", float(p_now[row]), t)
            if tracked:
                rec_fields = _record_fields(before, q, U_val, lr, ret, mean_return is not None)
                opt_bad = pop.optimizer.nonfinite().tolist()
                for row in range(len(pop.alive)):
                    if row in done:
                        continue
                    st = members[pop.alive[row]]
                    record = {k: (v[row] if isinstance(v, list) else v) for k, v in rec_fields.items()}
                    record["update"] = t
                    bad = next((k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)), None)
                    if bad is not None:
                        done[row] = ("failed", f"{bad} became non-finite at update {t}; stopped, the {st.n_records} "
                                               f"records before it are kept", p_list[row], t + 1)
                        continue
                    if opt_bad[row]:
                        done[row] = ("failed", f"the {first.optimizer} optimizer's state became non-finite at update "
                                               f"{t} (reward or learning rate too large?); stopped, the {st.n_records} "
                                               f"records before it are kept", p_list[row], t + 1)
                        continue
                    st.lines.append(json.dumps(_ordered(record), allow_nan=False))
                    st.n_records += 1
                    st.curve.append((t, record["P/value"]))
                    st.pred.append(record["P/pred_delta"])
                    st.real.append(record["P/real_delta"])
                sink.log({"update": t, "P/median": float(p_after.median()), "members/active": len(pop.alive)})
            for row, p in enumerate(p_list):
                if row in done:
                    continue
                st = members[pop.alive[row]]
                c = st.config
                if not math.isfinite(p):
                    done[row] = ("failed", f"P became non-finite at update {t}", p, t + 1)
                    continue
                if st.crossed is None and p >= 0.5 and st.p_start < 0.5:
                    st.crossed = t + 1
                if c.stop_at_p is not None and p >= c.stop_at_p:
                    done[row] = ("stopped_at_p", None, p, t + 1)
                elif t + 1 >= c.steps:
                    done[row] = ("finished", None, p, t + 1)
            t += 1
            if done:
                for row, (status, message, p_end, updates) in sorted(done.items()):
                    st = members[pop.alive[row]]
                    st.error = message
                    st.summary = member_summary(st, status, updates, p_end, sink)
                flush(members, force=True)
                pop.select([r for r in range(len(pop.alive)) if r not in done])
                if pop.alive:
                    q = pop.forward()
            if time.time() - last_flush > flush_seconds:
                flush(members)
                last_flush = time.time()
            if bar is not None:
                bar.update(1)
                if pop.alive:
                    bar.set_postfix(active=len(pop.alive), P=f"{float(q['P'].detach().median()):.4g}", refresh=False)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        loop_seconds = time.time() - loop_start
        if bar is not None:
            bar.close()
        for row in range(len(pop.alive)):  # still training: interrupted, or failed with the population
            st = members[pop.alive[row]]
            if st.summary is None:
                status = "interrupted" if interrupted else "failed"
                st.summary = member_summary(st, status, t, math.nan, sink)
        flush(members, force=True)
        sink.log_table("members", *members_table(members))
        sink.log_table("curves", *curves_table(members))
        sink.finish({"members": len(members), "updates": t})
    if interrupted:
        raise RunInterrupted(f"population interrupted at update {t}; the records so far are kept")
    results, failures = [], []
    for i, st in enumerate(members):
        if st.probe is not None:
            st.summary["price_scaling"] = st.probe
        write_json_atomic(st.run_dir / SUMMARY_FILE, st.summary)
        results.append(RunResult(st.run_dir, st.summary, st.summary["wandb_dir"],
                                 "do" if getattr(st.config, "target", 1) == 1 else "dont"))
        if st.error:
            failures.append((i, st.run_dir.name, st.error))
    return PopulationResult(results, failures, sink.directory if sink.run is not None else None, t,
                            time.time() - start, loop_seconds)


RECORD_ORDER = ("update", "lr", "U")


def _ordered(record: dict[str, Any]) -> dict[str, Any]:
    """A record in the per-run path's key order (update, lr, U, the properties' fields, ...)."""
    out = {k: record[k] for k in RECORD_ORDER}
    out.update({k: v for k, v in record.items() if k not in out})
    return out


def _record_fields(before: dict[str, Any], q: dict[str, Tensor], U: list[float], lr: Tensor, ret: list[float],
                   sampled: bool) -> dict[str, Any]:
    """Every field of this update's records, as a list over members (or one value for all)."""
    fields: dict[str, Any] = {"lr": _floats(lr), "U": U}
    for name in ("P", "R"):
        b = before[name]
        for key in ("value", "ntvar_euc", "ntvar_opt", "ntvar_fisher", "ntcov_euc", "ntcov_opt", "pred_delta"):
            if key == "ntvar_fisher" and b[key] is None:
                continue
            fields[f"{name}/{key}"] = _floats(b[key])
    fields["kappa"] = _floats(before["kappa"])
    fields["backend"] = "population"
    for name in ("P", "R"):
        real = q[name].detach() - before[name]["value"]
        fields[f"{name}/real_delta"] = _floats(real)
        fields[f"{name}/residual"] = _floats(real - before[name]["pred_delta"])
    fields["return"] = ret
    if sampled:
        fields["return_undiscounted"] = ret
    return fields


def member_summary(st: MemberState, status: str, updates: int, p_end: float, sink: WandbSink) -> dict[str, Any]:
    """The summary.json of a member: the per-run path's keys (see :func:`ntrl.train.train`)."""
    c = st.config
    summary = {
        "status": status,
        "updates": updates,
        "p_start": st.p_start,
        "p_end": p_end,
        "crossed_half_at": st.crossed,
        "started_above_half": st.p_start >= 0.5,
        "n_probe": 1,
        "episodes": st.episodes,
        "episodes_cut": 0,
        "rollout_horizon": getattr(c, "rollout_horizon", None),
        "return_first": st.returns[0] if st.returns else None,
        "return_last": st.returns[-1] if st.returns else None,
        "price_check_P": price_agreement(np.array(st.pred), np.array(st.real)),
        "records": str(st.run_dir / RECORDS_FILE),
        "wandb_dir": sink.directory,
        "wandb_mode": sink.mode,
        "population": True,
    }
    if st.error:
        summary["error"] = st.error
    return summary


def flush(members: Sequence[MemberState], force: bool = False) -> None:
    """Append the members' pending record lines to their records.jsonl."""
    for st in members:
        if st.lines:
            with open(st.run_dir / RECORDS_FILE, "a", encoding="utf-8") as f:
                f.write("\n".join(st.lines) + "\n")
                if force:
                    f.flush()
                    os.fsync(f.fileno())
            st.lines.clear()


def curves_table(members: Sequence[MemberState], max_rows: int = 200_000) -> tuple[list[str], list[list[Any]]]:
    """The members' P curves in long form (run, update, P): every tracked update, or when there are
    more than ``max_rows`` in all, every k-th of each member's (its first and last kept)."""
    total = sum(len(st.curve) for st in members)
    stride = max(1, -(-total // max_rows))
    rows = []
    for st in members:
        pts = st.curve[::stride] + (st.curve[-1:] if st.curve and (len(st.curve) - 1) % stride else [])
        rows += [[st.run_dir.name, u, p] for u, p in pts]
    return ["run", "update", "P"], rows


def members_table(members: Sequence[MemberState]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the members' summaries (for the W&B table)."""
    cols = ["run", "seed", "p0", "lr", "reward_do", "status", "updates", "p_start", "p_end", "crossed_half_at"]
    rows = []
    for st in members:
        s = st.summary or {}
        rows.append([st.run_dir.name, st.config.seed, st.config.p0, st.config.lr, getattr(st.config, "reward_do", None),
                     s.get("status"), s.get("updates"), s.get("p_start"), s.get("p_end"), s.get("crossed_half_at")])
    return cols, rows
