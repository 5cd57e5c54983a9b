"""Test set-up: CPU runs use Triton's interpreter (set before any kernel module imports triton);
`@pytest.mark.gpu` tests run only where a CUDA GPU is present (`pytest -m gpu`)."""
import os

import tuneforge  # noqa: F401  sets TRITON_INTERPRET=1 on GPU-less machines

import pytest
import torch

HAS_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_GPU else "cpu")
