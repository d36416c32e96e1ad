"""Test setup shared by the CPU tier (reference, Triton interpreter, vLLM on CPU) and the GPU tier."""
from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per test run, printed on failure so a failure can be replayed."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=torch.Generator().manual_seed(
        hash(request.node.nodeid) & 0xFFFF_FFFF ^ int.from_bytes(__import__("os").urandom(4), "little")
    )))
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed
