"""SIGTERM while a run or a population trains from Python (ntrl.termination): where the program
leaves SIGTERM at its default action, every run's records and summary are written first, one line
says so, and the process still ends by SIGTERM; a program's own SIGTERM handler is left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TRAIN = textwrap.dedent("""
    import signal, sys
    from ntrl.experiments.bandit import BanditConfig
    from ntrl.population import train_population
    from ntrl.train import train
    kind, out, own = sys.argv[1], sys.argv[2], sys.argv[3] == "own"
    if own:  # the program handles SIGTERM itself
        signal.signal(signal.SIGTERM, lambda s, f: sys.exit("own handler"))
    configs = [BanditConfig(policy="mlp", width=8, steps=10**7, seed=i, out=out, run_name=f"m{i}", wandb="disabled")
               for i in range(3)]
    if kind == "population":
        train_population(configs, progress=False, flush_seconds=0.05)
    elif kind == "sb3":
        from ntrl.experiments.gym_env import GymConfig
        from ntrl.experiments.sb3_train import train_sb3
        train_sb3(GymConfig(env="CartPole-v1", algo="ppo", steps=10**5, n_steps=32, out=out, run_name="m0",
                            wandb="disabled"), progress=False)
    else:
        train(configs[0], progress=False)
    print("returned")
""")


@pytest.fixture
def start():
    """start(kind, out, own=False): a program training ``kind`` into ``out``, returned once it has
    records on disk; killed at the end of the test, whatever happened."""
    procs = []

    def run(kind: str, out: Path, own: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", TRAIN, kind, str(out), "own" if own else "default"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        records = out / "m0" / "records.jsonl"
        deadline = time.monotonic() + 120
        while not (records.exists() and records.stat().st_size > 0):  # training, with records on disk
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no records after 120 s"
            time.sleep(0.05)
        return proc

    yield run
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("kind", ["population", "run", "sb3"])
def test_sigterm_writes_every_summary_then_ends_the_process_by_sigterm(tmp_path, kind, start):
    proc = start(kind, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM  # ended as SIGTERM ends a process
    assert "returned" not in out
    ours = [line for line in err.splitlines() if line.startswith("ntrl: ")]
    assert len(ours) == 1 and ours[0].startswith("ntrl: terminated by SIGTERM: ") and "kept" in ours[0], err
    assert err.splitlines()[-1] == ours[0]  # the last word
    said = int(ours[0].split("at update ")[1].split(";")[0])
    assert said == json.loads((tmp_path / "m0" / "summary.json").read_text())["updates"]  # the line says what was kept
    for d in sorted(tmp_path.iterdir()):
        summary = json.loads((d / "summary.json").read_text())
        n = len((d / "records.jsonl").read_text().splitlines())
        assert summary["status"] == "interrupted" and summary["updates"] >= n > 0  # tracked every update
    assert len(list(tmp_path.iterdir())) == (3 if kind == "population" else 1)


def test_a_program_s_own_sigterm_handler_is_left_alone(tmp_path, start):
    proc = start("population", tmp_path, own=True)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "own handler" in err and "ntrl: terminated" not in err
    assert proc.returncode == 1  # sys.exit("own handler"); the population ended through its error path


def test_a_second_sigterm_ends_the_process_at_once():
    script = textwrap.dedent("""
        import os, signal, time
        from ntrl.termination import Terminated, sigterm_as_interrupt
        with sigterm_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except Terminated:
                print("first", flush=True)
                os.kill(os.getpid(), signal.SIGTERM)  # during the clean-up
                time.sleep(5)
                print("clean-up finished", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "first\n" and proc.returncode == -signal.SIGTERM and "ntrl: terminated" not in proc.stderr


def test_a_sigterm_python_could_only_print_is_sent_again_not_lost():
    """A SIGTERM that lands in a finalizer: Python prints the exception and goes on; it is sent
    again, and the body stops at the next one, as the first, with its clean-up."""
    script = textwrap.dedent("""
        import os, signal, time
        from ntrl.termination import Terminated, sigterm_as_interrupt

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGTERM)  # its Terminated can only be printed
                time.sleep(0.001)

        with sigterm_as_interrupt():
            try:
                Finalized()
                time.sleep(5)
                print("not stopped", flush=True)
            except Terminated:
                print("stopped", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.stdout == "stopped\n" and proc.returncode == -signal.SIGTERM
    assert "Exception ignored" not in proc.stderr and proc.stderr.endswith("ntrl: terminated by SIGTERM\n")


def test_stdout_a_program_buffered_is_written_before_the_process_ends():
    script = textwrap.dedent("""
        import os, signal, sys
        from ntrl.termination import sigterm_as_interrupt
        print("buffered", end="")  # a pipe: Python buffers it
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered as by default
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == -signal.SIGTERM and proc.stdout == "buffered"


def test_outside_the_main_thread_nothing_changes():
    import threading

    from ntrl.termination import sigterm_as_interrupt

    seen = []

    def body():
        with sigterm_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [before] and signal.getsignal(signal.SIGTERM) is before


def test_a_closed_stderr_does_not_keep_the_process_from_ending_by_sigterm():
    script = textwrap.dedent("""
        import os, signal, sys
        from ntrl.termination import sigterm_as_interrupt
        with sigterm_as_interrupt():
            sys.stderr.close()  # ntrl's line cannot be printed
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGTERM


def test_a_study_s_worker_ends_at_once_on_sigterm_and_writes_nothing_more(tmp_path):
    script = textwrap.dedent("""
        import os, sys
        from ntrl.experiments.bandit import BanditConfig
        from ntrl.study.lock import worker_init
        from ntrl.train import train
        worker_init(os.getppid())
        train(BanditConfig(policy="mlp", width=8, steps=10**7, out=sys.argv[1], run_name="m0", wandb="disabled"),
              progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        records = tmp_path / "m0" / "records.jsonl"
        deadline = time.monotonic() + 120
        while not (records.exists() and records.stat().st_size > 0):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGTERM and "ntrl: terminated" not in err
    assert not (tmp_path / "m0" / "summary.json").exists()  # the study says what it kept, not each worker
