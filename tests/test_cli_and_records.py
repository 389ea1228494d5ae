"""The command line, the record file's crash safety, and what W&B really stored."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ntrl.records import read_records
from ntrl.wandb_sink import read_offline_run

NTRL = [sys.executable, "-m", "ntrl.cli"]


def ntrl(*args, **kw):
    return subprocess.run([*NTRL, *args], capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--p0", "0"], "--p0"),
        (["--p0", "1.5"], "--p0"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.1"], "--lr"),
        (["--optimizer", "rmsprop"], "--optimizer"),
        (["--target", "2"], "--target"),
        (["--policy", "cnn"], "--policy"),
        (["--steps", "0"], "--steps"),
        (["--p0", "abc"], "--p0"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, flag):
    r = ntrl("train", "bandit", "--out", str(tmp_path), "--no-wandb", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_cli_run_prints_summary(tmp_path):
    r = ntrl("train", "bandit", "--out", str(tmp_path), "--no-wandb", "--quiet", "--steps", "30", "--lr", "0.05",
             "--policy", "single_logit", "--p0", "0.02", "--run-name", "r")
    assert r.returncode == 0, r.stderr
    assert "went from 0.02 to" in r.stdout and "R² =" in r.stdout and "records.jsonl" in r.stdout
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["updates"] == 30
    assert json.loads((tmp_path / "r" / "config.json").read_text())["p0"] == 0.02


def test_verbose_says_which_tangent_backend_answers_each_property(tmp_path):
    """Juice with an MLP: the per-state log-odds z behind κ runs on the structured backend, the
    exact-model P, F and R on the reference (with the reason); each is said once, however many
    updates are tracked, and nothing is said without --verbose."""
    r = ntrl("train", "juice", "--out", str(tmp_path), "--no-wandb", "--quiet", "--steps", "4", "--track-every", "1",
             "--width", "8", "--size", "3", "--horizon", "6", "--p0", "0.05", "--verbose")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "tangent engine" in line]
    assert "ntrl: tangent engine: structured backend for 'z'" in lines
    for name in ("P", "F", "R"):
        said = [line for line in lines if line.startswith(f"ntrl: tangent engine: reference backend for '{name}' (")]
        assert len(said) == 1 and "per_state" in said[0], lines
    quiet = ntrl("train", "juice", "--out", str(tmp_path), "--no-wandb", "--quiet", "--steps", "2", "--width", "8",
                 "--size", "3", "--horizon", "6", "--p0", "0.05", "--run-name", "q")
    assert quiet.returncode == 0 and "tangent engine" not in quiet.stderr


def test_verbose_with_env(tmp_path):
    """--verbose also works for ``ntrl train --env ID``."""
    r = ntrl("train", "--env", "ntrl/TwoArmedBandit-v0", "--steps", "2", "--verbose", "--out", str(tmp_path),
             "--no-wandb", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "ntrl: tangent engine: " in r.stderr


def test_flag_before_the_experiment_is_refused_not_dropped(tmp_path):
    """``ntrl train --p0 0.3 bandit`` used to train with the default p0; now it is one line, exit 2."""
    for flag in (["--verbose"], ["--p0", "0.3"], ["--lr", "0.5"]):
        r = ntrl("train", *flag, "bandit", "--steps", "1", "--out", str(tmp_path), "--no-wandb", "--quiet")
        assert r.returncode == 2
        assert r.stderr.strip() == (f"ntrl: error: {flag[0]}: flags go after the experiment (ntrl train bandit "
                                    f"{flag[0]} ...); a flag before it would not be read")
    assert list(tmp_path.iterdir()) == []


def test_enable_verbose_is_idempotent_and_writes_through_tqdm(capsys):
    import logging

    from ntrl.verbose import enable_verbose

    logger = logging.getLogger("ntrl")
    old_handlers, old_level = list(logger.handlers), logger.level
    try:
        enable_verbose()
        enable_verbose()
        assert sum(getattr(h, "ntrl_verbose", False) for h in logger.handlers) == 1
        logging.getLogger("ntrl.engine.tangent").info("hello %s", "there")
        assert capsys.readouterr().err.splitlines().count("ntrl: hello there") == 1
    finally:
        logger.handlers[:] = old_handlers
        logger.setLevel(old_level)


def test_killed_run_keeps_every_completed_record(tmp_path):
    proc = subprocess.Popen([*NTRL, "train", "bandit", "--out", str(tmp_path), "--no-wandb", "--quiet",
                             "--steps", "100000", "--run-name", "k", "--policy", "single_logit"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = tmp_path / "k" / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not path.exists() or path.stat().st_size < 20_000):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    records = read_records(path)
    assert len(records) > 10
    assert [r["update"] for r in records] == list(range(len(records)))
    # a line cut off mid-write is dropped, the rest stays readable
    with open(path, "a") as f:
        f.write('{"update": 99999, "P/va')
    assert len(read_records(path)) == len(records)


def test_corrupt_record_in_the_middle_is_an_error(tmp_path):
    p = tmp_path / "records.jsonl"
    p.write_text('{"a": 1}\n{"a": \n{"a": 2}\n')
    with pytest.raises(ValueError, match="corrupt"):
        read_records(p)


def test_wandb_offline_run_matches_local_records(tmp_path):
    r = ntrl("train", "bandit", "--out", str(tmp_path), "--quiet", "--steps", "12", "--track-every", "3",
             "--run-name", "w", env={**os.environ, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "w" / "summary.json").read_text())
    wdir = summary["wandb_dir"]
    assert wdir and Path(wdir).exists()
    logged = read_offline_run(wdir)
    local = read_records(tmp_path / "w")
    assert len(logged["history"]) == len(local) == 4
    for h, rec in zip(logged["history"], local):
        assert h["update"] == rec["update"]
        for key in ("P/value", "P/pred_delta", "P/real_delta", "P/ntvar_euc", "P/ntcov_opt", "kappa", "R/value"):
            assert h[key] == pytest.approx(rec[key], rel=1e-12)
    assert logged["summary"]["p_end"] == pytest.approx(summary["p_end"], rel=1e-12)
    assert logged["config"]["p0"] == 0.01 and logged["config"]["optimizer"] == "sgd"


def test_wandb_project_entity_tags_ids_version_and_records_artifact(tmp_path):
    """--wandb-project / --wandb-entity / --tags, or WANDB_PROJECT / WANDB_TAGS when absent; a re-run
    after --force is a W&B run of its own (unique id and name, both readable); the config carries
    the ntrl version; records.jsonl is a W&B artifact."""
    from ntrl import __version__

    data_dir = tmp_path / "wandb-data"  # W&B's own folder outside --out: its artifact staging lives there
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_PROJECT": "env-project", "WANDB_TAGS": "x, y",
           "WANDB_DATA_DIR": str(data_dir)}
    logged = []
    for extra in ([], ["--force", "--wandb-project", "flag-project", "--wandb-entity", "my-team", "--tags", "z"]):
        r = ntrl("train", "bandit", "--out", str(tmp_path), "--quiet", "--steps", "3", "--run-name", "w", *extra, env=env)
        assert r.returncode == 0, r.stderr
        logged.append(read_offline_run(json.loads((tmp_path / "w" / "summary.json").read_text())["wandb_dir"]))
    first, second = (w["run"] for w in logged)
    assert (first["project"], first["tags"]) == ("env-project", ["x", "y"])
    assert (second["project"], second["entity"], second["tags"]) == ("flag-project", "my-team", ["z"])
    assert first["run_id"] != second["run_id"] and first["display_name"] != second["display_name"]
    assert all(w["display_name"].startswith("w-") and w["run_id"].startswith("w-") for w in (first, second))
    assert all(w["config"]["ntrl_version"] == __version__ for w in logged)
    assert all({"name": "records-w", "type": "records"} in w["artifacts"] for w in logged)
    # the artifact references the run's files in place: no copy of the records outside --out
    assert not [p for p in data_dir.rglob("*") if p.is_file()]


def test_unique_run_ids_are_readable_valid_and_keep_a_long_names_ends():
    import re

    from ntrl.wandb_sink import unique_run_id

    long = "CartPole-v1-reinforce-mlp-lr=0.01-seed0-" + "x" * 40 + "-9afb1a"
    ids = {unique_run_id(long) for _ in range(20)}
    assert len(ids) == 20  # unique
    for run_id in ids:
        assert len(run_id) <= 64 and re.fullmatch(r"[A-Za-z0-9_-]+", run_id)
        assert run_id.startswith("CartPole-v1-reinforce-mlp") and run_id[:-9].endswith("9afb1a")
    assert re.fullmatch(r"w-[0-9a-f]{8}", unique_run_id("w"))


def test_wandb_tables_declare_plain_column_types_and_keep_their_rows():
    """ntrl.wandb_sink.table: rows of one plain type per column get those types declared (W&B
    then checks rather than infers them); rows with a None or a numpy number are left to
    W&B's inference; the rows are the same either way."""
    import numpy as np

    from ntrl.wandb_sink import table

    rows = [["a", 1, 0.5], ["b", 2, 0.25]]
    t = table(["run", "update", "P"], rows)
    assert t.data == rows and "None" not in str(t._column_types)
    rows[1][2] = float("nan")  # W&B types a NaN as None: that column is declared optional
    t = table(["run", "update", "P"], rows)
    assert t.data == rows and "'P': None or Number" in str(t._column_types) and "'update': Number" in str(t._column_types)
    for odd in (None, np.float64(0.25)):
        other = [["a", 1, 0.5], ["b", 2, odd]]
        t = table(["run", "update", "P"], other)
        assert t.data == other and "None" in str(t._column_types)  # inferred, optional as before
    assert table(["run"], []).data == []
