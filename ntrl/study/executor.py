"""The rarity study, run: a process pool over the grid's runs, resumable, one study per directory.

Every run writes its own run directory (records, config, summary, W&B run grouped by study)
under ``STUDY_DIR/runs/``; a run whose final summary is already there is skipped, so a study
that was killed resumes where it stopped. The directory's lock (:mod:`ntrl.study.lock`) keeps a
second live study out, and the workers end with the process that started them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

from ntrl.config import ConfigError
from ntrl.study.grid import STUDY_FILE, RunSpec, StudyConfig, enumerate_runs, train_config_for, update_cap
from ntrl.termination import raise_if_swallowed
from ntrl.train import COMPLETE, TrainingError


class StudyIncomplete(TrainingError):
    """Some runs of a study failed; the completed ones are kept and a re-run retries the rest."""


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a study: completed runs are kept and a re-run resumes."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def run_one(study_dict: dict[str, Any], spec_dict: dict[str, Any], runs_dir: str, wandb_mode: str,
            parent_pid: int | None = None, verbose: bool = False) -> dict[str, Any]:
    """Worker: one training run. Returns the run's summary.

    The run counts as complete only once its final summary (with its spec) is written; a
    worker whose parent has died writes nothing more."""
    import torch

    from ntrl.records import SUMMARY_FILE, write_json_atomic
    from ntrl.run_dirs import RunDirLocks
    from ntrl.study.lock import parent_alive
    from ntrl.train import train

    torch.set_num_threads(1)
    if verbose:
        from ntrl.verbose import enable_verbose

        enable_verbose()
    study = StudyConfig(**study_dict)
    spec = RunSpec(**spec_dict)
    config = train_config_for(study, spec, Path(runs_dir), wandb_mode)
    with RunDirLocks() as locks:  # the run's directory stays locked until its final summary is written
        result = train(config, progress=False, locks=locks)
        summary = dict(result.summary)
        summary["spec"] = spec_dict
        if parent_pid is not None and not parent_alive(parent_pid):
            os._exit(1)
        write_json_atomic(result.run_dir / SUMMARY_FILE, summary)
    return summary


def run_chunk(study_dict: dict[str, Any], spec_dicts: list[dict[str, Any]], runs_dir: str, wandb_mode: str,
              verbose: bool = False, device: str = "cpu",
              wandb_parent: str | None = None,
              parent_pid: int | None = None) -> list[tuple[dict[str, Any], dict[str, Any] | None, str | None]]:
    """Worker: one population chunk, the runs of one cell trained as one batched computation
    (:mod:`ntrl.population`). Returns (spec, summary, error) per member; a member that failed has summary None and its error. Each member's summary
    is written when it stops; a worker whose parent died is ended by its watchdog
    (:func:`ntrl.study.lock.worker_init`) and, as :func:`run_one`'s, writes no summary more."""
    import torch

    from ntrl.population import train_population
    from ntrl.study.lock import parent_alive

    def before_summary() -> None:
        if parent_pid is not None and not parent_alive(parent_pid):
            os._exit(1)

    torch.set_num_threads(1)
    if verbose:
        from ntrl.verbose import enable_verbose

        enable_verbose()
    study = StudyConfig(**study_dict)
    specs = [RunSpec(**d) for d in spec_dicts]
    configs = [train_config_for(study, spec, Path(runs_dir), wandb_mode) for spec in specs]
    name, wandb_config = chunk_wandb_run(study, specs)
    result = train_population(configs, progress=False, device=device,
                              wandb_parent=wandb_parent, wandb_name=name, wandb_config=wandb_config,
                              summary_extra=[{"spec": d} for d in spec_dicts], before_summary=before_summary)
    errors = {i: e for i, _, e in result.failures}
    return [(d, None, errors[i]) if i in errors else (d, res.summary, None)
            for i, (d, res) in enumerate(zip(spec_dicts, result.results))]


