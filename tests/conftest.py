import os
import signal

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

# A suite started as a background job of a non-interactive shell (`cmd &`) inherits SIGINT
# ignored, and so would every ntrl process a test starts: Python then installs no Ctrl-C handler,
# and the tests that press Ctrl-C (tests/test_safety_processes.py) would test the shell, not ntrl.
# A handler, unlike SIG_IGN, is reset to the default in a child that execs: the processes the
# tests start get Ctrl-C as a terminal user's ntrl does.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _sb3_logs_in_pytest_tmp(tmp_path_factory):
    """SB3's default logger makes an empty folder, $SB3_LOGDIR or else /tmp/SB3-<date>, at every
    learn() of a model without a logger of its own (the tests that build PPO and A2C directly,
    and rl_zoo3's subprocess, which inherits the variable): put them in pytest's own temporary
    directory, which pytest rotates, rather than leave a few dozen in /tmp at every run."""
    if "SB3_LOGDIR" not in os.environ:
        os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3_logs"))
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # the networks here are tiny: with pytest-xdist's workers, extra threads only add contention
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def _quiet_ntrl_logger():
    """A test that calls ``main([... "--verbose"])`` in-process turns ntrl's INFO lines on for the
    whole worker; turn them off again so that later tests see the stderr a user sees."""
    import logging

    yield
    logger = logging.getLogger("ntrl")
    for h in [h for h in logger.handlers if getattr(h, "ntrl_verbose", False)]:
        logger.removeHandler(h)
    logger.setLevel(logging.NOTSET)
