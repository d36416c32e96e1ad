"""``sparse_kernel: "fa3"``: the selected blocks through vLLM's dense varlen kernel (FA3 on
Hopper), one pseudo-request per query block over the union of the blocks its heads selected:
every head computes the blocks any head of its row selected."""
from __future__ import annotations

from proxyattn_kernels import ChunkGeometry
from proxyattn_kernels.block_sparse_attn.union_pages import tail_first_calls, union_call_num_splits
from proxyattn_kernels.device import sm_count

from .base import SparseChunk, SparseKernel
from .union import union_pages


class FA3UnionKernel(SparseKernel):
    """The union page plan (``union.py``), then the layer's dense kernel
    (``DenseAttention.varlen``) over it; the dense-tail rows read every causal page: their own
    call first (``tail_first_calls``), or the impl's dense tail already did them. An FP8 cache
    goes to FA3 as the dense path gives it (the FP8 query and cache with their descales)."""

    name = "fa3"
    union_pages = True

    def run(self, attn_layer, chunk: SparseChunk, *, tail_done=False, row_lse=None, layer_index=None) -> None:
        layer, params = self.layer, self.layer.params
        pages = union_pages(layer, attn_layer, chunk, row_lse, layer_index)
        query, kv_cache, _, output, ctx = chunk
        geometry = ChunkGeometry(ctx, query.shape[0], params.block_size)
        first_tail_row = geometry.first_tail_row(params.dense_tail_tokens)
        for tokens, rows in tail_first_calls(pages, geometry, first_tail_row, tail_done):
            layer.dense.varlen(
                attn_layer, query[tokens], kv_cache, output[tokens], rows.cu_seqlens_q, rows.max_seqlen_q,
                rows.seqused_k, rows.max_seqlen_k, rows.block_table,
                num_splits=union_call_num_splits(rows.seqused_k.shape[0], layer.num_heads, sm_count(query.device)),
            )