def chunk_wandb_run(study: StudyConfig, specs: list[RunSpec]) -> tuple[str, dict[str, Any]]:
    """The name (the same chunk, the same name) and config of a population chunk's W&B run."""
    import hashlib

    cell = specs[0].cell
    digest = hashlib.sha1("\n".join(s.run_id for s in specs).encode()).hexdigest()[:8]
    return f"{study.name}-{'-'.join(cell)}-pop-{digest}", {
        "study": study.name, "env": cell[0], "policy": cell[1], "optimizer": cell[2], "mode": cell[3],
        "members": len(specs), "runs": [s.run_id for s in specs]}


# Seconds an update of a population chunk took, by environment, policy and gradient mode, in the
# 760-run grid of 2026-11-25 and the quick grid's well on 2 cores (benchmarks/RESULTS.md, run 19;
# rounded). Only the order in which a study's units start depends on them, never what they compute.
UPDATE_SECONDS: dict[tuple[str, str, str], float] = {
    ("bandit", "single_logit", "exact"): 0.8e-3, ("bandit", "single_logit", "sampled"): 1.6e-3,
    ("bandit", "tabular", "exact"): 0.8e-3, ("bandit", "tabular", "sampled"): 1.7e-3,
    ("bandit", "mlp", "exact"): 2.5e-3, ("bandit", "mlp", "sampled"): 4e-3,
    ("juice", "tabular", "exact"): 4e-3, ("juice", "tabular", "sampled"): 13e-3,
    ("juice", "mlp", "exact"): 30e-3, ("juice", "mlp", "sampled"): 25e-3,
    ("kbandit", "tabular", "exact"): 0.3e-3, ("kbandit", "escort", "exact"): 0.3e-3,
}


def estimated_seconds(study: StudyConfig, unit: list[RunSpec]) -> float:
    """How long a unit may take, for the order of the units alone: its runs' most updates
    (:func:`ntrl.study.grid.update_cap`) times the seconds an update of its kind took
    (:data:`UPDATE_SECONDS`; a kind not listed as the dearest listed)."""
    spec = unit[0]  # a unit's runs share their environment, policy and mode
    per_update = UPDATE_SECONDS.get((spec.env, spec.policy, spec.mode), max(UPDATE_SECONDS.values()))
    return per_update * max(update_cap(study, s) for s in unit)


