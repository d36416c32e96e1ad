"""Tear-down of in-process ``vllm.LLM`` engines, for the scripts that start several in one process.

Deleting an ``LLM`` is not enough: vLLM 0.26's ``EngineCore.__init__`` calls ``gc.freeze()``, so
the model weights and the KV cache stay referenced until ``EngineCore.shutdown`` (which also
releases the model runner's GPU memory). Without it, the next engine of the process finds the
GPU still held (seen on the H200: 70 GiB left behind by a finished quality engine).
"""
from __future__ import annotations

import gc


def release_memory() -> None:
    """Destroy vLLM's process groups and return the cached CUDA memory."""
    import torch
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shut_down(llm) -> None:
    """Shut ``llm``'s engine down, then :func:`release_memory`; the caller drops its reference.
    A failing shutdown is reported and the rest of the tear-down still runs."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None:
        try:
            core.shutdown()
        except Exception as exc:  # noqa: BLE001 - tear down as much as possible
            print(f"engine shutdown: {type(exc).__name__}: {exc}", flush=True)
    release_memory()
