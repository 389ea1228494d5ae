"""A run directory is locked while its run trains (ntrl.run_dirs.RunDirLocks): a second process
that would train, resume or replace it is refused with the holder's PID, before anything is
written or removed; the lock goes with its holder, however that dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ntrl.config import ConfigError
from ntrl.experiments.bandit import BanditConfig
from ntrl.population import train_population
from ntrl.run_dirs import RunDirLocks
from ntrl.train import train

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from ntrl.run_dirs import RunDirLocks
    locks = RunDirLocks()
    for d in sys.argv[1:]:
        locks.acquire(Path(d))
    print("locked", flush=True)
    time.sleep(120)
""")


def config(out: Path, name: str, seed: int = 0, **kw) -> BanditConfig:
    return BanditConfig(policy="single_logit", steps=12, seed=seed, out=str(out), run_name=name, wandb="disabled", **kw)


def files_of(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class Holder:
    """Another live process that holds the locks of ``dirs``, as a training ntrl would."""

    def __init__(self, *dirs: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, *map(str, dirs)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


@pytest.fixture
def holder():
    made = []

    def start(*dirs: Path) -> Holder:
        made.append(Holder(*dirs))
        return made[-1]

    yield start
    for h in made:
        if h.proc.poll() is None:
            h.kill()


def test_force_does_not_replace_a_run_another_live_process_trains(tmp_path, holder):
    train(config(tmp_path, "r0"), progress=False)
    before = files_of(tmp_path / "r0")
    h = holder(tmp_path / "r0")
    with pytest.raises(ConfigError, match=rf"being trained by another live process \(PID {h.proc.pid}\)"):
        train(config(tmp_path, "r0", force=True), progress=False)
    assert files_of(tmp_path / "r0") == before  # nothing removed or written
    h.kill()  # the kernel drops the lock with its holder, however it dies
    train(config(tmp_path, "r0", force=True), progress=False)


def test_a_resumed_population_refuses_a_member_another_process_trains_before_writing_anything(tmp_path, holder):
    configs = [config(tmp_path, f"m{i}", seed=i) for i in range(3)]
    train_population(configs, progress=False)
    (tmp_path / "m1" / "summary.json").unlink()  # cut short: a resume would train it again
    (tmp_path / "m2" / "summary.json").unlink()
    before = files_of(tmp_path)
    h = holder(tmp_path / "m1")
    with pytest.raises(ConfigError, match=rf"m1 is being trained by another live process \(PID {h.proc.pid}\)") as e:
        train_population(configs, progress=False, resume=True)
    assert "resume=True" not in str(e.value)  # the hint for runs of other settings would mislead here
    assert files_of(tmp_path) == before  # m2, which was free, was not replaced either
    h.kill()
    result = train_population(configs, progress=False, resume=True)
    assert [r.summary["status"] for r in result.results] == ["finished"] * 3


def test_a_new_population_refuses_a_member_directory_another_process_holds(tmp_path, holder):
    (tmp_path / "m1").mkdir()  # an empty directory, which a population would take
    h = holder(tmp_path / "m1")
    with pytest.raises(ConfigError, match=f"PID {h.proc.pid}"):
        train_population([config(tmp_path, f"m{i}", seed=i) for i in range(3)], progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m1"] and not any((tmp_path / "m1").iterdir())


def test_runs_release_their_locks_when_they_end(tmp_path, holder):
    train(config(tmp_path, "r0"), progress=False)
    train_population([config(tmp_path, f"m{i}", seed=i) for i in range(2)], progress=False)
    holder(*(tmp_path / d for d in ("r0", "m0", "m1")))  # free again: another process locks them all
    fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd") if fd.isdigit()
           and os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [f for f in fds if f.startswith(str(tmp_path))]


def test_one_process_holds_a_directory_once_whichever_of_its_locks_took_it(tmp_path, holder):
    with RunDirLocks() as outer:
        outer.acquire(tmp_path)
        with RunDirLocks() as inner:  # a study's worker, then the run it trains: no conflict with itself
            inner.acquire(tmp_path)
            assert len(inner) == 1
        with pytest.raises(subprocess.CalledProcessError):  # still held after the inner one let go
            subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; "
                            "from ntrl.run_dirs import RunDirLocks; RunDirLocks().acquire(Path(sys.argv[1]))",
                            str(tmp_path)], check=True, capture_output=True)
    holder(tmp_path)  # and free once the outer one let go too


def test_a_file_system_that_cannot_lock_a_directory_trains_without_the_lock_and_says_so_once(tmp_path, monkeypatch,
                                                                                            capsys):
    import errno
    import fcntl

    from ntrl import run_dirs

    def no_locking(fd, operation):  # what NFS answers for flock on a directory opened for reading
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locking)
    monkeypatch.setattr(run_dirs, "_SAID_NO_LOCKING", set())
    train(config(tmp_path, "r0"), progress=False)
    train_population([config(tmp_path, f"m{i}", seed=i) for i in range(2)], progress=False)
    said = capsys.readouterr().err
    assert said.count("cannot lock a directory") == 1 and "not guarded against a second process" in said
    assert json.loads((tmp_path / "m1" / "summary.json").read_text())["status"] == "finished"


