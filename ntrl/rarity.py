"""``ntrl rarity``: run the rarity study, analyse it, write the report, print the verdicts.

    ntrl rarity --quick                 # the README's main job, under 3 minutes on 2 cores
    ntrl rarity --full --workers 2      # the complete grid
    ntrl rarity --config my_grid.toml   # a grid of your own (keys: see ntrl.study.StudyConfig)
    ntrl rarity --analyse-only --out runs/rarity-quick   # re-analyse finished runs
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from ntrl.config import ConfigError


def add_rarity_parser(sub) -> None:
    p = sub.add_parser("rarity", help="the rarity study: p² or p(1 − p)? with confidence intervals")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="small grid, under 3 minutes on 2 cores (default)")
    preset.add_argument("--full", action="store_true", help="the complete grid")
    preset.add_argument("--config", metavar="FILE", help="a grid of your own (.toml or .json)")
    p.add_argument("--out", metavar="DIR", help="study directory (default: runs/<study name>)")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="parallel runs (default: 2)")
    p.add_argument("--force", action="store_true", help="replace a study directory that holds a different config")
    p.add_argument("--wandb", default=None, choices=("offline", "online", "disabled"),
                   help="W&B mode (default: WANDB_MODE from the environment, else offline)")
    p.add_argument("--no-wandb", dest="wandb", action="store_const", const="disabled", help="turn W&B logging off")
    p.add_argument("--analyse-only", action="store_true", help="only analyse and report the runs already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    from ntrl.cli import report_errors
    from ntrl.study import StudyConfig, run_study

    state: dict = {}

    def run() -> str:
        try:
            return run_and_report()
        except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM anywhere: say how far the study got
            from ntrl.study import StudyInterrupted

            if isinstance(e, StudyInterrupted) or "study" not in state:
                raise
            raise StudyInterrupted(progress_line(state["study"], state["out"])) from None

    def run_and_report() -> str:
        from ntrl.study_lock import study_lock
        from ntrl.wandb_sink import mode_from_environment

        wandb_mode = mode_from_environment(args.wandb)
        if args.workers < 1:
            raise ConfigError("--workers", f"must be >= 1, got {args.workers}")
        if args.analyse_only:
            from ntrl.study import read_study_file

            if not args.out:
                raise ConfigError("--out", "--analyse-only needs the study directory")
            read_study_file(Path(args.out))
        if args.config:
            study = StudyConfig.from_file(args.config)
        elif args.full:
            study = StudyConfig.full()
        else:
            study = StudyConfig.quick()
        out = Path(args.out or Path("runs") / study.name)
        state.update(study=study, out=out)
        start = time.time()
        if not args.analyse_only:
            run_study(study, out, workers=args.workers, wandb_mode=wandb_mode, force=args.force,
                      progress=not args.quiet)
        with study_lock(out):
            paths = analyse_and_report(out, wandb_mode)
        lines = [paths["table"], f"\nReport: {paths['html']} (also {paths['md']}); tables: {paths['csv']}"]
        if paths.get("wandb"):
            lines.append(f"W&B summary run ({wandb_mode}): {paths['wandb']}  (browse: wandb leet {out}/wandb)")
        lines.append(f"Done in {time.time() - start:.0f} s.")
        return "\n".join(lines)

    return report_errors(run)


def progress_line(study, out: Path) -> str:
    """"K of M runs complete; re-run the same command to resume"."""
    from ntrl.study import completed_summary, enumerate_runs

    specs = enumerate_runs(study)
    k = sum(completed_summary(out / "runs" / s.run_id) is not None for s in specs)
    return f"{k} of {len(specs)} runs complete; re-run the same command to resume"


def analyse_and_report(out: Path, wandb_mode: str = "offline") -> dict:
    """Analyse the runs in ``out``, write the report, log the W&B summary run."""
    from ntrl.analysis import analyse, load_study
    from ntrl.report import VERDICT_COLUMNS, log_summary_run, text_table, verdict_rows, write_report

    study, runs = load_study(out)
    cells = analyse(runs)
    paths = write_report(out, study, runs, cells)
    short = [r[:8] for r in verdict_rows(cells)]
    paths["table"] = text_table(VERDICT_COLUMNS[:8], short)
    paths["wandb"] = log_summary_run(out, study, runs, cells, mode=wandb_mode)
    paths["cells"] = cells
    return paths
