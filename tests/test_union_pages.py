"""kernels/block_sparse_attn/union_pages.py: a selection as a dense varlen paged batch.

The plan is run through a torch emulation of what FA3's ``flash_attn_varlen_func`` computes
(per pseudo-request: keys read through its block-table row, causal mask aligned bottom-right)
and must equal the naive block-sparse attention with every head given the row's union of
selected blocks."""
from __future__ import annotations

import pytest
import torch

from proxyattn_kernels import ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention
from proxyattn_kernels.block_sparse_attn.union_pages import tail_first_calls, union_block_mask, union_page_plan

from tests._paged import make_paged


def varlen_paged_causal(q, kv_cache, plan, scale):
    """Torch emulation of a dense varlen paged kernel: ``q [q_len, Hq, D]``, NHD-permuted cache."""
    head_dim = q.shape[-1]
    num_kv_heads, page_size = kv_cache.shape[1], kv_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    cu, used = plan.cu_seqlens_q.tolist(), plan.seqused_k.tolist()
    for r in range(len(used)):
        rows = q[cu[r]:cu[r + 1]].float()  # [n, Hq, D]
        pos = torch.arange(used[r])
        pages = plan.block_table[r][pos // page_size].long()
        kv = kv_cache[pages, :, pos % page_size].float()  # [k_len, Hkv, 2D]
        k = kv[..., :head_dim].repeat_interleave(group, dim=1)
        v = kv[..., head_dim:].repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", rows, k) * scale
        n = rows.shape[0]
        visible = pos[None, :] <= torch.arange(n)[:, None] + used[r] - n  # bottom-right causal
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        out[cu[r]:cu[r + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


@pytest.mark.parametrize("ctx,q_len,block,page,hq,hkv,groups", [
    (0, 100, 32, 16, 4, 2, 1),      # first chunk, partial last row
    (37, 70, 32, 16, 8, 2, 2),      # ctx not block-aligned: partial first row; two groups
    (64, 64, 32, 32, 7, 1, 1),      # page = block; GQA 7:1
    (45, 3, 16, 16, 4, 4, 4),       # a chunk inside one block
])
def test_union_plan_equals_naive_with_the_union_mask(rng_seed, ctx, q_len, block, page, hq, hkv, groups):
    d = 16
    q = torch.randn(q_len, hq, d)
    k = torch.randn(ctx + q_len, hkv, d)
    v = torch.randn(ctx + q_len, hkv, d)
    params = ProxyAttnParams(gamma=0.5, block_size=block, num_groups=groups, min_budget_blocks=1,
                             sink_blocks=1, local_blocks=1, min_sparse_len=0)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    kv_cache, table = make_paged(k, v, page)
    plan = union_page_plan(sel.ranking, sel.counts, table, ctx=ctx, q_len=q_len, block_size=block,
                           page_size=page)
    num_k_blocks = sel.ranking.shape[-1]
    union = union_block_mask(sel.ranking, sel.counts, num_k_blocks)
    assert plan.union_blocks.tolist() == union.sum(-1).tolist()
    assert int(plan.seqused_k.max()) <= plan.max_seqlen_k
    assert int((plan.cu_seqlens_q[1:] - plan.cu_seqlens_q[:-1]).max()) <= plan.max_seqlen_q
    scale = d**-0.5
    out = varlen_paged_causal(q, kv_cache, plan, scale)
    expected = block_sparse_attention(q, k, v, ctx, union.expand(hq, -1, -1), scale, block)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    # A real selection: the union is not everything, so this checks the page lists, not just causality.
    extents = sel.geometry.first_q_block + torch.arange(sel.geometry.num_q_blocks) + 1
    if int(extents.sum()) > 2 * sel.geometry.num_q_blocks + 2:
        assert int(plan.union_blocks.sum()) < int(extents.sum())


def test_union_plan_rejects_pages_larger_than_blocks():
    ranking = torch.zeros(1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of page_size"):
        union_page_plan(ranking, torch.ones(1, 1, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
                        ctx=0, q_len=8, block_size=16, page_size=32)


@pytest.mark.parametrize("ctx,q_len,tail_tokens,expected_calls", [
    (37, 100, 20, 2),   # ctx not block-aligned; the tail is the last row
    (37, 100, 40, 2),   # the tail spans two rows
    (0, 100, 0, 1),     # no tail: one call
    (37, 20, 50, 1),    # the tail covers the whole chunk: one call
])
def test_tail_first_calls_cover_the_chunk_once(rng_seed, ctx, q_len, tail_tokens, expected_calls):
    """The dense tail's own call, then the rest: together the calls compute what the whole plan
    does (each call's queries through its rows' rebased offsets)."""
    block, page, hq, hkv, d = 32, 16, 4, 2, 16
    q = torch.randn(q_len, hq, d)
    k = torch.randn(ctx + q_len, hkv, d)
    v = torch.randn(ctx + q_len, hkv, d)
    params = ProxyAttnParams(gamma=0.5, block_size=block, num_groups=1, min_budget_blocks=1, sink_blocks=1,
                             local_blocks=1, min_sparse_len=0, dense_tail_tokens=tail_tokens)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    kv_cache, table = make_paged(k, v, page)
    plan = union_page_plan(sel.ranking, sel.counts, table, ctx=ctx, q_len=q_len, block_size=block, page_size=page)
    geo = sel.geometry
    calls = tail_first_calls(plan, geo, geo.first_tail_row(tail_tokens))
    assert len(calls) == expected_calls
    out = torch.full_like(q, float("nan"))
    for tokens, sub in calls:
        assert int(sub.cu_seqlens_q[0]) == 0 and int(sub.cu_seqlens_q[-1]) == tokens.stop - tokens.start
        out[tokens] = varlen_paged_causal(q[tokens], kv_cache, sub, d**-0.5)
    if expected_calls == 2:  # the tail first: the rows from first_tail_row, to the chunk's end
        assert calls[0][0].stop == q_len and calls[1][0].start == 0 and calls[0][0].start == calls[1][0].stop
        assert len(calls[0][1].seqused_k) == geo.num_tail_rows(tail_tokens)
    torch.testing.assert_close(out, varlen_paged_causal(q, kv_cache, plan, d**-0.5), atol=0, rtol=0)
