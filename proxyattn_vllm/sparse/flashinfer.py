"""``sparse_kernel: "flashinfer"``: the union page plan through FlashInfer's paged prefill kernel
(``proxyattn_kernels/block_sparse_attn/flashinfer.py``; needs the ``[flashinfer]`` extra)."""
from __future__ import annotations

from proxyattn_kernels.block_sparse_attn import flashinfer as fi

from .base import SparseChunk, SparseKernel
from .union import union_pages


class FlashInferUnionKernel(SparseKernel):
    """The union page plan (``union.py``), then FlashInfer over it, dense-tail rows included:
    the impl's dense tail does not run first (FlashInfer's plan covers the whole chunk)."""

    name = "flashinfer"
    dense_tail_first = False
    union_pages = True

    def run(self, attn_layer, chunk: SparseChunk, *, tail_done=False, row_lse=None, layer_index=None) -> None:
        assert not tail_done, "FlashInfer computes the dense-tail rows itself"
        pages = union_pages(self.layer, attn_layer, chunk, row_lse, layer_index)
        query, kv_cache, _, output, ctx = chunk
        fi.flashinfer_union_attention(
            query, kv_cache, pages, output, ctx=ctx, scale=self.layer.scale, block_size=self.layer.params.block_size
        )
