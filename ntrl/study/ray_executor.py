"""The rarity study on Ray (``ntrl rarity --executor ray``): the study's work units as Ray tasks.

* **Work units** are the local executor's (:func:`ntrl.study.executor.work_units`): population
  chunks and single runs, one CPU each.
* **Results travel, files do not.** A task trains its unit in a temporary directory of the machine
  it runs on, with W&B off, and returns the records and summary of each of its runs
  (:func:`ray_unit`). The driver writes them into ``STUDY_DIR/runs/`` as they arrive, summary last
  (:func:`write_unit`), so a cluster needs no shared filesystem and the driver is the only process
  that writes into the study directory.
* **W&B**: the driver logs each unit's W&B run from the returned records
  (:func:`ntrl.train.log_finished_run`, :func:`ntrl.population.trainer.log_finished_population`):
  the same runs, histories, tables and artifacts as the local executor's, made on the driver's
  machine (workers need neither a W&B login nor network).
* **Faults**: a worker process that dies mid-unit (SIGKILL, out of memory, a lost node) is retried
  by Ray, up to :data:`MAX_RETRIES` times; the retry trains the unit again from its seeds, so its
  records are the ones the first try would have returned. An error inside a unit is not retried:
  it comes back with the unit's files and is reported once, as the local executor reports it.
* **Kills and resume**: the driver holds the study's lock, as the local executor does, and a run
  counts as complete once its summary is written, so a killed driver resumes where it stopped. A
  local Ray instance the driver started ends with it (``ray.shutdown()``, and
  :mod:`ntrl.study.reaper` for a SIGKILL); a cluster given by ``--ray-address`` is left running,
  and Ray stops the tasks of a driver that is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from ntrl.config import ConfigError
from ntrl.records import CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, write_bytes_atomic, write_json_atomic
from ntrl.study.executor import (
    UnitResult, chunk_wandb_run, in_flight, run_chunk, run_one, signals_held,
)
from ntrl.study.grid import RunSpec, StudyConfig, train_config_for

MAX_RETRIES = 3  # tries after the first, for a unit whose worker process died
UNIT_DIR_PREFIX = "ntrl-ray-unit-"  # a task's temporary directory: ntrl-ray-unit-<pid>-<random>
UNIT_DIR_MARKER = ".ntrl-ray-unit"
INSTALL_HINT = "pip install 'ntrl[ray]' (in a checkout: .venv/bin/pip install -e '.[ray]')"


def require_ray():
    """The ray module, or a ConfigError that says how to install it.

    ntrl's driver handles SIGTERM itself (records kept, one line, exit 143), so in this process
    ray.init installs no SIGTERM handler of its own, and the signal waits until ray.init returns
    (:func:`signals_deferred`). Left to itself, ray.init installs two: a Python one that calls
    ``sys.exit`` wherever ray.init then is (a SIGTERM after its core worker started left that worker
    half set up, and the driver crashed as it exited, exit -11), and Ray's C++ failure-signal
    handler (a C++ stack, then abort, -6). In stress runs 10 of 54 SIGTERMs sent 2.5 to 6 s into a
    study's start ended so (6 of 24 aimed at ray.init's last moments), and none of the same 54 since
    (benchmarks/stress_ray_signals.py). The C++ handler covers the fatal signals too (SIGSEGV,
    SIGABRT, ...): Python's faulthandler prints the driver's Python stack for those instead. This
    lasts for the process (a later ray.init in it is the same); Ray's own processes import Ray
    afresh and keep both handlers."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor", f"ray needs the optional extra, which is not installed: {INSTALL_HINT}") from None
    import faulthandler
    import importlib

    try:
        constants = importlib.import_module("ray._private.ray_constants")
        utils = importlib.import_module("ray._private.utils")
    except ImportError:  # another Ray's layout: its handlers stay; signals_deferred still catches its SystemExit
        return ray
    if hasattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER"):  # read by ray.init as it connects
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
        if not faulthandler.is_enabled():
            faulthandler.enable()
    if callable(getattr(utils, "set_sigterm_handler", None)):  # called by ray.init, in the main thread
        utils.set_sigterm_handler = _keep_ntrls_sigterm_handler
    return ray


