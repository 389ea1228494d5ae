"""One typed source for every flag (issue 11): each seam of the old hand-written bridge has a test
that fails if it comes back."""

from __future__ import annotations

import dataclasses
import json
import re
import typing

import pytest

from ntrl.cli import EXPERIMENTS, RarityArgs, experiment_config, load_class, main, one_line
from ntrl.config import TrainConfig

FAST = ["--steps", "2", "--no-wandb", "--quiet"]
HELPS = {
    "ntrl train bandit": ["train", "bandit", "--help"],
    "ntrl train juice": ["train", "juice", "--help"],
    "ntrl train --env ID": ["train", "--env", "CartPole-v1", "--help"],
    "ntrl rarity": ["rarity", "--help"],
}


def config_of(prog: str) -> type:
    if prog == "ntrl rarity":
        return RarityArgs
    if prog == "ntrl train --env ID":
        return load_class("ntrl.experiments.gym_env:GymConfig")
    return experiment_config(prog.split()[-1])


def choices(kind) -> tuple | None:
    """The allowed values of a Literal (or Optional[Literal]) field type."""
    if typing.get_origin(kind) is typing.Literal:
        return typing.get_args(kind)
    for arg in typing.get_args(kind):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def flag_help(text: str) -> dict[str, str]:
    """--flag → its help entry (the lines up to the next flag) in tyro's help box."""
    entries, current = {}, None
    for line in text.splitlines():
        body = line.strip().strip("│").strip()
        m = re.match(r"(?:-\w, )?(--[\w-]+)(?:, --no-[\w-]+)?", body)
        if m:
            current = m.group(1)
            entries[current] = body
        elif current and body and not body.startswith("╰"):
            entries[current] += " " + body
    return entries


@pytest.mark.parametrize("prog", sorted(HELPS))
def test_every_help_lists_the_choices_of_every_choice_flag_and_each_default_once(prog, capsys):
    assert main(HELPS[prog]) == 0
    entries = flag_help(capsys.readouterr().out)
    cls = config_of(prog)
    hints = typing.get_type_hints(cls)
    checked = 0
    for f in dataclasses.fields(cls):
        if not f.metadata.get("flag", True):
            assert f"--{f.name.replace('_', '-')}" not in entries
            continue
        flag = f"--{f.name.replace('_', '-')}"
        assert flag in entries, (prog, flag)
        entry = " ".join(entries[flag].split())
        # each default once (a repeatable list flag has none: it starts empty)
        assert entry.count("(default:") == (0 if "(repeatable)" in entry else 1), (prog, entry)
        allowed = choices(hints[f.name])
        if allowed:
            listed = re.search(r"\{([^}]*)\}", entry)
            assert listed and {str(a) for a in allowed} <= set(listed.group(1).split(",")), (prog, flag, entry)
            checked += 1
    assert checked >= 1


def test_differing_defaults_are_each_commands_own_in_its_help(capsys):
    defaults = {}
    for prog in ("ntrl train bandit", "ntrl train --env ID"):
        main(HELPS[prog])
        entries = flag_help(capsys.readouterr().out)
        defaults[prog] = {k: re.search(r"\(default: ([^)]*)\)", " ".join(v.split())).group(1)
                          for k, v in entries.items() if "(default:" in v}
    for flag, bandit, env in [("--width", "64", "32"), ("--batch-size", "64", "8"), ("--mode", "exact", "sampled"),
                              ("--fisher", "True", "False"), ("--target", "1", "0")]:
        assert defaults["ntrl train bandit"][flag] == bandit and defaults["ntrl train --env ID"][flag] == env


def test_summary_names_every_setting_that_differs_from_the_generic_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--env", "CartPole-v1", "--seed", "3", *FAST]) == 0
    out = capsys.readouterr().out
    said = out.split("Settings other than the generic defaults: ", 1)[1]
    for item in ("--mode sampled", "--batch-size 8", "--width 32", "--fisher False", "--seed 3", "--steps 2"):
        assert item in said, said
    assert main(["train", "bandit", "--run-name", "plain", "--steps", str(TrainConfig().steps), "--no-wandb",
                 "--quiet"]) == 0
    assert "Settings other than" not in capsys.readouterr().out


def test_booleans_are_flag_pairs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "bandit", "--no-fisher", "--run-name", "a", *FAST]) == 0
    assert json.loads((tmp_path / "runs" / "a" / "config.json").read_text())["fisher"] is False
    assert main(["train", "--env", "CartPole-v1", "--fisher", "--run-name", "b", *FAST]) == 0
    assert json.loads((tmp_path / "runs" / "b" / "config.json").read_text())["fisher"] is True
    assert main(["train", "bandit", "--fisher", "true", *FAST]) == 2  # no value after a boolean flag


