"""Safety (issue 10), as an attacker tried it: planted links, copied study files, user files in
ntrl's own directories, a terminal without a W&B login. Each case checks that the user's files
survive byte for byte and that the answer is one line."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ntrl.cli import main
from ntrl.config import ConfigError

from grids import tiny_grid

NTRL = str(Path(sys.executable).with_name("ntrl"))
GRID = tiny_grid("s")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def one_line(capsys, start: str = "ntrl: error: ") -> str:
    """The one line of stderr, beside the study's progress lines ("ntrl: analysing 2 runs ...")."""
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not (line.startswith("ntrl: ") and line.endswith(" ...") and not line.startswith(start))]
    assert len(err) == 1 and err[0].startswith(start), err
    return err[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.toml").write_text(GRID)
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("precious data")
    return tmp_path


def study(args=(), out="out") -> int:
    return main(["rarity", "--config", "g.toml", "--out", out, "--no-wandb", "--quiet", *args])


def test_lock_file_that_is_a_link_is_refused_and_its_target_untouched(work, capsys):
    (work / "out" / "s").mkdir(parents=True)
    (work / "out" / "s" / ".ntrl-lock").symlink_to(work / "victim" / "keep.txt")
    assert study() == 2
    assert "symbolic link" in one_line(capsys)
    assert (work / "victim" / "keep.txt").read_text() == "precious data"


def test_a_copied_study_json_does_not_make_a_folder_a_study(work, capsys):
    assert study() == 0
    proj = work / "proj" / "s"
    proj.mkdir(parents=True)
    (proj / "study.json").write_bytes((work / "out" / "s" / "study.json").read_bytes())
    (proj / "report.md").write_text("# My notes")
    (proj / "runs.csv").write_text("my,data")
    capsys.readouterr()
    before = files(work / "proj")
    for extra in ([], ["--force"]):
        assert study(extra, out="proj") == 2
        assert "holds no ntrl study" in one_line(capsys)
    assert files(work / "proj") == before


@pytest.mark.parametrize("name", ["report.md", "report.html", "verdicts.csv", "runs.csv"])
def test_report_files_planted_as_links_are_not_written_through(work, capsys, name):
    assert study() == 0
    s = work / "out" / "s"
    (s / name).unlink()
    (s / name).symlink_to(work / "victim" / "keep.txt")
    capsys.readouterr()
    assert main(["rarity", "--analyse-only", "--study-dir", "out/s", "--no-wandb"]) == 2
    assert "symbolic link" in one_line(capsys)
    assert (work / "victim" / "keep.txt").read_text() == "precious data"


def test_a_user_file_where_the_report_goes_is_not_overwritten(work, capsys):
    (work / "out" / "s").mkdir(parents=True)
    assert study() == 0
    s = work / "out" / "s"
    os.link(work / "victim" / "keep.txt", s / "report.md.tmp-user")  # unrelated: left alone
    (s / "report.md").unlink()
    os.link(work / "victim" / "keep.txt", s / "report.md")  # a hard link to the user's file
    capsys.readouterr()
    assert main(["rarity", "--analyse-only", "--study-dir", "out/s", "--no-wandb"]) == 2
    assert "linked elsewhere" in one_line(capsys)
    assert (work / "victim" / "keep.txt").read_text() == "precious data"


def test_atomic_writes_use_fresh_temporary_names(work):
    from ntrl.records import write_json_atomic

    (work / "d").mkdir()
    (work / "d" / "study.json.tmp").symlink_to(work / "victim" / "keep.txt")  # the old fixed name
    write_json_atomic(work / "d" / "study.json", {"a": 1})
    assert (work / "victim" / "keep.txt").read_text() == "precious data"
    assert not (work / "d" / "study.json").is_symlink() and json.loads((work / "d" / "study.json").read_text()) == {"a": 1}


def test_dangling_marker_link_in_an_empty_folder_is_refused(work, capsys):
    (work / "out" / "s").mkdir(parents=True)
    (work / "out" / "s" / ".ntrl-run").symlink_to(work / "victim" / "created_by_ntrl")
    assert study() == 2
    assert "symbolic link" in one_line(capsys)
    assert not (work / "victim" / "created_by_ntrl").exists()


def test_force_checks_everything_before_it_removes_anything(work, capsys):
    assert study() == 0
    s = work / "out" / "s"
    before = files(s)
    # a user file inside one of the study's run directories: --force with a new grid refuses
    run = next((s / "runs").iterdir())
    (run / "my_analysis.txt").write_text("mine")
    (work / "g.toml").write_text(GRID.replace("seeds = 1", "seeds = 2"))
    capsys.readouterr()
    assert study(["--force"]) == 2
    assert "my_analysis.txt" in one_line(capsys)
    after = files(s)
    assert after.pop(str((run / "my_analysis.txt").relative_to(s))) == b"mine"
    assert after == before  # nothing was removed
    # runs/ replaced by a link to elsewhere: refused before anything is removed
    (run / "my_analysis.txt").unlink()
    elsewhere = work / "elsewhere"
    (s / "runs").rename(elsewhere)
    (s / "runs").symlink_to(elsewhere)
    before = files(work)
    assert study(["--force"]) == 2
    assert "symbolic link" in one_line(capsys)
    assert files(work) == before


def test_wandb_online_on_a_terminal_without_login_never_prompts(work):
    """W&B asks at its login prompt on a terminal and waits there; ntrl checks for a login first."""
    import pty

    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(work), WANDB_SILENT="true")
    start = time.time()
    proc = subprocess.Popen([NTRL, "train", "bandit", "--steps", "3", "--quiet", "--out", "runs", "--run-name", "t",
                             "--wandb", "online"], stdin=slave, stdout=slave, stderr=slave, env=env, cwd=work)
    os.close(slave)
    output = b""
    try:
        while proc.poll() is None and time.time() - start < 120:
            import select

            if select.select([master], [], [], 0.2)[0]:
                try:
                    output += os.read(master, 4096)
                except OSError:
                    break
        assert proc.wait(timeout=5) == 0, output.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = output.decode(errors="replace")
    assert "Enter your choice" not in text and "logging offline instead" in text
    assert len((work / "runs" / "t" / "records.jsonl").read_text().splitlines()) == 3