def _keep_ntrls_sigterm_handler(handler: Any) -> None:
    """What ``ray._private.utils.set_sigterm_handler`` does in ntrl's driver: nothing (see
    :func:`require_ray`)."""


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A ConfigError unless a gRPC server (what a Ray cluster's GCS and Ray Client speak) answers
    at ``address`` (``auto``: :func:`resolve_ray_address`; ``[ray://]HOST:PORT``), checked before
    anything is written, with one connection that sends HTTP/2's preface and waits for the
    server's SETTINGS frame: ray.init waits for minutes where nothing, or something else (a web
    server, the dashboard's port), listens."""
    import socket

    target = resolve_ray_address(address)
    if target == "auto":
        return
    host, _, port = target.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError("--ray-address", f"must be auto or HOST:PORT, got {address!r}")
    head = b""
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as conn:
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
            while len(head) < 9:
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        pass  # silent: judged below
    except OSError as e:
        raise ConfigError("--ray-address", f"no Ray cluster answers at {target} ({e.strerror or e}); start one "
                                           f"with `ray start --head`, or give the address it printed") from None
    if len(head) < 9 or head[3] != 4:  # not a frame header of type SETTINGS
        raise ConfigError("--ray-address", f"something answers at {target}, but not a Ray cluster (no gRPC); give "
                                           f"the address `ray start --head` printed (its GCS port, 6379 by default)")


# ---------------------------------------------------------------------------------- on the worker
def ray_unit(study_dict: dict[str, Any], kind: str, spec_dicts: list[dict[str, Any]], verbose: bool = False,
             device: str = "cpu") -> list[tuple[dict[str, Any], dict[str, bytes] | None, str | None]]:
    """A Ray task: train one work unit ("population" chunk or single "run") in a temporary
    directory of this machine, W&B off, and return (spec, files, error) per run: files maps
    records.jsonl and summary.json to their bytes (None when the run left none), error is the
    text of what stopped it (None when it completed). The directory is removed before returning."""
    remove_stale_unit_dirs()
    tmp = Path(tempfile.mkdtemp(prefix=f"{UNIT_DIR_PREFIX}{os.getpid()}-"))
    try:
        (tmp / UNIT_DIR_MARKER).write_text(f"{os.getpid()}\n")
        runs_dir = tmp / "runs"
        runs_dir.mkdir()
        errors: dict[int, str] = {}
        try:
            if kind == "population":
                returned = run_chunk(study_dict, spec_dicts, str(runs_dir), "disabled", verbose, device)
                errors = {i: error_text(e) for i, (_, _, e) in enumerate(returned) if e is not None}
            else:
                run_one(study_dict, spec_dicts[0], str(runs_dir), "disabled", None, verbose)
        except Exception as e:  # the unit's own error: reported, not retried
            errors = {i: error_text(e) for i in range(len(spec_dicts))}
        out = []
        for i, d in enumerate(spec_dicts):
            run_dir = runs_dir / RunSpec(**d).run_id
            files = {name: (run_dir / name).read_bytes() for name in (RECORDS_FILE, SUMMARY_FILE)
                     if (run_dir / name).is_file()}
            out.append((d, files or None, errors.get(i)))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def error_text(e: BaseException | str) -> str:
    return e if isinstance(e, str) else (str(e) or type(e).__name__)


def remove_stale_unit_dirs() -> None:
    """Remove the temporary directories of this machine's tasks whose process is gone (a worker
    killed mid-unit leaves its directory); only directories that carry ntrl's unit marker."""
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{UNIT_DIR_PREFIX}*"):
        try:
            pid = int(path.name[len(UNIT_DIR_PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        if path.is_symlink() or not (path / UNIT_DIR_MARKER).is_file() or pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# ---------------------------------------------------------------------------------- on the driver
def write_unit(study: StudyConfig, unit: list[RunSpec], kind: str,
               returned: list[tuple[dict[str, Any], dict[str, bytes] | None, str | None]], runs_dir: Path,
               wandb_mode: str, wandb_parent: str | None) -> UnitResult:
    """Write a returned unit into the study's ``runs_dir``, as the local executor's workers would
    have written it: each run's directory, marker, config, records and, last, its summary (with
    this machine's paths, and its W&B run logged from the records when W&B is on), each run's
    directory locked until its summary is written (:class:`ntrl.run_dirs.RunDirLocks`). Returns
    (spec, summary, error) per run, as the local executor does."""
    from ntrl.run_dirs import RunDirLocks

    with RunDirLocks() as locks:
        return _write_unit(study, unit, kind, returned, runs_dir, wandb_mode, wandb_parent, locks)


def _write_unit(study: StudyConfig, unit: list[RunSpec], kind: str,
                returned: list[tuple[dict[str, Any], dict[str, bytes] | None, str | None]], runs_dir: Path,
                wandb_mode: str, wandb_parent: str | None, locks: Any) -> UnitResult:
    from ntrl.population.trainer import log_finished_population
    from ntrl.train import log_finished_run, prepare_run_dir

    results: list[Any] = [None] * len(unit)
    arrived = []  # (index, config, summary) of the runs whose files came back
    for i, (spec, (d, files, error)) in enumerate(zip(unit, returned)):
        if not files:
            results[i] = (d, None, error or "the unit returned no files")
            continue
        config = train_config_for(study, spec, runs_dir, wandb_mode)
        try:
            with signals_held():  # a run's directory is written whole, or left for a resume to replace
                run_dir = prepare_run_dir(config, locks)  # refuses a directory ntrl did not make, as a worker would
                write_json_atomic(run_dir / CONFIG_FILE, config.to_dict())
                if RECORDS_FILE in files:
                    write_bytes_atomic(run_dir / RECORDS_FILE, files[RECORDS_FILE])
        except (ConfigError, OSError) as e:
            results[i] = (d, None, e)
            continue
        summary = json.loads(files[SUMMARY_FILE]) if SUMMARY_FILE in files else None
        if summary is None:
            results[i] = (d, None, error or "the run left no summary")
            continue
        summary.update(records=str(run_dir / RECORDS_FILE), wandb_dir=None, wandb_mode="disabled")
        arrived.append((i, config, summary))
    if wandb_mode != "disabled" and kind == "population" and arrived:
        name, wandb_config = chunk_wandb_run(study, unit)  # the whole chunk's, as its worker names it
        summaries = log_finished_population([c for _, c, _ in arrived], [s for _, _, s in arrived],
                                            wandb_parent, name, wandb_config)
    elif wandb_mode != "disabled":
        summaries = [log_finished_run(c, Path(c.out) / c.run_name, s) for _, c, s in arrived]
    else:
        summaries = [s for _, _, s in arrived]
        for (_, c, s) in arrived:
            write_json_atomic(Path(c.out) / c.run_name / SUMMARY_FILE, s)
    for (i, _, _), summary in zip(arrived, summaries):
        d, _, error = returned[i]
        results[i] = (d, None, error) if error is not None else (d, summary, None)
    return results


def task_error_text(e: BaseException) -> str:
    """What ended a Ray task: the task's own error (not retried), or what Ray says (a task whose
    every try lost its worker, a raylet that died, ...)."""
    import ray

    if isinstance(e, ray.exceptions.RayTaskError) and getattr(e, "cause", None) is not None:
        return f"{type(e.cause).__name__}: {error_text(e.cause)}"
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return (f"{type(e).__name__}: {lines[0] if lines else ''} (Ray tries a unit whose worker dies up to "
            f"{MAX_RETRIES + 1} times)")


def connection_error_text(e: BaseException) -> str:
    """Why ray.init could not connect, with what to do: the first line of Ray's error, and for a
    missing or wrong token (the cause is often a few exceptions deep) how to give one."""
    chain, texts = e, []
    while chain is not None and len(texts) < 8:
        texts.append(str(chain))
        chain = chain.__cause__ or chain.__context__
    if any("AuthToken" in t or "Authentication token" in t for t in texts):
        return ("the cluster asks for its authentication token (Ray's default); set RAY_AUTH_MODE=token, with the "
                "cluster's token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
    lines = [line for line in texts[0].strip().splitlines() if line.strip()]
    return f"{lines[0][:300] if lines else type(e).__name__} (start one with `ray start --head`)"


@contextlib.contextmanager
def ray_connected(executor: str, address: str | None, workers: int, device: str = "cpu",
                  population: bool = True) -> Iterator[None]:
    """For ``executor`` "ray": connected to Ray for the body (:func:`ray_session`), unless
    already connected, with the GPU that ``device`` asks for (:func:`population_gpus`; only
    population chunks take one: without ``population`` every run trains on the CPU); nothing for
    "local"."""
    if executor != "ray":
        yield
        return
    ray = require_ray()
    device = device if population else "cpu"
    if ray.is_initialized():
        population_gpus(device)
        yield
        return
    with ray_session(address, workers):
        population_gpus(device)
        yield


def population_gpus(device: str) -> int:
    """GPUs a population chunk's task asks Ray for (Ray hides the GPUs from a task that asks for
    none): 1 for ``--device cuda``, refused (ConfigError) where the cluster has none; 1 for
    ``auto`` where the cluster has one, else 0; 0 for cpu. Single runs train on CPU and ask for none."""
    import ray

    have = ray.cluster_resources().get("GPU", 0)
    if device == "cuda" and have < 1:
        raise ConfigError("--device", "cuda was asked for, but the Ray cluster has no GPU (`ray status` lists its "
                                      "resources); use --device cpu or auto")
    return 1 if device != "cpu" and have >= 1 else 0


@contextlib.contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[None]:
    """Connect to the Ray cluster at ``address`` (``auto``: :func:`resolve_ray_address`), or start
    a local instance of ``workers`` CPUs that ends with this process (:func:`start_local_ray`)."""
    ray = require_ray()
    reaper = None
    if address is None:
        reaper = start_local_ray(ray, workers)
    else:
        try:
            with signals_deferred():
                ray.init(address=resolve_ray_address(address), logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError("--ray-address", f"cannot connect to the Ray cluster at {address}: "
                                               f"{connection_error_text(e)}") from None
    try:
        yield
    finally:
        with signals_held():  # a Ctrl-C or SIGTERM now would cut the clean-up short: it comes after
            ray.shutdown()
            if reaper is not None:
                from ntrl.study.reaper import stop_reaper

                stop_reaper(reaper)
                remove_stale_unit_dirs()  # those of the tasks that shutdown stopped midway, on this machine


def start_local_ray(ray, workers: int):
    """Start a local Ray instance of ``workers`` CPUs (a new one, even where RAY_ADDRESS names a
    cluster) and the reaper that ends its processes with this process (:mod:`ntrl.study.reaper`);
    returns the reaper. On any failure or interrupt meanwhile, what was started is ended again."""
    from ntrl.study.reaper import become_subreaper, start_reaper, stop_reaper

    become_subreaper()
    reaper = start_reaper(os.path.dirname(ray.__file__))
    try:
        with signals_deferred():
            ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level=logging.ERROR)
    except BaseException:
        with contextlib.suppress(Exception):
            ray.shutdown()
        stop_reaper(reaper)
        raise
    return reaper


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the body (ray.init) is done, then act as ntrl's
    handlers say: raised inside ray.init they can crash its threads or be swallowed by a fork
    callback (:func:`ntrl.study.executor.signals_held`, without a blocked mask, which Ray's
    processes would inherit). A SIGTERM handler that ray.init installs after all
    (:func:`require_ray` keeps it from doing so; a Ray that did it some other way) is replaced
    by ntrl's again, and its ``SystemExit`` taken as the SIGTERM it stands for."""
    with signals_held(block=False) as arrived:
        try:
            yield
        except SystemExit as e:
            if e.code != signal.SIGTERM:
                raise
            arrived.append(signal.SIGTERM)


def resolve_ray_address(address: str) -> str:
    """``auto``: RAY_ADDRESS, else the address that ``ray start`` noted on this machine (never just
    any Ray process running here, such as another study's local instance, which Ray's own ``auto``
    would join); other addresses as given. A ConfigError when ``auto`` finds none."""
    if address.strip() != "auto":
        return address.strip()
    found = os.environ.get("RAY_ADDRESS", "").strip()
    if not found:
        try:
            from ray._private.services import find_bootstrap_address  # reads the file `ray start` writes
        except ImportError:  # moved in another Ray: ray.init will say it
            return "auto"
        found = find_bootstrap_address(None) or ""
    if not found:
        raise ConfigError("--ray-address", "auto finds no Ray cluster started on this machine with `ray start` (nor "
                                           "RAY_ADDRESS); start one with `ray start --head`, or give HOST:PORT")
    return found


def ray_cpus(default: int) -> int:
    """The CPUs of the Ray cluster this process is connected to (``default`` if it says none)."""
    ray = require_ray()
    return max(1, int(ray.cluster_resources().get("CPU", default)))


def ray_unit_results(study: StudyConfig, units: list[tuple[str, list[RunSpec]]], out: Path, cpus: int,
                     wandb_mode: str, verbose: bool, device: str,
                     wandb_parent: str | None) -> Iterator[tuple[list[RunSpec], UnitResult]]:
    """The Ray executor, on the cluster this process is connected to (:func:`ray_connected`):
    the units as Ray tasks, two per CPU (``cpus``) in flight, each unit's (spec, summary, error)
    per run once the driver has written it (:func:`write_unit`). Stopped early (Ctrl-C, SIGTERM,
    an error), the tasks end with the session: ray.shutdown stops a local instance, and a cluster
    stops the tasks of a driver that has gone (ray.cancel is not used: cancelling a task as it
    completes trips a check in Ray's core worker, ray 2.60)."""
    ray = require_ray()
    runs_dir = out / "runs"
    study_dict = study.to_dict()
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(ray_unit)
    gpus = population_gpus(device) if any(kind == "population" for kind, _ in units) else 0
    kinds = {}

    def submit(kind: str, unit: list[RunSpec]):
        ref = task.options(num_gpus=gpus if kind == "population" else 0).remote(
            study_dict, kind, [asdict(s) for s in unit], verbose, device)
        kinds[ref] = kind
        return ref

    def wait_some(pending: set, timeout: float) -> tuple[set, set]:
        ready, rest = ray.wait(list(pending), num_returns=1, timeout=timeout)
        return set(ready), set(rest)

    for ref, unit in in_flight(units, 2 * cpus, submit, wait_some):
        try:
            returned = ray.get(ref)
        except ray.exceptions.RayError as e:
            returned = [(asdict(s), None, task_error_text(e)) for s in unit]
        try:
            result = write_unit(study, unit, kinds.pop(ref), returned, runs_dir, wandb_mode, wandb_parent)
        except Exception as e:  # a full disk, W&B's files: this unit fails, as a local worker's would
            result = [(asdict(s), None, e) for s in unit]
        yield unit, result