@pytest.mark.parametrize("argv, line", [
    (["train", "--p0", "0.3", "bandit", "--steps", "1"],
     "ntrl: error: --p0: flags go after the experiment (ntrl train bandit --p0 ...); a flag before it would not be read"),
    (["train", "bandit", "--size", "3"], "ntrl: error: --size: `ntrl train bandit` has no such flag"),
    (["train", "juice", "--reward-do", "2"], "ntrl: error: --reward-do: `ntrl train juice` has no such flag"),
    (["train", "bandit", "--optimizer", "lbfgs"],
     "ntrl: error: --optimizer: invalid choice 'lbfgs'; choose one of sgd, adam, npg, sign"),
    (["train", "bandit", "--lr", "fast"], "ntrl: error: --lr: could not convert string to float: 'fast'"),
    (["train", "bandit", "--steps"], "ntrl: error: --steps: needs a value"),
    (["train", "bandit", "--env", "CartPole-v1"], "ntrl: error: --env: give a built-in experiment (bandit) or --env ID, not both"),
    (["train", "cartpole"], "ntrl: error: unknown experiment 'cartpole'; choose bandit, kbandit, juice or --env ID"),
    (["fly"], "ntrl: error: unknown command 'fly'; choose train or rarity (see ntrl --help)"),
    (["rarity", "--quick", "--full"], "ntrl: error: --full: give one of --quick, --full or --config, not --quick and --full"),
    (["rarity", "--study-dir", "x"], "ntrl: error: --study-dir: is for --analyse-only"),
    (["train", "--env", "CartPole-v1", "--algo", "ppo", "--optimizer", "adam"],
     "ntrl: error: --optimizer: applies to --algo reinforce only; --algo ppo uses --lr, --steps"),
    (["train", "--env", "CartPole-v1", "--algo", "a2c", "--no-fisher"],
     "ntrl: error: --fisher: applies to --algo reinforce only; --algo a2c uses --lr"),
    (["train", "bandit", "--track-every", "10", "--track-per-decade", "10"],
     "ntrl: error: --track-per-decade: tracks log-spaced, --track-every every k-th update; give one of them"),
])
def test_every_seam_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, line):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--optimizer", "--p0", "--baseline", "--batch-size", "--policy"])
def test_sb3_rejects_each_reinforce_only_flag_naming_what_ppo_uses(tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    value = {"--optimizer": "adam", "--p0": "0.3", "--baseline": "none", "--batch-size": "4", "--policy": "mlp"}[flag]
    assert main(["train", "--env", "CartPole-v1", "--algo", "ppo", flag, value, *FAST]) == 2
    err = capsys.readouterr().err
    assert f"{flag}: applies to --algo reinforce only" in err and "--n-steps" in err


@pytest.mark.parametrize("algo, lr", [("ppo", 3e-4), ("a2c", 7e-4), ("reinforce", 0.01)])
def test_learning_rate_defaults_follow_the_algorithm(tmp_path, monkeypatch, capsys, algo, lr):
    import tempfile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.delenv("SB3_LOGDIR", raising=False)  # conftest's: SB3's default logger would write there instead
    extra = ["--n-steps", "16"] if algo != "reinforce" else []
    assert main(["train", "--env", "CartPole-v1", "--algo", algo, "--run-name", algo, *extra, *FAST]) == 0
    assert json.loads((tmp_path / "runs" / algo / "config.json").read_text())["lr"] == lr
    assert list((tmp_path / "tmp").glob("SB3-*")) == []  # SB3's default logger would make a folder there
    said = capsys.readouterr().out.split("Settings other than the generic defaults: ", 1)[1]
    if algo != "reinforce":  # the REINFORCE-only settings an SB3 run does not use are not named
        assert f"--lr {lr:g}" in said and "--mode" not in said and "--fisher" not in said, said


def test_property_flag_repeats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--env", "CartPole-v1", "--property", "action:1", "--property", "left=action:0",
                 "--run-name", "p", *FAST]) == 0
    assert json.loads((tmp_path / "runs" / "p" / "config.json").read_text())["property"] == ["action:1", "left=action:0"]
    record = json.loads((tmp_path / "runs" / "p" / "records.jsonl").read_text().splitlines()[0])
    assert "left/value" in record and "action:1/value" in record


