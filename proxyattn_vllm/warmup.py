"""Startup compilation of the sparse-prefill kernels (see ``proxyattn_kernels.warmup``).

vLLM runs the model once before serving to measure memory (the forward gets no attention
metadata). The first ProxyAttn layer of that run compiles every kernel variant the longest
allowed prompt can need, so no request pays a Triton compile inside its time-to-first-token.
Once per process and layer shape; only on CUDA (the CPU interpreter compiles nothing).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm.logger import init_logger

from proxyattn_kernels import ProxyAttnParams
from proxyattn_kernels.block_sparse_attn import flashinfer as fi
from proxyattn_kernels.block_sparse_attn.triton import copy_bytes, default_copy_page
from proxyattn_kernels.device import has_tma
from proxyattn_kernels.warmup import warm_up

if TYPE_CHECKING:
    from .sparse.base import SparseKernel

logger = init_logger("vllm.proxyattn")

_warmed: set = set()
_logged_reservation = False  # reserve_copy_memory's log line, once per process
_warned_page_mismatch = False  # check_page_size's warning, once per process


@dataclass(frozen=True)
class WarmupShape:
    """What the compiled variants depend on: the layer's shape and the engine's limits."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    max_seq_len: int
    params: ProxyAttnParams


def shape_from_vllm_config(vllm_config, num_q_heads: int, num_kv_heads: int, head_dim: int,
                           params: ProxyAttnParams) -> WarmupShape | None:
    """The warm-up shape of a layer, or None when the engine's limits are not known yet."""
    model_config = getattr(vllm_config, "model_config", None)
    cache_config = getattr(vllm_config, "cache_config", None)
    max_len = getattr(model_config, "max_model_len", None)
    page_size = getattr(cache_config, "block_size", None)
    if not isinstance(max_len, int) or not isinstance(page_size, int) or page_size % 16:
        return None
    return WarmupShape(num_q_heads, num_kv_heads, head_dim, page_size, max_len, params)


def copy_reservation(shape: WarmupShape | None, dtype: torch.dtype, has_tma: bool) -> tuple[int, int]:
    """``(copy page, bytes)`` the Triton block-sparse kernel's contiguous copy takes for the
    longest prompt of ``shape`` (``block_sparse_attn``'s ``copy_page``; ``(0, 0)`` when it reads
    the cache as it is). vLLM sizes the KV cache from the memory-profiling run's peak, which
    never sees a long prompt: that run allocates this much once so the peak includes it."""
    if shape is None or shape.max_seq_len < shape.params.min_sparse_len:
        return 0, 0
    copy_page = default_copy_page(shape.page_size, shape.params.block_size, shape.head_dim, has_tma)
    return copy_page, copy_bytes(shape.max_seq_len, shape.num_kv_heads, shape.head_dim, dtype, copy_page)


