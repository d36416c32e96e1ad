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

:func:`union_page_plan_torch` is the readable specification (about 30 tensor ops);
:func:`union_page_plan` computes the same plan in one Triton launch, one program per row. The
plan is built for every layer of every chunk, and 30 small launches cost a fixed GPU time per
chunk that showed up end to end in the H200 TTFT fit. No host sync either way;
requires ``block_size % page_size == 0`` (a selection block is a whole number of pages).
``flashinfer_plan.py`` packs the same plan into FlashInfer's CSR page lists.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..common import MAX_TRITON_BLOCKS, row_pad, row_warps
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
    """``[R, Kb]`` bool: the blocks any head selected, per query-block row.

    The heads of a group share its ranking and each computes a prefix of it, so their union is
    the group's longest prefix: a ``[G, R, Kb]`` mask instead of ``[Hq, R, Kb]`` (this runs for
    every layer of every chunk; the per-head mask was 33 MB of int64 at 256K tokens, Hq 32)."""
    num_groups, num_rows = ranking.shape[0], ranking.shape[1]
    group_counts = counts.reshape(num_groups, -1, num_rows).amax(dim=1)  # [G, R]
    return selection_block_mask(ranking, group_counts, num_k_blocks).any(dim=0)


def row_bounds(geo: ChunkGeometry, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``[R]`` int64 each query-block row's block index and one past its last query (absolute).

    A row reads at most ``row_end`` keys (its whole causal extent), and its queries are the
    chunk's ``[max(ctx, row_block * block_size), row_end)``. ``device="cpu"`` gives the host
    copy that a host-side planner needs without touching the GPU."""
    row_block = geo.first_q_block + torch.arange(geo.num_q_blocks, device=device)
    row_end = ((row_block + 1) * geo.block_size).clamp(max=geo.seq_len)
    return row_block, row_end


def _check_plan_args(ranking: torch.Tensor, counts: torch.Tensor, block_table: torch.Tensor, block_size: int,
                     page_size: int) -> None:
    """ValueError unless the arguments fit :func:`union_page_plan_torch` and :func:`union_page_plan`:
    ``ranking [G, R, Kb]`` and ``counts [Hq, R]`` int32 with ``Hq % G == 0``, a 1-D block table,
    and a selection block that is a whole number of pages."""
    if block_size % page_size:
        raise ValueError(f"block_size={block_size} must be a multiple of page_size={page_size}")
    if (ranking.dim() != 3 or counts.dim() != 2 or ranking.dtype != torch.int32 or counts.dtype != torch.int32
            or counts.shape[1] != ranking.shape[1] or counts.shape[0] % ranking.shape[0] or block_table.dim() != 1):
        raise ValueError(f"need ranking [G, R, Kb] and counts [Hq, R] int32 with G dividing Hq and a 1-D block "
                         f"table; got {ranking.dtype}{tuple(ranking.shape)}, {counts.dtype}{tuple(counts.shape)}, "
                         f"block_table {tuple(block_table.shape)}")


def union_page_plan_torch(
    ranking: torch.Tensor,
    counts: torch.Tensor,
    block_table: torch.Tensor,
    *,
    ctx: int,
    q_len: int,
    block_size: int,
    page_size: int,
) -> UnionPagePlan:
    """Plan one chunk's selection for a dense paged varlen kernel (torch ops; the spec of
    :func:`union_page_plan`).

    Args:
        ranking: ``[G, R, Kb]`` int32 selection ranking (the diagonal block first in each row).
        counts: ``[Hq, R]`` int32 ranking entries each head computes per row.
        block_table: ``[max_pages]`` int32 the request's physical page per logical page.
        ctx, q_len: the chunk's queries are the absolute positions ``[ctx, ctx + q_len)``.
        block_size: selection block size, a multiple of ``page_size``.
        page_size: KV-cache page size.
    """
    _check_plan_args(ranking, counts, block_table, block_size, page_size)
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


# Nothing that follows the chunk or the request's block-table row (whose address is 16-byte
# aligned or not depending on the request's slot) is specialized: no compile while serving.
@triton.jit(do_not_specialize=["block_table_ptr", "first_q_block", "num_k_blocks", "seq_len", "ctx", "last_page",
                               "stride_rk_group", "stride_rk_row", "stride_cnt_head", "stride_inv_row",
                               "stride_ord_row", "stride_pages_row"])
def _union_plan_kernel(
    ranking_ptr, counts_ptr, block_table_ptr, inv_ptr,
    ordered_ptr, pages_ptr, union_blocks_ptr, seqused_ptr, cu_seqlens_ptr,
    first_q_block, num_k_blocks, seq_len, ctx, last_page,
    stride_rk_group, stride_rk_row, stride_cnt_head, stride_inv_row, stride_ord_row, stride_pages_row,
    NUM_GROUPS: tl.constexpr, HEADS_PER_GROUP: tl.constexpr, HEADS_PAD: tl.constexpr,
    KB_PAD: tl.constexpr, PAGES_PER_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0)
    q_block = first_q_block + row
    cols = tl.arange(0, KB_PAD)
    in_range = cols < num_k_blocks
    causal = in_range & (cols <= q_block)
    head_ok = tl.arange(0, HEADS_PAD) < HEADS_PER_GROUP
    inv_row = inv_ptr + row * stride_inv_row

    # A group's heads compute prefixes of its ranking: the union is its longest prefix. Each
    # causal block appears once in the ranking row, so scattering positions to block ids gives
    # every causal block's position (its rank), and the block is in the union when that is
    # inside the prefix.
    union = tl.zeros([KB_PAD], tl.int32)
    for g in tl.static_range(NUM_GROUPS):
        heads = g * HEADS_PER_GROUP + tl.arange(0, HEADS_PAD)
        prefix = tl.max(tl.load(counts_ptr + heads * stride_cnt_head + row, mask=head_ok, other=0), 0)
        blocks = tl.load(ranking_ptr + g * stride_rk_group + row * stride_rk_row + cols, mask=in_range, other=-1)
        tl.store(inv_row + blocks, cols, mask=in_range & (blocks >= 0))
        tl.debug_barrier()  # the scatter is visible to the whole program before the gather
        rank = tl.load(inv_row + cols, mask=causal, other=KB_PAD)
        tl.debug_barrier()  # every gather done before the next group's scatter
        union = union | (causal & (rank < prefix)).to(tl.int32)

    # Ascending order by compaction (the diagonal, the largest index, lands last), then padding.
    num_union = tl.sum(union, 0)
    dest = tl.cumsum(union, 0) - 1
    chosen = union > 0
    padding = in_range & (cols >= num_union)
    ordered_row = ordered_ptr + row * stride_ord_row
    tl.store(ordered_row + dest, cols, mask=chosen)
    tl.store(ordered_row + cols, num_k_blocks + 0 * cols, mask=padding)
    pages_row = pages_ptr + row * stride_pages_row
    for j in tl.static_range(PAGES_PER_BLOCK):
        page = tl.load(block_table_ptr + tl.minimum(cols * PAGES_PER_BLOCK + j, last_page), mask=chosen, other=0)
        tl.store(pages_row + dest * PAGES_PER_BLOCK + j, page, mask=chosen)
        # Padding entries read the spec's clamped page past the last block (any valid page).
        pad_page = tl.load(block_table_ptr + tl.minimum(num_k_blocks * PAGES_PER_BLOCK + j, last_page))
        tl.store(pages_row + cols * PAGES_PER_BLOCK + j, pad_page + 0 * cols, mask=padding)

    row_end = tl.minimum((q_block + 1) * BLOCK_SIZE, seq_len)
    tl.store(union_blocks_ptr + row, num_union)
    tl.store(seqused_ptr + row, (num_union - 1) * BLOCK_SIZE + row_end - q_block * BLOCK_SIZE)
    tl.store(cu_seqlens_ptr + row + 1, row_end - ctx)
    if row == 0:
        tl.store(cu_seqlens_ptr, 0)


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
    """Plan one chunk's selection for a dense paged varlen kernel: :func:`union_page_plan_torch`
    (same arguments, same result) in one Triton launch; rows longer than ``MAX_TRITON_BLOCKS``
    key blocks use the torch ops. Needs ``ranking`` as ``select`` produces it (each row lists
    every causal key block exactly once, then ``-1``), and int32 ``ranking`` and ``counts``.
    """
    _check_plan_args(ranking, counts, block_table, block_size, page_size)
    num_groups, num_rows, num_k_blocks = ranking.shape
    num_q_heads = counts.shape[0]
    if num_k_blocks > MAX_TRITON_BLOCKS:
        return union_page_plan_torch(ranking, counts, block_table, ctx=ctx, q_len=q_len, block_size=block_size,
                                     page_size=page_size)
    geo = ChunkGeometry(ctx, q_len, block_size)
    device = ranking.device
    pages_per_block = block_size // page_size
    kb_pad = row_pad(num_k_blocks)
    heads_per_group = num_q_heads // num_groups
    ordered = torch.empty(num_rows, num_k_blocks, dtype=torch.int32, device=device)
    pages = torch.empty(num_rows, num_k_blocks * pages_per_block, dtype=torch.int32, device=device)
    union_blocks = torch.empty(num_rows, dtype=torch.int32, device=device)
    seqused_k = torch.empty(num_rows, dtype=torch.int32, device=device)
    cu_seqlens_q = torch.empty(num_rows + 1, dtype=torch.int32, device=device)
    inverse = torch.empty(num_rows, kb_pad, dtype=torch.int32, device=device)  # scratch: rank per block
    block_table = block_table.contiguous()  # itself when it is already
    _union_plan_kernel[(num_rows,)](
        ranking, counts, block_table, inverse, ordered, pages, union_blocks, seqused_k, cu_seqlens_q,
        geo.first_q_block, num_k_blocks, geo.seq_len, ctx, block_table.numel() - 1,
        ranking.stride(0), ranking.stride(1), counts.stride(0), inverse.stride(0), ordered.stride(0),
        pages.stride(0),
        NUM_GROUPS=num_groups, HEADS_PER_GROUP=heads_per_group,
        HEADS_PAD=max(2, triton.next_power_of_2(heads_per_group)), KB_PAD=kb_pad,
        PAGES_PER_BLOCK=pages_per_block, BLOCK_SIZE=block_size, num_warps=row_warps(kb_pad),
    )
    return UnionPagePlan(cu_seqlens_q, seqused_k, pages, min(block_size, q_len), num_k_blocks * block_size,
                         union_blocks, ordered[None])


#: A union call with at least this many (pseudo-request, query head) tiles per SM runs without
#: split-KV (:func:`union_call_num_splits`).
SPLIT_FREE_TILES_PER_SM = 8


def union_call_num_splits(num_rows: int, num_q_heads: int, num_sms: int) -> int:
    """``num_splits`` for a dense varlen kernel over ``num_rows`` pseudo-requests of a plan: 1 (no
    split-KV) when the call has at least ``SPLIT_FREE_TILES_PER_SM`` (row, query head) tiles per SM,
    else 0 (FA3 chooses).

    FA3's split heuristic sizes the key range from ``max_seqlen_k``, which for a union call is the
    whole context (a host bound: the unions are on the device), while each row reads only its
    union, about the density times the context. It then splits rows that are already short and
    adds a combine kernel. H200, last 8K chunk of 128K at density 0.1 (the kernel benchmark):
    Llama-3.1-8B's shape (2016 tiles, 15 per SM) took 2.96 ms with one split against 3.17 ms with
    FA3's choice at 128-token pages, 3.29 vs 3.44 at 16; Qwen2.5-0.5B's (882 tiles, 6.7 per SM)
    was within 2% either way, so it keeps FA3's choice. A call with few rows (the dense tail, a
    short chunk) needs the splits to fill the GPU."""
    return 1 if num_sms > 0 and num_rows * num_q_heads >= SPLIT_FREE_TILES_PER_SM * num_sms else 0


def tail_first_calls(plan: UnionPagePlan, geo: ChunkGeometry, first_tail_row: int,
                     tail_done: bool = False) -> list[tuple[slice, UnionPagePlan]]:
    """The kernel calls of a plan: ``[(chunk token slice, plan of those rows)]``.

    Rows ``[first_tail_row, R)`` (the dense tail of ``dense_tail_tokens``, which reads every
    causal page) come first, in a call of their own, then the other rows. In one call the tail's
    pseudo-requests would be scheduled last and run alone on a nearly idle GPU; alone, a
    split-KV kernel (FA3's heuristic) spreads their keys over the GPU. One call when there is
    no tail or only tail. Slices of the plan's tensors (``cu_seqlens_q`` rebased: one tensor op).
    ``tail_done``: the tail rows are attended already (a dense call before the selection): only
    the other rows' call, if any."""
    num_rows = geo.num_q_blocks
    if tail_done and first_tail_row < num_rows:
        return tail_first_calls(plan, geo, first_tail_row)[1:] if first_tail_row > 0 else []
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