def work_units(study: StudyConfig, todo: list[RunSpec], runs_dir: Path, workers: int, population: bool,
               max_members: int = 256, device: str = "cpu") -> list[tuple[str, list[RunSpec]]]:
    """What the pool schedules: population chunks (the runs of one cell the population path
    supports, at most ``max_members`` each and as many as fit in a worker's share of the memory,
    :func:`ntrl.population.trainer.members_that_fit`, and split so that every worker has one), as
    ("population", runs), and single runs, as ("run", [run]), for the cells it does not support.
    The longest first (:func:`estimated_seconds`; the grid's order among equals): a long chunk
    that starts last leaves the study waiting for it alone (the 760-run grid's longest, sampled
    NPG on the juice MLP, started 233 s in and ended at 834 s; the other worker had nothing left
    to do from about 350 s on)."""
    from ntrl.population import unsupported_reason
    from ntrl.population.trainer import members_that_fit

    if not population:
        return longest_first(study, [("run", [s]) for s in todo])
    cells: dict[tuple, list[RunSpec]] = {}
    singles = []
    supported: dict[tuple, bool] = {}  # what the population path covers depends on the cell alone
    fits: dict[tuple, int] = {}  # members per chunk
    for spec in todo:
        if spec.cell not in supported:
            config = train_config_for(study, spec, runs_dir, "disabled")
            supported[spec.cell] = unsupported_reason(config) is None
            if supported[spec.cell]:
                fits[spec.cell] = min(max_members, members_that_fit(config, device, 1 / max(1, workers)))
        if supported[spec.cell]:
            cells.setdefault(spec.cell, []).append(spec)
        else:
            singles.append(("run", [spec]))
    chunks = []
    n_chunks = {c: max(1, -(-len(rs) // fits[c])) for c, rs in cells.items()}
    while cells and sum(n_chunks.values()) < workers:  # one chunk per worker at least, where there are runs enough
        c = max(cells, key=lambda k: len(cells[k]) / n_chunks[k])
        if len(cells[c]) <= n_chunks[c]:
            break
        n_chunks[c] += 1
    for c, rs in cells.items():
        k = n_chunks[c]
        chunks += [("population", rs[i::k]) for i in range(k)]
    return longest_first(study, chunks + singles)


def longest_first(study: StudyConfig, units: list[tuple[str, list[RunSpec]]]) -> list[tuple[str, list[RunSpec]]]:
    """``units`` by :func:`estimated_seconds`, the longest first; equals in their order."""
    return sorted(units, key=lambda unit: -estimated_seconds(study, unit[1]))


def completed_summary(run_dir: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or None if the run is missing, failed or incomplete."""
    path = run_dir / "summary.json"
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError):
        return None
    ok = isinstance(summary, dict) and summary.get("status") in COMPLETE and "spec" in summary
    return summary if ok else None


def read_study_file(study_dir: Path, flag: str = "--out") -> StudyConfig:
    """The StudyConfig in ``study_dir/study.json``; a missing, malformed or foreign file is a
    ConfigError that says which."""
    path = study_dir / STUDY_FILE
    if not study_dir.is_dir():
        raise ConfigError(flag, f"{study_dir} is not a directory, so it holds no study")
    if not path.is_file():
        raise ConfigError(flag, f"{study_dir} holds no study (no {STUDY_FILE}); give the directory a study wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(flag, f"{path} is not valid JSON ({e}); it was not written by ntrl, or was damaged") from None
    keys = {f.name for f in dataclasses.fields(StudyConfig)}
    # a study file holds every key; one written before a key was added lacks only the newer ones
    if not isinstance(data, dict) or not set(data) <= keys or not {"name", "envs", "p0s", "lrs"} <= set(data):
        raise ConfigError(flag, f"{path} is not an ntrl study file (its keys are not a study's)")
    try:
        return StudyConfig.from_dict(data, str(path), flag)
    except ConfigError as e:
        raise ConfigError(flag, f"{path} is not a valid ntrl study file: {e}") from None


def is_study_dir(study_dir: Path) -> bool:
    """Whether ``study_dir`` was made by a study: it carries the study marker (a study.json
    alone does not make a folder a study)."""
    from ntrl.run_dirs import STUDY_KIND, marker_kind

    return marker_kind(study_dir) == STUDY_KIND


def removal_plan(out: Path) -> list[Path]:
    """What ``--force`` removes from the study in ``out``: the study file, the run directories
    ntrl made under runs/, the report files the study recorded in its marker, its W&B directory
    and the marker. Refuses (ConfigError), before anything is removed, when a run directory holds
    files ntrl did not write; nothing else in ``out`` is ever touched."""
    from ntrl.run_dirs import MARKER, RUN_KIND, WANDB_KIND, foreign_entries, marker_files, marker_kind

    plan: list[Path] = []
    runs = out / "runs"
    if runs.is_dir() and not runs.is_symlink():
        for child in sorted(runs.iterdir()):
            if child.is_dir() and not child.is_symlink() and marker_kind(child) == RUN_KIND:
                foreign = foreign_entries(child)
                if foreign:
                    raise ConfigError("--force", f"{child} holds {', '.join(foreign[:3])}, which ntrl did not write; "
                                                 f"move it away first (nothing was removed)")
                plan.append(child)
    for name in marker_files(out):
        target = out / name
        if target.is_file() and not target.is_symlink() and target.stat().st_nlink == 1:
            plan.append(target)
    wandb_dir = out / "wandb"
    if wandb_dir.is_dir() and not wandb_dir.is_symlink() and marker_kind(wandb_dir) == WANDB_KIND:
        plan.append(wandb_dir)
    plan += [out / n for n in (STUDY_FILE, MARKER) if (out / n).is_file() and not (out / n).is_symlink()]
    return plan


def remove_study_outputs(plan: list[Path], out: Path) -> None:
    """Remove what :func:`removal_plan` listed (and runs/ once it is empty): each directory, a run's
    or the W&B one, with its marker last (:func:`ntrl.run_dirs.remove_marked_dir`)."""
    from ntrl.run_dirs import RunDirLocks, remove_marked_dir

    RunDirLocks.reserve(sum(path.is_dir() for path in plan), "--force")  # a lock per run: a big study's thousands
    with RunDirLocks() as locks:
        for path in plan:  # none is removed while another process trains a run of it (a RunLocked first)
            if path.is_dir():
                locks.acquire(path, "--out")
        for path in plan:
            remove_marked_dir(path) if path.is_dir() else path.unlink()
    runs = out / "runs"
    if runs.is_dir() and not runs.is_symlink() and not any(runs.iterdir()):
        runs.rmdir()


def refuse_foreign_dir(out: Path) -> None:
    """A ConfigError unless ``out`` is absent, empty (but for ntrl's own lock and marker) or a
    study; its marker, lock or runs/ must not be symbolic links."""
    from ntrl.run_dirs import MARKER
    from ntrl.study.lock import LOCK_FILE

    if out.is_symlink() and not out.exists():
        raise ConfigError("--out", f"{out} is a dangling symbolic link; remove it or choose another directory")
    if not out.is_dir():
        return
    for name in (MARKER, LOCK_FILE, "runs", STUDY_FILE):
        if (out / name).is_symlink():
            raise ConfigError("--out", f"{out / name} is a symbolic link; ntrl does not write through links "
                                       f"(remove it, or choose another directory)")
    from ntrl.run_dirs import is_marker_leftover

    if (any(c.name not in (MARKER, LOCK_FILE) and not is_marker_leftover(c.name) for c in out.iterdir())
            and not is_study_dir(out)):
        raise ConfigError("--out", f"{out} is not empty and holds no ntrl study (no {MARKER} marker), so ntrl "
                                   f"will not write into it (not even with --force); choose a new or empty directory")


def prepare_study_dir(study: StudyConfig, out: Path, force: bool) -> Path:
    """Create or reopen a study directory, under its lock (taken by the caller).

    An empty or new directory becomes a study; a study of the same config is resumed; a study of
    a different config (or a damaged study file) is replaced only with ``force``, and only what
    it wrote is removed; a non-empty directory that is not a study is refused, with or without
    ``force``. Every check runs before anything is removed."""
    from ntrl.records import write_json_atomic
    from ntrl.run_dirs import MARKER, STUDY_KIND, inside, write_marker

    path = out / STUDY_FILE
    refuse_foreign_dir(out)
    inside(out / "runs", out)
    if path.exists() or path.is_symlink():
        try:
            old = read_study_file(out).to_dict()
        except ConfigError as e:
            if not force:
                raise ConfigError("--out", f"{e.message}; pass --force to replace that study") from None
            old = None
        if old != study.to_dict():
            if not force:
                changed = sorted(k for k in set(old) | set(study.to_dict()) if old.get(k) != study.to_dict().get(k))
                raise ConfigError("--out", f"{out} holds a study with a different config (differs in: {', '.join(changed)}); "
                                  "pass --force to replace it, or choose another --out")
            remove_study_outputs(removal_plan(out), out)
    if not (out / MARKER).exists():
        write_marker(out, STUDY_KIND)
    write_json_atomic(path, study.to_dict())
    (out / "runs").mkdir(exist_ok=True)
    return out


def open_study_dir(study: StudyConfig, out: Path, force: bool) -> contextlib.AbstractContextManager:
    """Check ``out``, create it, take its lock and prepare it; the lock is held until the returned
    context exits. A directory this call created is removed again if preparing it fails."""
    from ntrl.run_dirs import check_out_dir, made_dirs
    from ntrl.study.lock import study_lock

    check_out_dir(out)
    refuse_foreign_dir(out)  # before the lock file is made in it
    stack = contextlib.ExitStack()
    with made_dirs(out.absolute()):
        stack.enter_context(study_lock(out))
        try:
            prepare_study_dir(study, out, force)
        except BaseException:
            stack.close()
            raise
    return stack


def run_study(
    study: StudyConfig,
    out: str | os.PathLike,
    workers: int = 2,
    wandb_mode: str = "offline",
    force: bool = False,
    progress: bool = True,
    on_error: Callable[[RunSpec, BaseException], None] | None = None,
    verbose: bool = False,
    population: bool = True,
    device: str = "cpu",
    executor: str = "local",
    ray_address: str | None = None,
) -> list[tuple[RunSpec, dict[str, Any]]]:
    """Run (or resume) every run of the grid; return (spec, summary) for each completed run.

    Holds the study directory's lock throughout. Workers end with this process (however it
    ends); on Ctrl-C or SIGTERM the running runs are stopped and :class:`StudyInterrupted` says
    how many are complete."""
    from ntrl.study.ray_executor import ray_connected

    study.validate()
    out = Path(out)
    with ray_connected(executor, ray_address, workers, device, population), \
            open_study_dir(study, out, force):
        return run_grid(study, out, workers, wandb_mode, progress, on_error, verbose, population, device, executor,
                        ray_address)


@contextlib.contextmanager
def signals_held(block: bool = True) -> Iterator[list[int]]:
    """Hold SIGINT, SIGTERM and SIGHUP back for the body; each that arrives is raised again,
    under the handler of before, once the body is done. A second arrival of the same signal
    acts at once (the user asked twice: a clean-up that hangs can still be stopped). A signal
    this process ignores stays ignored. Yields the list of the signals noted so far.

    With ``block``, they are also blocked in this thread, so that a process the body starts
    inherits them blocked (``block=False`` where that would be wrong: ray.init, whose processes
    must stay stoppable). The mask alone would hold back only what the kernel gives this thread:
    a signal to the process goes to any thread that does not block it (Ray's C++ threads, a
    progress bar's monitor), and Python runs the handler in this thread all the same, inside the
    body (a SIGTERM so cut ray.shutdown short, and the driver crashed as it exited). So the body
    runs under handlers that note. The handlers of before are put back, and the mask restored,
    even where one of them runs meanwhile and raises (that is raised after)."""
    import signal
    import threading

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    arrived: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return
    old = {sig: handler for sig in sigs if (handler := signal.getsignal(sig)) not in (signal.SIG_IGN, None)}

    def note(signum: int, frame: Any) -> None:
        if signum not in arrived:
            arrived.append(signum)
            return
        arrived.remove(signum)  # the second: acted on now, once, and not again after the body
        if callable(old[signum]):
            old[signum](signum, frame)
        else:  # SIG_DFL: its default action, now
            signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
            signal.raise_signal(signum)

    old_mask = None
    try:
        if block:
            old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        for sig in old:
            signal.signal(sig, note)
        yield arrived
    finally:
        raised = None
        for _ in range(len(sigs) + 1):  # every handler put back, though one put back runs and raises meanwhile
            try:
                for sig, handler in old.items():
                    if signal.getsignal(sig) is not handler:
                        signal.signal(sig, handler)
                break
            except BaseException as e:  # once per signal at most; anything else again and again is raised
                raised = raised or e
        try:
            for sig in dict.fromkeys(arrived):  # pending until the mask is restored, where it blocks them
                signal.raise_signal(sig)
        except BaseException as e:
            raised = raised or e
        finally:
            if old_mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        if raised is not None:
            raise raised


def progress_line(study: StudyConfig, study_dir: Path) -> str:
    """"K of M runs complete; re-run the same command to resume", counted on disk as a resume
    would count them."""
    specs = enumerate_runs(study)
    k = sum(completed_summary(study_dir / "runs" / s.run_id) is not None for s in specs)
    return f"{k} of {len(specs)} runs complete; re-run the same command to resume"


def run_grid(study: StudyConfig, out: Path, workers: int = 2, wandb_mode: str = "offline", progress: bool = True,
             on_error: Callable[[RunSpec, BaseException], None] | None = None,
             verbose: bool = False, population: bool = True, device: str = "cpu",
             executor: str = "local", ray_address: str | None = None) -> list[tuple[RunSpec, dict[str, Any]]]:
    """The grid's work units (population chunks and single runs, see :func:`work_units`) on
    ``executor``: "local", a process pool of ``workers`` (:func:`local_unit_results`), or "ray"
    (:func:`ntrl.study.ray_executor.ray_unit_results`, at ``ray_address`` or on a local Ray
    instance of ``workers`` CPUs), in a study directory already opened (and locked) by
    :func:`open_study_dir`; see :func:`run_study`."""
    runs_dir = out / "runs"
    specs = enumerate_runs(study)
    done: dict[RunSpec, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        s = completed_summary(runs_dir / spec.run_id)
        if s is not None:
            done[spec] = s
        else:
            todo.append(spec)
    stack, slots = contextlib.ExitStack(), workers
    if executor == "ray":  # connected before the bar and the units: a chunk per CPU of the cluster
        from ntrl.study.ray_executor import ray_connected, ray_cpus

        stack.enter_context(ray_connected(executor, ray_address, workers, device, population))
        slots = ray_cpus(workers)
    with stack:
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(specs), initial=len(done), desc=f"{study.name} runs", unit="run", file=sys.stderr,
                       dynamic_ncols=True)
        failures = []
        pool = None
        if executor == "local" and todo:  # its workers import while the units are planned
            pool = start_local_pool(workers, wandb_mode, len(todo))
            stack.callback(close_pool, pool, True)  # if it is not shut down by then (an error, Ctrl-C)
        # Ray: sized in this machine's memory; a task's population checks its own device's before it trains
        units = work_units(study, todo, runs_dir, slots, population, device=device if executor == "local" else "cpu")
        runs_progress = RunsProgress(runs_dir, [s for _, unit in units for s in unit], bar) if bar is not None else None
        wandb_parent = None
        if wandb_mode != "disabled" and any(kind == "population" for kind, _ in units):
            from ntrl.run_dirs import ntrl_wandb_dir

            wandb_parent = str(out) if ntrl_wandb_dir(out) is not None else None
        if units:
            if executor == "ray":
                from ntrl.study.ray_executor import ray_unit_results

                results = ray_unit_results(study, units, out, slots, wandb_mode, verbose, device, wandb_parent)
            else:  # the workers write their runs here as they go: the bar counts each as it stops
                results = local_unit_results(study, units, runs_dir, workers, wandb_mode, verbose, device, wandb_parent,
                                             heartbeat=runs_progress.poll if runs_progress is not None else None,
                                             pool=pool)
            interrupted = False
            try:
                with contextlib.closing(results):
                    for unit, result in results:
                        for spec, (_, summary, error) in zip(unit, result):
                            if summary is not None:
                                done[spec] = summary
                            else:
                                e = error if isinstance(error, BaseException) else TrainingError(error)
                                failures.append((spec, e))
                                if on_error is not None:
                                    on_error(spec, e)
                        if runs_progress is not None:
                            runs_progress.unit_done(unit)
                raise_if_swallowed()  # in the last wait, or as the last unit's results were taken
            except KeyboardInterrupt:
                interrupted = True
            if interrupted:
                if bar is not None:
                    bar.close()
                raise StudyInterrupted(progress_line(study, out))
        if bar is not None:
            bar.close()
        if failures:
            spec, e = failures[0]
            raise StudyIncomplete(f"{len(failures)} run(s) failed, first {spec.run_id}: {e}; "
                                  "completed runs are kept, re-run the same command to retry the rest")
        return [(spec, done[spec]) for spec in specs if spec in done]


UnitResult = list[tuple[dict[str, Any], "dict[str, Any] | None", "BaseException | str | None"]]


class RunsProgress:
    """The study's progress bar, counting runs as they finish: a unit's runs when it returns
    (:meth:`unit_done`), and before that (:meth:`poll`, the executor's heartbeat) each run of a
    unit still training whose complete summary has appeared since the study began, as a
    population's members write theirs when they stop. Each run counts once. While few cells are
    left, the bar names them and how many of their runs are still to finish."""

    CELLS_NAMED = 3  # name the cells left while there are at most this many

    def __init__(self, runs_dir: Path, specs: list[RunSpec], bar: Any) -> None:
        self.runs_dir, self.bar = runs_dir, bar
        # runs still to finish (none of them had a complete summary when the study began: those
        # are done and not in any unit)
        self.left: dict[str, RunSpec] = {s.run_id: s for s in specs}
        self.incomplete: dict[str, int] = {}  # the mtime of each summary read and found incomplete
        self._name_cells()

    def poll(self) -> None:
        """Count the runs still to finish whose complete summary is now there (a former
        attempt's incomplete one is not: :func:`completed_summary`; it is read again only once
        its file has changed)."""
        done = []
        for run_id in self.left:
            try:
                mtime = (self.runs_dir / run_id / "summary.json").stat().st_mtime_ns
            except OSError:
                continue
            if self.incomplete.get(run_id) == mtime:
                continue
            if completed_summary(self.runs_dir / run_id) is not None:
                done.append(run_id)
            else:
                self.incomplete[run_id] = mtime
        self._count(done)

    def unit_done(self, unit: list[RunSpec]) -> None:
        """A unit returned: its runs not counted yet count now."""
        self._count([s.run_id for s in unit if s.run_id in self.left])

    def _count(self, run_ids: list[str]) -> None:
        for run_id in run_ids:
            del self.left[run_id]
        if run_ids:
            self._name_cells()
            self.bar.update(len(run_ids))

    def _name_cells(self) -> None:
        cells: dict[tuple, int] = {}
        for spec in self.left.values():
            cells[spec.cell] = cells.get(spec.cell, 0) + 1
        text = "; ".join(f"{' '.join(cell)}: {n} left" for cell, n in cells.items()) \
            if 0 < len(cells) <= self.CELLS_NAMED else ""
        self.bar.set_postfix_str(text, refresh=False)


HEARTBEAT_SECONDS = 2.0  # how often a study looks for runs finished inside units still training


def in_flight(units: list[tuple[str, list[RunSpec]]], slots: int, submit: Callable[[str, list[RunSpec]], Any],
              wait_some: Callable[[set, float], tuple[set, set]],
              heartbeat: Callable[[], None] | None = None) -> Iterator[tuple[Any, list[RunSpec]]]:
    """Keep ``slots`` units submitted at a time (a huge grid neither starts nor stops all at
    once): ``submit(kind, unit)`` gives a handle, ``wait_some(pending, timeout)`` the (finished,
    pending) handles, none finished when ``timeout`` seconds (:data:`HEARTBEAT_SECONDS`) pass first; yields
    (handle, unit) per finished unit, after submitting the next. ``heartbeat()``, where given, is
    called about every :data:`HEARTBEAT_SECONDS`, whether or not units finish meanwhile (the study's
    progress bar counts a population's members as they stop, :class:`RunsProgress`). Between waits
    an interrupt that a library swallowed is raised again (:func:`ntrl.termination.raise_if_swallowed`)."""
    queue, owner, pending = iter(units), {}, set()
    last_beat = time.monotonic()

    def submit_next() -> None:
        kind, unit = next(queue, (None, None))
        if unit is not None:
            handle = submit(kind, unit)
            owner[handle] = unit
            pending.add(handle)

    for _ in range(slots):
        submit_next()
    while pending:
        raise_if_swallowed()  # the driver stops now, not when the last unit is done
        finished, rest = wait_some(pending, HEARTBEAT_SECONDS)
        pending.clear()
        pending.update(rest)
        if heartbeat is not None and (not finished or time.monotonic() - last_beat >= HEARTBEAT_SECONDS):
            heartbeat()
            last_beat = time.monotonic()
        for handle in finished:
            submit_next()
            yield handle, owner.pop(handle)


def warm_worker(parent_pid: int, wandb_mode: str) -> None:
    """Initializer of a local study worker: :func:`ntrl.study.lock.worker_init`, then the imports
    every unit makes (torch, the population and per-run training code; W&B, and its service
    process, where the study logs to W&B: about 2 s in all), so that a worker started while the
    study plans its units (:func:`start_local_pool`) has them done when its first unit comes. An
    import or a W&B start-up that fails here is left to fail in the unit, which reports it (an
    initializer's error would break the whole pool)."""
    from ntrl.study.lock import worker_init

    worker_init(parent_pid)
    try:
        import importlib

        for module in ("ntrl.population", "ntrl.train"):
            importlib.import_module(module)
        if wandb_mode != "disabled":
            import wandb

            wandb.setup()
    except Exception:
        pass


def start_local_pool(workers: int, wandb_mode: str, start: int) -> ProcessPoolExecutor:
    """The local executor's process pool of ``workers`` (spawned, each initialised by
    :func:`warm_worker`), ``start`` of them (at most ``workers``) started now: a spawning pool
    starts a worker per task submitted while none is idle, so one no-op task each. Started before
    the study plans its units, the workers' imports run meanwhile (in one instrumented run of
    ``ntrl rarity --quick`` before and after, its longest chunk set up in 1.3 s instead of 2.3 s
    and ended 1.7 s sooner after the command started)."""
    import multiprocessing as mp

    pool = ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn"),
                               initializer=warm_worker, initargs=(os.getpid(), wandb_mode))
    try:
        # no Ctrl-C or SIGTERM halfway through starting a worker (one started but not yet known to
        # the pool would not be stopped); they arrive once the worker is known, and stop it
        with signals_held():
            for _ in range(min(start, max(1, workers))):
                pool.submit(int)
    except BaseException:
        close_pool(pool, kill=True)
        raise
    return pool


def close_pool(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Shut ``pool`` down: with ``kill``, its running workers killed and its queued tasks dropped
    (nothing when it was shut down already); else once every task is done."""
    if kill:
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
        pool.shutdown(wait=False, cancel_futures=True)
    else:
        pool.shutdown(wait=True)


def local_unit_results(study: StudyConfig, units: list[tuple[str, list[RunSpec]]], runs_dir: Path, workers: int,
                       wandb_mode: str, verbose: bool, device: str, wandb_parent: str | None,
                       heartbeat: Callable[[], None] | None = None,
                       pool: ProcessPoolExecutor | None = None) -> Iterator[tuple[list[RunSpec], UnitResult]]:
    """The local executor: the units in a process pool of ``workers`` (``pool``, from
    :func:`start_local_pool`, or one started here), each unit's (spec, summary, error) per run as
    it finishes. The workers write their runs into ``runs_dir`` themselves and end with this
    process; when the consumer stops early (Ctrl-C, SIGTERM, an error) the running ones are
    killed and the queued ones dropped. ``heartbeat``: see :func:`in_flight`."""
    if pool is None:
        pool = start_local_pool(workers, wandb_mode, 0)
    study_dict = study.to_dict()

    def submit(kind: str, unit: list[RunSpec]):
        with signals_held():  # as start_local_pool's
            if kind == "population":
                return pool.submit(run_chunk, study_dict, [asdict(s) for s in unit], str(runs_dir),
                                   wandb_mode, verbose, device, wandb_parent, os.getpid())
            return pool.submit(run_one, study_dict, asdict(unit[0]), str(runs_dir), wandb_mode, os.getpid(), verbose)

    def wait_some(pending: set, timeout: float) -> tuple[set, set]:
        finished, rest = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
        return set(finished), set(rest)

    stopped = True
    try:
        for fut, unit in in_flight(units, 2 * max(1, workers), submit, wait_some, heartbeat):
            try:
                result = fut.result()
            except Exception as e:  # a failed unit is reported; the others go on
                result = [(asdict(s), None, e) for s in unit]
            if isinstance(result, dict):  # a single run's summary
                result = [(asdict(unit[0]), result, None)]
            yield unit, result
        stopped = False
    finally:  # stopped early: the running runs stopped, the queued ones dropped
        close_pool(pool, kill=stopped)
