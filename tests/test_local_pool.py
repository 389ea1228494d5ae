"""The local executor's pool starts its workers before the study plans its units, so that their
imports (torch, the training code, W&B's service) run meanwhile; and it leaves no worker behind
when the study stops before the units run."""

from __future__ import annotations

import sys

import time

import pytest

from ntrl.config import ConfigError
from ntrl.study import StudyConfig, run_study
from ntrl.study import executor


def tiny_study() -> StudyConfig:
    return StudyConfig(name="t", policies=["single_logit"], optimizers=["sgd"], p0s=[0.05], seeds=1,
                       directions=["rewarded"], track_every=50).validate()


def capture_pools(monkeypatch) -> list:
    pools = []
    start = executor.start_local_pool

    def recording(*args, **kwargs):
        pools.append(start(*args, **kwargs))
        return pools[-1]

    monkeypatch.setattr(executor, "start_local_pool", recording)
    return pools


def test_the_workers_start_before_the_units_are_planned(tmp_path, monkeypatch):
    """When the units are planned, the pool's workers (as many as there are workers, or runs if
    fewer) are already started; the study then runs its units in that same pool."""
    pools = capture_pools(monkeypatch)
    started_when_planned = []
    plan = executor.work_units

    def planning(*args, **kwargs):
        started_when_planned.append(len(pools[-1]._processes) if pools else 0)
        return plan(*args, **kwargs)

    monkeypatch.setattr(executor, "work_units", planning)
    results = run_study(tiny_study(), tmp_path / "two", workers=2, wandb_mode="disabled", progress=False)
    assert len(results) == 1 and len(pools) == 1
    assert started_when_planned == [1]  # one run: one worker started, not two
    study = StudyConfig(name="t", policies=["single_logit"], optimizers=["sgd", "sign"], p0s=[0.05], seeds=1,
                        directions=["rewarded"], track_every=50).validate()
    results = run_study(study, tmp_path / "more", workers=2, wandb_mode="disabled", progress=False)
    assert len(results) == 2 and len(pools) == 2
    assert started_when_planned == [1, 2]


def test_a_study_stopped_while_planning_leaves_no_worker(tmp_path, monkeypatch):
    """An error (or Ctrl-C) while the units are planned ends the workers already started."""
    pools = capture_pools(monkeypatch)
    processes = []

    def failing(*args, **kwargs):
        processes.extend(pools[-1]._processes.values())
        raise ConfigError("--config", "planned to fail")

    monkeypatch.setattr(executor, "work_units", failing)
    with pytest.raises(ConfigError, match="planned to fail"):
        run_study(tiny_study(), tmp_path, workers=2, wandb_mode="disabled", progress=False)
    assert len(pools) == 1 and len(processes) == 1
    assert all_ended(processes)


def test_a_failing_import_in_the_warm_up_is_left_to_the_unit(monkeypatch):
    """The warm-up never raises (an initializer's error would break every unit of the pool): an
    import that fails there fails again in the unit, which reports it."""
    import ntrl.study.lock

    monkeypatch.setattr(ntrl.study.lock, "worker_init", lambda parent_pid: None)
    monkeypatch.setitem(sys.modules, "ntrl.train", None)  # importing it raises ImportError
    executor.warm_worker(0, "disabled")


def test_a_signal_while_the_workers_start_stops_them(monkeypatch):
    """A Ctrl-C or SIGTERM held back while the workers start arrives as the pool is returned: the
    workers started are stopped, not left to finish their imports."""
    import contextlib

    started = []
    pool_class = executor.ProcessPoolExecutor

    class Recording(pool_class):
        def submit(self, *args, **kwargs):
            future = super().submit(*args, **kwargs)
            started.extend(p for p in self._processes.values() if p not in started)
            return future

    @contextlib.contextmanager
    def held_then_raised():
        yield []
        raise KeyboardInterrupt

    monkeypatch.setattr(executor, "ProcessPoolExecutor", Recording)
    monkeypatch.setattr(executor, "signals_held", held_then_raised)
    with pytest.raises(KeyboardInterrupt):
        executor.start_local_pool(2, "disabled", 2)
    assert len(started) == 2
    assert all_ended(started)


def all_ended(processes, timeout: float = 30.0) -> bool:
    """Whether every process has ended within ``timeout`` s, by the kernel's account (gone, or a
    zombie not yet reaped). Not Process.is_alive(): the pool's manager thread reaps the killed
    workers too, and a waitpid that loses that race gets ECHILD, which multiprocessing reads as
    "still running"."""
    deadline = time.monotonic() + timeout
    while not all(process_ended(proc.pid) for proc in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return all(process_ended(proc.pid) for proc in processes)


def process_ended(pid: int) -> bool:
    """Whether process ``pid`` has exited (it is gone, or a zombie), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
        return True
