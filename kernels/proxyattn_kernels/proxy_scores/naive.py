"""Proxy block scores, the readable specification.

For one prefill chunk (queries at absolute positions ``[ctx, ctx + q_len)``, keys ``[0, ctx + q_len)``):

1. Proxy heads: the query heads are split into ``num_groups`` contiguous groups aligned with the
   KV heads; a group's proxy query (key) is the mean of its query (KV) heads.
2. Strided token scores: keep the positions ``p % stride == 0`` of the proxy queries and keys,
   softmax each strided query row over the strided keys it may see (``key_pos <= query_pos``).
3. 2-D max pooling of those probabilities into ``[query-block rows of the chunk, key blocks]``.

Key blocks past a row's causal frontier score ``-inf``. A row that holds no strided query (a
chunk that starts or ends fewer than ``stride`` tokens into a block) has no estimate: all ``-inf``.
"""
from __future__ import annotations

import torch

from ..params import ChunkGeometry


def proxy_heads(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean over the heads of each contiguous group: ``[T, H, D] -> [T, num_groups, D]`` in fp32."""
    tokens, heads, dim = x.shape
    assert heads % num_groups == 0, (heads, num_groups)
    return x.float().reshape(tokens, num_groups, heads // num_groups, dim).mean(dim=2)


def proxy_block_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: int,
    scale: float,
    num_groups: int,
    stride: int,
    block_size: int,
) -> torch.Tensor:
    """Max-pooled strided proxy attention.

    Args:
        q: ``[q_len, Hq, D]`` post-RoPE queries of the chunk.
        k: ``[ctx + q_len, Hkv, D]`` post-RoPE keys of the whole sequence so far.
        ctx: absolute position of the chunk's first query.
        scale: softmax scale (usually ``D ** -0.5``).
        num_groups: number of proxy heads; divides ``Hkv``.
        stride: sampling stride; ``block_size % stride == 0``.
        block_size: selection block size in tokens.

    Returns:
        ``[num_groups, num_q_blocks, num_k_blocks]`` float32 scores.
    """
    geo = ChunkGeometry(ctx, q.shape[0], block_size)
    assert k.shape[0] == geo.seq_len, (k.shape, geo)
    device = q.device
    q_proxy = proxy_heads(q, num_groups)  # [q_len, G, D]
    k_proxy = proxy_heads(k, num_groups)  # [seq_len, G, D]

    q_pos = torch.arange(ctx, geo.seq_len, device=device)
    q_keep = q_pos % stride == 0
    q_pos = q_pos[q_keep]
    k_pos = torch.arange(0, geo.seq_len, stride, device=device)
    q_strided = q_proxy[q_keep]  # [Nq, G, D]
    k_strided = k_proxy[k_pos]  # [Nk, G, D]

    logits = torch.einsum("qgd,kgd->gqk", q_strided, k_strided) * scale
    visible = k_pos[None, :] <= q_pos[:, None]  # [Nq, Nk]
    probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    probs = probs.masked_fill(~visible, float("-inf"))  # masked pairs must not win the max

    scores = torch.full(
        (num_groups, geo.num_q_blocks, geo.num_k_blocks), float("-inf"), device=device
    )
    q_row = (q_pos // block_size - geo.first_q_block).long()
    k_blk = (k_pos // block_size).long()
    # Pool over key columns, then over query rows.
    per_key_block = torch.full(
        (num_groups, q_pos.numel(), geo.num_k_blocks), float("-inf"), device=device
    )
    per_key_block.scatter_reduce_(
        2, k_blk.expand(num_groups, q_pos.numel(), -1), probs, reduce="amax"
    )
    scores.scatter_reduce_(
        1, q_row[None, :, None].expand_as(per_key_block), per_key_block, reduce="amax"
    )
    return scores
