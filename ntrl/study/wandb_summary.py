"""The study's W&B summary run (:class:`SummaryRun`), and logging it in a forked helper process
while this one analyses the runs and writes the report (:func:`summary_run_beside`).

The summary run holds the verdict table as a wandb.Table of numbers (and its text form), T(p₀) as
a line series, the Price check's relative residual against P for every record (subsampled per
cell beyond :data:`ntrl.study.report.RESIDUAL_POINTS`) as a table with the optimizer as a column
and a scatter per optimizer (W&B's scatter has no colour channel; the report's residual PNG,
logged too, colours by optimizer), the report's other tables, the report's PNGs as images, and
report.html, report.md and the CSVs as a ``report`` artifact, all in one history row."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ntrl.study.analysis import CellResult, RunData
from ntrl.study.well import WellCell


class SummaryRun:
    """A study's W&B summary run, logged in three steps as what each reads is ready: the runs'
    (:meth:`log_runs`), the cells' (:meth:`log_cells`) and the report's (:meth:`log_report`,
    which finishes it). Each step's data joins the same history row (logged uncommitted until
    the last). W&B off, or a W&B that cannot start or fails (the sink says why in one line):
    nothing is logged, and :meth:`log_report` gives None."""

    def __init__(self, study_dir: Path, study: Any, mode: str) -> None:
        self.study_dir, self.study = study_dir, study
        self.sink = None
        self.directory: str | None = None
        if mode == "disabled":
            return
        from ntrl.run_dirs import ntrl_wandb_dir
        from ntrl.wandb_sink import WandbSink

        if ntrl_wandb_dir(study_dir) is None:  # it has said why
            return
        sink = WandbSink(study_dir, study.to_dict(), mode=mode, name=f"{study.name}-summary", group=study.name,
                         job_type="summary")
        if sink.run is not None:  # else W&B could not start; it has said why
            self.sink, self.directory = sink, sink.directory

    def _log(self, what: str, data: dict[str, Any], commit: bool = False) -> None:
        if self.sink is None:
            return
        try:
            self.sink.run.log(data, commit=commit)
        except Exception as e:
            self.sink.lost(what, e)
            self.sink = self.directory = None

    def log_runs(self, runs: Sequence[RunData]) -> None:
        """T(p₀) per (environment, mode, policy) as a line series over the optimizers; the Price
        check's residuals per optimizer (a table and its scatter) and of every cell in one table."""
        if self.sink is None:
            return
        import wandb

        from ntrl.study.report import RESIDUAL_COLUMNS, _groups, escape_data, residual_rows
        from ntrl.wandb_sink import table

        data: dict[str, Any] = {}
        residuals: list[list[Any]] = []
        for (env, gmode), by_policy in sorted(_groups(runs).items()):
            for pol, by_opt in sorted(by_policy.items()):
                xs, ys, keys = [], [], []
                for opt, rs in sorted(by_opt.items()):
                    p0, T = escape_data([r for r in rs if r.spec.direction == "rewarded"])
                    if not len(p0):
                        continue
                    uniq = sorted(set(p0.tolist()))
                    xs.append(uniq)
                    ys.append([float(np.nanmedian(T[p0 == u])) for u in uniq])
                    keys.append(opt)
                if keys:
                    data[f"escape/{env}_{gmode}_{pol}"] = wandb.plot.line_series(
                        xs=xs, ys=ys, keys=keys, title=f"T(p0), {env} {gmode} {pol} (median over seeds)", xname="p0")
                for opt, rs in sorted(by_opt.items()):
                    rows = residual_rows(env, gmode, pol, opt, rs)
                    residuals.extend(rows)
                    if rows:
                        t = table(RESIDUAL_COLUMNS, rows)
                        data[f"price_residual/{env}_{gmode}_{pol}/{opt}"] = wandb.plot.scatter(
                            t, "P", "relative_residual",
                            title=f"(realised − predicted)/|predicted| ΔP against P: {env} {gmode} {pol}, {opt}")
        if residuals:
            data["price_residual"] = table(RESIDUAL_COLUMNS, residuals)
        self._log("logging the runs' tables", data)

    def log_cells(self, cells: Sequence[CellResult], well_cells: Sequence[WellCell] = ()) -> None:
        """The verdict table (numbers, and text), the extinction, Price-across-training and noise
        tables, the gravity well's table and least-P series, and each verdict in the summary."""
        if self.sink is None:
            return
        import wandb

        from ntrl.study.report import (EXTINCTION_COLUMNS, NOISE_TABLE_COLUMNS, PRICE_COLUMNS, VERDICT_COLUMNS,
                                       WELL_COLUMNS, extinction_rows, noise_rows_table, numeric_verdict_rows,
                                       price_rows, verdict_rows)
        from ntrl.study.well import well_numbers

        cols, numeric = numeric_verdict_rows(cells)
        data: dict[str, Any] = {"verdicts": wandb.Table(columns=cols, data=numeric),
                                "verdicts_text": wandb.Table(columns=VERDICT_COLUMNS, data=verdict_rows(cells))}
        for key, cols, rows in (("extinction", EXTINCTION_COLUMNS, extinction_rows(cells)),
                                ("price_across_training", PRICE_COLUMNS, price_rows(cells)),
                                ("noise", NOISE_TABLE_COLUMNS, noise_rows_table(cells))):
            if rows:
                data[key] = wandb.Table(columns=cols, data=rows)
        if well_cells:
            data["gravity_well"] = wandb.Table(columns=WELL_COLUMNS, data=well_numbers(well_cells))
            data["gravity_well/min_p"] = wandb.plot.line_series(
                xs=[[w.p0 for w in c.runs] for c in well_cells], ys=[[w.p_min for w in c.runs] for c in well_cells],
                keys=[c.label for c in well_cells], title="Gravity well: least P against p0", xname="p0")
        self._log("logging the verdict tables", data)
        if self.sink is None:
            return
        try:
            for c in cells:
                self.sink.run.summary[f"verdict/{'/'.join(c.cell)}"] = c.verdict
            for c in well_cells:
                self.sink.run.summary[f"gravity_well/{c.policy}/{c.optimizer}"] = c.verdict
        except Exception as e:
            self.sink.lost("logging the verdicts", e)
            self.sink = self.directory = None

    def log_report(self) -> str | None:
        """The report's PNGs as images (committing the history row), the report and its CSVs as an
        artifact; finishes the run. Returns its directory, or None where nothing was logged."""
        if self.sink is None:
            return None
        import wandb

        from ntrl.study.report import REPORT_FILES

        self._log("logging the report's plots",
                  {f"plots/{png.stem}": wandb.Image(str(png)) for png in sorted(self.study_dir.glob("*.png"))},
                  commit=True)
        if self.sink is not None:
            self.sink.log_artifact(f"{self.study.name}-report", "report", [self.study_dir / n for n in REPORT_FILES])
        if self.sink is None or self.sink.run is None:  # lost while logging: it has said why
            return None
        self.sink.finish()
        return self.directory


