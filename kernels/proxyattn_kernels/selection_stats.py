"""Diagnostics of a block selection: its density and the share of dense attention mass it keeps.

Plain torch, no vLLM. Used by ``proxyattn_vllm/stats.py`` (the ``PROXYATTN_STATS`` collector)
and by the quality benchmark; both are diagnostic-only (the kept mass reads the whole context's
keys and host-syncs when the caller converts it to a number).

Conventions are those of ``proxyattn_kernels/select/naive.py``: a chunk has queries ``[ctx, ctx + q_len)``
and keys ``[0, ctx + q_len)``; row ``r`` is query block ``ctx // block_size + r`` and may see key
blocks ``0 .. ctx // block_size + r`` (its causal extent); head ``h`` of group
``g = h // (Hq // G)`` computes key blocks ``ranking[g, r, :counts[h, r]]``. Rows that run dense
(no proxy estimate, or a sequence shorter than ``min_sparse_len``) have ``counts == extent``, so
they count as fully dense here too.
"""
from __future__ import annotations

import torch

from .block_sparse_attn.naive import selection_block_mask
from .params import ChunkGeometry


def causal_blocks(ctx: int, q_len: int, block_size: int) -> int:
    """Causal key blocks of one head over all query-block rows of the chunk (host int)."""
    geo = ChunkGeometry(ctx, q_len, block_size)
    rows = geo.num_q_blocks
    # sum over r of (first_q_block + r + 1)
    return rows * (geo.first_q_block + 1) + rows * (rows - 1) // 2


def selection_density(counts: torch.Tensor, ctx: int, q_len: int, block_size: int) -> torch.Tensor:
    """Selected blocks over causal blocks, averaged over heads (and rows, weighted by extent).

    Args:
        counts: ``[Hq, R]`` int blocks each head computes per query-block row.
        ctx, q_len, block_size: the chunk geometry (host ints).

    Returns:
        0-dim float32 tensor on ``counts.device`` in ``(0, 1]`` (no host sync). Equal to
        ``reference.Selection.density`` for the same selection.
    """
    total = counts.shape[0] * causal_blocks(ctx, q_len, block_size)
    return counts.sum(dtype=torch.float64).div(total).float()


