import os

import pytest
import torch

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    # the networks here are tiny: with pytest-xdist's workers, extra threads only add contention
    torch.set_num_threads(1)
    yield
