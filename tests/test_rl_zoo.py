"""The README's RL Zoo snippet, run for real (issue 15 item 9): its YAML, verbatim, as the zoo's
``--conf-file`` with ``python -m rl_zoo3.train`` and a short ``-n``; the NTCovCallback writes the
records the snippet names. rl_zoo3 is the optional extra ``zoo`` (CI installs it)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_zoo_yaml() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return re.search(r"```yaml\n(CartPole-v1:.*?)```", text, re.S).group(1)


def test_readme_rl_zoo_snippet_runs(tmp_path):
    try:
        import rl_zoo3  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI installs the zoo extra (pip install -e '.[zoo]')")
        pytest.skip("rl_zoo3 is an optional extra: pip install -e '.[zoo]'")
    (tmp_path / "hyperparams.yml").write_text(readme_zoo_yaml())
    proc = subprocess.run([sys.executable, "-m", "rl_zoo3.train", "--algo", "ppo", "--env", "CartPole-v1",
                           "--conf-file", "hyperparams.yml", "-n", "1024", "-f", "logs", "--seed", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "ntrl_records.jsonl").read_text().splitlines()]
    assert len(records) == 1024 // (4 * 64)  # one per rollout of 4 envs × 64 steps
    assert {"action:1/value", "action:1/pred_delta", "action:1/real_delta", "rollout/ep_rew_mean"} <= set(records[0])
    # and through SB3's logger, in the zoo's own console table (its section ntrl/)
    assert "ntrl/" in proc.stdout and "action:1/pred_delta" in proc.stdout
