"""The three commands of the README's "Plug in your own env" section, run exactly as written
(in a copy of examples/my_env, with offline W&B writing into it)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_env"


def readme_commands() -> list[str]:
    """The lines of the first ```bash block of the README's "Plug in your own env" section."""
    text = (EXAMPLE.parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Plug in your own env\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_readme_has_three_commands():
    cmds = readme_commands()
    assert len(cmds) == 3
    assert cmds[0].startswith("ntrl train --env my_env:Corridor-v0")
    assert "--algo ppo" in cmds[1]
    assert cmds[2].startswith("python show.py")


def test_readme_commands_run(tmp_path):
    work = tmp_path / "my_env"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("runs", "wandb", "__pycache__"))
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", WANDB_SILENT="true",
               WANDB_MODE="offline")
    outputs = []
    for cmd in readme_commands():
        proc = subprocess.run(shlex.split(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        outputs.append(proc.stdout)
    assert "P = π(a=2)" in outputs[0] and "Price check" in outputs[0]
    assert outputs[1].startswith("PPO on my_env:Corridor-v0")
    assert "prefers_right" in outputs[2] and "event_heads_for_juice" in outputs[2] and "R² =" in outputs[2]
    runs = sorted(p.name for p in (work / "runs").iterdir())
    assert runs[0] == "corridor" and runs[1].startswith("my_env_Corridor-v0-ppo-sb3-lr=0.001-seed0-")
    for run in runs:
        summary = json.loads((work / "runs" / run / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["wandb_dir"]
    ppo = [json.loads(x) for x in (work / "runs" / runs[1] / "records.jsonl").read_text().splitlines()]
    assert len(ppo) == 4 and "right_minus_left/pred_delta_sgd" in ppo[0]
