"""Safety (issue 10): nothing a user types destroys their files.

Each test builds a sandbox with user files around the target and checks that every one of them
survives, byte for byte.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ntrl.cli import main
from ntrl.run_dirs import MARKER

from grids import tiny_grid

FAST = ["--steps", "2", "--no-wandb", "--quiet"]


def user_files(root: Path) -> dict[str, bytes]:
    """A snapshot of every file under ``root`` (relative path → bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """tmp/A/thesis.txt, tmp/A/out/ with a sibling run and a user folder, cwd = tmp."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "A" / "out" / "notes").mkdir(parents=True)
    (tmp_path / "A" / "thesis.txt").write_text("four years of work")
    (tmp_path / "A" / "out" / "notes" / "todo.txt").write_text("user's")
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "sibling", *FAST]) == 0
    return tmp_path


def one_error_line(capsys, flag: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"ntrl: error: {flag}: "), err
    return err[0]


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "../escape", "/ABS", "a\\b", "x\0y"])
def test_run_name_that_is_not_a_name_is_refused_and_deletes_nothing(sandbox, capsys, name):
    if name == "/ABS":
        name = str(sandbox / "A")  # an absolute name that points at the user's directory
    before = user_files(sandbox)
    assert main(["train", "bandit", "--out", "A/out", "--run-name", name, "--force", *FAST]) == 2
    one_error_line(capsys, "--run-name")
    assert user_files(sandbox) == before


def test_force_refuses_a_directory_ntrl_did_not_make(sandbox, capsys):
    before = user_files(sandbox)
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "notes", "--force", *FAST]) == 2
    line = one_error_line(capsys, "--run-name")
    assert "did not write" in line and MARKER in line
    assert user_files(sandbox) == before


def test_force_replaces_ntrl_run_only(sandbox, capsys):
    run = sandbox / "A" / "out" / "sibling"
    assert json.loads((run / MARKER).read_text())["kind"] == "run"
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "sibling", *FAST]) == 2  # no --force
    assert "--force" in one_error_line(capsys, "--run-name")
    old_records = (run / "records.jsonl").read_text()
    (run / "my_notes.txt").write_text("the user's, inside a run ntrl made")
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "sibling", "--force", *FAST]) == 2
    assert "my_notes.txt" in one_error_line(capsys, "--run-name")
    assert (run / "my_notes.txt").read_text() == "the user's, inside a run ntrl made"
    (run / "my_notes.txt").unlink()
    (run / "records.jsonl").write_text(old_records + '{"update": 99}\n')
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "sibling", "--force", *FAST]) == 0
    assert (run / "records.jsonl").read_text() == old_records  # the old run was replaced
    assert (sandbox / "A" / "thesis.txt").read_text() == "four years of work"
    assert (sandbox / "A" / "out" / "notes" / "todo.txt").read_text() == "user's"


def test_run_directory_that_is_a_symlink_is_refused(sandbox, capsys):
    (sandbox / "A" / "out" / "link").symlink_to(sandbox / "A")
    before = user_files(sandbox)
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "link", "--force", *FAST]) == 2
    assert "symbolic link" in one_error_line(capsys, "--run-name")
    assert user_files(sandbox) == before


def test_empty_user_directory_can_hold_a_run(sandbox):
    (sandbox / "A" / "out" / "fresh").mkdir()
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "fresh", *FAST]) == 0
    assert (sandbox / "A" / "out" / "fresh" / MARKER).exists()


@pytest.mark.parametrize("command", [["train", "bandit", *FAST], ["rarity", "--quick", "--no-wandb", "--quiet"]])
@pytest.mark.parametrize("where", ["file", "under_file", "proc", "dev"])
def test_bad_out_is_one_line_and_leaves_no_directory(tmp_path, monkeypatch, capsys, command, where):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    out = {"file": "afile", "under_file": "afile/sub/dir", "proc": "/proc/ntrl-out", "dev": "/dev/ntrl-out"}[where]
    before = sorted(tmp_path.rglob("*"))
    assert main([*command[:2], "--out", out, *command[2:]]) == 2
    one_error_line(capsys, "--out")
    assert sorted(tmp_path.rglob("*")) == before
    assert not Path("/proc/ntrl-out").exists() and not Path("/dev/ntrl-out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write a read-only directory")
def test_unwritable_out_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["train", "bandit", "--out", str(ro / "x"), *FAST]) == 2
        assert "not writable" in one_error_line(capsys, "--out")
    finally:
        ro.chmod(0o755)


def test_every_file_of_a_run_resolves_under_out(sandbox):
    out = (sandbox / "A" / "out").resolve()
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "wb", "--steps", "2", "--quiet",
                 "--wandb", "offline"]) == 0
    files = [p for p in (out / "wb").rglob("*")]
    # the one exception is W&B's own: its service process keeps one log for all runs in W&B's
    # cache directory, and each run links to it
    outside = [p for p in files if out not in p.resolve().parents]
    assert files and {p.name for p in outside} <= {"debug-core.log"}  # linked when this process started W&B
    assert all(p.is_symlink() and "wandb" in str(p.resolve()) for p in outside)


# ---------------------------------------------------------------------- studies


def write_grid(path: Path, name: str = "tiny") -> Path:
    path.write_text(tiny_grid(name))
    return path


def test_study_into_a_non_empty_folder_that_is_not_a_study_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = write_grid(tmp_path / "grid.toml")
    (tmp_path / "papers" / "tiny").mkdir(parents=True)  # OUT/<study name> is the user's folder
    (tmp_path / "papers" / "tiny" / "draft.tex").write_text("mine")
    before = user_files(tmp_path)
    for extra in ([], ["--force"]):
        assert main(["rarity", "--config", str(grid), "--out", "papers", "--no-wandb", "--quiet", *extra]) == 2
        assert "holds no ntrl study" in one_error_line(capsys, "--out")
    assert user_files(tmp_path) == before  # not even a lock file was made there


def test_study_force_removes_only_what_the_study_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    grid = write_grid(tmp_path / "grid.toml")
    args = ["rarity", "--config", str(grid), "--out", "st", "--quiet"]
    assert main([*args, "--wandb", "offline"]) == 0
    st = tmp_path / "st" / "tiny"
    wrote = {"study.json", "report.html", "report.md", "verdicts.csv", "runs.csv"}
    assert wrote <= {p.name for p in st.iterdir()} and (st / "wandb").is_dir()
    # the user keeps notes in the study folder, in runs/, and a user file named like a report plot
    (st / "my_notes.md").write_text("mine")
    (st / "runs" / "my_run_notes").mkdir()
    (st / "runs" / "my_run_notes" / "n.txt").write_text("mine")
    (st / "escape_mine.png").write_bytes(b"mine")
    capsys.readouterr()
    grid.write_text(grid.read_text().replace("seeds = 1", "seeds = 2"))  # a different config: refused without --force
    assert main([*args, "--no-wandb"]) == 2
    assert "--force" in one_error_line(capsys, "--out")
    assert main([*args, "--no-wandb", "--force"]) == 0
    assert (st / "my_notes.md").read_text() == "mine"
    assert (st / "runs" / "my_run_notes" / "n.txt").read_text() == "mine"
    assert (st / "escape_mine.png").read_bytes() == b"mine"
    assert not (st / "wandb").exists()  # the old study's W&B summary run went with it
    assert json.loads((st / "study.json").read_text())["seeds"] == 2


def test_grid_name_that_is_not_a_name_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for name in ["..", "../up", "/tmp", "", "."]:
        grid = write_grid(tmp_path / "grid.toml", name=name)
        assert main(["rarity", "--config", str(grid), "--no-wandb", "--quiet"]) == 2
        assert "name" in one_error_line(capsys, "config key 'name'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.toml", "keep.txt"]


def test_a_run_directory_killed_between_making_and_marking_is_reused(sandbox):
    """A kill inside write_marker leaves only its temporary file (mkstemp's ``..ntrl-run.XXXX.tmp``):
    that directory is ntrl's and empty, so the next run uses it without --force."""
    import tempfile

    run = sandbox / "A" / "out" / "killed"
    run.mkdir()
    fd, tmp = tempfile.mkstemp(prefix=f".{MARKER}.", suffix=".tmp", dir=run)
    os.close(fd)
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "killed", *FAST]) == 0
    assert not Path(tmp).exists() and (run / MARKER).exists()
    (sandbox / "A" / "out" / "other").mkdir()
    (sandbox / "A" / "out" / "other" / ".ntrl-runaway.tmp").write_text("the user's")
    assert main(["train", "bandit", "--out", "A/out", "--run-name", "other", "--force", *FAST]) == 2
    assert (sandbox / "A" / "out" / "other" / ".ntrl-runaway.tmp").read_text() == "the user's"


def test_a_run_directory_replaced_with_force_loses_its_marker_last(tmp_path, monkeypatch):
    """--force removes a run of ntrl's with its marker last: a kill part-way (here an interrupt at
    the second file) leaves a directory still marked as ntrl's, which the next --force replaces,
    never config.json or records without the marker (which ntrl would refuse as not its own)."""
    from ntrl.run_dirs import RUN_KIND, check_run_dir, marker_kind, remove_marked_dir, write_marker

    run = tmp_path / "r"
    run.mkdir()
    write_marker(run, RUN_KIND)
    for name in ("config.json", "records.jsonl", "summary.json"):
        (run / name).write_text("{}")
    (run / "wandb").mkdir()
    (run / "wandb" / "x").write_text("w")
    removed = []
    real = Path.unlink

    def unlink(self, missing_ok=False):
        if len(removed) == 1:
            raise KeyboardInterrupt
        removed.append(self.name)
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        remove_marked_dir(run)
    monkeypatch.setattr(Path, "unlink", real)
    assert removed == ["config.json"] and marker_kind(run) == RUN_KIND
    assert check_run_dir(run, force=True) == "replace"
    remove_marked_dir(run)
    assert not run.exists()
