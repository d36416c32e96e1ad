"""Block selection, the readable specification.

Per proxy group and query-block row, the key blocks are ranked as:

1. forced blocks: the diagonal block, then the ``local_blocks - 1`` blocks before it (nearest
   first), then the ``sink_blocks`` leading blocks, each kept once and only if causal;
2. every other causal block, by descending proxy score (ties: lower block index first);
3. ``-1`` for the blocks past the row's causal frontier.

Head ``h`` of group ``g`` computes the first ``counts[h, row]`` entries of ``ranking[g, row]``:
``min(extent, max(budget[h], num_forced[row]))``, so the heads of one group select nested
prefixes of one list. A row with no proxy estimate (all scores ``-inf``) is computed densely, and
so are the rows holding the chunk's last ``dense_tail_tokens`` tokens: in a prompt's last chunk
they are the tokens generation starts from (typically the question), whose own attention must
find whatever the prompt holds; the budget and proxy ranking of one row can miss a needle.
"""
from __future__ import annotations

import torch

from ..params import ChunkGeometry


def forced_rank(geo: ChunkGeometry, sink_blocks: int, local_blocks: int, device=None) -> torch.Tensor:
    """Priority of the forced blocks: ``[num_q_blocks, num_k_blocks]`` int64.

    0 for the diagonal, ``j`` for the block ``j`` before it (``j < local_blocks``), then the sink
    blocks; ``NOT_FORCED`` for other causal blocks and ``NOT_CAUSAL`` past the frontier.
    """
    rows = geo.first_q_block + torch.arange(geo.num_q_blocks, device=device)[:, None]
    cols = torch.arange(geo.num_k_blocks, device=device)[None, :]
    distance = rows - cols
    rank = torch.full(distance.shape, NOT_FORCED, dtype=torch.long, device=device)
    is_sink = (cols < sink_blocks) & (distance >= 0)
    rank = torch.where(is_sink, local_blocks + cols, rank)
    is_local = (distance >= 0) & (distance < local_blocks)
    rank = torch.where(is_local, distance, rank)
    return torch.where(distance < 0, NOT_CAUSAL, rank)


NOT_FORCED = 1 << 30
NOT_CAUSAL = NOT_FORCED + 1


def check_select_args(
    scores: torch.Tensor, budget: torch.Tensor, geo: ChunkGeometry, sink_blocks: int, local_blocks: int,
    dense_tail_tokens: int,
) -> None:
    """ValueError unless the arguments fit :func:`select_blocks` (``select/triton.py`` takes the
    same): ``scores [G, num_q_blocks, num_k_blocks]`` float32 of ``geo``, ``budget [Hq]`` int32
    on the same device with ``Hq % G == 0``, ``sink_blocks >= 0``, ``local_blocks >= 1`` (the
    diagonal is always forced) and ``dense_tail_tokens >= 0``."""
    if scores.dim() != 3 or scores.dtype != torch.float32:
        raise ValueError(f"scores must be float32 [G, R, Kb]; got {scores.dtype}{tuple(scores.shape)}")
    num_groups = scores.shape[0]
    if scores.shape[1:] != (geo.num_q_blocks, geo.num_k_blocks):
        raise ValueError(f"scores shape {tuple(scores.shape)} does not match ctx={geo.ctx}, q_len={geo.q_len}, "
                         f"block_size={geo.block_size}: expected [G, {geo.num_q_blocks}, {geo.num_k_blocks}]")
    if budget.dim() != 1 or budget.dtype != torch.int32 or budget.shape[0] % max(num_groups, 1):
        raise ValueError(f"budget must be int32 [Hq] with Hq a multiple of G={num_groups}; "
                         f"got {budget.dtype}{tuple(budget.shape)}")
    if budget.device != scores.device:
        raise ValueError(f"scores and budget on different devices: {scores.device}, {budget.device}")
    if sink_blocks < 0 or local_blocks < 1 or dense_tail_tokens < 0:
        raise ValueError(f"need sink_blocks >= 0, local_blocks >= 1 and dense_tail_tokens >= 0; "
                         f"got {sink_blocks}, {local_blocks}, {dense_tail_tokens}")


def select_blocks(
    scores: torch.Tensor,
    budget: torch.Tensor,
    ctx: int,
    q_len: int,
    block_size: int,
    sink_blocks: int,
    local_blocks: int,
    dense_tail_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank key blocks per group and row, and count each head's prefix.

    Args:
        scores: ``[G, num_q_blocks, num_k_blocks]`` float32 proxy scores (``-inf`` = no score).
        budget: ``[Hq]`` per-row block budget of each query head; ``Hq % G == 0``.
        dense_tail_tokens: rows holding the chunk's last this-many tokens count every block.

    Returns:
        ranking ``[G, num_q_blocks, num_k_blocks]`` int32 (``-1`` past the frontier),
        counts ``[Hq, num_q_blocks]`` int32, num_forced ``[num_q_blocks]`` int32.
    """
    geo = ChunkGeometry(ctx, q_len, block_size)
    check_select_args(scores, budget, geo, sink_blocks, local_blocks, dense_tail_tokens)
    num_groups = scores.shape[0]
    num_q_heads = budget.shape[0]

    rank = forced_rank(geo, sink_blocks, local_blocks, scores.device)  # [R, Kb]
    # Lexicographic sort (forced rank asc, score desc, index asc) by chained stable sorts.
    by_score = scores.sort(dim=-1, descending=True, stable=True).indices  # [G, R, Kb]
    rank_in_score_order = rank.expand_as(by_score).gather(-1, by_score)
    order = rank_in_score_order.sort(dim=-1, stable=True).indices
    ranking = by_score.gather(-1, order).to(torch.int32)
    causal = rank.expand_as(by_score).gather(-1, ranking.long()) != NOT_CAUSAL
    ranking = torch.where(causal, ranking, torch.full_like(ranking, -1))

    extent = geo.first_q_block + 1 + torch.arange(geo.num_q_blocks, device=scores.device)
    num_forced = (rank < NOT_FORCED).sum(dim=-1).to(torch.int32)  # [R]
    has_estimate = torch.isfinite(scores).any(dim=-1)  # [G, R]
    group_of_head = torch.arange(num_q_heads, device=scores.device) // (num_q_heads // num_groups)
    want = torch.maximum(budget[:, None].long(), num_forced[None, :].long())
    counts = torch.minimum(want, extent[None, :])
    counts = torch.where(has_estimate[group_of_head], counts, extent[None, :].expand_as(counts))
    tail = torch.arange(geo.num_q_blocks, device=scores.device) >= geo.first_tail_row(dense_tail_tokens)
    counts = torch.where(tail[None, :], extent[None, :].expand_as(counts), counts)
    return ranking, counts.to(torch.int32), num_forced
