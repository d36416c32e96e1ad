"""Each head's selected key blocks as the block-sparse kernel walks them (by position), and the
cache row of each of their key tiles for its TMA path: the torch ops and one Triton launch with
the same results (:func:`head_lists_and_tile_rows`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import MAX_TRITON_BLOCKS, row_pad, row_warps


def head_block_lists(ranking: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each head's selected key blocks in descending key order: ``[Hq, R, Kb]`` int32.

    Row ``[h, r]`` holds the first ``counts[h, r]`` blocks of ``ranking[group(h), r]`` sorted by
    position, largest first (so the diagonal block stays first, as the kernel expects), then -1.
    Softmax does not care about the visiting order, but the memory system does: when every
    program walks its keys in the same direction, programs running at the same time read the
    same K/V tiles and share them in L2, which a score-ordered walk does not (a few tensor ops,
    no host sync)."""
    num_q_heads, num_rows = counts.shape
    per_head = ranking.repeat_interleave(num_q_heads // ranking.shape[0], dim=0)
    in_prefix = torch.arange(ranking.shape[-1], device=ranking.device) < counts[..., None]
    return torch.where(in_prefix, per_head, -1).sort(dim=-1, descending=True).values.to(torch.int32)


def ranked_tile_rows(
    ranking: torch.Tensor, block_table: torch.Tensor, block_size: int, block_n: int, page_size: int
) -> torch.Tensor:
    """Physical cache row of every key tile of the ranking: ``[G, R, Kb * (block_size // block_n)]``
    int32 (``page * page_size + offset`` of the tile's first key). Entries the kernel never reads
    (-1 padding; tiles of the partial last block, which is always a diagonal) are clamped into
    the table. A few tensor ops, no host sync; requires ``page_size % block_n == 0``."""
    sub = block_size // block_n
    starts = ranking.clamp(min=0).long()[..., None] * block_size + torch.arange(
        sub, device=ranking.device) * block_n
    pages = block_table.long()[(starts // page_size).clamp(max=block_table.numel() - 1)]
    return (pages * page_size + starts % page_size).to(torch.int32).flatten(-2)


# Nothing that follows the chunk or the request's block-table row is specialized (see the
# attention kernel in triton.py).
@triton.jit(do_not_specialize=["block_table_ptr", "num_k_blocks", "last_page", "stride_rk_group", "stride_rk_row",
                               "stride_cnt_head", "stride_list_head", "stride_list_row", "stride_tr_head",
                               "stride_tr_row"])
def _head_lists_kernel(
    ranking_ptr, counts_ptr, block_table_ptr, lists_ptr, tile_rows_ptr,
    num_k_blocks, last_page,
    stride_rk_group, stride_rk_row, stride_cnt_head, stride_list_head, stride_list_row,
    stride_tr_head, stride_tr_row,
    HEADS_PER_GROUP: tl.constexpr, KB_PAD: tl.constexpr, WITH_TILE_ROWS: tl.constexpr,
    TILES_PER_BLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    cols = tl.arange(0, KB_PAD)
    in_range = cols < num_k_blocks
    count = tl.load(counts_ptr + head * stride_cnt_head + row)
    blocks = tl.load(ranking_ptr + (head // HEADS_PER_GROUP) * stride_rk_group + row * stride_rk_row + cols,
                     mask=in_range & (cols < count), other=-1)
    blocks = tl.sort(blocks, descending=True)  # the head's prefix by position, largest first, then -1
    tl.store(lists_ptr + head * stride_list_head + row * stride_list_row + cols, blocks, mask=in_range)
    if WITH_TILE_ROWS:  # as ranked_tile_rows: the cache row of each key tile's first key
        start = tl.maximum(blocks, 0) * BLOCK_SIZE
        out_row = tile_rows_ptr + head * stride_tr_head + row * stride_tr_row + cols * TILES_PER_BLOCK
        for sub in tl.static_range(TILES_PER_BLOCK):
            key = start + sub * BLOCK_N
            page = tl.load(block_table_ptr + tl.minimum(key // PAGE_SIZE, last_page), mask=in_range, other=0)
            tl.store(out_row + sub, page * PAGE_SIZE + key % PAGE_SIZE, mask=in_range)


def head_lists_and_tile_rows(
    ranking: torch.Tensor, counts: torch.Tensor, block_table: torch.Tensor, block_size: int, block_n: int,
    page_size: int, with_tile_rows: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`head_block_lists` and, with ``with_tile_rows``, :func:`ranked_tile_rows` of those
    lists, in one launch (one program per row and head) instead of a dozen tensor ops over
    ``[Hq, R, Kb]`` int64 temporaries. Same results; rows longer than ``MAX_TRITON_BLOCKS`` key
    blocks use the torch functions. Returns ``(lists [Hq, R, Kb], tile_rows or None)``."""
    num_q_heads, num_rows = counts.shape
    num_groups, _, num_k_blocks = ranking.shape
    if num_k_blocks > MAX_TRITON_BLOCKS:
        lists = head_block_lists(ranking, counts)
        rows = ranked_tile_rows(lists, block_table, block_size, block_n, page_size) if with_tile_rows else None
        return lists, rows
    tiles_per_block = block_size // block_n
    lists = torch.empty(num_q_heads, num_rows, num_k_blocks, dtype=torch.int32, device=ranking.device)
    rows = (torch.empty(num_q_heads, num_rows, num_k_blocks * tiles_per_block, dtype=torch.int32,
                        device=ranking.device) if with_tile_rows else lists)
    kb_pad = row_pad(num_k_blocks)
    block_table = block_table.contiguous()  # itself when it is already
    _head_lists_kernel[(num_rows, num_q_heads)](
        ranking, counts, block_table, lists, rows, num_k_blocks, block_table.numel() - 1,
        ranking.stride(0), ranking.stride(1), counts.stride(0), lists.stride(0), lists.stride(1),
        rows.stride(0), rows.stride(1),
        HEADS_PER_GROUP=num_q_heads // num_groups, KB_PAD=kb_pad, WITH_TILE_ROWS=with_tile_rows,
        TILES_PER_BLOCK=tiles_per_block, BLOCK_SIZE=block_size, BLOCK_N=block_n, PAGE_SIZE=page_size,
        num_warps=row_warps(kb_pad),
    )
    return lists, (rows if with_tile_rows else None)


def heaviest_first(counts: torch.Tensor, num_rows: int, tiles_per_row: int) -> torch.Tensor:
    """The block-sparse kernel's programs in descending order of work: ``[Hq * num_rows *
    tiles_per_row]`` int32 ids ``head * (num_rows * tiles_per_row) + tile`` (query tile ``tile``
    of row ``tile // tiles_per_row``), sorted by the blocks the head computes in that row
    (``counts [Hq, >= num_rows]``), ties in id order.

    Why: programs start roughly in launch order, so with per-head budgets of 0.5% to 97% of the
    blocks, a heavy head launched last runs alone while the rest of the GPU idles; heaviest first
    is the classic longest-processing-time rule. A few tensor ops on the device, no host sync."""
    num_q_heads = counts.shape[0]
    work = counts[:, :num_rows].repeat_interleave(tiles_per_row, dim=1).reshape(num_q_heads * num_rows * tiles_per_row)
    return torch.sort(work, descending=True, stable=True).indices.to(torch.int32)


__all__ = ["head_block_lists", "head_lists_and_tile_rows", "heaviest_first", "ranked_tile_rows"]