def test_a_study_s_force_removes_nothing_while_another_process_trains_one_of_its_runs(tmp_path, holder):
    from ntrl.study.grid import StudyConfig, enumerate_runs
    from ntrl.study.executor import run_study

    grid = dict(name="s", policies=["single_logit"], optimizers=["sgd"], p0s=[0.01], seeds=1, extinction_steps=20,
                max_steps=200, track_every=5, price_scales=[1.0, 0.5])
    study = StudyConfig(**grid)
    out = tmp_path / "s"
    run_study(study, out, workers=1, wandb_mode="disabled", progress=False)
    before = files_of(out)
    h = holder(out / "runs" / enumerate_runs(study)[0].run_id)
    with pytest.raises(ConfigError, match=f"another live process \\(PID {h.proc.pid}\\)"):
        run_study(StudyConfig(**{**grid, "seeds": 2}), out, workers=1, wandb_mode="disabled", progress=False,
                  force=True)
    assert files_of(out) == before


def test_a_population_raises_the_soft_limit_on_open_files_it_needs_and_refuses_past_the_hard_one(tmp_path):
    script = textwrap.dedent("""
        import resource, sys
        from ntrl.config import ConfigError
        from ntrl.experiments.bandit import BanditConfig
        from ntrl.population import train_population
        hard = int(sys.argv[1])
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
        configs = [BanditConfig(policy="single_logit", steps=3, seed=i, out=sys.argv[2], run_name=f"m{i}",
                                wandb="disabled") for i in range(300)]
        try:
            train_population(configs, progress=False)
        except ConfigError as e:
            print("refused:", e)
        else:
            print("trained", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    """)
    ok = subprocess.run([sys.executable, "-c", script, "4096", str(tmp_path / "a")], capture_output=True, text=True,
                        check=True).stdout
    assert ok.startswith("trained") and int(ok.split()[1]) > 300
    assert len(list((tmp_path / "a").iterdir())) == 300
    refused = subprocess.run([sys.executable, "-c", script, "250", str(tmp_path / "b")], capture_output=True,
                             text=True, check=True).stdout
    assert "300 run directories are to be locked" in refused and "at most 250 files" in refused
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_a_run_inside_a_run_another_process_trains_is_refused_not_left_waiting(tmp_path, holder, monkeypatch):
    from ntrl import run_dirs

    monkeypatch.setattr(run_dirs, "CREATING_WAIT_S", 1.0)
    (tmp_path / "a").mkdir()
    h = holder(tmp_path / "a")  # a run directory another process trains, named as --out
    with pytest.raises(ConfigError, match=rf"--out: {tmp_path / 'a'} has been locked by another process "
                                          rf"\(PID {h.proc.pid}\) for 1 s: it is a run directory being trained"):
        train(config(tmp_path / "a", "x"), progress=False)
    assert not any((tmp_path / "a").iterdir())


