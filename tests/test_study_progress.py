"""The study's progress bar counts runs as they finish, a population's members included, not a
whole chunk at once when it returns (a chunk of a `--full` study trains for up to half an hour)."""

from __future__ import annotations

import json
import os

from ntrl.study import StudyConfig, enumerate_runs, run_study
from ntrl.study import executor
from ntrl.study.executor import HEARTBEAT_SECONDS, RunsProgress, in_flight


class FakeBar:
    def __init__(self) -> None:
        self.n, self.postfix = 0, ""

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text


def test_in_flight_beats_while_no_unit_finishes():
    units = [("run", [f"u{i}"]) for i in range(3)]
    timeouts, beats, polls = [], [], iter([0, 0, 1, 0, 1, 1])  # 1: one unit finishes

    def wait_some(pending, timeout):
        timeouts.append(timeout)
        if next(polls):
            first = min(pending)
            return {first}, pending - {first}
        return set(), set(pending)

    handles = iter(range(100))
    done = [unit for _, unit in in_flight(units, 2, lambda kind, unit: next(handles), wait_some,
                                          heartbeat=lambda: beats.append(1))]
    assert sorted(u[0] for u in done) == ["u0", "u1", "u2"]
    assert len(beats) == 3 and set(timeouts) == {HEARTBEAT_SECONDS}
    # without a heartbeat too the executor waits a heartbeat at a time: between waits it raises an
    # interrupt that a library swallowed
    timeouts.clear()
    polls = iter([1, 1, 1])
    assert len(list(in_flight(units, 2, lambda kind, unit: next(handles), wait_some))) == 3
    assert set(timeouts) == {HEARTBEAT_SECONDS}


def test_in_flight_raises_an_interrupt_swallowed_while_it_waited():
    """An interrupt whose exception a library dropped while the driver waited
    (:func:`ntrl.termination.raise_if_swallowed`) stops the driver before its next wait."""
    import signal

    import pytest

    from ntrl import termination

    units = [("run", [f"u{i}"]) for i in range(3)]
    waits = []

    def wait_some(pending, timeout):
        waits.append(timeout)
        if len(waits) == 1:
            termination.note_raised(signal.SIGTERM)  # raised by the handler, then swallowed
            return set(), set(pending)
        return set(pending), set()

    handles = iter(range(100))
    with termination.noting_raised(), pytest.raises(termination.Terminated):  # as inside a CLI command
        list(in_flight(units, 2, lambda kind, unit: next(handles), wait_some))
    assert len(waits) == 1


def test_in_flight_beats_on_time_while_units_keep_finishing(monkeypatch):
    """Short units that finish less than a heartbeat apart do not starve the heartbeat: a long
    population chunk beside them still has its members counted as they stop."""
    clock = [0.0]
    monkeypatch.setattr(executor.time, "monotonic", lambda: clock[0])
    units = [("run", [f"u{i}"]) for i in range(12)]

    def wait_some(pending, timeout):  # one unit finishes every 0.9 s
        clock[0] += 0.9
        first = min(pending)
        return {first}, pending - {first}

    beats = []
    handles = iter(range(100))
    assert len(list(in_flight(units, 2, lambda kind, unit: next(handles), wait_some,
                              heartbeat=lambda: beats.append(clock[0])))) == 12
    # 12 waits of 0.9 s: a beat at 2.7, 5.4, 8.1 and 10.8 s, each at least HEARTBEAT_SECONDS apart
    assert len(beats) == 4 and all(b - a >= HEARTBEAT_SECONDS for a, b in zip([0.0] + beats, beats))


def write_summary(runs_dir, spec, status):
    (runs_dir / spec.run_id).mkdir(parents=True, exist_ok=True)
    (runs_dir / spec.run_id / "summary.json").write_text(json.dumps({"status": status, "spec": {}}))


def test_runs_progress_counts_each_finished_run_once(tmp_path, monkeypatch):
    study = StudyConfig(name="t", policies=["single_logit", "mlp"], optimizers=["sgd", "npg"], p0s=[0.05, 0.005],
                        seeds=2, directions=["rewarded"]).validate()
    specs = enumerate_runs(study)
    real_read = executor.completed_summary
    old = specs[1]
    write_summary(tmp_path, old, "interrupted")  # a former attempt's: not complete, not counted
    bar = FakeBar()
    progress = RunsProgress(tmp_path, specs, bar)
    assert bar.postfix == ""  # more than three cells left
    progress.poll()
    assert bar.n == 0
    write_summary(tmp_path, specs[0], "finished")
    write_summary(tmp_path, specs[2], "failed")  # a failed member counts when its unit returns
    progress.poll()
    progress.poll()
    assert bar.n == 1
    reads = []
    monkeypatch.setattr(executor, "completed_summary", lambda d: reads.append(d.name) or real_read(d))
    progress.poll()
    assert reads == []  # the incomplete summaries seen before are not read again while unchanged
    write_summary(tmp_path, old, "finished")  # rewritten, now complete
    os.utime(tmp_path / old.run_id / "summary.json", ns=(1, 1))  # a new mtime, whatever the clock's grain
    progress.poll()
    assert reads == [old.run_id] and bar.n == 2
    progress.unit_done(specs[:3])  # specs[0] and specs[1] were counted already
    assert bar.n == 3
    rest = specs[3:]
    last_cell = [s for s in rest if s.cell == rest[-1].cell]
    progress.unit_done([s for s in rest if s.cell != rest[-1].cell])
    assert bar.n == len(specs) - len(last_cell)
    assert bar.postfix == f"{' '.join(rest[-1].cell)}: {len(last_cell)} left"
    progress.unit_done(last_cell)
    assert bar.n == len(specs) and bar.postfix == ""


def test_a_study_counts_a_populations_members_before_its_chunk_returns(tmp_path, monkeypatch):
    """One chunk of single-logit SGD members whose escapes take from a few to thousands of
    updates: the bar counts the first ones while the chunk still trains."""
    monkeypatch.setattr(executor, "HEARTBEAT_SECONDS", 0.05)
    counted_by_poll = []
    poll = RunsProgress.poll

    def recording(self):
        before = len(self.left)
        poll(self)
        counted_by_poll.append(before - len(self.left))

    monkeypatch.setattr(RunsProgress, "poll", recording)
    study = StudyConfig(name="t", policies=["single_logit"], optimizers=["sgd"], p0s=[0.05, 0.005, 5e-5],
                        seeds=1, directions=["rewarded"], track_every=50).validate()
    results = run_study(study, tmp_path, workers=1, wandb_mode="disabled", progress=True)
    assert len(results) == 3
    assert sum(counted_by_poll) >= 1, counted_by_poll
