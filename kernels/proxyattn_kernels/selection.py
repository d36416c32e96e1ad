"""The whole ProxyAttn block selection of one prefill chunk from a vLLM-0.26 paged KV cache.

Composes the Triton ops: proxy scores (``proxy_scores/triton.py``) -> per-head budgets
(``budget/triton.py``) -> selection (``select/triton.py``), with the semantics of
``proxyattn_kernels/reference.py`` (including the dense fallback of short sequences). Everything stays on
the device: no host synchronisation, no Python loop over heads, rows or blocks; ``ctx`` and
``q_len`` are host integers.

Launches: 5 for the proxy scores (fill, 2 proxy-head means, 2 passes), 2 for the block mass (1
when the budget rows' LSE is given, ``row_lse``), 1 for the gamma counts and limits, 1 for the
selection.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .budget.naive import fraction_budgets
from .budget.triton import BudgetTileConfig, head_budgets_paged
from .params import ChunkGeometry, ProxyAttnParams
from .proxy_scores.triton import ProxyTileConfig, proxy_block_scores_paged
from .select.triton import select_blocks


class PagedSelection(NamedTuple):
    """Output of :func:`select_blocks_paged` (a tuple, in this order).

    Attributes:
        ranking: ``[G, R, Kb]`` int32 key blocks per group and query-block row, forced blocks
            first, ``-1`` past the causal frontier.
        counts: ``[Hq, R]`` int32: head ``h`` computes ``ranking[h // (Hq // G), row, :counts]``.
        num_forced: ``[R]`` int32 forced blocks at the front of each row.
        budget: ``[Hq]`` int32 per-row block budget (all ``Kb`` blocks for short sequences).
        gamma_counts: ``[Hq]`` int32 blocks needed to reach gamma, before the limits.
        scores: ``[G, R, Kb]`` float32 proxy scores.
    """

    ranking: torch.Tensor
    counts: torch.Tensor
    num_forced: torch.Tensor
    budget: torch.Tensor
    gamma_counts: torch.Tensor
    scores: torch.Tensor


def select_blocks_paged(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    *,
    ctx: int,
    scale: float,
    params: ProxyAttnParams,
    proxy_tile: ProxyTileConfig | None = None,
    budget_tile: BudgetTileConfig | None = None,
    row_lse: torch.Tensor | None = None,
    budget_fraction: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
) -> PagedSelection:
    """Block selection of one prefill chunk.

    Args:
        q: ``[q_len, Hq, D]`` post-RoPE queries at absolute positions ``[ctx, ctx + q_len)``
            (any strides with a contiguous last dim; fp16, bf16 or fp32).
        kv_cache: ``[num_pages, Hkv, page_size, 2 * D]`` vLLM-0.26 cache view (K in ``[..., :D]``,
            V in ``[..., D:]``), any strides with a contiguous last dim, same dtype as ``q`` or FP8
            (``paged.FP8_KV_DTYPE``) with ``k_scale``; must already hold keys ``[0, ctx + q_len)``.
            ``page_size`` is a multiple of 16.
        block_table: ``[max_pages]`` int32, the request's physical page per logical page.
        ctx: tokens before the chunk (host int).
        scale: softmax scale.
        params: resolved parameters of this layer (``num_groups`` divides ``Hkv``).
        proxy_tile, budget_tile: optional launch parameters (defaults tuned per device).
        row_lse: optional ``[Hq, min(q_len, block_size)]`` float32 natural-log LSE of the
            chunk's last queries (the budget rows), from a dense kernel that already attended
            them: the budget's block mass then takes one pass (``last_block_mass_paged``).
        budget_fraction: optional ``[Hq]`` float32 share of the key blocks each head keeps per
            row, replacing the gamma budget (``budget.naive.fraction_budgets``: two small launches).
            The gamma budget is still computed, so the selection costs what it costs without it.
        k_scale: an FP8 cache's 1-element float32 key scale (device tensor, read by the kernels),
            else None.

    Returns:
        ``PagedSelection(ranking, counts, num_forced, budget, gamma_counts, scores)``, equal to
        the fields of ``reference.Selection`` computed from the same inputs (scores and the block
        mass up to floating-point rounding; with ``seq_len < params.min_sparse_len`` the budget
        is every key block, as in the reference).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [q_len, Hq, D]; got {tuple(q.shape)}")
    q_len = q.shape[0]
    geo = ChunkGeometry(ctx, q_len, params.block_size)
    scores = proxy_block_scores_paged(
        q, kv_cache, block_table, ctx=ctx, scale=scale, num_groups=params.num_groups,
        stride=params.stride, block_size=params.block_size, tile=proxy_tile, k_scale=k_scale,
    )
    budget, gamma_counts = head_budgets_paged(
        q, kv_cache, block_table, ctx=ctx, scale=scale, block_size=params.block_size,
        gamma=params.gamma, min_budget_blocks=params.min_budget_blocks,
        max_blocks=params.budget_cap_blocks(geo), tile=budget_tile, row_lse=row_lse, k_scale=k_scale,
    )
    if budget_fraction is not None:
        budget = fraction_budgets(budget_fraction, geo.num_k_blocks, params.min_budget_blocks,
                                  params.budget_cap_blocks(geo))
    if geo.seq_len < params.min_sparse_len:
        budget = torch.full_like(budget, geo.num_k_blocks)
    ranking, counts, num_forced = select_blocks(
        scores, budget, ctx, q_len, params.block_size, params.sink_blocks, params.local_blocks,
        params.dense_tail_tokens,
    )
    return PagedSelection(ranking, counts, num_forced, budget, gamma_counts, scores)


__all__ = ["PagedSelection", "select_blocks_paged"]
