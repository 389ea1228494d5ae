"""A local Ray instance ends with the study that started it, however the study ends.

``ray.shutdown()`` stops a local instance whenever the driver leaves through Python (a normal end,
an error, Ctrl-C, SIGTERM). A SIGKILL of the driver ends Ray's GCS, raylet and workers as well, but
leaves ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent`` running, for good (ray 2.60: they log
"Raylet is dead! Exiting" and stay), and so does ``ray.shutdown()`` itself at times, or a Ctrl-C
while ``ray.init`` starts them. The reaper is a small process the driver starts with a pipe on
its stdin. While the driver lives, it notes every :data:`SCAN_S` which of the driver's descendants
are Ray's (the command line names Ray's package directory, or is a ``ray::`` process title); once
the pipe closes, which the kernel does however the driver ends, it looks once more and kills those
still running (the same PID with the same start time), and exits. The driver makes itself a child
subreaper (:func:`become_subreaper`), so that Ray's processes orphaned while it lives (the agents,
once the raylet is gone) stay its descendants and in sight. (Their environment cannot mark them:
their process titles overwrite it.)

    python -I .../ntrl/study/reaper.py DRIVER_PID RAY_PACKAGE_DIR   (started by :func:`start_reaper`;
                                                                   the standard library alone, not ntrl)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

SCAN_S = 0.25


def process_table() -> dict[int, tuple[int, int]]:
    """PID → (parent PID, start time in clock ticks) of every live process (from /proc)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()  # state, ppid, …; the start time is field 22 of stat
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def ray_descendants(root: int, ray_dir: str, exclude: int) -> dict[int, int]:
    """PID → start time of ``root``'s descendants that are Ray's processes."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        cmd = command_line(pid)
        if pid != exclude and (cmd.startswith("ray::") or ray_dir in cmd):
            found[pid] = table[pid][1]
    return found


def kill_if_same(found: dict[int, int]) -> None:
    """SIGKILL each process of ``found`` that still runs with the start time it was seen with."""
    table = process_table()
    for pid, start in found.items():
        if table.get(pid, (None, None))[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    driver, ray_dir = int(argv[0]), argv[1]
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the driver, which decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    found: dict[int, int] = {}
    while True:
        found.update(ray_descendants(driver, ray_dir, os.getpid()))
        ready, _, _ = select.select([sys.stdin], [], [], SCAN_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):  # end of file: the driver has ended or let go
            found.update(ray_descendants(driver, ray_dir, os.getpid()))  # (none once the driver is gone)
            kill_if_same(found)
            return 0


def become_subreaper() -> None:
    """Linux: orphaned descendants of this process are re-parented to it, not to init
    (prctl PR_SET_CHILD_SUBREAPER); the reaper finds them among its descendants."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        PR_SET_CHILD_SUBREAPER = 36
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except Exception:  # the periodic scan still sees them
        pass


def start_reaper(ray_dir: str) -> subprocess.Popen:
    """Start the reaper for this process; close its stdin (:func:`stop_reaper`) to let it act."""
    # run as a file in isolated mode: no import of ntrl (and torch), nothing from the working directory;
    # in a session of its own, so that a terminal's Ctrl-C to the driver's process group does not reach
    # it while Python starts, before main() ignores SIGINT (a CI run saw it die so, printing "Fatal
    # Python error: init_import_site" into the driver's stderr)
    return subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__), str(os.getpid()), ray_dir],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
                            start_new_session=True)


def stop_reaper(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Let the reaper end what is left of Ray's processes, and wait for it."""
    try:
        proc.stdin.close()
        proc.wait(timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        proc.kill()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
