"""W&B logging for the record stream: offline by default, online on request, or off.

Charts use ``update`` (the optimizer step) as their x-axis via ``define_metric``. Batched
properties are logged as their mean; the local record file keeps every entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

WANDB_MODES = ("offline", "online", "disabled")


class WandbSink:
    """One W&B run. ``mode="disabled"`` makes every call a no-op without importing wandb."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict[str, Any],
        mode: str = "offline",
        project: str = "ntrl",
        name: str | None = None,
        group: str | None = None,
        job_type: str = "train",
        step_metric: str = "update",
    ):
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.mode = mode
        self.run = None
        self.step_metric = step_metric
        if mode == "disabled":
            return
        import wandb

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            dir=str(run_dir),
            name=name,
            group=group,
            job_type=job_type,
            config=config,
            mode=mode,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, disable_git=True),
        )
        self.run.define_metric(step_metric)
        self.run.define_metric("*", step_metric=step_metric)

    @property
    def directory(self) -> str | None:
        """The W&B run directory (what ``wandb leet`` and ``wandb sync`` take), if any."""
        return None if self.run is None else str(Path(self.run.dir).parent)

    def log(self, record: dict[str, Any]) -> None:
        if self.run is None:
            return
        from ntrl.records import scalar_items

        self.run.log(dict(scalar_items(record)))

    def finish(self, summary: dict[str, Any] | None = None, exit_code: int = 0) -> None:
        if self.run is None:
            return
        for k, v in (summary or {}).items():
            if isinstance(v, (int, float, str, bool)) or v is None:
                self.run.summary[k] = v
        self.run.finish(exit_code=exit_code)
        self.run = None


def read_offline_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read an offline W&B run back with ``wandb leet inspect --json``.

    Returns {"history": [logged dicts, in order], "summary": {...}, "config": {...},
    "tables": {key: table record}}, i.e. what W&B really stored.
    """
    import json
    import shutil
    import subprocess
    import sys

    exe = shutil.which("wandb") or str(Path(sys.executable).with_name("wandb"))
    out = subprocess.run([exe, "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    history, summary, config = [], {}, {}
    for line in out.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        kind = rec.get("type")
        if kind == "history":
            history.append(rec["history"]["item"])
        elif kind == "summary":
            summary.update(rec["summary"].get("update", {}))
        elif kind == "run":
            config.update(rec["run"].get("config", {}).get("update", {}))
    return {"history": history, "summary": summary, "config": config}
