"""Per-query-head block budgets, the readable specification.

Each query head takes the chunk's last ``block_size`` queries (fewer if the chunk is shorter)
against all keys of its KV head at full resolution, causal softmax, sums the probability mass
per key block and averages it over the queries. Sorting the blocks by mass, the head's budget
is the number of blocks needed for the cumulative mass to reach ``gamma`` (gamma = 1 means all
blocks). The count is then floored at ``min_budget_blocks`` and, when ``max_density`` is set,
capped at the per-row budget that keeps the whole chunk (forced blocks and dense tail included)
within that fraction of its causal blocks (``params.density_budget_cap``).

Deviation from the paper's text (which average-pools): we sum within a key block so that the
budget is the exact attention mass the selected blocks cover; for full blocks the two agree
after normalisation.
"""
from __future__ import annotations

import torch

from ..params import ChunkGeometry


def _last_rows_logits(q: torch.Tensor, k: torch.Tensor, ctx: int, scale: float, block_size: int):
    """The chunk's last ``n = min(q_len, block_size)`` queries against every key:
    ``(logits [Hq, n, S] float32, scaled, -inf where causally hidden; block of each key [S])``."""
    geo = ChunkGeometry(ctx, q.shape[0], block_size)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    n_last = min(geo.q_len, block_size)
    k_full = k.float().repeat_interleave(num_q_heads // num_kv_heads, dim=1)  # [S, Hq, D]
    logits = torch.einsum("qhd,khd->hqk", q[-n_last:].float(), k_full) * scale
    q_pos = torch.arange(geo.seq_len - n_last, geo.seq_len, device=q.device)
    k_pos = torch.arange(geo.seq_len, device=q.device)
    visible = k_pos[None, :] <= q_pos[:, None]
    return logits.masked_fill(~visible, float("-inf")), k_pos // block_size


def _mean_block_sums(probs: torch.Tensor, key_block: torch.Tensor) -> torch.Tensor:
    """``probs [Hq, n, S]`` summed per key block, averaged over the rows: ``[Hq, Kb]``."""
    num_k_blocks = int(key_block[-1]) + 1
    mass = torch.zeros(*probs.shape[:2], num_k_blocks, device=probs.device)
    mass.index_add_(2, key_block, probs)
    return mass.mean(dim=1)


def last_block_mass(
    q: torch.Tensor, k: torch.Tensor, ctx: int, scale: float, block_size: int
) -> torch.Tensor:
    """Attention mass per key block of the chunk's last queries.

    Args:
        q: ``[q_len, Hq, D]``; k: ``[ctx + q_len, Hkv, D]``.

    Returns:
        ``[Hq, num_k_blocks]`` float32, each row sums to 1.
    """
    logits, key_block = _last_rows_logits(q, k, ctx, scale, block_size)
    return _mean_block_sums(torch.softmax(logits, dim=-1), key_block)


def block_mass_given_lse(
    q: torch.Tensor, k: torch.Tensor, ctx: int, scale: float, block_size: int, row_lse: torch.Tensor
) -> torch.Tensor:
    """:func:`last_block_mass` with each query row's log-sum-exp given instead of computed.

    A dense kernel that has already attended those rows (the dense tail) returns their LSE; with
    it the mass needs one pass, ``exp(logit - lse)`` summed per block. With the exact LSE this
    equals :func:`last_block_mass`; an LSE off by ``delta`` scales the row's mass by
    ``exp(-delta)``.

    Args:
        q: ``[q_len, Hq, D]``; k: ``[ctx + q_len, Hkv, D]``.
        row_lse: ``[Hq, n]`` natural-log LSE of the scaled causal logits of the chunk's last
            ``n = min(q_len, block_size)`` queries.

    Returns:
        ``[Hq, num_k_blocks]`` float32.
    """
    logits, key_block = _last_rows_logits(q, k, ctx, scale, block_size)
    return _mean_block_sums(torch.exp(logits - row_lse.float()[:, :, None]), key_block)


def last_rows_lse(q: torch.Tensor, k: torch.Tensor, ctx: int, scale: float, block_size: int) -> torch.Tensor:
    """``[Hq, n]`` float32 natural-log LSE of the causal logits of the chunk's last
    ``n = min(q_len, block_size)`` queries (what FlashAttention returns for those rows)."""
    logits, _ = _last_rows_logits(q, k, ctx, scale, block_size)
    return torch.logsumexp(logits, dim=-1)


def gamma_block_counts(block_mass: torch.Tensor, gamma: float) -> torch.Tensor:
    """Fewest blocks whose mass reaches ``gamma``: ``[Hq, Kb] -> [Hq]`` int32."""
    num_k_blocks = block_mass.shape[-1]
    if gamma >= 1.0:
        return torch.full(block_mass.shape[:-1], num_k_blocks, dtype=torch.int32, device=block_mass.device)
    sorted_mass = block_mass.sort(dim=-1, descending=True).values
    sorted_mass = sorted_mass / sorted_mass.sum(dim=-1, keepdim=True)
    below = (sorted_mass.cumsum(dim=-1) < gamma).sum(dim=-1) + 1
    return below.clamp(max=num_k_blocks).to(torch.int32)


def limit_budget(
    counts: torch.Tensor, num_k_blocks: int, min_budget_blocks: int, max_blocks: int | None
) -> torch.Tensor:
    """Apply the minimum budget, then the optional cap (``ProxyAttnParams.budget_cap_blocks``,
    from ``max_density``); result in ``[1, num_k_blocks]``."""
    # One clamp (one kernel on the device): the minimum first, then the cap wins.
    lower, upper = budget_bounds(num_k_blocks, min_budget_blocks, max_blocks)
    return counts.clamp(min=lower, max=upper).to(torch.int32)


def budget_bounds(num_k_blocks: int, min_budget_blocks: int, max_blocks: int | None) -> tuple[int, int]:
    """``(lower, upper)`` of a row budget, both >= 1: a count becomes
    ``min(max(count, lower), upper)``, i.e. the minimum first, then the cap (and ``num_k_blocks``)."""
    upper = num_k_blocks if max_blocks is None else max(1, min(max_blocks, num_k_blocks))
    return max(1, min_budget_blocks), upper


def fraction_budgets(
    fraction: torch.Tensor, num_k_blocks: int, min_budget_blocks: int, max_blocks: int | None
) -> torch.Tensor:
    """Budgets that keep a given share of the key blocks: ``fraction [Hq]`` (of the chunk's
    ``num_k_blocks``) -> ``[Hq]`` int32 ``ceil(fraction * num_k_blocks)``, then
    :func:`limit_budget`. Replaces the gamma budget when a benchmark prescribes each head's
    density (a density profile) instead of measuring it from the attention."""
    return limit_budget(torch.ceil(fraction.float() * num_k_blocks), num_k_blocks, min_budget_blocks, max_blocks)


def head_budgets(
    q: torch.Tensor,
    k: torch.Tensor,
    ctx: int,
    scale: float,
    block_size: int,
    gamma: float,
    min_budget_blocks: int,
    max_blocks: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(budget [Hq], gamma_counts [Hq])``, int32 block counts."""
    num_k_blocks = ChunkGeometry(ctx, q.shape[0], block_size).num_k_blocks
    counts = gamma_block_counts(last_block_mass(q, k, ctx, scale, block_size), gamma)
    return limit_budget(counts, num_k_blocks, min_budget_blocks, max_blocks), counts
