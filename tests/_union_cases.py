"""Chunk cases and selections shared by the FlashInfer-path tests (CPU plan tests, GPU kernel tests)."""
from __future__ import annotations

import torch

from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention
from proxyattn_kernels.block_sparse_attn.union_pages import union_block_mask
from proxyattn_kernels.params import ChunkGeometry
from proxyattn_kernels.reference import gather_paged_kv
from proxyattn_kernels.select.naive import select_blocks

#: (ctx, q_len, block_size, page_size, Hq, Hkv, proxy groups): ctx > 0 not block-aligned, a
#: first chunk, partial last blocks, GQA 4:1 and 7:1, pages of 16 and 128 tokens.
CASES = [
    (37, 300, 64, 16, 8, 2, 1),        # partial first and last rows, GQA 4:1, pages 16
    (200, 190, 128, 128, 7, 1, 1),     # GQA 7:1, page = block
    (1000, 500, 128, 16, 28, 4, 4),    # GQA 7:1, one group per KV head, pages 16
    (0, 777, 128, 128, 32, 8, 1),      # first chunk, GQA 4:1, page = block
    (513, 1300, 256, 128, 16, 4, 2),   # two pages per block, two groups
]
CASE_IDS = [f"ctx{c[0]}-q{c[1]}-b{c[2]}-p{c[3]}-{c[4]}x{c[5]}-g{c[6]}" for c in CASES]


def random_selection(hq, groups, ctx, q_len, block_size, density, device="cpu", generator=None):
    """A selection with the real structure (diagonal + sink forced, then a random ranking per
    group) and per-head budgets that differ, so a row's union exceeds most heads' own blocks."""
    geo = ChunkGeometry(ctx, q_len, block_size)
    scores = torch.rand(groups, geo.num_q_blocks, geo.num_k_blocks, generator=generator).to(device)
    fractions = density * (0.5 + torch.rand(hq, generator=generator))  # 0.5x .. 1.5x density
    budget = (fractions * geo.num_k_blocks).ceil().clamp(min=1).to(torch.int32).to(device)
    ranking, counts, _ = select_blocks(scores, budget, ctx, q_len, block_size, 1, 1)
    return ranking, counts


def union_reference(q, kv_cache, table, ranking, counts, ctx, block_size, scale):
    """Naive block-sparse attention with every head given its row's union (fp32 math)."""
    seq_len = ctx + q.shape[0]
    k, v = gather_paged_kv(kv_cache, table, seq_len)
    union = union_block_mask(ranking, counts, ranking.shape[-1])
    return block_sparse_attention(q, k, v, ctx, union.expand(q.shape[1], -1, -1), scale, block_size)


def random_cache(seq_len, hkv, head_dim, page_size, dtype, device="cpu", extra_pages=5, poison=float("nan")):
    """A vLLM-layout paged cache (NHD physical, permuted logical view) with a shuffled table.
    Slots outside the sequence hold ``poison``: NaN catches any read of them; a large finite
    value (a real cache holds stale finite data there) catches reads that are not masked."""
    n = -(-seq_len // page_size)
    physical = torch.randn(n + extra_pages, page_size, hkv, 2 * head_dim, device=device).to(dtype)
    table = torch.randperm(n + extra_pages, device=device)[:n].to(torch.int32)
    unused = torch.ones(n + extra_pages, dtype=torch.bool, device=device)
    unused[table.long()] = False
    physical[unused] = poison
    pos = torch.arange(n * page_size, device=device)
    tail = pos[pos >= seq_len]  # slots of the last page past the sequence
    physical[table[tail // page_size].long(), tail % page_size] = poison
    return physical.permute(0, 2, 1, 3), table
