"""The rarity study layer: the grid (:mod:`ntrl.study.grid`), its executor and lock
(:mod:`ntrl.study.executor`, :mod:`ntrl.study.lock`), the analysis
(:mod:`ntrl.study.analysis`), the report (:mod:`ntrl.study.report`) and the end-to-end
command (:mod:`ntrl.study.rarity`).

    from ntrl.study import StudyConfig, run_study
    run_study(StudyConfig.quick(), "runs/rarity-quick")
"""

from ntrl.study.executor import StudyIncomplete, StudyInterrupted, completed_summary, read_study_file, run_study
from ntrl.study.grid import RunSpec, StudyConfig, enumerate_runs, train_config_for

__all__ = ["RunSpec", "StudyConfig", "StudyIncomplete", "StudyInterrupted", "completed_summary", "enumerate_runs",
           "read_study_file", "run_study", "train_config_for"]
