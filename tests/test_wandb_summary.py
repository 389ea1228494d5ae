"""The study's W&B summary run, logged by a forked helper beside the analysis and the report: the
same run as one logged in this process, and a helper that dies, hangs or is stopped never costs
the summary run or outlives the study."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from ntrl.study import StudyConfig, run_study
from ntrl.study import wandb_summary
from ntrl.study.analysis import analyse, load_study
from ntrl.study.well import analyse_well
from ntrl.study.report import write_report
from ntrl.study.wandb_summary import SummaryRun, log_summary_run, summary_run_beside
from ntrl.wandb_sink import read_offline_run

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the helper is a forked process")


@pytest.fixture(autouse=True)
def two_cores(monkeypatch):
    """The helper is forked only where a second core is there to run it; these tests want it."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    """A finished two-cell study with its report written (W&B off while it ran)."""
    out = tmp_path_factory.mktemp("study") / "s"
    study = StudyConfig(name="s", policies=["single_logit"], optimizers=["sgd", "npg"], p0s=[0.05, 0.005], seeds=1,
                        extinction_steps=30, track_every=5, price_scales=[1.0, 0.5], well_p0s=[0.1]).validate()
    run_study(study, out, workers=1, wandb_mode="disabled", progress=False)
    study, runs = load_study(out)
    write_report(out, study, runs, analyse(runs, study.batch_size), analyse_well(runs, study.well_p0s))
    return out


def summary_dirs(out) -> set:
    return {d for d in (out / "wandb").iterdir() if d.name.startswith("offline-run")} if (out / "wandb").exists() \
        else set()


def logged(directory) -> dict:
    run = read_offline_run(directory)
    rows = [h for h in run["history"] if any(not k.startswith("_") for k in h)]
    assert len(rows) == 1, rows  # one history row, as one log call gives
    tables = {}
    for path in (directory / "files" / "media" / "table").rglob("*.table.json"):
        key = path.name.rsplit("_", 2)[0]
        tables[key] = json.loads(path.read_text())["data"]
    # artifacts by name, without the run's id and W&B's random suffix of a chart's table
    return {"keys": sorted(k for k in rows[0] if not k.startswith("_")), "summary": {
        k: v for k, v in run["summary"].items() if k.startswith(("verdict/", "gravity_well/")) and "." not in k},
        "tables": tables,
        "artifacts": sorted((re.sub(r"_table-.*$", "_table", re.sub(r"-summary-[0-9a-f]+-", "-summary-ID-", a["name"])), a["type"])
                            for a in run["artifacts"])}


def beside(out, cells=None) -> tuple[str | None, float]:
    study, runs = load_study(out)
    start = time.monotonic()
    with summary_run_beside(out, study, runs, "offline") as summary:
        if cells is None:
            summary.cells(analyse(runs, study.batch_size), analyse_well(runs, study.well_p0s))
        else:
            summary.cells(cells)
        directory = summary.finish()
    return directory, time.monotonic() - start


def test_the_helper_logs_the_same_run_as_this_process(study_dir):
    study, runs = load_study(study_dir)
    cells, well_cells = analyse(runs, study.batch_size), analyse_well(runs, study.well_p0s)
    assert well_cells
    before = summary_dirs(study_dir)
    here = log_summary_run(study_dir, study, runs, cells, mode="offline", well_cells=well_cells)
    (made,) = summary_dirs(study_dir) - before
    assert str(made) == here
    directory, _ = beside(study_dir)
    (made_beside,) = summary_dirs(study_dir) - before - {made}
    assert str(made_beside) == directory
    a, b = logged(made), logged(made_beside)
    assert a == b
    logged_keys = {k.split(".")[0] for k in a["keys"]}  # a table's or chart's fields: "verdicts._type", ...
    assert {"verdicts", "verdicts_text", "price_residual", "escape/bandit_exact_single_logit_table",
            "price_residual/bandit_exact_single_logit/npg_table", "gravity_well", "gravity_well/min_p_table"} \
        <= logged_keys
    assert any(k.startswith("plots/") for k in logged_keys)
    assert a["summary"] == {**{f"verdict/{'/'.join(c.cell)}": c.verdict for c in cells},
                            **{f"gravity_well/{c.policy}/{c.optimizer}": c.verdict for c in well_cells}}
    assert ("s-report", "report") in a["artifacts"]


def test_a_helper_that_dies_is_replaced_by_the_run_logged_here(study_dir, monkeypatch, capfd):
    monkeypatch.setattr(wandb_summary.SummaryRunBeside, "_helper", lambda self, commands: os._exit(3))
    before = summary_dirs(study_dir)
    directory, _ = beside(study_dir)
    (made,) = summary_dirs(study_dir) - before
    assert str(made) == directory
    assert "helper process stopped before it finished" in capfd.readouterr().err
    assert "verdicts._type" in logged(made)["keys"]


def test_a_helper_that_hangs_is_stopped_and_replaced(study_dir, monkeypatch, capfd):
    monkeypatch.setattr(wandb_summary, "HELPER_GRACE_S", 1.0)
    monkeypatch.setattr(wandb_summary.SummaryRunBeside, "_helper", lambda self, commands: time.sleep(600))
    before = summary_dirs(study_dir)
    directory, seconds = beside(study_dir)
    assert seconds < 60
    (made,) = summary_dirs(study_dir) - before
    assert str(made) == directory
    assert "helper process stopped before it finished" in capfd.readouterr().err


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_an_error_or_ctrl_c_in_the_study_stops_the_helper(study_dir, error):
    study, runs = load_study(study_dir)
    with pytest.raises(error, match="analysis stopped"):
        with summary_run_beside(study_dir, study, runs, "offline") as summary:
            pid = summary.pid
            assert pid
            raise error("analysis stopped")
    with pytest.raises(ChildProcessError):  # reaped, not left running or a zombie
        os.waitpid(pid, os.WNOHANG)


def test_with_wandb_off_nothing_is_forked_or_logged(study_dir):
    study, runs = load_study(study_dir)
    before = summary_dirs(study_dir)
    with summary_run_beside(study_dir, study, runs, "disabled") as summary:
        assert summary.pid == 0
        summary.cells(analyse(runs, study.batch_size))
        assert summary.finish() is None
    assert summary_dirs(study_dir) == before
    assert SummaryRun(study_dir, study, "disabled").log_report() is None


def test_an_analysis_larger_than_a_pipe_does_not_wait_for_the_helper(study_dir, monkeypatch, capfd):
    """The analysis is handed over from a thread: while the helper is still logging the runs'
    part, a hand-over larger than a pipe holds (64 KiB on Linux) does not hold up the study."""
    seen = []
    log_runs = SummaryRun.log_runs

    def slow(self, runs):
        time.sleep(2.0)
        log_runs(self, runs)

    monkeypatch.setattr(SummaryRun, "log_runs", slow)
    monkeypatch.setattr(SummaryRun, "log_cells", lambda self, cells, well_cells=(): seen.append(len(cells[0])))
    study, runs = load_study(study_dir)
    big = [b"x" * (4 << 20)]
    with summary_run_beside(study_dir, study, runs, "offline") as summary:
        start = time.monotonic()
        summary.cells(big)
        handed_over = time.monotonic() - start
        directory = summary.finish()
    assert handed_over < 1.0
    assert directory is not None and directory.startswith(str(study_dir / "wandb")), capfd.readouterr().err
