"""Block selection (Triton): one program per (query-block row, proxy group).

Semantics: exactly ``select/naive.py`` (``select_blocks``); same arguments and outputs.

The naive spec orders the key blocks of a row lexicographically by (forced rank ascending,
score descending, block index ascending) with two chained stable sorts. Here that order is
packed into one unique int64 key per block and sorted once with ``tl.sort`` (bitonic, in
registers):

* forced block (rank ``f``):  ``f << 24 | block``
* other causal block:         ``1 << 60 | desc(score) << 24 | block``, where ``desc`` is the
  32-bit float pattern mapped to an unsigned integer that decreases as the float increases
  (``-0.0`` is folded into ``+0.0``, as torch's sort compares them equal)
* past the causal frontier:   ``3 << 60 | block`` (written as ``-1``)

so the block index is the low 24 bits of the sorted key. Rows longer than
``MAX_TRITON_BLOCKS`` key blocks (over 1M tokens at block 128) fall back to the naive torch ops
(also on the device, without host sync). NaN scores are not supported (the proxy scores never
produce them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import MAX_TRITON_BLOCKS, row_pad
from ..params import ChunkGeometry
from . import naive

_INDEX_BITS = 24


# Values and row strides that follow the chunk are not specialized: no compile per new chunk
# shape while serving (proxyattn_kernels/warmup.py compiles the rest at startup).
@triton.jit(do_not_specialize=["first_q_block", "num_k_blocks", "sink_blocks", "local_blocks", "first_tail_row",
                               "stride_sc_group", "stride_sc_row", "stride_rk_group", "stride_rk_row",
                               "stride_cnt_head"])
def _select_kernel(
    scores_ptr, budget_ptr, ranking_ptr, counts_ptr, num_forced_ptr,
    first_q_block, num_k_blocks, sink_blocks, local_blocks, first_tail_row,
    stride_sc_group, stride_sc_row, stride_rk_group, stride_rk_row, stride_cnt_head,
    HEADS_PER_GROUP: tl.constexpr, HEADS_PAD: tl.constexpr, KB_PAD: tl.constexpr,
    NOT_FORCED: tl.constexpr,
):
    row = tl.program_id(0)
    g = tl.program_id(1)
    q_block = first_q_block + row
    cols = tl.arange(0, KB_PAD)
    in_range = cols < num_k_blocks
    sc = tl.load(scores_ptr + g * stride_sc_group + row * stride_sc_row + cols, mask=in_range,
                 other=float("-inf"))
    finite = (sc == sc) & (tl.abs(sc) < float("inf"))
    has_estimate = tl.max((finite & in_range).to(tl.int32), 0) > 0

    # Forced rank, as naive.forced_rank.
    distance = q_block - cols
    causal = (distance >= 0) & in_range
    rank = tl.where((cols < sink_blocks) & causal, local_blocks + cols, NOT_FORCED)
    rank = tl.where(causal & (distance < local_blocks), distance, rank)
    forced = causal & (rank < NOT_FORCED)
    num_forced = tl.sum(forced.to(tl.int32), 0)

    # Score descending as an unsigned 32-bit key (held in int64).
    sc = tl.where(sc == 0.0, 0.0, sc)  # -0.0 -> +0.0
    bits = sc.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    desc = tl.where(bits >= 0x80000000, bits, 0x7FFFFFFF - bits)
    idx = cols.to(tl.int64)
    key = tl.where(forced, (rank.to(tl.int64) << 24) | idx, (desc << 24) | idx | (1 << 60))
    key = tl.where(causal, key, idx | (3 << 60))
    key = tl.sort(key)
    block = (key & ((1 << 24) - 1)).to(tl.int32)
    block = tl.where(key < (3 << 60), block, -1)
    tl.store(ranking_ptr + g * stride_rk_group + row * stride_rk_row + cols, block, mask=in_range)

    # Each head's prefix length.
    extent = q_block + 1
    heads = g * HEADS_PER_GROUP + tl.arange(0, HEADS_PAD)
    head_ok = tl.arange(0, HEADS_PAD) < HEADS_PER_GROUP
    budget = tl.load(budget_ptr + heads, mask=head_ok, other=0)
    count = tl.minimum(tl.maximum(budget, num_forced), extent)
    count = tl.where(has_estimate & (row < first_tail_row), count, extent)
    tl.store(counts_ptr + heads * stride_cnt_head + row, count, mask=head_ok)
    if g == 0:
        tl.store(num_forced_ptr + row, num_forced)


def select_blocks(
    scores: torch.Tensor,
    budget: torch.Tensor,
    ctx: int,
    q_len: int,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
    dense_tail_tokens: int = 0,
    *,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    max_triton_blocks: int = MAX_TRITON_BLOCKS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank key blocks per group and row, and count each head's prefix (one launch).

    Args:
        scores: ``[G, num_q_blocks, num_k_blocks]`` float32 proxy scores (``-inf`` = no score),
            contiguous last dim.
        budget: ``[Hq]`` int32 per-row block budget of each query head; ``Hq % G == 0``.
        ctx, q_len, block_size: the chunk geometry.
        sink_blocks (>= 0), local_blocks (>= 1): forced blocks, see ``select/naive.py``.
        dense_tail_tokens (>= 0): rows holding the chunk's last this-many tokens count every
            causal block (``select/naive.py``).
        out: optional preallocated ``(ranking, counts, num_forced)`` (every element is written).
        max_triton_blocks: rows with more key blocks use the naive torch ops.

    Returns:
        ranking ``[G, num_q_blocks, num_k_blocks]`` int32 (``-1`` past the frontier),
        counts ``[Hq, num_q_blocks]`` int32, num_forced ``[num_q_blocks]`` int32, exactly as
        ``select.naive.select_blocks``.
    """
    geo = ChunkGeometry(ctx, q_len, block_size)
    naive.check_select_args(scores, budget, geo, sink_blocks, local_blocks, dense_tail_tokens)
    num_groups = scores.shape[0]
    if geo.num_k_blocks >= 1 << _INDEX_BITS:
        raise ValueError(f"{geo.num_k_blocks} key blocks: at most {(1 << _INDEX_BITS) - 1} supported")
    num_q_heads = budget.shape[0]
    device = scores.device
    rows, num_k_blocks = geo.num_q_blocks, geo.num_k_blocks

    if num_k_blocks > max_triton_blocks:
        result = naive.select_blocks(scores, budget, ctx, q_len, block_size, sink_blocks, local_blocks,
                                     dense_tail_tokens)
        if out is None:
            return result
        for dst, src in zip(out, result):
            dst.copy_(src)
        return out

    if out is None:
        ranking = torch.empty((num_groups, rows, num_k_blocks), dtype=torch.int32, device=device)
        counts = torch.empty((num_q_heads, rows), dtype=torch.int32, device=device)
        num_forced = torch.empty((rows,), dtype=torch.int32, device=device)
    else:
        ranking, counts, num_forced = out
        expected = [((num_groups, rows, num_k_blocks)), ((num_q_heads, rows)), ((rows,))]
        for t, shape in zip(out, expected):
            if tuple(t.shape) != shape or t.dtype != torch.int32 or t.stride(-1) != 1:
                raise ValueError(f"out tensors must be int32 {expected} with contiguous last dims")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()

    kb_pad = row_pad(num_k_blocks)
    heads_per_group = num_q_heads // num_groups
    num_warps = 4 if kb_pad <= 1024 else (8 if kb_pad <= 4096 else 16)
    _select_kernel[(rows, num_groups)](
        scores, budget, ranking, counts, num_forced,
        geo.first_q_block, num_k_blocks, sink_blocks, local_blocks, geo.first_tail_row(dense_tail_tokens),
        scores.stride(0), scores.stride(1), ranking.stride(0), ranking.stride(1), counts.stride(0),
        HEADS_PER_GROUP=heads_per_group, HEADS_PAD=max(2, triton.next_power_of_2(heads_per_group)),
        KB_PAD=kb_pad, NOT_FORCED=naive.NOT_FORCED, num_warps=num_warps,
    )
    return ranking, counts, num_forced


__all__ = ["select_blocks"]
