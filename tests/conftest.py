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
