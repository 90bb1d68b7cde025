"""Shared test settings: deterministic seeds, and helpers to randomise every parameter of a model."""

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a shared 2-core machine, OpenMP's spinning threads make 2 threads up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_(model: nn.Module) -> nn.Module:
    """Give every parameter a random value (norm affines and LayerScales included), so a wrong mapping shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0, 0.02)
            elif name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.uniform_(-0.1, 0.1)
            else:
                p.uniform_(0.8, 1.2)
    return model
