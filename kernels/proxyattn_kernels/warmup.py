"""Compile the sparse-prefill kernels for every variant a model can need, before serving.

Triton compiles a kernel the first time it meets a new combination of compile-time constants.
Most of ours depend only on the model (head size, group sizes, page and block size), but two
follow the chunk: the select kernel keeps a row of key blocks in registers, padded to the next
power of two (``KB_PAD``: 16, 32, ... up to the longest prompt's key blocks), and the budget
kernel's query tile follows the chunk's last query block (``n_last``: a prompt's last chunk can
be a few tokens long). Compiled lazily, the first 256K prompt after startup would pay a compile
(about a second each) inside its time-to-first-token. :func:`warm_up` runs one tiny chunk per
variant instead, at startup.

The chunks are cheap whatever their length: every logical page of the block table points at
the same physical page, so the cache is a handful of pages, and each chunk has at most one
block of queries. Arguments that vary with the chunk's position (``ctx``, row and key-block
counts, row strides of ``[.., Kb]`` buffers) and the block-table row's address (vLLM passes a
row of its table, 16-byte aligned or not depending on the request's slot) are not specialized by
the kernels (``do_not_specialize``), so these chunks cover every chunk of a real prompt.
"""
from __future__ import annotations

import torch
import triton

from .block_sparse_attn.triton import block_sparse_attn
from .block_sparse_attn.union_pages import union_page_plan
from .budget.triton import last_block_mass_paged
from .common import MAX_TRITON_BLOCKS
from .paged import FP8_KV_DTYPE
from .params import ProxyAttnParams
from .selection import select_blocks_paged


def warmup_chunks(max_seq_len: int, block_size: int) -> list[tuple[int, int]]:
    """``(ctx, q_len)`` chunks that reach every compile-time variant of the selection kernels.

    One chunk per ``KB_PAD`` up to the key blocks of ``max_seq_len`` (capped at the select
    kernel's Triton limit, past which it runs torch ops), each ending in a full query block; then
    last-chunk tails of 1, 17 and 33 tokens (budget tiles of 16, 32 and 64 queries; a full
    block uses the largest) where the block is longer."""
    if max_seq_len < 1 or block_size < 1:
        raise ValueError(f"need max_seq_len >= 1 and block_size >= 1; got {max_seq_len}, {block_size}")
    max_blocks = min(triton.cdiv(max_seq_len, block_size), MAX_TRITON_BLOCKS)
    chunks = []
    pad = 16
    while True:
        blocks = min(pad, max_blocks)
        chunks.append(((blocks - 1) * block_size, block_size))
        if blocks == max_blocks:
            break
        pad *= 2
    chunks += [(0, tail) for tail in (1, 17, 33) if tail < block_size]
    return chunks


def warm_up(
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    params: ProxyAttnParams,
    max_seq_len: int,
    attention: bool = True,
    union_plan: bool = False,
    budget_lse: bool = False,
    kv_dtype: torch.dtype | None = None,
) -> int:
    """Run the selection (and, with ``attention``, the block-sparse kernel; with ``union_plan``,
    the union page plan of the "fa3" / "flashinfer" paths, whose row also lives in registers;
    with ``budget_lse``, the budget's one-pass mass from a given LSE, used where a dense kernel
    attends the tail first) once per chunk of :func:`warmup_chunks` on zeros, with the layout of
    vLLM's cache (NHD pages, K|V packed). ``kv_dtype``: the cache's dtype when it differs from
    the queries' ``dtype`` (``paged.FP8_KV_DTYPE``, read with unit scales).

    Returns the number of chunks run. Allocates O(heads * head_dim * block_size) for the
    queries and cache, plus the selection's ``[Hq, Kb, block]`` float32 workspace of the
    longest chunk and, where the block-sparse kernel copies small pages (``default_copy_page``),
    its copy of the longest chunk's keys and values; frees everything before returning.
    """
    block = params.block_size
    chunks = warmup_chunks(max_seq_len, block)
    num_pages = 2
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    physical = torch.zeros(num_pages, page_size, num_kv_heads, 2 * head_dim, dtype=kv_dtype, device=device)
    fp8 = kv_dtype == FP8_KV_DTYPE
    k_scale = v_scale = torch.ones((), dtype=torch.float32, device=device) if fp8 else None
    kv_cache = physical.permute(0, 2, 1, 3)  # the logical [pages, Hkv, page, 2D] view vLLM passes
    max_pages = triton.cdiv(max(ctx + q_len for ctx, q_len in chunks), page_size)
    block_table = torch.zeros(max_pages, dtype=torch.int32, device=device)  # every page -> page 0
    scale = head_dim**-0.5
    for ctx, q_len in chunks:
        q = torch.zeros(q_len, num_q_heads, head_dim, dtype=dtype, device=device)
        selection = select_blocks_paged(q, kv_cache, block_table, ctx=ctx, scale=scale, params=params,
                                        k_scale=k_scale)
        if attention:
            block_sparse_attn(q, kv_cache, block_table, selection.ranking, selection.counts,
                              torch.empty_like(q), ctx=ctx, scale=scale, block_size=block, k_scale=k_scale,
                              v_scale=v_scale)
        if budget_lse:
            last_block_mass_paged(q, kv_cache, block_table, ctx=ctx, scale=scale, block_size=block,
                                  row_lse=torch.zeros(num_q_heads, min(q_len, block), device=device), k_scale=k_scale)
        if union_plan and block % page_size == 0:
            union_page_plan(selection.ranking, selection.counts, block_table, ctx=ctx, q_len=q_len,
                            block_size=block, page_size=page_size)
    return len(chunks)


__all__ = ["warm_up", "warmup_chunks"]
