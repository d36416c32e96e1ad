"""Test helper: build a vLLM-0.26 paged KV cache from contiguous keys and values."""
from __future__ import annotations

import torch


def make_paged(k: torch.Tensor, v: torch.Tensor, page_size: int, extra_pages: int = 3):
    """Scatter ``k, v [seq_len, Hkv, D]`` into an NHD physical cache whose unused slots are NaN
    (so a kernel reading outside the sequence is caught) with a shuffled int32 block table.

    Returns vLLM's permuted logical view ``[pages, Hkv, page_size, 2D]`` and the table row."""
    seq_len, hkv, d = k.shape
    n = -(-seq_len // page_size)
    physical = torch.full((n + extra_pages, page_size, hkv, 2 * d), float("nan"), dtype=k.dtype,
                          device=k.device)
    table = torch.randperm(n + extra_pages, device=k.device)[:n].to(torch.int32)
    pos = torch.arange(seq_len, device=k.device)
    physical[table[pos // page_size].long(), pos % page_size] = torch.cat([k, v], dim=-1)
    return physical.permute(0, 2, 1, 3), table


def random_selection(groups: int, num_q_heads: int, ctx: int, q_len: int, block: int, page: int,
                     max_budget: int, device, tail_tokens: int = 0):
    """A selection in ``select``'s format from random proxy scores and random head budgets in
    ``[1, max_budget)``, and a shuffled int32 block-table row with spare entries that covers
    the sequence: ``(ranking [G, R, Kb], counts [Hq, R], table)``."""
    from proxyattn_kernels.select.naive import select_blocks

    num_rows = (ctx + q_len - 1) // block - ctx // block + 1
    num_k_blocks = -(-(ctx + q_len) // block)
    scores = torch.rand(groups, num_rows, num_k_blocks, device=device)
    budget = torch.randint(1, max_budget, (num_q_heads,), dtype=torch.int32, device=device)
    ranking, counts, _ = select_blocks(scores, budget, ctx, q_len, block, 1, 1, tail_tokens)
    pages = num_k_blocks * block // page + 2
    table = torch.randperm(4 * pages, device=device)[:pages].to(torch.int32)
    return ranking, counts, table
