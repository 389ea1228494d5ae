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
import errno
import fcntl
import functools
import json
import os
import shutil
import threading
import time
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


class RunLocked(ConfigError):
    """A run directory that another live process holds (:class:`RunDirLocks`)."""


# flock(2) errors of a file system that cannot lock a directory opened for reading (NFS, which
# emulates flock with byte-range locks; Lustre without its flock option; some CIFS): runs go on
# there without their lock, said once
_NO_LOCKING = (errno.EBADF, errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_HELD: dict[tuple[int, int], list[int]] = {}  # this process's locked directories: (st_dev, st_ino) → [fd, holders]
_HELD_GUARD = threading.Lock()  # _HELD is shared by the threads of the process
_SAID_NO_LOCKING: set[int] = set()  # the file systems (st_dev) already said to lock nothing
CREATING_WAIT_S = 10.0  # how long a run directory's making waits for --out's lock before it is refused


class RunDirLocks:
    """Exclusive ``flock(2)`` locks on run directories, held while their runs train, so that
    another process never trains, resumes or replaces (``force``) a run that a live one is still
    writing: it is refused with the holder's PID. The lock is on the directory itself (nothing is
    written for it, so nothing is left to clean up), and the kernel drops it when its holder dies,
    however it dies: a run whose process was killed is never blocked. A process holds each
    directory once, whichever of its :class:`RunDirLocks` (or threads) took it (a study's worker,
    then the run it trains), until the last of them lets go: the locks keep processes apart, not
    the threads of one. Each held directory takes one file descriptor, closed on ``exec`` (a
    process started with ``subprocess`` does not keep the lock; a ``fork()``-ed child shares it
    until it exits); :meth:`reserve` raises the soft limit on open files where a population needs
    more. On a file system that cannot lock a directory (NFS, for one) runs go on without their
    lock, said once. Use as a context manager: leaving it lets go of its locks."""

    def __init__(self) -> None:
        self._keys: list[tuple[int, int]] = []  # what this holds, once each

    def __enter__(self) -> "RunDirLocks":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let go of every lock this holds. An interrupt (Ctrl-C, or SIGTERM taken as one) that
        lands meanwhile lets go of the rest before it goes on, so that a long-lived process (a
        notebook) does not keep them from other processes."""
        try:
            while self._keys:
                _let_go(self._keys.pop())
        finally:
            while self._keys:  # only after an interrupt above
                _let_go(self._keys.pop())

    def __len__(self) -> int:
        return len(self._keys)

    @staticmethod
    def reserve(n: int, flag: str = "--population") -> None:
        """Raise the soft limit on open files (RLIMIT_NOFILE) towards its hard limit, so that ``n``
        more locks fit beside what the process has open (a margin of :data:`SPARE_FILES`); a
        ConfigError where the hard limit is too low."""
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 64
        need = in_use + n + SPARE_FILES
        if soft == resource.RLIM_INFINITY or need <= soft:
            return
        if hard != resource.RLIM_INFINITY and need > hard:
            raise ConfigError(flag, f"{n} run directories are to be locked, one open file each, but this process may "
                                    f"open at most {hard} files (ulimit -Hn); "
                                    + ("train fewer members at once, or raise the limit" if flag == "--population"
                                       else "raise the limit"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    def acquire(self, run_dir: Path, flag: str = "--run-name") -> os.stat_result | None:
        """Lock the directory ``run_dir`` (not through a symbolic link; nothing where there is no
        directory), or a :class:`RunLocked` naming the live process that holds it (``flag``: what
        the error names). Returns the directory's stat, None where there is none."""
        try:
            fd = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):  # nothing to lock: the checks say why
                return None
            raise ConfigError(flag, f"cannot open {run_dir} to lock it: {e.strerror or e}") from None
        try:  # the descriptor is closed on every way out but the lock's being held (fd −1 once closed or kept)
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
            with _HELD_GUARD:
                if key in self._keys or key in _HELD:
                    os.close(fd)
                    fd = -1
                    if key not in self._keys:  # this process holds it already, for another
                        _HELD[key][1] += 1
                        self._keys.append(key)
                    return st
                locked = _try_flock(fd, run_dir, st, flag)
                if locked is None:
                    os.close(fd)  # the file system locks nothing
                    fd = -1
                    return st
                if not locked:
                    other = "run name" if flag == "--run-name" else "directory"
                    raise RunLocked(flag, f"{run_dir} is being trained by another live process ({holder_text(st)}), "
                                          f"or belongs to a population it trains; wait for it to end or stop it, "
                                          f"or choose another {other}")
                _HELD[key] = [fd, 1]
                fd = -1
                self._keys.append(key)
                return st
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def release(self, run_dir_stat: os.stat_result) -> None:
        """Let go of the lock on the directory of ``run_dir_stat``, if this holds it."""
        key = (run_dir_stat.st_dev, run_dir_stat.st_ino)
        if key in self._keys:
            self._keys.remove(key)
            _let_go(key)

    @staticmethod
    @contextlib.contextmanager
    def creating(out: Path) -> Iterator[None]:
        """Hold ``out``'s own lock while a run directory in it is looked at, replaced, made and
        locked, so that no other process makes, locks or replaces it in between (they take the
        same lock, each for moments). Where ``out`` stays locked for :data:`CREATING_WAIT_S`, it is
        a run directory that another process trains (runs inside a run) or that process hangs: a
        :class:`RunLocked` naming it, rather than a wait without end."""
        try:
            fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:  # the checks that follow say what is wrong with out
            yield
            return
        try:
            st = os.fstat(fd)
            with _HELD_GUARD:
                ours = (st.st_dev, st.st_ino) in _HELD  # held as a run directory already: by this process alone
            deadline = time.monotonic() + CREATING_WAIT_S
            while not ours and _try_flock(fd, out, st, "--out") is False:
                if time.monotonic() > deadline:
                    raise RunLocked("--out", f"{out} has been locked by another process ({holder_text(st)}) for "
                                             f"{CREATING_WAIT_S:.0f} s: it is a run directory being trained (runs do "
                                             f"not go inside runs), or that process hangs while it makes a run in it; "
                                             f"choose another --out")
                time.sleep(0.01)
            yield
        finally:
            os.close(fd)


def _try_flock(fd: int, path: Path, st: os.stat_result, flag: str) -> bool | None:
    """An exclusive ``flock`` of ``fd`` without waiting: True once held, False where another
    process holds it, None where the file system cannot lock (said once per file system)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        if e.errno in _NO_LOCKING:
            if st.st_dev not in _SAID_NO_LOCKING:
                _SAID_NO_LOCKING.add(st.st_dev)
                from ntrl.wandb_sink import warn

                warn(f"the file system of {path} cannot lock a directory ({e.strerror or e}); runs there are not "
                     f"guarded against a second process training them")
            return None
        raise ConfigError(flag, f"cannot lock {path}: {e.strerror or e}") from None


def holder_text(st: os.stat_result) -> str:
    """"PID n" of the process holding a ``flock`` on the file of ``st``, as an error names it."""
    holder = flock_holder(st)
    return f"PID {holder}" if holder else "its PID unknown"


def _let_go(key: tuple[int, int]) -> None:
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[key]
            os.close(held[0])  # the only descriptor of its open file: its flock goes with it


SPARE_FILES = 256  # open files left for everything else when run directories are locked


def flock_holder(st: os.stat_result) -> int | None:
    """The PID holding a ``flock`` on the file of ``st``, from /proc/locks (Linux); None if unknown."""
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted and fields[4].isdigit():
                    return int(fields[4])
    except OSError:
        pass
    return None


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
