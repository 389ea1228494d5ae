"""Where ntrl writes, and the rules that keep it from touching anything it did not write.

* A *name* that becomes a path (``--run-name``, a study's ``name``) is one path component: not
  empty, not ``.`` or ``..``, no path separator, not absolute (:func:`check_name`).
* ``--out`` must be a directory ntrl can write, or a path where one can be made; it is checked
  before anything is created (:func:`check_out_dir`), and a directory ntrl creates for it and
  then fails to use is removed again (:func:`made_dirs`).
* Every directory ntrl creates to hold a run or a study carries a marker file
  (:data:`MARKER`, JSON with the kind and ntrl's version), written first. ``--force`` replaces
  only a directory that has the marker (:func:`replace_run_dir`); a non-empty directory without
  it is refused even with ``--force``.
* Every path ntrl writes resolves, after symlinks, to a path under ``--out``
  (:func:`inside`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Sequence

from ntrl.config import ConfigError
from ntrl.records import CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, write_json_atomic

MARKER = ".ntrl-run"
RUN_KIND = "run"
STUDY_KIND = "study"
WANDB_KIND = "wandb"
# Pseudo-filesystems where nothing of ntrl's belongs.
SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


@functools.lru_cache(maxsize=1)
def ntrl_version() -> str:
    """The installed ntrl's version (read once: a population marks a thousand run directories)."""
    try:
        from importlib.metadata import version

        return version("ntrl")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def check_name(name: object, flag: str) -> str:
    """``name`` as a single path component, or a ConfigError naming ``flag``."""
    if not isinstance(name, str):
        raise ConfigError(flag, f"must be a string, got {type(name).__name__} {name!r}")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if name in ("", ".", ".."):
        raise ConfigError(flag, f"must be a name, not {name!r}: choose a directory name such as my-run")
    if len(name.encode("utf-8", "surrogateescape")) > 255:
        raise ConfigError(flag, f"is {len(name.encode('utf-8', 'surrogateescape'))} bytes long; a file name can have "
                                f"at most 255")
    if "\0" in name or any(s in name for s in seps) or os.path.isabs(name):
        raise ConfigError(flag, f"must be a plain name without path separators, got {name!r}; "
                                f"to write elsewhere, change --out instead")
    return name


def _under_system_root(path: Path) -> str | None:
    text = str(path)
    for root in SYSTEM_ROOTS:
        if text == root or text.startswith(root + "/"):
            return root
    return None


def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """``out`` made absolute, after checking that ntrl could make and write it.

    Refused: a path that is a file or lies under a file, one under /proc, /sys or /dev, and one
    whose nearest existing ancestor is not a writable directory. Nothing is created here.
    """
    text = str(out)
    if not text.strip():
        raise ConfigError(flag, "must name a directory, got an empty path")
    path = Path(os.path.abspath(text))  # a literal "~" is a name, as it is for every other path ntrl writes
    try:
        resolved = path.resolve()
        root = _under_system_root(resolved) or _under_system_root(path)
        if root is not None:
            raise ConfigError(flag, f"{out} is under {root}, a system pseudo-filesystem; choose a directory of your own")
        probe = path
        while True:
            if probe.exists() or probe.is_symlink():
                if not probe.is_dir():
                    what = "is a file" if probe == path else f"lies under {probe}, which is a file"
                    raise ConfigError(flag, f"{out} {what}; choose a directory")
                break
            probe = probe.parent
    except OSError as e:
        raise ConfigError(flag, f"cannot look at {out}: {e.strerror or e}") from None
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(flag, f"{probe} is not writable, so {out} cannot be written; choose a directory you can write")
    return path


