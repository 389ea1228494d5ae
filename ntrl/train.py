"""One training run: config → env + policy + optimizer → loop → tracker → records and W&B.

Readable top to bottom; ``scripts/train_bandit.py`` and ``ntrl train <env>`` both call
:func:`train` with a config whose ``build()`` makes the :class:`ntrl.config.Experiment`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ntrl.config import PLACEMENT_FIELDS, ConfigError, TrainConfig
from ntrl.records import (
    CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, RecordWriter, json_file_bytes, nonfinite_field, read_records,
    write_bytes_many_atomic, write_json_atomic,
)
from ntrl.run_dirs import (
    MARKER, RUN_KIND, RunDirLocks, check_name, check_out_dir, inside, made_dirs, marker_contents, missing_dirs,
    remove_empty_dirs, replace_run_dir, write_marker,
)
from ntrl.engine.tangent import TangentEngine
from ntrl.termination import sigterm_as_interrupt
from ntrl.tracker import (
    FIRST_ORDER_SHARE, FIRST_ORDER_TOLERANCE, Tracker, first_order_scale_of_columns, price_agreement,
)
from ntrl.wandb_sink import WandbSink


# how a run that completed ends: all its updates, or one of its stopping rules
COMPLETE = ("finished", "stopped_at_p", "stopped_below_p")


class TrainingError(RuntimeError):
    """Training could not go on (for example a non-finite gradient); records so far are kept."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a run; the records so far and a summary are kept."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class RunResult:
    """What :func:`train` returns: the run directory, its summary, its W&B directory, and (read
    from the run directory when asked) its records, as dicts or as a pandas DataFrame."""

    run_dir: Path
    summary: dict[str, Any]
    wandb_dir: str | None
    target_label: str = "target"

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record of the run, in order (read from records.jsonl)."""
        return read_records(self.run_dir)

    def dataframe(self):
        """The records in long form (:func:`ntrl.records.to_dataframe`)."""
        from ntrl.records import to_dataframe

        return to_dataframe(self.run_dir)


class OwnPolicy(torch.nn.Module):
    """The user's module, handed floating observations in its parameters' dtype (rollouts pass the
    env's own, often float32; the tracker float64): z = module(obs.to(dtype))."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        if obs.is_floating_point():
            dtype = next((p.dtype for p in self.module.parameters() if p.is_floating_point()), obs.dtype)
            obs = obs.to(dtype)
        return self.module(obs)


def own_policy_settings(policy: Any) -> dict[str, Any]:
    """What a run's config records instead of the built policy's settings when it trains the
    user's own module: its class, and no p₀, width, depth or activation (the module's own)."""
    cls = type(policy)
    return {"policy": f"user:{cls.__module__}.{cls.__qualname__}", "p0": None, "width": None, "depth": None,
            "activation": None}


def use_policy(exp: Any, policy: Any, config: TrainConfig) -> None:
    """Train the user's own torch module instead of the policy the config builds (``train(config,
    policy=module)``). The module must map a batch of the observations the built policy takes
    (shape (N, ...), as the env's observations reach it) to logits of shape (N, K), K the env's
    actions, from floating-point parameters, some of which require grad. Its own initialisation
    decides P at the start (``p0`` is the built policy's, and the run's config records the module's
    class instead, :func:`own_policy_settings`). It is wrapped in :class:`OwnPolicy`, which hands it
    floating observations in its parameters' dtype. The optimizer is rebuilt over its parameters;
    the engine answers through its torch.func reference."""
    from torch import nn

    from ntrl.agents.optimizers import make_optimizer
    from ntrl.engine.tangent import PolicyView

    if not isinstance(policy, nn.Module):
        raise TypeError(f"policy must be a torch.nn.Module that returns logits, got {type(policy).__name__}")
    params = [p for p in policy.parameters() if p.requires_grad]
    if not params or not all(p.is_floating_point() for p in params):
        raise ValueError("policy needs floating-point parameters that require grad (the tangent engine "
                         "differentiates with respect to them)")
    seen: dict[str, Any] = {}
    hook = exp.policy.register_forward_pre_hook(lambda m, args: seen.setdefault("obs", args[0]))
    try:  # the observations the built policy is asked about, and its logits there
        exp.properties[0](PolicyView(exp.policy, dict(exp.policy.named_parameters())))
    finally:
        hook.remove()
    obs = seen["obs"]
    own = OwnPolicy(policy)
    with torch.no_grad():
        want = exp.policy(obs)
        try:
            got = own(obs)
        except Exception as e:
            hint = (f" (make the module {obs.dtype} with .to({obs.dtype}), or cast obs to its dtype in forward)"
                    if "dtype" in str(e) else "")
            raise ValueError(f"policy(obs) failed on the env's observations, a {obs.dtype} tensor of shape "
                             f"{tuple(obs.shape)}: {type(e).__name__}: {e}{hint}") from None
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(want.shape) or not got.is_floating_point():
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise ValueError(f"policy(obs) must return floating-point logits of shape {tuple(want.shape)} (N observations "
                         f"× {want.shape[-1]} actions) for obs of shape {tuple(obs.shape)}; got {shape}")
    if not torch.isfinite(got).all():
        raise ValueError("policy(obs) returned non-finite logits at the start")
    exp.policy = own
    exp.optimizer = make_optimizer(config.optimizer, own, config.lr, **config.optimizer_kwargs())


def prepare_run_dir(config: TrainConfig, locks: RunDirLocks | None = None) -> Path:
    """``--out``/``--run-name``, made and marked as ntrl's (see :mod:`ntrl.run_dirs`).

    An existing run of ntrl's is replaced only with ``force``; a directory holding anything ntrl
    did not write, a symbolic link, or a name that is not a plain name is refused. With ``locks``,
    the directory is locked before it is looked at (a run another live process trains is refused)
    and stays locked in ``locks``."""
    return _make_run_dir(config, mark=True, locks=locks)


def _make_run_dir(config: TrainConfig, mark: bool, created: list[list[Path]] | None = None,
                  locks: RunDirLocks | None = None) -> Path:
    """The run directory of ``config``, made (and ``mark``-ed); ``created`` gets the directories
    this made (the run directory and ``out``'s missing parents, innermost first); ``locks``, where
    given, holds its lock (:class:`ntrl.run_dirs.RunDirLocks`): an existing directory's, taken
    before it is checked or replaced, and the new one's where it was replaced."""
    out = check_out_dir(config.out)
    name = check_name(config.run_name or config.default_run_name(), "--run-name")
    run_dir = Path(config.out) / name
    missing = missing_dirs(out / name) if created is not None else []
    with made_dirs(out), (locks.creating(out) if locks is not None else contextlib.nullcontext()):
        target = out / name
        before = locks.acquire(target) if locks is not None else None
        replace_run_dir(target, config.force)
        target.mkdir(exist_ok=True)
        inside(target, out)
        if locks is not None:
            now = locks.acquire(target)
            if before is not None and (before.st_dev, before.st_ino) != (now.st_dev, now.st_ino):
                locks.release(before)  # the directory it replaced
        if mark:
            write_marker(target, RUN_KIND)
    if created is not None:
        created.append(missing)
    return run_dir


def prepare_run_dirs(configs: Sequence[TrainConfig], made: Callable[[], None] | None = None,
                     files: Callable[[], None] | None = None, locks: RunDirLocks | None = None) -> list[Path]:
    """:func:`prepare_run_dir` for many runs (a population's members), each run directory also
    given its config.json and an empty records file, with two syncs in all
    (:func:`ntrl.records.write_bytes_many_atomic`) instead of two fsyncs a run.

    Every directory is made first, then the three files of each are written: every marker goes into
    place, synced, before any other file is written. For a progress bar, ``made`` is called after
    each directory and after each file, ``files`` once between the two. A kill before the markers
    are in place leaves directories that are empty or hold only a marker's temporary file, which any
    rerun takes; a kill after leaves runs of ntrl's, cut short, which a resumed population trains
    again (:func:`ntrl.population.trainer.resume_population`) or ``force`` replaces: never a
    directory that ntrl refuses as not its own. Two runs that reach one directory by different paths
    (a symbolic link, ``a/../a``, a case-insensitive file system) are refused before anything is
    written into it. If making or writing fails, the directories this call made that are still
    empty are removed again. ``locks``: each directory's lock goes there (:func:`prepare_run_dir`)."""
    run_dirs: list[Path] = []
    created: list[list[Path]] = []  # per run, the directories this call made
    seen: dict[tuple[int, int], int] = {}
    try:
        for i, config in enumerate(configs):
            run_dir = _make_run_dir(config, mark=False, created=created, locks=locks)
            st = run_dir.stat()
            if (st.st_dev, st.st_ino) in seen:
                raise ConfigError("--run-name", f"members of one population need distinct run directories: members "
                                                f"{seen[st.st_dev, st.st_ino]} and {i} both write {run_dir} (by different "
                                                f"paths to one directory)")
            seen[st.st_dev, st.st_ino] = i
            run_dirs.append(run_dir)
            if made is not None:
                made()
        if files is not None:
            files()
        marker = json_file_bytes(marker_contents(RUN_KIND))
        write_bytes_many_atomic([(d / MARKER, marker) for d in run_dirs], written=made)
    except BaseException:
        for dirs in reversed(created):  # rmdir removes an empty directory only: nothing anyone wrote
            remove_empty_dirs(dirs)
        raise
    write_bytes_many_atomic([(d / CONFIG_FILE, json_file_bytes(c.to_dict())) for d, c in zip(run_dirs, configs)]
                            + [(d / RECORDS_FILE, b"") for d in run_dirs], written=made)
    return run_dirs


def _mean(value: Any) -> float:
    """A record's value, or the mean of its list (np.mean's, exact for one number)."""
    return float(value) if isinstance(value, (int, float)) else float(np.mean(value))


def _means(values: Sequence[Any]) -> np.ndarray:
    """:func:`_mean` of each value, as a float64 array (at once where every value is one number)."""
    if set(map(type, values)) <= {float, int}:
        return np.array(values, dtype=float)
    return np.array([_mean(v) for v in values], dtype=float)


def price_check(records: list[dict[str, Any]], name: str = "P") -> dict[str, float]:
    """How well predicted ΔX matched realised ΔX over a run's records (see price_agreement), and
    where the records carry the η-probe, the largest learning rate at which all but
    FIRST_ORDER_SHARE of the probed updates stay first-order (``first_order_lr``; see
    :func:`ntrl.tracker.first_order_scale`) and the largest probed one."""
    real_key = f"{name}/real_delta"
    rows = [r for r in records if real_key in r]
    keys = PRICE_CHECK_KEYS + (real_key, f"{name}/pred_delta", f"{name}/value")
    return price_check_of_columns({k: [r.get(k) for r in rows] for k in keys}, name)


PRICE_CHECK_KEYS = ("update", "lr", "P/probe_lr", "P/probe_real", "P/probe_pred")  # and X/real_delta, X/pred_delta, X/value


def price_check_of_columns(columns: dict[str, Sequence[Any]], name: str = "P") -> dict[str, float]:
    """:func:`price_check` of the records that hold X/real_delta, given as columns (one entry
    per record, None where a record lacks the key; a key with no column: no record has it): the
    keys of ``PRICE_CHECK_KEYS`` and X/real_delta, X/pred_delta and X/value."""
    real = columns[f"{name}/real_delta"]
    n = len(real)
    out = price_agreement(_means(columns.get(f"{name}/pred_delta") or [None] * n), _means(real))
    values = [v for v in columns.get(f"{name}/value") or [] if v is not None]
    if values:
        out["value_scale"] = float(max(map(abs, _means(values).tolist())))  # the headline P, the mean over probe states
    if n:
        updates = columns.get("update") or [None] * n
        out["top_miss_updates"] = [i if updates[i] is None else updates[i] for i in out.pop("top_miss_index", [])]
    if name == "P" and n:
        scale, _, top = first_order_scale_of_columns(columns)
        if math.isfinite(scale):
            lr = columns["lr"][0]
            out["first_order_lr"], out["probed_lr_max"] = scale * lr, top * lr
    return out


def extra_tracking_caller(fn: Callable[..., dict]) -> Callable[..., dict]:
    """``call(engine, u, plan, stats)`` for an Experiment's extra tracking: a function that takes
    only three arguments (the older form, without the tracker's stats) is called with three.
    The signature is read once, not at every tracked update."""
    try:
        inspect.signature(fn).bind(None, None, None, None)
    except TypeError:
        return lambda engine, u, plan, stats: fn(engine, u, plan)
    return fn


def headline(values: torch.Tensor) -> float:
    """The headline P of a run: the property's value, or its mean over the probe states when it
    has one value per state (``--env``: P = (1/N) Σ_s π(target | s))."""
    return float(values.reshape(-1).to(torch.float64).mean())


def split_seed(seed: int) -> tuple[int, np.random.Generator]:
    """Independent streams from one seed: the environment's seed and the action sampler.
    (Seeding both with ``seed`` itself would make them draw the very same numbers.)"""
    env_ss, action_ss = np.random.SeedSequence(seed).spawn(2)
    return int(env_ss.generate_state(1)[0]), np.random.default_rng(action_ss)


def run_summary(config: TrainConfig, run_dir: Path, sink: WandbSink, *, status: str, updates: int, p_start: float,
                p_end: float, crossed: int | None, n_probe: int, episodes: int, episodes_cut: int,
                return_first: float | None, return_last: float | None, price: dict[str, float],
                p_min: float | None = None, p_min_at: int | None = None,
                p_back_at: int | None = None) -> dict[str, Any]:
    """A run's summary.json (the single-run path's and a population member's): how it ended, P at
    both ends and where it crossed ½, the least P along the trajectory and the number of updates
    after which it occurred (0: the start) and, where P fell below its start, the update at which it
    was back at its start (``p_back_at``, None if it never was), the episodes behind it, the mean return of its first and
    last update, and the Price check of its records (``price``, see :func:`price_check`)."""
    return {
        "status": status,
        "updates": updates,
        "p_start": p_start,
        "p_end": p_end,
        "crossed_half_at": crossed,
        "p_min": p_start if p_min is None else p_min,
        "p_min_at": 0 if p_min_at is None else p_min_at,
        "p_back_at": p_back_at,
        "started_above_half": p_start >= 0.5,
        "n_probe": n_probe,
        "episodes": episodes,
        "episodes_cut": episodes_cut,
        "rollout_horizon": getattr(config, "rollout_horizon", None),
        "return_first": return_first,
        "return_last": return_last,
        "price_check_P": price,
        "records": str(run_dir / RECORDS_FILE),
        "wandb_dir": sink.directory,
        "wandb_mode": sink.mode,
    }


def train(config: TrainConfig, progress: bool = True, policy: Any = None,
          locks: RunDirLocks | None = None) -> RunResult:
    """Run REINFORCE with Price tracking; write records, config and summary to the run dir.
    ``policy``: the user's own torch module, trained instead of the config's (:func:`use_policy`).
    The run directory is locked while the run trains (:class:`ntrl.run_dirs.RunDirLocks`), and
    beyond where the caller gives its own ``locks`` (a study's worker writes the summary again); a
    SIGTERM at its default action ends the process only once the run is written
    (:func:`ntrl.termination.sigterm_as_interrupt`)."""
    with sigterm_as_interrupt(), RunDirLocks() as own:
        return _train(config, progress, policy, own if locks is None else locks)


def _train(config: TrainConfig, progress: bool, policy: Any, locks: RunDirLocks) -> RunResult:
    config.validate()
    torch.set_num_threads(config.threads)  # tiny networks: extra threads only add contention
    exp = config.build()  # bad input fails here, before anything is written
    try:
        if policy is not None:
            use_policy(exp, policy, config)
        run_dir = prepare_run_dir(config, locks)
    except BaseException:
        exp.env.close()
        raise
    recorded = config.to_dict() if policy is None else {**config.to_dict(), **own_policy_settings(policy)}
    try:
        write_json_atomic(run_dir / CONFIG_FILE, recorded)
        env, policy, optimizer, properties = exp.env, exp.policy, exp.optimizer, exp.properties
        env_seed, rng = split_seed(config.seed)
        env.reset(seed=env_seed)
        train_engine = TangentEngine(policy)  # gradients in the policy's own dtype
        analysis_engine = TangentEngine(policy, dtype=torch.float64)  # tracking always in float64
        tracker = Tracker(analysis_engine, properties, kappa=exp.kappa, fisher=config.fisher,
                          schedule=config.track_schedule(), price_scales=config.price_scales, noise=config.noise,
                          exact_utility=exp.exact_utility)
        P = properties[0]
        extra = None if exp.extra_tracking is None else extra_tracking_caller(exp.extra_tracking)
        p_values = analysis_engine.evaluate(P)
        p_start, n_probe = headline(p_values), int(p_values.numel())
        sink = WandbSink(run_dir, recorded, mode=config.wandb, name=run_dir.name, group=config.group,
                         system_metrics=not config.axes, **config.wandb_settings())
    except KeyboardInterrupt:
        exp.env.close()
        raise RunInterrupted(f"interrupted before the first update; {run_dir} holds the run's config only") from None
    steps_done, crossed, status = 0, None, "finished"
    p_min, p_min_at, p_back_at = p_start, 0, None  # the least P so far, after how many updates; back at p_start
    episodes, episodes_cut = 0, 0
    return_first = return_last = None  # the mean episode return of an update (undiscounted when sampled)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=run_dir.name, unit="upd", file=sys.stderr, dynamic_ncols=True)
    interrupted = False
    try:
        with RecordWriter(run_dir / RECORDS_FILE) as writer:
            for t in range(config.steps):
                u = exp.utility(train_engine, rng)
                episodes, episodes_cut = episodes + u.episodes, episodes_cut + u.episodes_cut
                return_last = u.mean_return if u.mean_undiscounted_return is None else u.mean_undiscounted_return
                return_first = return_last if return_first is None else return_first
                if not torch.isfinite(u.gradient).all():
                    raise TrainingError(f"non-finite utility gradient at update {t}")
                plan = optimizer.plan(u.gradient, u.fisher_states)
                pending = None
                if tracker.should_track(t):
                    pending = tracker.before(t, u.gradient, plan, u.value, u.fisher_states, u.episode_utilities)
                    if extra is not None:
                        pending.record.update(extra(analysis_engine, u, plan, pending.stats))
                optimizer.apply(plan)
                steps_done = t + 1
                if pending is not None:
                    record = tracker.after(pending)
                    record["return"] = u.mean_return
                    if u.mean_undiscounted_return is not None:  # sampled episodes: Σ_t r_t as well
                        record["return_undiscounted"] = u.mean_undiscounted_return
                    bad = nonfinite_field(record)
                    if bad is not None:
                        raise TrainingError(f"{bad} became non-finite at update {t}; stopped, "
                                            f"the {writer.count} records before it are kept")
                    bad = optimizer.nonfinite_state()
                    if bad is not None:
                        raise TrainingError(f"the {config.optimizer} optimizer's {bad} became non-finite at update {t} "
                                            f"(reward or learning rate too large?); stopped, the {writer.count} "
                                            f"records before it are kept")
                    writer.write(record)
                    sink.log(record)
                # P after the step: the tracker has just evaluated it on tracked updates
                p = headline(pending.after[P.name] if pending is not None else analysis_engine.evaluate(P))
                if not math.isfinite(p):
                    raise TrainingError(f"P became non-finite at update {t}")
                if crossed is None and p >= 0.5 and p_start < 0.5:
                    crossed = t + 1
                if p < p_min:  # a new least P: the return to p_start is counted from it
                    p_min, p_min_at, p_back_at = p, t + 1, None
                elif p_back_at is None and p_min < p_start <= p:
                    p_back_at = t + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(P=f"{p:.4g}", refresh=False)
                if config.stop_at_p is not None and p >= config.stop_at_p:
                    status = "stopped_at_p"
                    break
                if config.stop_below_p is not None and p <= config.stop_below_p:
                    status = "stopped_below_p"
                    break
    except KeyboardInterrupt:
        status, interrupted = "interrupted", True
    except BaseException:
        status = "failed"
        raise
    finally:
        if bar is not None:
            bar.close()
        try:
            summary = run_summary(config, run_dir, sink, status=status, updates=steps_done, p_start=p_start,
                                  p_end=headline(analysis_engine.evaluate(P)), crossed=crossed, n_probe=n_probe,
                                  episodes=episodes, episodes_cut=episodes_cut, return_first=return_first,
                                  return_last=return_last, p_min=p_min, p_min_at=p_min_at, p_back_at=p_back_at,
                                  price=price_check(read_records(run_dir / RECORDS_FILE), "P"))
            write_json_atomic(run_dir / SUMMARY_FILE, summary)
            close_wandb_run(sink, run_dir, summary)
        except Exception as e:  # never let the summary hide the error that ended the run
            if status != "failed" and not interrupted:
                raise
            print(f"ntrl: could not write the summary of {run_dir} after the run stopped: {e}", file=sys.stderr)
        finally:
            env.close()
    if interrupted:
        n = len(read_records(run_dir / RECORDS_FILE))
        raise RunInterrupted(f"interrupted at update {steps_done}; {n} records kept in {run_dir}")
    return RunResult(run_dir, summary, summary["wandb_dir"], exp.target_label)


def close_wandb_run(sink: WandbSink, run_dir: Path, summary: dict[str, Any]) -> None:
    """The end of a run's W&B run: its records, config and summary as the ``records`` artifact,
    and the summary's scalars (the Price check's as ``price_check_P/…``) as W&B's summary."""
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict)}
    flat.update({f"price_check_P/{k}": v for k, v in summary["price_check_P"].items()})
    sink.log_artifact(f"records-{run_dir.name}", "records",
                      [run_dir / RECORDS_FILE, run_dir / CONFIG_FILE, run_dir / SUMMARY_FILE])
    sink.finish(flat, exit_code=0 if summary["status"] in COMPLETE else 1)