def query_rows(ctx: int, q_len: int, block_size: int, num_queries: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``min(num_queries, q_len)`` queries spread evenly over the whole chunk, and their rows.

    With ``n = num_queries < q_len`` the chunk offsets are ``i * (q_len - 1) // (n - 1)`` for
    ``i = 0 .. n - 1``: deterministic, strictly increasing, always the chunk's first and last
    query, consecutive gaps differing by at most one (``n == 1``: the last query only). With
    ``q_len <= num_queries`` every query of the chunk.

    Not the chunk's last queries: the query-block rows holding a chunk's last
    ``dense_tail_tokens`` tokens compute every causal block by construction, so sampling the
    tail would report a kept mass of ~1 whatever the sparse rows keep.

    Returns:
        positions ``[n]`` int64 (absolute, in ``[ctx, ctx + q_len)``), rows ``[n]`` int64
        (query-block row of the chunk: ``position // block_size - ctx // block_size``).
    """
    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1; got {num_queries}")
    if q_len <= num_queries:
        offsets = torch.arange(q_len)
    elif num_queries == 1:
        offsets = torch.tensor([q_len - 1])
    else:
        offsets = torch.arange(num_queries) * (q_len - 1) // (num_queries - 1)
    positions = ctx + offsets
    rows = positions // block_size - ctx // block_size
    return positions, rows


def dense_tail_rows(counts: torch.Tensor, ctx: int, q_len: int, block_size: int) -> torch.Tensor:
    """``[R]`` bool: the chunk's trailing rows in which every head computes every causal block.

    The selection does not say which rows ``dense_tail_tokens`` made dense; this is the longest
    run of fully dense rows ending at the chunk's last row, i.e. the dense tail (and any fully
    dense rows just before it). All rows when the whole chunk runs dense (a short sequence), none
    when the last row is sparse for some head. Device ops only (no host sync).

    Args:
        counts: ``[Hq, R]`` int blocks each head computes per query-block row.
        ctx, q_len, block_size: the chunk geometry (host ints).
    """
    geo = ChunkGeometry(ctx, q_len, block_size)
    extents = geo.first_q_block + 1 + torch.arange(counts.shape[1], device=counts.device)
    dense = (counts >= extents).all(dim=0)  # [R]
    return dense.flip(0).int().cumprod(0).flip(0).bool()


def kept_mass_per_query(
    q: torch.Tensor,
    k: torch.Tensor,
    ranking: torch.Tensor,
    counts: torch.Tensor,
    *,
    ctx: int,
    scale: float,
    block_size: int,
    heads: list[int],
    num_queries: int = 128,
) -> torch.Tensor:
    """The kept mass of each sampled head and query, before averaging over the queries.

    Arguments as :func:`kept_attention_mass`; the queries are those of :func:`query_rows`
    (``query_rows(ctx, q_len, block_size, num_queries)`` gives their positions and rows).

    Returns:
        ``[len(heads), n]`` float32 on ``q.device``, each in ``[0, 1]``.
    """
    q_len, num_q_heads, _ = q.shape
    seq_len = ctx + q_len
    assert k.shape[0] == seq_len, (k.shape, ctx, q_len)
    heads_per_kv = num_q_heads // k.shape[1]
    block_mask = selection_block_mask(ranking, counts, ranking.shape[-1])  # [Hq, R, Kb]

    positions, rows = query_rows(ctx, q_len, block_size, num_queries)
    positions, rows = positions.to(q.device), rows.to(q.device)
    key_pos = torch.arange(seq_len, device=q.device)
    causal = key_pos[None, :] <= positions[:, None]  # [n, S]
    key_block = key_pos // block_size  # [S]

    kept = []
    # One head at a time: the [n, S] probabilities of a 128K context stay small.
    for head in heads:
        logits = (q[positions - ctx, head].float() @ k[:, head // heads_per_kv].float().T) * scale
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)  # [n, S]
        inside = block_mask[head, rows][:, key_block]  # [n, S]: the key's block is computed
        kept.append((probs * inside).sum(dim=-1))
    return torch.stack(kept).clamp_(0.0, 1.0)


def kept_attention_mass(q: torch.Tensor, k: torch.Tensor, ranking: torch.Tensor, counts: torch.Tensor,
                        **geometry) -> torch.Tensor:
    """Share of each head's dense causal attention mass inside the blocks it computes.

    For head ``h`` and each of ``min(num_queries, q_len)`` queries spread evenly over the whole
    chunk (:func:`query_rows`: always its first and last query; absolute position ``p``), the
    dense softmax over keys ``[0, p]`` (fp32, ``scale`` applied) is summed over the keys whose
    block is among the first ``counts[h, row(p)]`` entries of ``ranking[group(h), row(p)]``; the
    result is the mean over those queries, an estimate of the whole chunk's average. A head that
    computes every causal block keeps exactly 1.

    The queries are spread over the chunk rather than taken from its end: the rows holding the
    chunk's last ``dense_tail_tokens`` tokens compute every causal block, so the last queries
    would measure the dense tail (kept mass 1 by construction), not the selection.

    Args:
        q: ``[q_len, Hq, D]`` queries of the chunk, absolute positions ``[ctx, ctx + q_len)``.
        k: ``[ctx + q_len, Hkv, D]`` keys (e.g. ``reference.gather_paged_kv`` of the cache).
        ranking: ``[G, R, Kb]`` int key blocks per group and row (``-1`` past the frontier).
        counts: ``[Hq, R]`` int prefix of ``ranking`` each head computes.
        ctx: tokens before the chunk.
        scale: softmax scale of the layer.
        block_size: selection block size in tokens.
        heads: query heads to measure (indices into ``Hq``).
        num_queries: how many evenly spaced queries of the chunk to average over (all of them
            when the chunk has no more; default 128).

    ``ctx``, ``scale``, ``block_size``, ``heads`` and ``num_queries`` are keyword-only, exactly
    as :func:`kept_mass_per_query` takes them.

    Returns:
        ``[len(heads)]`` float32 on ``q.device``, each in ``[0, 1]``.
    """
    return kept_mass_per_query(q, k, ranking, counts, **geometry).mean(dim=-1)


def sample_heads(num_q_heads: int, num_samples: int) -> list[int]:
    """``num_samples`` evenly spaced query heads (all heads if there are fewer)."""
    if num_samples >= num_q_heads:
        return list(range(num_q_heads))
    step = num_q_heads / num_samples
    return [int(i * step) for i in range(num_samples)]


__all__ = [
    "causal_blocks",
    "dense_tail_rows",
    "kept_attention_mass",
    "kept_mass_per_query",
    "query_rows",
    "sample_heads",
    "selection_density",
]