def test_a_run_directory_is_made_only_under_its_out_s_lock(tmp_path):
    """While another process holds --out's lock (as a process making a run directory there does),
    no run directory appears in it; once it lets go, the run is made and trains. So two processes
    never both check, replace and take one directory."""
    import threading
    import time

    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(1.5)
        print(time.time(), flush=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        seen: list[float] = []

        def watch() -> None:  # when the run directory first exists
            while not seen:
                if (out / "r").exists():
                    seen.append(time.time())
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        train(config(out, "r"), progress=False)
        watcher.join(timeout=10)
        released = float(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert seen and seen[0] >= released - 0.05  # not before the holder let go (clocks of one machine)
    assert json.loads((out / "r" / "summary.json").read_text())["status"] == "finished"


def test_the_ray_driver_writes_no_returned_run_into_a_directory_another_live_process_holds(tmp_path, holder,
                                                                                          monkeypatch):
    """The Ray driver writes each run a unit returns under that run's lock (write_unit): a run
    whose directory another process holds comes back as that run's error, with the holder's PID,
    and its directory is untouched; the unit's other run is written whole. (No Ray is needed to
    run a unit, a population chunk here, and write what it returned.)"""
    from dataclasses import asdict

    from ntrl.study.grid import StudyConfig, enumerate_runs
    from ntrl.study.ray_executor import ray_unit, write_unit

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the unit's own temporary directory
    monkeypatch.setattr("tempfile.tempdir", None)
    study = StudyConfig(name="e", policies=["single_logit"], optimizers=["sgd"], p0s=[0.01], seeds=1,
                        extinction_steps=20, max_steps=50, track_every=5).validate()
    specs = enumerate_runs(study)[:2]
    returned = ray_unit(study.to_dict(), "population", [asdict(s) for s in specs])
    assert all(files and error is None for _, files, error in returned)
    runs = tmp_path / "runs"
    held = runs / specs[0].run_id
    held.mkdir(parents=True)  # an empty directory, which the driver would take
    h = holder(held)
    results = write_unit(study, specs, "population", returned, runs, "disabled", None)
    (_, summary0, error0), (_, summary1, error1) = results
    assert summary0 is None and isinstance(error0, ConfigError) and f"PID {h.proc.pid}" in str(error0)
    assert not any(held.iterdir())
    assert error1 is None and summary1["status"] == "finished"
    assert json.loads((runs / specs[1].run_id / "summary.json").read_text())["status"] == "finished"


def test_an_interrupt_while_locks_are_let_go_still_lets_go_of_the_rest(tmp_path, monkeypatch):
    """A Ctrl-C that lands while a population's locks are let go (RunDirLocks.close) goes on, but
    only after every other lock is let go: another process can take them at once, though this
    one lives on (a notebook)."""
    import ntrl.run_dirs as run_dirs

    dirs = [tmp_path / f"m{i}" for i in range(3)]
    for d in dirs:
        d.mkdir()
    let_go, calls = run_dirs._let_go, []

    def interrupted_once(key):
        let_go(key)
        calls.append(key)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_dirs, "_let_go", interrupted_once)
    locks = RunDirLocks()
    for d in dirs:
        locks.acquire(d)
    with pytest.raises(KeyboardInterrupt):
        locks.close()
    assert len(calls) == 3 and len(locks) == 0
    subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", ""), *map(str, dirs)], check=True,
                   capture_output=True, timeout=60)  # another process takes all three


def test_a_study_s_force_raises_the_soft_limit_on_open_files_for_its_run_locks(tmp_path):
    """A study's --force locks every run it removes before it removes any: one open file each,
    so a study of more runs than the soft limit on open files (a default 1024 against thousands
    of runs) raises that limit rather than fail on "Too many open files" (300 runs under 200)."""
    script = textwrap.dedent("""
        import resource, sys
        from pathlib import Path
        from ntrl.run_dirs import RUN_KIND, write_marker
        from ntrl.study.executor import remove_study_outputs
        out = Path(sys.argv[1])
        plan = []
        for i in range(300):
            (out / "runs" / f"r{i}").mkdir(parents=True)
            write_marker(out / "runs" / f"r{i}", RUN_KIND)
            plan.append(out / "runs" / f"r{i}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        remove_study_outputs(plan, out)
        print("removed", sorted(p.name for p in out.iterdir()))
    """)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "removed []", done.stderr[-2000:]
