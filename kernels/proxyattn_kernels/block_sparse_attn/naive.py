"""Block-sparse causal attention over a selection, the readable specification.

Query ``i`` of the chunk (absolute position ``ctx + i``, query-block row
``(ctx + i) // block_size - first_q_block``) of head ``h`` attends to the keys ``j <= ctx + i``
whose block ``j // block_size`` is among the first ``counts[h, row]`` entries of
``ranking[group(h), row]``. Computed densely with a mask, in fp32.
"""
from __future__ import annotations

import torch

from ..params import ChunkGeometry


def selection_block_mask(
    ranking: torch.Tensor, counts: torch.Tensor, num_k_blocks: int
) -> torch.Tensor:
    """``ranking [G, R, Kb]``, ``counts [Hq, R]`` -> ``[Hq, R, num_k_blocks]`` bool."""
    num_groups = ranking.shape[0]
    num_q_heads = counts.shape[0]
    per_head = ranking.repeat_interleave(num_q_heads // num_groups, dim=0).long()  # [Hq, R, Kb]
    in_prefix = torch.arange(per_head.shape[-1], device=ranking.device) < counts[..., None]
    mask = torch.zeros(*counts.shape, num_k_blocks + 1, dtype=torch.bool, device=ranking.device)
    # Entries outside the prefix (and -1 padding) are routed to a spare column and dropped.
    target = torch.where(in_prefix & (per_head >= 0), per_head, num_k_blocks)
    mask.scatter_(2, target, True)
    return mask[..., :num_k_blocks]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ctx: int,
    block_mask: torch.Tensor,
    scale: float,
    block_size: int,
) -> torch.Tensor:
    """Masked attention of one chunk.

    Args:
        q: ``[q_len, Hq, D]``; k, v: ``[ctx + q_len, Hkv, D]``.
        block_mask: ``[Hq, num_q_blocks, num_k_blocks]`` bool, the selected blocks.

    Returns:
        ``[q_len, Hq, D]`` in ``q.dtype``.
    """
    geo = ChunkGeometry(ctx, q.shape[0], block_size)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    q_pos = torch.arange(ctx, geo.seq_len, device=q.device)
    k_pos = torch.arange(geo.seq_len, device=q.device)
    q_row = q_pos // block_size - geo.first_q_block
    allowed = block_mask[:, q_row][:, :, k_pos // block_size]  # [Hq, q_len, S]
    allowed &= k_pos[None, None, :] <= q_pos[None, :, None]
    logits = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vf).to(q.dtype)
