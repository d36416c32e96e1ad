"""End-to-end ProxyAttn prefill of one request chunk in plain torch: the oracle of every kernel.

Composes the naive ops: proxy scores -> per-head budgets -> selection -> block-sparse attention.
Keys and values come either contiguous or from a vLLM-0.26 paged cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .block_sparse_attn.naive import block_sparse_attention, selection_block_mask
from .budget.naive import fraction_budgets, head_budgets
from .params import ChunkGeometry, ProxyAttnParams
from .proxy_scores.naive import proxy_block_scores
from .select.naive import select_blocks


@dataclass
class Selection:
    """The blocks one chunk computes, and why.

    Attributes:
        geometry: the chunk's block geometry.
        scores: ``[G, R, Kb]`` float32 proxy scores (``R`` query-block rows, ``Kb`` key blocks).
        ranking: ``[G, R, Kb]`` int32 key blocks per group and row, forced blocks first, ``-1``
            past the causal frontier.
        counts: ``[Hq, R]`` int32: head ``h`` computes ``ranking[h // (Hq // G), row, :counts]``.
        num_forced: ``[R]`` int32 forced blocks (sink, local/diagonal) at the front of each row.
        budget: ``[Hq]`` int32 per-row block budget after the minimum and density cap.
        gamma_counts: ``[Hq]`` int32 blocks needed to reach gamma, before the limits.
        dense_reason: why the chunk ran dense (``"short"``), or None.
    """

    geometry: ChunkGeometry
    scores: torch.Tensor
    ranking: torch.Tensor
    counts: torch.Tensor
    num_forced: torch.Tensor
    budget: torch.Tensor
    gamma_counts: torch.Tensor
    dense_reason: str | None = None

    @property
    def num_groups(self) -> int:
        return self.ranking.shape[0]

    def extents(self) -> torch.Tensor:
        """``[R]`` causal key-block extent of each row."""
        geo = self.geometry
        return geo.first_q_block + 1 + torch.arange(geo.num_q_blocks, device=self.counts.device)

    def block_mask(self) -> torch.Tensor:
        """``[Hq, R, Kb]`` bool mask of the selected blocks."""
        return selection_block_mask(self.ranking, self.counts, self.geometry.num_k_blocks)

    @property
    def density(self) -> float:
        """Selected blocks over causal blocks, summed over heads and rows."""
        causal = self.extents().sum() * self.counts.shape[0]
        return float(self.counts.sum() / causal)

    def stats(self) -> dict:
        return {
            "density": self.density,
            "num_q_blocks": self.geometry.num_q_blocks,
            "num_k_blocks": self.geometry.num_k_blocks,
            "mean_budget_blocks": float(self.budget.float().mean()),
            "min_budget_blocks": int(self.budget.min()),
            "max_budget_blocks": int(self.budget.max()),
            "dense_reason": self.dense_reason,
        }


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``x`` (keys or values in the cache dtype) as the kernels read it: FP8 times ``scale`` in
    float32, or ``x`` itself when ``scale`` is None."""
    return x if scale is None else x.float() * scale.float().reshape(())


def gather_paged_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read keys and values ``[0, seq_len)`` of one request from a vLLM-0.26 paged cache.

    Args:
        kv_cache: ``[num_pages, Hkv, page_size, 2 * D]``, K in ``[..., :D]`` and V in ``[..., D:]``
            (any strides: vLLM hands a permuted view of an NHD tensor).
        block_table: ``[max_pages]`` int, the request's physical page per logical page.
        k_scale, v_scale: an FP8 cache's 1-element float32 scales: keys and values come back
            dequantized (:func:`dequantize_kv`), in float32.

    Returns:
        k, v: ``[seq_len, Hkv, D]`` contiguous.
    """
    page_size = kv_cache.shape[2]
    head_size = kv_cache.shape[3] // 2
    pos = torch.arange(seq_len, device=kv_cache.device)
    pages = block_table.long()[pos // page_size]
    tokens = kv_cache[pages, :, pos % page_size]  # [seq_len, Hkv, 2D]
    return (dequantize_kv(tokens[..., :head_size], k_scale).contiguous(),
            dequantize_kv(tokens[..., head_size:], v_scale).contiguous())


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: int, scale: float, window: int | None = None
) -> torch.Tensor:
    """Plain causal attention of a chunk (bottom-right aligned), fp32 math: ``[q_len, Hq, D]``.
    With ``window``, query position ``p`` sees keys ``(p - window, p]`` only (sliding window)."""
    q_len, num_q_heads = q.shape[:2]
    group = num_q_heads // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), kf) * scale
    q_pos = torch.arange(ctx, ctx + q_len, device=q.device)
    k_pos = torch.arange(k.shape[0], device=q.device)
    hidden = k_pos[None, None, :] > q_pos[None, :, None]
    if window is not None:
        hidden |= k_pos[None, None, :] <= q_pos[None, :, None] - window
    logits = logits.masked_fill(hidden, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(logits, dim=-1), vf).to(q.dtype)


def proxyattn_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    *,
    ctx: int,
    params: ProxyAttnParams,
    scale: float | None = None,
    kv_cache: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    budget_fraction: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Selection]:
    """ProxyAttn prefill of one chunk.

    Args:
        q: ``[q_len, Hq, D]`` post-RoPE queries at absolute positions ``[ctx, ctx + q_len)``.
        k, v: ``[ctx + q_len, Hkv, D]`` contiguous keys/values, or None with ``kv_cache``.
        ctx: tokens before the chunk (already in the cache).
        params: resolved parameters for this layer.
        scale: softmax scale; defaults to ``D ** -0.5``.
        kv_cache: ``[num_pages, Hkv, page_size, 2 * D]`` paged cache (vLLM 0.26 layout).
        block_table: ``[max_pages]`` the request's block-table row, with ``kv_cache``.
        budget_fraction: optional ``[Hq]`` share of the key blocks each head keeps per row,
            replacing the gamma budget (:func:`reference_selection`).
        k_scale, v_scale: with an FP8 ``kv_cache``, its scales: the reference runs on the
            dequantized cache (:func:`gather_paged_kv`).

    Returns:
        ``(out [q_len, Hq, D] in q.dtype, selection)``.
    """
    geo = ChunkGeometry(ctx, q.shape[0], params.block_size)
    if kv_cache is not None:
        assert k is None and v is None and block_table is not None
        k, v = gather_paged_kv(kv_cache, block_table, geo.seq_len, k_scale, v_scale)
    assert k is not None and v is not None and k.shape[0] == geo.seq_len, (k.shape if k is not None else None, geo)
    scale = q.shape[2] ** -0.5 if scale is None else scale
    selection = reference_selection(q, k, ctx=ctx, params=params, scale=scale, budget_fraction=budget_fraction)
    out = block_sparse_attention(q, k, v, ctx, selection.block_mask(), scale, params.block_size)
    return out, selection


def reference_selection(
    q: torch.Tensor, k: torch.Tensor, *, ctx: int, params: ProxyAttnParams, scale: float,
    budget_fraction: torch.Tensor | None = None,
) -> Selection:
    """The blocks one chunk computes (``proxyattn_prefill_reference`` up to the attention).

    Args:
        q: ``[q_len, Hq, D]`` post-RoPE queries at absolute positions ``[ctx, ctx + q_len)``.
        k: ``[ctx + q_len, Hkv, D]`` contiguous keys.
        ctx, params, scale: as in :func:`proxyattn_prefill_reference`.
        budget_fraction: optional ``[Hq]`` share of the chunk's key blocks each head keeps per
            row (``budget.naive.fraction_budgets``), in place of the gamma budget; the gamma
            counts are still computed and reported.
    """
    geo = ChunkGeometry(ctx, q.shape[0], params.block_size)
    assert q.shape[1] % k.shape[1] == 0 and k.shape[1] % params.num_groups == 0
    scores = proxy_block_scores(
        q, k, ctx, scale, params.num_groups, params.stride, params.block_size
    )
    budget, gamma_counts = head_budgets(
        q, k, ctx, scale, params.block_size, params.gamma, params.min_budget_blocks,
        params.budget_cap_blocks(geo),
    )
    if budget_fraction is not None:
        budget = fraction_budgets(budget_fraction, geo.num_k_blocks, params.min_budget_blocks,
                                  params.budget_cap_blocks(geo))
    return selection_from_budgets(geo, scores, budget, gamma_counts, params)


def selection_from_budgets(
    geo: ChunkGeometry, scores: torch.Tensor, budget: torch.Tensor, gamma_counts: torch.Tensor,
    params: ProxyAttnParams,
) -> Selection:
    """The last step of :func:`reference_selection`: the blocks each head computes, given the
    chunk's proxy scores (``[groups, query blocks, key blocks]``) and the heads' budgets
    (``budget``, ``gamma_counts``: ``[Hq]`` int32 block counts). A chunk shorter than
    ``min_sparse_len`` keeps every block."""
    dense_reason = None
    if geo.seq_len < params.min_sparse_len:
        dense_reason = "short"
        budget = torch.full_like(budget, geo.num_k_blocks)
    ranking, counts, num_forced = select_blocks(
        scores, budget, geo.ctx, geo.q_len, params.block_size, params.sink_blocks, params.local_blocks,
        params.dense_tail_tokens,
    )
    return Selection(geo, scores, ranking, counts, num_forced, budget, gamma_counts, dense_reason)