def test_rarity_out_is_the_parent_and_seed_and_verbose_are_flags(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.toml").write_text('name = "s"\npolicies = ["single_logit"]\noptimizers = ["sgd"]\n'
                                     'p0s = [0.01]\nseeds = 1\nextinction_steps = 20\nmax_steps = 200\n')
    assert main(["rarity", "--config", "g.toml", "--out", "studies", "--seed", "7", "--verbose", "--no-wandb",
                 "--quiet"]) == 0
    err = capfd.readouterr().err
    assert "ntrl: tangent engine: " in err  # --verbose reached the workers
    runs = sorted(p.name for p in (tmp_path / "studies" / "s" / "runs").iterdir())
    assert runs and all(r.endswith("seed7") for r in runs), runs
    assert json.loads((tmp_path / "studies" / "s" / "study.json").read_text())["seed"] == 7
    assert main(["rarity", "--analyse-only", "--study-dir", "studies/s", "--no-wandb"]) == 0


def test_one_line_folds_tyro_boxes_in_utf8_and_ascii():
    box = ("╭─ Unrecognized options ─────╮\n│ Unrecognized options: --size, 3 │\n│ ────── │\n"
           "│ Perhaps you meant: │\n│     --batch-size INT │\n╰──────╯\n")
    assert one_line(box, "ntrl train bandit") == ("--size: `ntrl train bandit` has no such flag; did you mean "
                                                  "--batch-size? (see `ntrl train bandit --help`)")
    assert one_line("\x1b[31m╭─ Value error ─╮\n│ Error parsing --lr: bad │\n╰─╯", "p") == "--lr: bad"
    ascii_box = (" Invalid choice      \n ------------------- \n  invalid choice 'x' for argument '--mode'. Expected "
                 "one of ('exact', 'sampled').\n  -----------------\n  For full helptext, run p --help\n")
    assert one_line(ascii_box, "p") == "--mode: invalid choice 'x'; choose one of exact, sampled"


def test_each_flag_comes_from_its_config_field():
    """The help of a flag is its field's metadata: there is no separate help table."""
    import ntrl.cli as cli

    assert not hasattr(cli, "HELP") and not hasattr(cli, "add_config_flags")
    for name in EXPERIMENTS:
        for f in dataclasses.fields(experiment_config(name)):
            assert f.metadata.get("help"), (name, f.name)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_train_device(tmp_path, capsys):
    """--device cuda without a GPU is one line and writes nothing; --device auto without one is the
    CPU run; SB3 algorithms refuse the flag (they train on SB3's own device)."""
    from ntrl.cli import main

    assert main(["train", "bandit", "--device", "cuda", "--steps", "2", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "--device: cuda was asked for, but torch sees no CUDA device" in err[0]
    assert not (tmp_path / "a").exists()
    assert main(["train", "bandit", "--device", "auto", "--steps", "2", "--out", str(tmp_path / "b"), "--quiet",
                 "--no-wandb"]) == 0
    assert "went from 0.01" in capsys.readouterr().out
    assert main(["train", "--env", "CartPole-v1", "--algo", "ppo", "--device", "auto", "--out",
                 str(tmp_path / "c"), "--quiet", "--no-wandb"]) == 2
    assert "--device: applies to ntrl's REINFORCE loop" in capsys.readouterr().err


def test_the_grid_flags_help_counts_the_grids_runs():
    """`ntrl rarity --help` says how many runs --quick and --full hold; the grids decide the numbers."""
    import dataclasses

    from ntrl.cli import RarityArgs
    from ntrl.study.grid import StudyConfig, enumerate_runs

    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(RarityArgs)}
    assert f"({len(enumerate_runs(StudyConfig.quick()))} runs)" in helps["quick"]
    assert f"({len(enumerate_runs(StudyConfig.full()))} runs)" in helps["full"]


@pytest.mark.parametrize("handler", ["_raise_interrupt", "_raise_terminated"])
def test_once_asked_to_stop_ntrl_prints_no_more_warnings(handler, monkeypatch):
    """An interrupt that lands inside an import makes some modules warn as they unwind (Cython's
    "failed to patch module with custom type" on SIGTERM while Ray imports): after ntrl's Ctrl-C
    or SIGTERM handler has run, a warning prints nothing, so the user sees ntrl's one line."""
    import signal
    import warnings

    from ntrl import cli

    monkeypatch.setattr(cli, "_TERMINATED", [])
    with warnings.catch_warnings():
        with pytest.raises(KeyboardInterrupt):
            getattr(cli, handler)(signal.SIGTERM, None)
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("Cython module failed to patch module with custom type", RuntimeWarning)
        assert seen == []
    with warnings.catch_warnings(record=True) as seen:  # and only then
        warnings.simplefilter("always")
        warnings.warn("before any interrupt", RuntimeWarning)
    assert len(seen) == 1
