"""Safety (issue 10): ``module:`` hooks import only the module the user named, and W&B never
costs a run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ntrl.cli import main
from ntrl.wandb_sink import WandbSink, mode_from_environment, project_from_environment

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_env"
NTRL = str(Path(sys.executable).with_name("ntrl"))
LOUD = "raise SystemExit('the working directory\\'s {name}.py was imported instead of the installed {name}')\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_SILENT="true", **extra)
    return env


def test_user_module_cannot_shadow_installed_packages(tmp_path):
    work = tmp_path / "w"
    shutil.copytree(EXAMPLE, work, ignore=shutil.ignore_patterns("runs", "wandb", "__pycache__"))
    for name in ("wandb", "numpy", "torch"):
        (work / f"{name}.py").write_text(LOUD.format(name=name))
    proc = subprocess.run([NTRL, "train", "--env", "my_env:Corridor-v0", "--steps", "2", "--quiet",
                           "--property", "my_env:prefers_right", "--wandb", "offline"],
                          cwd=work, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "instead of the installed" not in proc.stdout + proc.stderr
    assert "W&B (offline)" in proc.stdout


def test_naming_a_module_that_an_installed_one_shadows_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "json.py").write_text("def prefers(view):\n    return view\n")
    assert main(["train", "--env", "CartPole-v1", "--steps", "1", "--property", "json:prefers", "--no-wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--property" in err[0] and "rename your file" in err[0]


# ---------------------------------------------------------------------- W&B
def run_bandit(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([NTRL, "train", "bandit", "--steps", "3", "--quiet", "--out", str(tmp_path / "runs"),
                           "--run-name", "r", *flags], env=env or clean_env(), capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


def records(tmp_path: Path) -> list[dict]:
    return [json.loads(x) for x in (tmp_path / "runs" / "r" / "records.jsonl").read_text().splitlines()]


def test_online_without_login_falls_back_to_offline_and_keeps_every_record(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = run_bandit(tmp_path, "--wandb", "online", env=clean_env(HOME=str(home)))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "W&B" in line]
    assert len(warnings) == 1 and "logging offline instead" in warnings[0]
    assert "W&B (offline)" in proc.stdout
    assert len(records(tmp_path)) == 3


def test_online_with_no_network_does_not_hang(tmp_path):
    """A key but no reachable server (the proxy points at a closed local port): W&B's start-up
    wait is bounded (INIT_TIMEOUT_S online = 5 s), then the run goes on offline."""
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9",
                    HTTPS_PROXY="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9")
    proc = run_bandit(tmp_path, "--wandb", "online", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "logging offline instead" in proc.stderr
    assert len(records(tmp_path)) == 3


def test_bad_wandb_mode_in_environment_is_one_line_and_ignored(tmp_path):
    proc = run_bandit(tmp_path, env=clean_env(WANDB_MODE="bogus"))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "WANDB_MODE='bogus'" in lines[0]
    assert "W&B (offline)" in proc.stdout


def test_flag_wins_over_environment(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert mode_from_environment(None) == "disabled"
    assert mode_from_environment("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert mode_from_environment(None) == "offline"
    monkeypatch.delenv("WANDB_MODE")
    assert mode_from_environment(None) == "offline"
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert project_from_environment() == "mine" and project_from_environment("given") == "given"
    monkeypatch.delenv("WANDB_PROJECT")
    assert project_from_environment() == "ntrl"


def test_unwritable_wandb_directory_turns_wandb_off_and_trains(tmp_path, monkeypatch, capsys):
    """The run's wandb/ path is taken by a file, so W&B cannot write anything: one line, and the
    run goes on with every local record."""
    out = tmp_path / "runs"
    (out / "r").mkdir(parents=True)
    (out / "r" / "wandb").write_text("in the way")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "bandit", "--steps", "3", "--quiet", "--out", str(out), "--run-name", "r",
                 "--wandb", "offline"]) == 2  # a user file in the directory: refused, untouched
    (out / "r" / "wandb").unlink()
    capsys.readouterr()
    from ntrl.experiments.bandit import BanditConfig
    from ntrl.train import train

    config = BanditConfig(steps=3, out=str(out), run_name="r", wandb="offline").validate()
    real_mkdir = Path.mkdir

    def mkdir_then_block(self, *a, **k):  # once the run directory exists, put a file where W&B writes
        real_mkdir(self, *a, **k)
        if self == out / "r" and not (self / "wandb").exists():
            (self / "wandb").write_text("in the way")

    monkeypatch.setattr(Path, "mkdir", mkdir_then_block)
    result = train(config, progress=False)
    assert result.summary["wandb_mode"] == "disabled" and result.wandb_dir is None
    err = capsys.readouterr().err
    assert err.count("ntrl: warning: W&B could not start offline") == 1
    assert len(records(tmp_path)) == 3


def test_wandb_dying_mid_run_leaves_the_run_and_its_records(tmp_path, monkeypatch, capsys):
    from ntrl.experiments.bandit import BanditConfig
    from ntrl.train import train

    calls, kept = [], {}
    real_log = WandbSink.log

    def log_then_die(self, record):
        calls.append(record["update"])
        if len(calls) == 2 and self.run is not None:  # the service process goes away
            def broken(*a, **k):
                raise BrokenPipeError("wandb-core is gone")
            kept.update(run=self.run, finish=self.run.finish)
            self.run.log = broken
            self.run.finish = broken
        real_log(self, record)

    monkeypatch.setattr(WandbSink, "log", log_then_die)
    config = BanditConfig(steps=5, out=str(tmp_path / "runs"), run_name="r", wandb="offline").validate()
    result = train(config, progress=False)
    assert result.summary["status"] == "finished" and result.summary["updates"] == 5
    assert len(records(tmp_path)) == 5
    err = capsys.readouterr().err
    assert err.count("W&B failed while logging") == 1
    kept["finish"]()  # end the real run, so that no later test finds it active


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_sink_modes_record_what_happened(tmp_path, mode):
    sink = WandbSink(tmp_path, {"a": 1}, mode=mode, name="x")
    assert sink.mode == mode
    sink.finish()