def reserve_copy_memory(shape: WarmupShape | None, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """In the memory-profiling run: allocate, and free, :func:`copy_reservation` on ``device``
    (no-op where there is no copy), so vLLM's peak, and so its KV-cache sizing, includes it;
    logged once per process. Returns ``(copy page, bytes)``."""
    global _logged_reservation
    copy_page, nbytes = copy_reservation(shape, dtype, has_tma(device))
    # Never inside a CUDA-graph capture: the graph's private pool would keep the block.
    if nbytes and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        torch.empty(nbytes, dtype=torch.uint8, device=device)
    if nbytes and not _logged_reservation:
        _logged_reservation = True
        logger.info(
            "proxyattn: KV pages of %d tokens are too small for the sparse kernel's TMA tiles: it reads "
            "each long prompt's keys and values from a copy in %d-token pages (one layer at a time). "
            "Reserved %.2f GiB for the copy of a %d-token prompt; --block-size %d avoids the copy and "
            "this memory.", shape.page_size, copy_page, nbytes / 2**30, shape.max_seq_len, copy_page,
        )
    return copy_page, nbytes


def warm_up_once(shape: WarmupShape | None, dtype: torch.dtype, device: torch.device, *,
                 flashinfer: bool = False, union_plan: bool = False, budget_lse: bool = False,
                 kv_dtype: torch.dtype | None = None) -> bool:
    """Compile the kernels for ``shape`` unless done already in this process; True if it ran.
    ``dtype``: the queries'; ``kv_dtype``: the cache's where it differs (FP8), else None.
    ``flashinfer``: FlashInfer's prefill kernel too (``sparse_kernel`` chose it); ``union_plan``:
    the union page plan of the "fa3" and "flashinfer" kernels; ``budget_lse``: the budget's
    pass from the dense tail's LSE (the tail goes to FlashAttention first)."""
    if shape is None or device.type != "cuda" or shape.max_seq_len < shape.params.min_sparse_len:
        return False
    key = (shape, dtype, kv_dtype, device)
    if key in _warmed:
        return False
    _warmed.add(key)
    start = time.perf_counter()
    try:
        chunks = warm_up(
            num_q_heads=shape.num_q_heads, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
            page_size=shape.page_size, dtype=dtype, device=device, params=shape.params,
            max_seq_len=shape.max_seq_len, union_plan=union_plan, budget_lse=budget_lse, kv_dtype=kv_dtype,
        )
        if flashinfer:
            fi.warm_up(device, dtype, shape.num_q_heads, shape.num_kv_heads, shape.head_dim,
                       shape.page_size, shape.params.block_size)
        torch.cuda.synchronize(device)
    except Exception as exc:
        # The same kernels would fail on the first long prompt: stop the startup here instead.
        raise RuntimeError(
            f"proxyattn: compiling the sparse-prefill kernels at startup failed for {shape} in "
            f"{dtype} ({type(exc).__name__}: {exc}). Serve this model with --attention-backend "
            "FLASH_ATTN, or report the error with this message."
        ) from exc
    logger.info(
        "proxyattn: compiled the sparse-prefill kernels%s for prompts up to %d tokens "
        "(%d warm-up chunks, %.1f s)", " and FlashInfer's" if flashinfer else "", shape.max_seq_len,
        chunks, time.perf_counter() - start,
    )
    return True


def warm_up_layer(shape: WarmupShape | None, kernel: "SparseKernel | None", dtype: torch.dtype,
                  device: torch.device, dense_tail_first: bool, kv_dtype: torch.dtype | None = None) -> None:
    """A sparse layer's part of the memory-profiling run: reserve the Triton kernel's copy and
    compile what ``kernel`` (the layer's sparse kernel at ``shape``'s page size; None: not known
    yet) runs. ``dense_tail_first``: the dense kernel takes the dense-tail rows first, so the
    budget reads their LSE (``DenseAttention.tail_first``). ``kv_dtype``: the cache's dtype
    (FP8) where it differs from the queries' ``dtype``."""
    if kernel is not None and kernel.copies_pages:
        reserve_copy_memory(shape, kv_dtype or dtype, device)  # the copy is of the cache's bytes
    budget_lse = (dense_tail_first and kernel is not None and kernel.dense_tail_first
                  and shape is not None and shape.params.dense_tail_tokens > 0)
    warm_up_once(shape, dtype, device, flashinfer=kernel is not None and kernel.name == "flashinfer",
                 union_plan=kernel is not None and kernel.union_pages, budget_lse=budget_lse,
                 kv_dtype=None if kv_dtype == dtype else kv_dtype)


def check_page_size(warmed_page_size: int | None, page_size: int) -> None:
    """Warn once per process when the cache's pages differ from those the startup warm-up
    compiled for (``warmed_page_size``; None: nothing was compiled)."""
    global _warned_page_mismatch
    if warmed_page_size not in (None, page_size) and not _warned_page_mismatch:
        _warned_page_mismatch = True
        logger.warning(
            "proxyattn: the sparse kernels were compiled at startup for KV pages of %d tokens, but "
            "the cache has pages of %d: the first long prompts compile them again (seconds each). "
            "Please report this with your vllm serve command.", warmed_page_size, page_size,
        )
