"""A selection as inputs of a dense paged varlen kernel (FA3's ``flash_attn_varlen_func``).

Dense paged-attention kernels read each request's keys through its own block-table row. A
selection becomes such a batch when every query-block row of the chunk is one pseudo-request:
its queries are the row's queries, its "block table" lists the pages of the key blocks the row
selected in ascending order, so the diagonal block (the largest selected index) comes last, and
the kernel's causal mask, aligned to the end of the keys (bottom right), masks exactly the
diagonal block. The kernel computes all query heads over one page list, so a row's list is the
union over heads (and groups) of what they selected: blocks a head did not select but another
did are computed for it too. :func:`union_block_mask` gives that mask, for the density reported
and for the reference that tests this path.

Pure torch, a few tensor ops per chunk, no host sync; requires ``block_size % page_size == 0``
(a selection block is a whole number of pages). ``flashinfer.py`` packs the same plan into
FlashInfer's CSR page lists.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..params import ChunkGeometry
from .naive import selection_block_mask


class UnionPagePlan(NamedTuple):
    """Arguments of a dense varlen paged kernel for one chunk, one pseudo-request per row.

    Attributes:
        cu_seqlens_q: ``[R + 1]`` int32 query offsets of the rows within the chunk.
        seqused_k: ``[R]`` int32 keys each row reads (its selected blocks; the diagonal block
            only up to the row's last query).
        block_table: ``[R, Kb * block_size // page_size]`` int32 physical pages, row by row.
        max_seqlen_q: host upper bound of the rows' query counts.
        max_seqlen_k: host upper bound of ``seqused_k``.
        union_blocks: ``[R]`` int32 selected blocks per row (union over heads).
        union_ranking: ``[1, R, Kb]`` int32 each row's selected blocks, ascending, then padding:
            with ``union_blocks`` as every head's count, the selection this path computes (for
            density and kept-mass statistics, which must count the union).
    """

    cu_seqlens_q: torch.Tensor
    seqused_k: torch.Tensor
    block_table: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    union_blocks: torch.Tensor
    union_ranking: torch.Tensor


def union_block_mask(ranking: torch.Tensor, counts: torch.Tensor, num_k_blocks: int) -> torch.Tensor:
    """``[R, Kb]`` bool: the blocks any head selected, per query-block row."""
    return selection_block_mask(ranking, counts, num_k_blocks).any(dim=0)


def row_bounds(geo: ChunkGeometry, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R]`` int64 each query-block row's block index and one past its last query (absolute).

    A row reads at most ``row_end`` keys (its whole causal extent), and its queries are the
    chunk's ``[max(ctx, row_block * block_size), row_end)``. ``device="cpu"`` gives the host
    copy that a host-side planner needs without touching the GPU."""
    row_block = geo.first_q_block + torch.arange(geo.num_q_blocks, device=device)
    row_end = ((row_block + 1) * geo.block_size).clamp(max=geo.seq_len)
    return row_block, row_end


def union_page_plan(
    ranking: torch.Tensor,
    counts: torch.Tensor,
    block_table: torch.Tensor,
    *,
    ctx: int,
    q_len: int,
    block_size: int,
    page_size: int,
) -> UnionPagePlan:
    """Plan one chunk's selection for a dense paged varlen kernel.

    Args:
        ranking: ``[G, R, Kb]`` int32 selection ranking (the diagonal block first in each row).
        counts: ``[Hq, R]`` int32 ranking entries each head computes per row.
        block_table: ``[max_pages]`` int32 the request's physical page per logical page.
        ctx, q_len: the chunk's queries are the absolute positions ``[ctx, ctx + q_len)``.
        block_size: selection block size, a multiple of ``page_size``.
        page_size: KV-cache page size.
    """
    if block_size % page_size:
        raise ValueError(f"block_size={block_size} must be a multiple of page_size={page_size}")
    geo = ChunkGeometry(ctx, q_len, block_size)
    num_rows, num_k_blocks = ranking.shape[1], ranking.shape[2]
    device = ranking.device
    mask = union_block_mask(ranking, counts, num_k_blocks)  # [R, Kb]
    union_blocks = mask.sum(dim=-1, dtype=torch.int32)
    block_ids = torch.arange(num_k_blocks, device=device)
    # Ascending block order puts the diagonal, the largest selected index, last.
    ordered = torch.where(mask, block_ids, num_k_blocks).sort(dim=-1).values  # [R, Kb]
    pages_per_block = block_size // page_size
    logical_pages = ordered[..., None] * pages_per_block + torch.arange(pages_per_block, device=device)
    logical_pages = logical_pages.flatten(1).clamp(max=block_table.numel() - 1)  # unused tail: any page
    pages = block_table[logical_pages].to(torch.int32)

    row_block, row_end = row_bounds(geo, device)
    cu_seqlens_q = torch.zeros(num_rows + 1, dtype=torch.int32, device=device)
    cu_seqlens_q[1:] = row_end - ctx
    seqused_k = ((union_blocks - 1) * block_size + row_end - row_block * block_size).to(torch.int32)
    return UnionPagePlan(
        cu_seqlens_q, seqused_k, pages, min(block_size, q_len), num_k_blocks * block_size, union_blocks,
        ordered.to(torch.int32)[None],
    )


def tail_first_calls(plan: UnionPagePlan, geo: ChunkGeometry, first_tail_row: int) -> list[tuple[slice, UnionPagePlan]]:
    """The kernel calls of a plan: ``[(chunk token slice, plan of those rows)]``.

    Rows ``[first_tail_row, R)`` (the dense tail of ``dense_tail_tokens``, which reads every
    causal page) come first, in a call of their own, then the other rows. In one call the tail's
    pseudo-requests would be scheduled last and run alone on a nearly idle GPU; alone, a
    split-KV kernel (FA3's heuristic) spreads their keys over the GPU. One call when there is
    no tail or only tail. Slices of the plan's tensors (``cu_seqlens_q`` rebased: one tensor op)."""
    num_rows = geo.num_q_blocks
    if not 0 < first_tail_row < num_rows:
        return [(slice(0, geo.q_len), plan)]
    split = geo.row_token_start(first_tail_row)
    calls = []
    for rows, tokens in ((slice(first_tail_row, num_rows), slice(split, geo.q_len)),
                         (slice(0, first_tail_row), slice(0, split))):
        calls.append((tokens, plan._replace(
            cu_seqlens_q=plan.cu_seqlens_q[rows.start : rows.stop + 1] - tokens.start,
            seqused_k=plan.seqused_k[rows], block_table=plan.block_table[rows],
            union_blocks=plan.union_blocks[rows], union_ranking=plan.union_ranking[:, rows],
        )))
    return calls
