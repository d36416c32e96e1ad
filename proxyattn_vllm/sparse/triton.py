"""``sparse_kernel: "triton"``: the selection, then the block-sparse kernel, where each head
computes exactly the blocks it selected (``proxyattn_kernels/block_sparse_attn/triton.py``)."""
from __future__ import annotations

import torch

from vllm.logger import init_logger

from proxyattn_kernels import ChunkGeometry, ProxyAttnParams
from proxyattn_kernels.block_sparse_attn.triton import TileConfig, block_sparse_attn, copy_bytes, default_copy_page
from proxyattn_kernels.device import has_tma
from proxyattn_kernels.selection import select_blocks_paged

from .. import stats
from .base import SparseChunk, SparseKernel, kernel_query, kv_scales

logger = init_logger("vllm.proxyattn")

#: Set when the Triton kernel's contiguous copy of a request once ran out of GPU memory: from
#: then on, this process reads small pages directly (``copy_page=0``, slower but the same result).
_copy_out_of_memory = False


def sparse_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    output: torch.Tensor,
    ctx: int,
    scale: float,
    params: ProxyAttnParams,
    layer_index: int | None = None,
    tail_done: bool = False,
    row_lse: torch.Tensor | None = None,
    budget_fraction: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    tile: TileConfig | None = None,
) -> None:
    """ProxyAttn attention of one request's prefill chunk, written into ``output`` in place.

    The boundary between the vLLM glue and the ProxyAttn Triton kernels: the glue guarantees the
    arguments below; the kernels compute proxy scores, budgets, the selection and block-sparse
    attention (kernel launches only, no host sync), and must equal
    ``proxyattn_kernels/reference.py::proxyattn_prefill_reference`` (the oracle, see
    tests/test_vllm_impl.py).

    Args:
        query, kv_cache, block_table_row, output, ctx: the chunk (:class:`.base.SparseChunk`),
            ``query`` in the model dtype (:func:`.base.kernel_query`).
        scale: softmax scale.
        params: the layer's resolved ProxyAttn parameters.
        layer_index: the layer's index, only for the ``PROXYATTN_STATS`` diagnostics.
        tail_done: the caller computes the dense-tail rows (``params.dense_tail_tokens``) with a
            dense kernel: their tokens of ``output`` are not written here. Otherwise the block-
            sparse kernel computes them too, launched first.
        row_lse: optional ``[Hq, min(q_len, block_size)]`` float32 LSE of the chunk's last
            queries from that dense kernel (:func:`.base.budget_rows_lse`): the budget then
            reuses it.
        budget_fraction: optional ``[Hq]`` prescribed budget fractions (``budget_profile.py``).
        k_scale, v_scale: an FP8 cache's 1-element float32 device scales (:func:`.base.kv_scales`).
        tile: the block-sparse kernel's launch parameters, for benchmarks (default: the
            kernel's own for the pages it reads).
    """
    selection = select_blocks_paged(
        query, kv_cache, block_table_row, ctx=ctx, scale=scale, params=params, row_lse=row_lse,
        budget_fraction=budget_fraction, k_scale=k_scale,
    )
    if stats.ENABLED:  # diagnostic only (see stats.py); off: this one check
        stats.record(
            query, kv_cache, block_table_row, selection, ctx=ctx, scale=scale,
            block_size=params.block_size, layer_index=layer_index, k_scale=k_scale,
        )
    tail_rows = ChunkGeometry(ctx, query.shape[0], params.block_size).num_tail_rows(params.dense_tail_tokens)
    rows = {"skip_rows": tail_rows} if tail_done else {"heavy_rows": tail_rows}

    def attend(copy_page: int) -> None:
        block_sparse_attn(query, kv_cache, block_table_row, selection.ranking, selection.counts, output,
                          ctx=ctx, scale=scale, block_size=params.block_size, copy_page=copy_page,
                          k_scale=k_scale, v_scale=v_scale, tile=tile, **rows)

    global _copy_out_of_memory
    copy_page = 0 if _copy_out_of_memory else default_copy_page(
        kv_cache.shape[2], params.block_size, query.shape[-1], has_tma(query.device))
    try:
        attend(copy_page)
    except torch.OutOfMemoryError:
        # The memory-profiling run reserves the copy (warmup.reserve_copy_memory), but an engine
        # sized without that run (--kv-cache-memory-bytes) has no room for it. The startup
        # warm-up compiled the kernel for the copy's pages only: the first chunk that reads the
        # small pages compiles that variant (seconds, once).
        if not copy_page:
            raise
        _copy_out_of_memory = True
        logger.warning(
            "proxyattn: out of GPU memory for the sparse kernel's copy of a %d-token prompt's keys and "
            "values in %d-token pages (%.2f GiB); from now on it reads the %d-token pages directly (the "
            "same result, up to 1.4x slower). The KV cache left no room for the copy: without "
            "--kv-cache-memory-bytes vLLM reserves it at startup; or serve with --block-size %d, "
            "which needs no copy.", ctx + query.shape[0], copy_page,
            copy_bytes(ctx + query.shape[0], kv_cache.shape[1], query.shape[-1], kv_cache.dtype, copy_page) / 2**30,
            kv_cache.shape[2], copy_page,
        )
        attend(0)


class TritonSparseKernel(SparseKernel):
    """:func:`sparse_prefill` per chunk. Where the cache's pages are too small for its TMA tiles
    it reads a contiguous copy of the request, which the memory-profiling run reserves."""

    name = "triton"
    copies_pages = True

    def run(self, attn_layer, chunk: SparseChunk, *, tail_done=False, row_lse=None, layer_index=None) -> None:
        sparse_prefill(kernel_query(chunk, attn_layer), *chunk[1:], self.layer.scale, self.layer.params,
                       layer_index=layer_index, tail_done=tail_done, row_lse=row_lse,
                       budget_fraction=self.layer.budget_fraction(chunk), **kv_scales(attn_layer, chunk.kv_cache))
