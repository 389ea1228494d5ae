"""One live study per directory, and workers that end with their parent.

* :func:`study_lock` takes ``fcntl.flock`` on ``STUDY_DIR/.ntrl-lock``. The kernel drops the
  lock when the holder dies, however it dies, so a lock file left by a killed study never blocks
  a resume; a second live study is refused with the holder's PID.
* :func:`worker_init` runs in each worker process of the study's pool: it ignores SIGINT (the
  parent decides what Ctrl-C does) and starts a watchdog that ends the worker within
  :data:`WATCHDOG_INTERVAL_S` of its parent's death (SIGKILL included); on Linux the kernel's
  parent-death signal does the same at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from ntrl.config import ConfigError

LOCK_FILE = ".ntrl-lock"
WATCHDOG_INTERVAL_S = 0.1


@contextlib.contextmanager
def study_lock(study_dir: Path, flag: str = "--out") -> Iterator[None]:
    """Hold the study directory's lock for the body; a second holder is refused (ConfigError)."""
    import fcntl

    import stat

    path = study_dir / LOCK_FILE
    try:  # never through a symbolic link, and never a file that has another name elsewhere
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ConfigError(flag, f"cannot open the study lock {path}: {e.strerror or e} (a symbolic link there is "
                                f"refused; remove it)") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ConfigError(flag, f"{path} is not a lock file ntrl made (it is linked elsewhere); remove it")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(flag, f"{study_dir} is being written by another live ntrl study (PID {holder}); "
                                f"wait for it to end or stop it, or choose another directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def parent_alive(parent_pid: int) -> bool:
    """Whether the process that started this one is still its parent."""
    return os.getppid() == parent_pid


def _set_parent_death_signal() -> None:
    """Linux: have the kernel send SIGKILL to this process when its parent dies (prctl)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except Exception:  # the watchdog still covers it
        pass


def _end_at_once(signum: int, frame: object) -> None:
    """SIGTERM's default action, as a handler of its own: a study's worker ends at once, as
    before, rather than write its runs first (:mod:`ntrl.termination` leaves a program's own
    handler alone; the study says what it kept, in one line)."""
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


def worker_init(parent_pid: int) -> None:
    """Initializer of a study worker: ignore Ctrl-C, end at once on SIGTERM, and die with the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _end_at_once)
    # the parent holds these back while it starts a worker, and a new process inherits that mask
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
    _set_parent_death_signal()
    if not parent_alive(parent_pid):
        os._exit(1)

    def watch() -> None:
        while parent_alive(parent_pid):
            time.sleep(WATCHDOG_INTERVAL_S)
        os._exit(1)  # at once: no cleanup that could write into the study directory

    threading.Thread(target=watch, name="ntrl-parent-watchdog", daemon=True).start()
