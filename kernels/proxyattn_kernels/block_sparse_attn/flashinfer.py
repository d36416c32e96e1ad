"""A selection through FlashInfer's paged prefill kernel (``sparse_kernel: "flashinfer"``).

**What it computes.** The chunk becomes the batch of :mod:`.union_pages`: one pseudo-request per
query-block row, whose page list is the pages of the key blocks *any head of the layer*
selected in that row, ascending, so the diagonal block comes last and FlashInfer's causal mask
(aligned bottom-right: query ``i`` of a request sees keys ``j <= i + kv_len - qo_len``) is
exactly the diagonal mask. FlashInfer's pages are shared by all heads of a request, and vLLM's
NHD cache (``[pages, page_size, Hkv, D]``, every KV head inside every page) rules out one page
list per KV head, so every head computes its row's union: a block one head (or one proxy group)
selected is computed for every head of the layer. This is what the Triton kernel does not do
(it computes each head's own blocks) and what ``sparse_kernel: "fa3"`` does too. The output
equals ``block_sparse_attention`` (naive.py) with :func:`.union_pages.union_block_mask` as
every head's mask, and the density reported (``PROXYATTN_STATS``, the benchmark) counts that
union, as for "fa3".

**Shapes.** Queries and output ``[q_len, Hq, D]`` (fp16/bf16); vLLM's logical cache view
``[num_pages, Hkv, page_size, 2 * D]``; a selection ``ranking [G, R, Kb]`` int32 and
``counts [Hq, R]`` int32 over the chunk's ``R`` query-block rows and ``Kb`` key blocks; the
request's ``block_table [max_pages]`` int32. K and V reach FlashInfer as strided views of the
cache, ``[pages, page_size, Hkv, D]`` each (the physical NHD tensor split along its last dim; no
copy): both FlashInfer kernels take the cache's strides (``paged_kv_t`` built from
``kv_cache_strides`` in ``csrc/batch_prefill.cu``; ``k_page_stride``/``k_stride_n``/
``k_stride_h`` in ``csrc/batch_prefill_sm90.cu``), and require only that K and V have equal
strides (0.6.14; 0.7.x also takes unequal ones), which two halves of one tensor do.

The page lists, the plan and its reuse across layers are :mod:`.flashinfer_plan`; which
FlashInfer releases are accepted, and the import, are :mod:`.flashinfer_release`.
"""
from __future__ import annotations

import torch

from .flashinfer_plan import DEFAULT_BACKEND, chunk_plan
from .union_pages import UnionPagePlan, union_page_plan


def paged_kv_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's logical cache ``[pages, Hkv, page_size, 2D]`` -> FlashInfer NHD K and V views
    ``[pages, page_size, Hkv, D]`` (strides of the physical tensor, no copy)."""
    head_dim = kv_cache.shape[-1] // 2
    nhd = kv_cache.transpose(1, 2)
    return nhd[..., :head_dim], nhd[..., head_dim:]


def flashinfer_union_attention(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    union: UnionPagePlan,
    output: torch.Tensor,
    *,
    ctx: int,
    scale: float,
    block_size: int,
    backend: str = DEFAULT_BACKEND,
) -> None:
    """Attention of one chunk over its rows' unions of selected blocks, written into ``output``.

    Args:
        query: ``[q_len, Hq, D]`` fp16/bf16 queries at absolute positions ``[ctx, ctx + q_len)``.
        kv_cache: ``[num_pages, Hkv, page_size, 2 * D]`` vLLM's logical view of the NHD cache.
        union: :func:`.union_pages.union_page_plan` of the chunk's selection (``block_table``
            ``[R, Kb * block_size // page_size]`` pages per row, ``seqused_k [R]`` keys per row).
        output: ``[q_len, Hq, D]``, fully overwritten.
        ctx, scale, block_size: the chunk's offset, the softmax scale, the selection block size.
        backend: ``"fa2"`` (no host sync) or ``"fa3"`` (plans per call after one sync).
    """
    plan = chunk_plan(query, kv_cache, ctx=ctx, scale=scale, block_size=block_size, backend=backend)
    plan.write_pages(union)
    if backend == "fa3":
        plan.plan_from_device()
    out = output if output.is_contiguous() else torch.empty_like(output)  # fa2 writes dense rows
    plan.wrapper.run(query, paged_kv_views(kv_cache), out=out, enable_pdl=False)
    if out is not output:
        output.copy_(out)


def block_sparse_attn_flashinfer(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    ranking: torch.Tensor,
    counts: torch.Tensor,
    output: torch.Tensor,
    *,
    ctx: int,
    scale: float,
    block_size: int,
    backend: str = DEFAULT_BACKEND,
) -> UnionPagePlan:
    """:func:`flashinfer_union_attention` from a selection (``ranking [G, R, Kb]``,
    ``counts [Hq, R]``) and the request's ``block_table [max_pages]``; returns the union plan
    (its ``union_blocks``/``union_ranking`` give the density computed)."""
    union = union_page_plan(
        ranking, counts, block_table, ctx=ctx, q_len=query.shape[0], block_size=block_size,
        page_size=kv_cache.shape[2],
    )
    flashinfer_union_attention(query, kv_cache, union, output, ctx=ctx, scale=scale,
                               block_size=block_size, backend=backend)
    return union


def warm_up(
    device: torch.device | str, dtype: torch.dtype, num_q_heads: int, num_kv_heads: int,
    head_dim: int, page_size: int, block_size: int, backend: str = DEFAULT_BACKEND,
) -> None:
    """Compile FlashInfer's kernel for this layer shape now (its first plan JIT-compiles it with
    nvcc, 1-2 minutes) on a one-row chunk; serving then finds it compiled."""
    device = torch.device(device)
    pages = -(-block_size // page_size) + 1
    kv_cache = torch.zeros(pages, page_size, num_kv_heads, 2 * head_dim, dtype=dtype,
                           device=device).transpose(1, 2)
    query = torch.zeros(block_size, num_q_heads, head_dim, dtype=dtype, device=device)
    ranking = torch.zeros(1, 1, 1, dtype=torch.int32, device=device)
    counts = torch.ones(num_q_heads, 1, dtype=torch.int32, device=device)
    table = torch.arange(pages, dtype=torch.int32, device=device)
    block_sparse_attn_flashinfer(query, kv_cache, table, ranking, counts, torch.empty_like(query),
                                 ctx=0, scale=head_dim**-0.5, block_size=block_size, backend=backend)