def log_finished_run(config: TrainConfig, run_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Log a run of ``config`` that trained elsewhere (a Ray worker, W&B off) to W&B from its records, as
    :func:`train` logs while it runs: one W&B step per record, in order, then the artifact and the
    summary. Writes ``summary`` (with the W&B run's directory and mode) as the run's summary.json,
    the last file of a complete run, and returns it."""
    sink = WandbSink(run_dir, config.to_dict(), mode=config.wandb, name=run_dir.name, group=config.group,
                     system_metrics=not config.axes, **config.wandb_settings())
    for record in read_records(run_dir / RECORDS_FILE):
        sink.log(record)
    summary = {**summary, "wandb_dir": sink.directory, "wandb_mode": sink.mode}
    write_json_atomic(run_dir / SUMMARY_FILE, summary)
    close_wandb_run(sink, run_dir, summary)
    return summary


def crossing_text(summary: dict[str, Any]) -> str:
    """How P relates to 1/2: the update it crossed, that it never did, or that it started above."""
    if summary.get("started_above_half", summary["p_start"] >= 0.5):
        return ", having started at or above 1/2"
    if summary["crossed_half_at"]:
        return f", crossing 1/2 at update {summary['crossed_half_at']}"
    return ", without reaching 1/2"


def format_percent(x: float) -> str:
    """A relative error as a percentage; very large ones in scientific notation."""
    return f"{x:.2%}" if abs(x) < 100 else f"{x * 100:.3g}%"


def price_check_text(pc: dict[str, Any], name: str = "ΔP = η·NTCov_M(P, U)") -> str:
    """The Price-check sentence of a summary; never prints a NaN or infinite R² or percentage."""
    n = pc.get("n", 0)
    if not n:
        return "Price check: no update was tracked."
    head = f"Price check over {n} tracked updates: "
    r2, rel = pc.get("r2"), pc.get("median_rel_error")
    good = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    biggest, scale = pc.get("max_abs_real"), pc.get("value_scale")
    if good(biggest) and good(scale) and biggest <= STILL * max(scale, 1e-300):
        return (head + f"P did not change: every realised |ΔP| was at most {biggest:.2g}, rounding of P ≈ {scale:.3g}, "
                f"so there is nothing for the prediction to explain (a larger --lr, or more updates, would move it).")
    if good(r2):
        shown = f"{r2:.6f}" if abs(r2) < 1e6 else f"{r2:.3g}"
        text = f"the predicted {name} explains R² = {shown} of the realised ΔP"
    elif r2 == -math.inf:
        text = f"the predicted {name} misses the realised ΔP by so much that R² overflows (below −1e308)"
    elif n < 2:
        text = f"one update is too few for an R² of the predicted {name}"
    else:
        text = f"no R²: the realised ΔP was the same at every update, so there is no variance for the predicted {name} to explain"
    if good(rel):
        text += f", with median relative error {format_percent(rel)}"
    else:
        text += "; no relative error: the realised ΔP was 0 at every update"
    share, updates = pc.get("top_miss_share"), pc.get("top_miss_updates") or []
    if good(r2) and r2 < 0.5 and good(rel) and rel < 0.05 and good(share) and share > 0.5 and updates:
        which = ", ".join(map(str, sorted(updates)))
        misses = "the largest miss (update" if len(updates) == 1 else f"the {len(updates)} largest misses (updates"
        text += (f". R² is set by a few large steps: {misses} {which}) make{'s' if len(updates) == 1 else ''} up "
                 f"{share:.0%} of the squared error, while the typical update is predicted to {format_percent(rel)}")
    return head + text + "." + first_order_text(pc)


STILL = 1e-12  # realised changes at most this fraction of |P|: rounding, P did not move


def first_order_text(pc: dict[str, Any]) -> str:
    """The sentence on the first-order regime: the share of tracked updates outside it and,
    from the η-probe, the largest learning rate at which 95 % of the probed updates stay inside."""
    outside = pc.get("outside_first_order")
    if not isinstance(outside, (int, float)) or not math.isfinite(outside):
        return ""
    bound = f"|realised − predicted| > {FIRST_ORDER_TOLERANCE:g}·|predicted|"
    n = pc.get("n")
    if outside > 0 and isinstance(n, int) and n > 0:  # a count: "0%" would read as none
        count = round(outside * n)
        text = f" {count} of the {n} tracked updates ({outside:.1%}) {'was' if count == 1 else 'were'} outside " \
               f"the first-order regime ({bound})"
    elif outside > 0:
        text = f" {outside:.1%} of the tracked updates were outside the first-order regime ({bound})"
    else:
        text = f" Every tracked update was first-order (none had {bound})"
    lr, top = pc.get("first_order_lr"), pc.get("probed_lr_max")
    most = f"{1 - FIRST_ORDER_SHARE:.0%} of the probed updates"
    if isinstance(lr, (int, float)) and math.isfinite(lr):
        if lr >= top:
            text += f"; replayed at up to lr {top:g}, {most} stay first-order"
        elif lr > 0:
            text += f"; {most} stay first-order up to lr {lr:g}"
        else:
            text += f"; even at the smallest probed step, more than {FIRST_ORDER_SHARE:.0%} of the updates are not first-order"
    if outside > 0.25:
        text += (f": the Price prediction is not a first-order one for this run; a smaller --lr"
                 f"{f' (at most {lr:g})' if isinstance(lr, (int, float)) and 0 < lr < (top or 0) else ''} "
                 f"would keep most updates first-order")
    return text + "."


# What the summary's settings line leaves out: the env (named already) and where the run is written and logged.
NOT_SETTINGS = ("env", *PLACEMENT_FIELDS)


def non_default_settings(config: TrainConfig, skip: Sequence[str] = ()) -> str:
    """The settings of ``config`` that differ from the generic defaults of :class:`TrainConfig`
    (the experiments have some defaults of their own), as ``--flag value`` items; fields named in
    ``skip`` (settings the run does not use) are left out."""
    generic = TrainConfig()
    items = []

    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:g}"
        if isinstance(value, list):
            return " ".join(shown(v) for v in value)
        return str(value)

    for f in dataclasses.fields(TrainConfig):
        if f.name in NOT_SETTINGS or f.name in skip:
            continue
        value = getattr(config, f.name)
        if value != getattr(generic, f.name) and value is not None:
            items.append(f"--{f.name.replace('_', '-')} {shown(value)}")
    # the experiment's own settings (e.g. the K-armed bandit's --rewards and --start), where they
    # differ from its defaults
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    for f in dataclasses.fields(type(config)):
        if f.name in own or f.name in skip or not f.metadata.get("flag", True):
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        value = getattr(config, f.name)
        if value != default and value not in (None, []):
            items.append(f"--{f.name.replace('_', '-')} {shown(value)}")
    return ", ".join(items)


DIP_SHOWN = 1.01  # the summary mentions a dip of P below its start from 1 % on


def dip_text(summary: dict[str, Any]) -> str:
    """The least P when it fell below its start (the gravity well), else nothing."""
    p_min, p_start = summary.get("p_min"), summary["p_start"]
    if p_min is None or not p_min < p_start / DIP_SHOWN or not summary.get("p_min_at") or not summary["p_end"] > p_min:
        return ""  # no dip, or P is still at its least (then "went from … to …" says it)
    ratio = p_start / p_min
    how = f"{ratio:.3g}× below its start" if ratio >= 1.5 else f"{1 - 1 / ratio:.1%} below its start"
    return f", after falling to its minimum {p_min:.4g} ({how}) at update {summary['p_min_at']}"


def describe(result: RunResult, config: TrainConfig) -> str:
    """The one-paragraph summary the CLI prints at the end of a run."""
    s = result.summary
    action = result.target_label
    over = f", the mean over {s['n_probe']} probe states," if s.get("n_probe", 1) > 1 else ""
    text = (
        f"P = π({action}){over} went from {s['p_start']:.4g} to {s['p_end']:.4g} in {s['updates']} updates"
        f"{dip_text(s)}{crossing_text(s)} ({config.optimizer}, {config.mode} gradients, {config.policy} policy, "
        f"lr {config.lr:g}). "
        f"{price_check_text(s['price_check_P'])} Records: {s['records']}."
    )
    if result.wandb_dir:
        text += f" W&B ({s.get('wandb_mode', config.wandb)}): {result.wandb_dir} (browse: wandb leet {result.wandb_dir})."
    if s.get("return_first") is not None and math.isfinite(s["return_first"]) and math.isfinite(s["return_last"]):
        kind = "the mean episode return" if s.get("episodes") else "the expected return J"
        text += f" Over the run {kind} went from {s['return_first']:.4g} to {s['return_last']:.4g}."
    if s.get("episodes_cut"):
        text += (f" {s['episodes_cut']} of {s['episodes']} sampled episodes were cut at the horizon of "
                 f"{s['rollout_horizon']} steps (--horizon): REINFORCE ascended the return of their first "
                 f"{s['rollout_horizon']} steps.")
    differ = non_default_settings(config)
    if differ:
        text += f" Settings other than the generic defaults: {differ}."
    return text
