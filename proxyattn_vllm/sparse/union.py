"""What the union kernels ("fa3", "flashinfer") share: the selection, then each query block's
union of the blocks its heads selected as a page plan
(``proxyattn_kernels/block_sparse_attn/union_pages.py``)."""
from __future__ import annotations

import torch

from proxyattn_kernels.block_sparse_attn.union_pages import UnionPagePlan, union_page_plan
from proxyattn_kernels.selection import select_blocks_paged

from .. import stats
from .base import SparseChunk, SparseLayer, kernel_query, kv_scales


def union_pages(layer: SparseLayer, attn_layer: torch.nn.Module, chunk: SparseChunk, row_lse: torch.Tensor | None,
                layer_index: int | None) -> UnionPagePlan:
    """The chunk's selection as one pseudo-request per query block over its union of selected
    blocks (kernel launches only); ``attn_layer``, ``row_lse``: as :meth:`.base.SparseKernel.run`."""
    params = layer.params
    _, kv_cache, block_table_row, _, ctx = chunk
    query = kernel_query(chunk, attn_layer)
    k_scale = kv_scales(attn_layer, kv_cache)["k_scale"]
    selection = select_blocks_paged(
        query, kv_cache, block_table_row, ctx=ctx, scale=layer.scale, params=params, row_lse=row_lse,
        budget_fraction=layer.budget_fraction(chunk), k_scale=k_scale,
    )
    pages = union_page_plan(
        selection.ranking, selection.counts, block_table_row, ctx=ctx, q_len=query.shape[0],
        block_size=params.block_size, page_size=kv_cache.shape[2],
    )
    if stats.ENABLED:  # what this path computes: every head gets its row's union
        union = selection._replace(
            ranking=pages.union_ranking, counts=pages.union_blocks.expand(query.shape[1], -1))
        stats.record(query, kv_cache, block_table_row, union, ctx=ctx, scale=layer.scale,
                     block_size=params.block_size, layer_index=layer_index, k_scale=k_scale)
    return pages