@contextlib.contextmanager
def made_dirs(path: Path, flag: str = "--out") -> Iterator[Path]:
    """Create ``path`` (and its missing parents); if the body raises, remove again the
    directories this call created, as long as they are still empty. OSErrors from creating
    become a ConfigError naming ``flag``."""
    created = missing_dirs(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty_dirs(created)
        raise ConfigError(flag, f"cannot create {path}: {e.strerror or e}") from None
    try:
        yield path
    except BaseException:
        remove_empty_dirs(created)
        raise


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and its parents that do not exist yet, innermost first (what making it creates)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_dirs(dirs: list[Path]) -> None:
    """Remove ``dirs`` (innermost first) while they are empty; stop at the first that is not."""
    for d in dirs:  # innermost first
        try:
            d.rmdir()
        except OSError:
            return


def inside(path: Path, root: Path, flag: str = "--out") -> Path:
    """``path``, after checking that it resolves (symlinks followed) to a path under ``root``."""
    real, real_root = path.resolve(), root.resolve()
    if real != real_root and real_root not in real.parents:
        raise ConfigError(flag, f"{path} resolves to {real}, outside {root}; ntrl writes only under --out "
                                f"(remove the symbolic link or choose another --out)")
    return path


def refuse_foreign_targets(directory: Path, patterns: list[str], flag: str = "--out") -> None:
    """Before ntrl (over)writes the files of ``directory`` matching ``patterns`` (names or globs):
    a ConfigError if one of them is a symbolic link, has another name elsewhere (a hard link), or
    is not among the files ntrl recorded in the directory's marker as its own."""
    ours = set(marker_files(directory))
    for pattern in patterns:
        for path in directory.glob(pattern):
            if path.is_symlink():
                raise ConfigError(flag, f"{path} is a symbolic link; ntrl does not write through links "
                                        f"(remove it, or choose another directory)")
            if path.name not in ours:
                raise ConfigError(flag, f"{path} was not written by ntrl, so ntrl will not overwrite it; move it away")
            if path.is_file() and path.stat().st_nlink > 1:
                raise ConfigError(flag, f"{path} is also linked elsewhere; ntrl will not overwrite it; remove it")


def ntrl_wandb_dir(parent: Path) -> Path | None:
    """``parent/wandb``, made and marked as ntrl's when absent (so that --force may remove it);
    None, with one line, when it is a symbolic link or a directory ntrl did not make."""
    from ntrl.wandb_sink import warn

    wandb_dir = parent / "wandb"
    if wandb_dir.is_symlink():
        warn(f"{wandb_dir} is a symbolic link; W&B runs are not logged there")
        return None
    if not wandb_dir.exists():
        wandb_dir.mkdir()
        write_marker(wandb_dir, WANDB_KIND)
    elif marker_kind(wandb_dir) != WANDB_KIND:
        warn(f"{wandb_dir} was not made by ntrl; W&B runs are not logged there")
        return None
    return wandb_dir


def marker_contents(kind: str) -> dict[str, str]:
    """What the marker of a directory of ``kind`` ("run" or "study") says."""
    return {"kind": kind, "ntrl": ntrl_version()}


def write_marker(directory: Path, kind: str) -> None:
    """Mark ``directory`` as made by ntrl (kind "run" or "study")."""
    write_json_atomic(directory / MARKER, marker_contents(kind))


def _marker(directory: Path) -> dict:
    path = directory / MARKER
    if path.is_symlink() or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def marker_kind(directory: Path) -> str | None:
    """The kind in ``directory``'s marker, or None when it has no (readable) marker."""
    kind = _marker(directory).get("kind")
    return kind if isinstance(kind, str) else None


def is_ntrl_run(directory: Path) -> bool:
    """Whether ``directory`` is a run directory of ntrl's: itself, not a link, with a run marker."""
    return not directory.is_symlink() and marker_kind(directory) == RUN_KIND


def marker_files(directory: Path) -> list[str]:
    """The plain file names ntrl recorded in ``directory``'s marker as written by it."""
    files = _marker(directory).get("files", [])
    if not isinstance(files, list):
        return []
    out = []
    for name in files:
        try:
            out.append(check_name(name, "marker"))
        except ConfigError:
            continue
    return out


def record_written_files(directory: Path, paths: list[Path]) -> None:
    """Add the files ``paths`` (directly inside ``directory``) to its marker's list of files ntrl
    wrote, so that ``--force`` may later remove exactly those."""
    data = _marker(directory)
    names = set(data.get("files", []) if isinstance(data.get("files"), list) else [])
    names |= {p.name for p in paths if p.parent.resolve() == directory.resolve()}
    data["files"] = sorted(names)
    data.setdefault("ntrl", ntrl_version())
    write_json_atomic(directory / MARKER, data)


def is_leftover_of(name: str, targets: Sequence[str]) -> bool:
    """A temporary file that :func:`ntrl.records.write_json_atomic` makes for one of ``targets``
    (``.NAME.XXXX.tmp``, before it is renamed into place), left behind by a kill."""
    return name.endswith(".tmp") and any(name.startswith(f".{t}.") for t in targets)


def is_marker_leftover(name: str) -> bool:
    """A temporary file of :func:`write_marker`, left by a kill between making and marking."""
    return is_leftover_of(name, [MARKER])


def is_empty_dir(path: Path) -> bool:
    """Empty, or holding no more than what a kill between making and marking it left behind."""
    if not path.is_dir():
        return False
    children = list(path.iterdir())
    return all(not c.is_symlink() and c.is_file() and
               (is_marker_leftover(c.name) or (c.name == MARKER and marker_kind(path) is None)) for c in children)


def check_run_dir(run_dir: Path, force: bool, flag: str = "--run-name", kind: str = RUN_KIND) -> str:
    """Whether ``run_dir`` may take a new run, touching nothing: "absent", "empty" (or holding
    only ntrl's own leftovers) or "replace" (a run of ntrl's, with ``force``); anything else is
    a ConfigError that says why."""
    if run_dir.is_symlink():
        raise ConfigError(flag, f"{run_dir} is a symbolic link; ntrl does not write through it. Remove it or choose another name")
    if not run_dir.exists():
        return "absent"
    if not run_dir.is_dir():
        raise ConfigError(flag, f"{run_dir} is a file, not a run directory; move it away or choose another name")
    if is_empty_dir(run_dir):
        return "empty"
    if marker_kind(run_dir) != kind:
        raise ConfigError(flag, f"{run_dir} holds files that ntrl did not write (no {MARKER} marker), so it is not "
                                f"replaced even with --force; move them away or choose another name")
    if not force:
        raise ConfigError(flag, f"run directory {run_dir} already holds a run; pass --force to replace it or choose another name")
    foreign = foreign_entries(run_dir)
    if foreign:
        raise ConfigError(flag, f"{run_dir} is a run of ntrl's but also holds {', '.join(foreign[:3])}"
                                f"{' ...' if len(foreign) > 3 else ''}, which ntrl did not write, so it is not "
                                f"replaced even with --force; move them away")
    return "replace"


def replace_run_dir(run_dir: Path, force: bool, flag: str = "--run-name", kind: str = RUN_KIND) -> None:
    """Make ``run_dir`` ready for a new run: absent or empty is fine; a directory that holds a run
    is removed with ``force``; anything else is refused with a ConfigError that says why
    (:func:`check_run_dir`)."""
    state = check_run_dir(run_dir, force, flag, kind)
    if state == "empty":
        for child in run_dir.iterdir():  # only ntrl's own leftovers (see is_empty_dir)
            if not child.is_symlink():
                child.unlink()
    elif state == "replace":
        remove_marked_dir(run_dir)


def remove_marked_dir(directory: Path) -> None:
    """Remove a directory of ntrl's with its marker last: a kill part-way leaves a directory that
    is still marked as ntrl's (which --force or a resume takes) or empty, never files without the
    marker that vouches for them (which ntrl would refuse as not its own)."""
    for child in sorted(directory.iterdir()):
        if child.name == MARKER:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    (directory / MARKER).unlink(missing_ok=True)
    directory.rmdir()


# What a run directory holds when ntrl alone wrote it (W&B writes inside wandb/).
RUN_FILES = (CONFIG_FILE, RECORDS_FILE, SUMMARY_FILE, "wandb", MARKER)


def foreign_entries(run_dir: Path) -> list[str]:
    """The entries of a run directory that ntrl does not write there (temporary files of its
    atomic writes are its own)."""
    out = []
    for child in sorted(run_dir.iterdir()):
        ours = child.name in RUN_FILES or is_leftover_of(child.name, RUN_FILES)
        if not ours or child.is_symlink() or (child.name == "wandb" and not child.is_dir()):
            out.append(child.name)
    return out
