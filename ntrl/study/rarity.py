"""The rarity study end to end: run (or resume) the grid, analyse it, write the report, and
return the text ``ntrl rarity`` prints.

    ntrl rarity --quick                 # the README's main job, under 3 minutes on 2 cores
    ntrl rarity --full --workers 2      # the complete grid
    ntrl rarity --config my_grid.toml   # a grid of your own (keys: see ntrl.study.StudyConfig)
    ntrl rarity --analyse-only          # re-analyse the finished runs of runs/rarity-quick
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from ntrl.study.executor import StudyInterrupted, open_study_dir, progress_line, read_study_file, run_grid
from ntrl.study.grid import STUDY_FILE, StudyConfig
from ntrl.study.lock import study_lock


def rarity(study: StudyConfig, study_dir: Path, *, workers: int = 2, wandb_mode: str = "offline",
           force: bool = False, progress: bool = True, analyse_only: bool = False, verbose: bool = False,
           population: bool = True, device: str = "cpu", executor: str = "local",
           ray_address: str | None = None) -> str:
    """Run or resume ``study`` in ``study_dir`` (unless ``analyse_only``), analyse and report it.

    ``population``: train the cells the population path supports as batched population chunks
    (:mod:`ntrl.population`, on ``device``), the others run by run; without it every run is trained
    on its own. Ctrl-C or SIGTERM anywhere raises :class:`StudyInterrupted` saying how many runs
    are complete. ``executor``: "local" (a process pool of ``workers``) or "ray" (Ray tasks, at
    ``ray_address`` or on a local Ray instance of ``workers`` CPUs; :mod:`ntrl.study.ray_executor`)."""
    start = time.time()
    if wandb_mode == "online":
        from ntrl.wandb_sink import online_login_or_offline

        wandb_mode = online_login_or_offline()  # decided once, not by every run's W&B start-up
    try:
        if analyse_only:
            read_study_file(study_dir)
            with study_lock(study_dir):
                remembered_wandb_settings(study_dir)
                paths = analyse_and_report(study_dir, wandb_mode, progress)
        else:
            from ntrl.study.ray_executor import ray_connected

            study.validate()
            # Ray first (a cluster that cannot be reached leaves no study directory behind), and
            # let go of once the runs are done: a local instance holds about 1 GB
            ray_stack = contextlib.ExitStack()
            ray_stack.enter_context(ray_connected(executor, ray_address, workers, device, population))
            with ray_stack, open_study_dir(study, study_dir, force):
                remember_wandb_settings(study_dir, wandb_mode)
                run_grid(study, study_dir, workers=workers, wandb_mode=wandb_mode, progress=progress,
                         verbose=verbose, population=population, device=device, executor=executor,
                         ray_address=ray_address)
                ray_stack.close()
                paths = analyse_and_report(study_dir, wandb_mode, progress)
    except KeyboardInterrupt as e:
        if isinstance(e, StudyInterrupted):
            raise
        if not (study_dir / STUDY_FILE).exists():  # still starting (Ray): the CLI says nothing was written
            raise KeyboardInterrupt from None
        raise StudyInterrupted(progress_line(study, study_dir)) from None
    lines = [paths["table"], f"\nReport: {paths['html']} (also {paths['md']}); tables: {paths['csv']}"]
    if paths.get("wandb"):
        mode = "offline" if "offline-run" in str(paths["wandb"]) else wandb_mode
        lines.append(f"W&B summary run ({mode}): {paths['wandb']}  (browse: wandb leet {study_dir}/wandb)")
    lines.append(f"Done in {time.time() - start:.0f} s.")
    return "\n".join(lines)


WANDB_SETTINGS = ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_TAGS")
SETTINGS_FILE = "ntrl-wandb-settings.json"  # in the study's own wandb/ folder


def remember_wandb_settings(study_dir: Path, wandb_mode: str) -> None:
    """Keep the study's W&B project, entity and tags (from its flags or the environment) in its
    ``wandb/`` folder, so that ``--analyse-only`` logs its summary run to the same project."""
    values = {k: os.environ[k] for k in WANDB_SETTINGS if os.environ.get(k)}
    if wandb_mode == "disabled" or not values:
        return
    from ntrl.records import write_json_atomic
    from ntrl.run_dirs import ntrl_wandb_dir

    wandb_dir = ntrl_wandb_dir(study_dir)
    if wandb_dir is not None:
        write_json_atomic(wandb_dir / SETTINGS_FILE, values)


def remembered_wandb_settings(study_dir: Path) -> None:
    """For ``--analyse-only``: the settings the study ran with, where neither a flag nor the
    environment gives one now."""
    import json

    path = study_dir / "wandb" / SETTINGS_FILE
    try:
        values = json.loads(path.read_text(encoding="utf-8")) if path.is_file() and not path.is_symlink() else {}
    except (OSError, ValueError):
        return
    for key, value in values.items():
        if key in WANDB_SETTINGS and isinstance(value, str) and not os.environ.get(key):
            os.environ[key] = value


def analyse_and_report(out: Path, wandb_mode: str = "offline", progress: bool = False) -> dict:
    """Analyse the runs in ``out``, write the report, log the W&B summary run; ``progress``: say
    on stderr what it is doing (these take seconds to minutes, after the runs' progress bar)."""
    from ntrl.study.analysis import analyse, load_study
    from ntrl.study.report import VERDICT_COLUMNS, text_table, verdict_rows, write_report
    from ntrl.study.wandb_summary import summary_run_beside
    from ntrl.study.well import WELL_TITLE, WELL_VERDICT_COLUMNS, analyse_well, well_verdicts

    def say(text: str) -> None:
        if progress:
            print(f"ntrl: {text}", file=sys.stderr, flush=True)

    say(f"reading the runs of {out} ...")
    study, runs = load_study(out)
    # the W&B summary run, logged beside the analysis and the report where a second core is free
    with summary_run_beside(out, study, runs, wandb_mode) as summary:
        say(f"analysing {len(runs)} runs (fits and bootstrap intervals) ...")
        cells = analyse(runs, study.batch_size)
        well_cells = analyse_well(runs, study.well_p0s)
        summary.cells(cells, well_cells)
        say("writing the report and its plots ...")
        paths = write_report(out, study, runs, cells, well_cells)
        short = [r[:8] for r in verdict_rows(cells)]
        paths["table"] = text_table(VERDICT_COLUMNS[:8], short)
        if well_cells:
            paths["table"] += (f"\n\n{WELL_TITLE}, rewards (1, 0.9, 0), start (p₀, 0.95 − p₀, 0.05):\n"
                               + text_table(WELL_VERDICT_COLUMNS, well_verdicts(well_cells)))
        if wandb_mode != "disabled":
            say("finishing the W&B summary run ...")
        paths["wandb"] = summary.finish()
    paths["cells"] = cells
    return paths