def test_config_error_survives_the_trip_from_a_worker():
    e = pickle.loads(pickle.dumps(ConfigError("--run-name", "is bad")))
    assert isinstance(e, ConfigError) and e.flag == "--run-name" and str(e) == "--run-name: is bad"


def test_a_run_that_fails_in_a_worker_says_why(work, capsys):
    """A directory of the user's where a run of the study would go: that run fails with the reason,
    the others complete (the pool is not broken by an error it cannot unpickle)."""
    (work / "g.toml").write_text(GRID.replace('optimizers = ["sgd"]', 'optimizers = ["sgd", "npg"]'))
    runs = work / "out" / "s" / "runs"
    assert study() == 0
    victim = runs / "bandit-single_logit-npg-exact-rewarded-p0=0.01-seed0"
    import shutil

    shutil.rmtree(victim)
    victim.mkdir()
    (victim / "mine.txt").write_text("mine")
    (work / "out" / "s" / "runs" / "bandit-single_logit-sgd-exact-punished-p0=0.2-seed0" / "summary.json").unlink()
    capsys.readouterr()
    assert study() == 1
    line = one_line(capsys, "ntrl: training stopped: 1 run(s) failed")
    assert "did not write" in line
    assert (victim / "mine.txt").read_text() == "mine"


@pytest.mark.parametrize("text, words", [
    ('lrs = { bandit = { single_logit = { sgd = inf } } }', "finite learning rate"),
    ('[lrs.cartpole.mlp]\nsgd = 0.1', "unknown environment"),
])
def test_impossible_learning_rates_are_refused_up_front(work, capsys, text, words):
    (work / "g.toml").write_text(GRID + text + "\n")
    assert study() == 2
    assert words in one_line(capsys)
    assert not (work / "out").exists()


@pytest.mark.parametrize("content", ["{", "", "[1]"])
def test_damaged_study_file_in_a_study_is_one_line_and_force_replaces_it(work, capsys, content):
    assert study() == 0
    (work / "out" / "s" / "study.json").write_text(content)
    capsys.readouterr()
    assert study() == 2
    assert "--force" in one_line(capsys)
    assert study(["--force"]) == 0


def test_long_names_and_literal_tilde(work, capsys):
    assert main(["train", "bandit", "--run-name", "x" * 300, "--steps", "1", "--no-wandb", "--quiet"]) == 2
    assert "at most 255" in one_line(capsys)
    assert main(["train", "bandit", "--out", "~/ntrl-t", "--run-name", "r", "--steps", "1", "--no-wandb",
                 "--quiet"]) == 0
    assert (work / "~" / "ntrl-t" / "r" / "records.jsonl").exists()  # "~" is a name, as the shell left it


@pytest.mark.parametrize("argv, words", [
    (["train", "bandit", "--noise-std", "inf"], "--noise-std"),
    (["train", "bandit", "--dtype", "float32", "--lr", "1e39"], "--lr"),
])
def test_inputs_that_used_to_raise_tracebacks(work, capsys, argv, words):
    assert main([*argv, "--steps", "1", "--no-wandb", "--quiet"]) == 2
    assert one_line(capsys).startswith(f"ntrl: error: {words}")


@pytest.mark.parametrize("array", [np.array(["a", "b", "c", "d"]), np.zeros((2, 4), dtype=complex),
                                   np.zeros(2, dtype=[("a", float), ("b", float), ("c", float), ("d", float)])])
def test_npy_probe_states_that_are_not_real_numbers(work, capsys, array):
    np.save(work / "p.npy", array)
    assert main(["train", "--env", "CartPole-v1", "--probe-states", "p.npy", "--steps", "1", "--no-wandb",
                 "--quiet"]) == 2
    assert "not a real-valued numeric array" in one_line(capsys)


def test_damaged_records_of_a_finished_run_in_analyse_only(work, capsys):
    assert study() == 0
    run = next(p for p in (work / "out" / "s" / "runs").iterdir())
    (run / "records.jsonl").write_text('{"update": 0}\nnot json\n{"update": 1}\n')
    capsys.readouterr()
    assert main(["rarity", "--analyse-only", "--study-dir", "out/s", "--no-wandb"]) == 2
    assert "records cannot be read" in one_line(capsys)


def test_working_directory_leaves_sys_path_after_the_user_module_is_imported(tmp_path, monkeypatch):
    from ntrl.experiments.user_properties import import_user_module

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymod.py").write_text("X = 1\n")
    (tmp_path / "tabulate.py").write_text("raise SystemExit('a library imported the cwd copy of tabulate')\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert import_user_module("mymod", "--env").X == 1
    assert str(tmp_path) not in sys.path


def test_degenerate_grid_reports_without_a_traceback(work, capfd):
    """max_steps = 1: nothing escapes, so the escape plot has nothing for its log axis; the plot is
    left out with one line and the report is written."""
    (work / "g.toml").write_text(GRID.replace("max_steps = 200", "max_steps = 1").replace("extinction_steps = 20",
                                                                                         "extinction_steps = 1"))
    assert study() == 0
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert err and all(line.startswith("ntrl: warning: the plot ") for line in err), err
    assert (work / "out" / "s" / "report.html").exists()