def log_summary_run(study_dir: Path, study: Any, runs: Sequence[RunData], cells: Sequence[CellResult],
                    mode: str = "offline", well_cells: Sequence[WellCell] = ()) -> str | None:
    """The whole :class:`SummaryRun` of a study whose report is written, in this process; its
    directory, or None."""
    run = SummaryRun(study_dir, study, mode)
    run.log_runs(runs)
    run.log_cells(cells, well_cells)
    return run.log_report()


HELPER_GRACE_S = 120.0  # the least time the summary run's helper gets, once the report is written, to say
# that it is logging the report's part (or twice the time it has had so far, if longer: a large
# study's tables take longer); from then on it is waited for as long as it lives (an upload online
# takes as long as it takes, as it did in this process)
STARTED, ANSWERED = b"L", b"\n"  # the helper's messages: logging the report's part; its answer's end


class SummaryRunBeside:
    """:func:`summary_run_beside`'s handle: :meth:`cells` once the analysis is done, :meth:`finish`
    once the report is written."""

    def __init__(self, study_dir: Path, study: Any, runs: Sequence[RunData], mode: str) -> None:
        self.study_dir, self.study, self.runs, self.mode = study_dir, study, runs, mode
        self.pid = 0
        self.to_child = self.from_child = -1
        self.started = 0.0  # time.monotonic() when the helper was forked
        self.writer: threading.Thread | None = None  # sends the helper its messages (cells)
        self.report_written = threading.Event()
        self.analysed: tuple[Sequence[CellResult], Sequence[WellCell]] | None = None

    def start(self) -> None:
        """Fork the helper: it starts the run and logs the runs' part now, then the cells' part
        when they arrive, then the report's. Ctrl-C and SIGTERM are held back meanwhile, so that
        a helper is never forked without this process knowing it (to stop it)."""
        import time

        from ntrl.study.executor import signals_held

        sys.stdout.flush()  # nothing written before the fork is written again by the helper
        sys.stderr.flush()
        with signals_held():
            to_child, child_in = os.pipe()
            child_out, from_child = os.pipe()
            try:
                pid = os.fork()
            except OSError:  # no helper: all of it in this process, in finish()
                for fd in (to_child, child_in, child_out, from_child):
                    os.close(fd)
                return
            if pid == 0:  # the helper: log, answer, and leave without running anything of the parent's
                self._helper_process(to_child, from_child, (child_in, child_out))
            self.pid, self.to_child, self.from_child, self.started = pid, child_in, child_out, time.monotonic()
            os.close(to_child)
            os.close(from_child)

    def _helper_process(self, commands: int, answers: int, parents: tuple[int, int]) -> None:
        """The helper's whole life: it ends with its parent (SIGKILL from the kernel, as a study's
        workers do), takes Ctrl-C, SIGTERM and SIGHUP by their default actions, logs, answers, and
        leaves by ``os._exit``. Where it fails, it says why in one line and leaves W&B's run
        unfinished (its service process ends with it), as a crashed run; its parent then logs the
        summary run itself."""
        code = 1
        try:
            from ntrl.study.lock import _set_parent_death_signal

            for fd in parents:
                os.close(fd)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
            _set_parent_death_signal()
            try:
                directory = self._helper(commands, answers)
            except Exception as e:  # a parent that stopped first (EOFError) has nobody to tell
                if os.getppid() != 1:
                    print(f"ntrl: warning: the W&B summary run's helper process failed ({type(e).__name__}: {e})",
                          file=sys.stderr)
            else:
                os.write(answers, (directory or "").encode() + ANSWERED)
                code = 0
                with contextlib.suppress(BaseException):  # W&B's service process ends with this helper
                    import wandb

                    wandb.teardown()
        finally:
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os._exit(code)

    def _helper(self, commands: int, answers: int) -> str | None:
        """In the helper: the summary run, step by step as the parent's messages come (the cells,
        pickled; then one byte once the report is written, which it answers with
        :data:`STARTED`)."""
        run = SummaryRun(self.study_dir, self.study, self.mode)
        run.log_runs(self.runs)
        with os.fdopen(commands, "rb") as pipe:
            cells, well_cells = pickle.load(pipe)
            run.log_cells(cells, well_cells)
            if pipe.read(1) != b"R":
                raise EOFError("the study stopped before its report was written")
        os.write(answers, STARTED)
        return run.log_report()

    def cells(self, cells: Sequence[CellResult], well_cells: Sequence[WellCell] = ()) -> None:
        """Hand the analysis to the helper, and then (once :meth:`finish` says so) the news that the
        report is written, from a thread: the helper reads them once it has logged the runs' part,
        and a pipe holds only so much meanwhile. An analysis that cannot be pickled stops the
        helper: :meth:`finish` then logs the run here."""
        self.analysed = (cells, well_cells)
        if not self.pid:
            return
        try:
            payload = pickle.dumps((cells, well_cells), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            self._reap(kill=True)
            return
        fd = self.to_child

        def send() -> None:
            with contextlib.suppress(OSError):  # the helper died (a broken pipe): the run is logged here
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view):]
                self.report_written.wait()
                os.write(fd, b"R")

        self.writer = threading.Thread(target=send, name="ntrl-summary-run", daemon=True)
        self.writer.start()

    def finish(self) -> str | None:
        """The report is written: the helper logs its part and finishes the run. Returns the run's
        directory, or None where W&B logged nothing (it has said why). Where there is no helper,
        or it died or did not start on the report's part in time (:data:`HELPER_GRACE_S`; stopped
        then), the summary run is logged here, with one line saying so."""
        import select
        import time

        if not self.pid:
            return self._here()
        if self.writer is None:
            self.cells(())
            if not self.pid:
                return self._here()
        now = time.monotonic()
        deadline = now + max(HELPER_GRACE_S, 2 * (now - self.started))
        self.report_written.set()
        self.writer.join(max(0.0, deadline - now))
        text, started = b"", False
        while not self.writer.is_alive():
            left = None if started else deadline - time.monotonic()
            if left is not None and (left <= 0 or not select.select([self.from_child], [], [], left)[0]):
                break  # not started on the report's part in time
            chunk = os.read(self.from_child, 1 << 16)
            if not chunk:
                break
            text += chunk
            started = text.startswith(STARTED)
        status = self._reap(kill=not text.endswith(ANSWERED))
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and started and text.endswith(ANSWERED):
            return text[len(STARTED):-len(ANSWERED)].decode("utf-8", "replace") or None
        print("ntrl: warning: the W&B summary run's helper process stopped before it finished; logging the "
              "summary run again here", file=sys.stderr)
        return self._here()

    def _here(self) -> str | None:
        cells, well_cells = self.analysed if self.analysed is not None else ((), ())
        return log_summary_run(self.study_dir, self.study, self.runs, cells, self.mode, well_cells)

    def _reap(self, kill: bool) -> int:
        """Wait for the helper (killed first where ``kill``), end the thread that writes to it,
        and close the pipes; the helper's wait status."""
        if kill:
            with contextlib.suppress(OSError):
                os.kill(self.pid, signal.SIGKILL)
        _, status = os.waitpid(self.pid, 0)
        self.pid = 0
        if self.writer is not None:  # its pipe has no reader now: a write it is in fails at once
            self.report_written.set()
            self.writer.join()
        for fd in (self.to_child, self.from_child):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.to_child = self.from_child = -1
        return status

    def stop(self) -> None:
        """The parent stops early (an error, Ctrl-C): the helper is stopped with it."""
        if self.pid:
            self._reap(kill=True)


@contextlib.contextmanager
def summary_run_beside(study_dir: Path, study: Any, runs: Sequence[RunData], mode: str) -> Iterator[SummaryRunBeside]:
    """The study's W&B summary run, logged by a forked helper process while this one analyses the
    runs and writes the report, on a second core (the end of ``ntrl rarity --quick`` took 1.0–2.4 s
    less in three alternated readings): it starts W&B and logs the runs' part now, the cells' part
    once :meth:`SummaryRunBeside.cells` hands them over, and the report's once
    :meth:`SummaryRunBeside.finish` says it is written. In this process instead (all in
    ``finish``) on one core, where the platform cannot fork, or with W&B off. An error or Ctrl-C
    in the body stops the helper."""
    beside = SummaryRunBeside(study_dir, study, runs, mode)
    try:
        if mode != "disabled" and (os.cpu_count() or 1) >= 2 and hasattr(os, "fork"):
            beside.start()
        yield beside
    finally:
        beside.stop()
