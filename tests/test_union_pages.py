"""proxyattn_kernels/block_sparse_attn/union_pages.py: a selection as a dense varlen paged batch.

The plan is run through a torch emulation of what FA3's ``flash_attn_varlen_func`` computes
(per pseudo-request: keys read through its block-table row, causal mask aligned bottom-right)
and must equal the naive block-sparse attention with every head given the row's union of
selected blocks."""
from __future__ import annotations

import pytest
import torch

from proxyattn_kernels import ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention, selection_block_mask
from proxyattn_kernels.block_sparse_attn import union_pages
from proxyattn_kernels.block_sparse_attn.union_pages import (
    tail_first_calls, union_block_mask, union_call_num_splits, union_page_plan, union_page_plan_torch,
)

from tests._paged import make_paged, random_selection, varlen_paged_causal


@pytest.mark.parametrize("groups,heads_per_group", [(1, 4), (2, 3), (4, 1)])
def test_union_mask_is_the_union_of_every_heads_mask(rng_seed, groups, heads_per_group):
    """The group-prefix shortcut equals the union of the per-head masks (the definition)."""
    num_rows, num_k_blocks = 6, 23
    ranking = torch.stack([torch.stack([torch.randperm(num_k_blocks) for _ in range(num_rows)])
                           for _ in range(groups)]).to(torch.int32)  # [G, R, Kb]
    ranking[..., -3:] = -1  # padding past a causal frontier
    counts = torch.randint(0, num_k_blocks - 2, (groups * heads_per_group, num_rows), dtype=torch.int32)
    expected = selection_block_mask(ranking, counts, num_k_blocks).any(dim=0)
    assert torch.equal(union_block_mask(ranking, counts, num_k_blocks), expected)
    assert 0 < int(expected.sum()) < expected.numel()


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


# (ctx, q_len, block, page, hq, hkv, groups): one page per block and several; partial first and
# last rows; GQA 1, 2, 4 and 7 heads per group; several groups; 19 key blocks (not a power of 2).
TRITON_PLAN_CASES = [
    (0, 100, 32, 16, 4, 2, 1),
    (37, 70, 32, 16, 8, 2, 2),
    (64, 64, 32, 32, 7, 1, 1),
    (45, 3, 16, 16, 4, 4, 4),
    (250, 53, 16, 16, 6, 3, 3),
    (130, 170, 64, 16, 8, 4, 2),
]


def selection_of(ctx, q_len, block, hq, hkv, groups, gamma=0.5):
    d = 16
    q, k, v = torch.randn(q_len, hq, d), torch.randn(ctx + q_len, hkv, d), torch.randn(ctx + q_len, hkv, d)
    params = ProxyAttnParams(gamma=gamma, block_size=block, num_groups=groups, min_budget_blocks=1,
                             sink_blocks=1, local_blocks=1, min_sparse_len=0)
    return proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)[1]


def assert_plans_equal(plan, expected):
    for name, got, want in zip(plan._fields, plan, expected):
        if torch.is_tensor(want):
            assert got.dtype == want.dtype and torch.equal(got, want), name
        else:
            assert got == want, name


@pytest.mark.parametrize("ctx,q_len,block,page,hq,hkv,groups", TRITON_PLAN_CASES)
def test_triton_plan_equals_the_torch_spec(rng_seed, ctx, q_len, block, page, hq, hkv, groups):
    sel = selection_of(ctx, q_len, block, hq, hkv, groups)
    # A shuffled block table with spare entries: every page index is checked, not just order.
    table = torch.randperm(4 * (ctx + q_len) // page + 16)[: -(-(ctx + q_len) // page) + 3].to(torch.int32)
    args = dict(ctx=ctx, q_len=q_len, block_size=block, page_size=page)
    expected = union_page_plan_torch(sel.ranking, sel.counts, table, **args)
    assert 0 < int(expected.union_blocks.min())
    assert_plans_equal(union_page_plan(sel.ranking, sel.counts, table, **args), expected)
    # Equal counts (max_density binding) and a block table that is a strided row view.
    table_2d = torch.stack([table, table.flip(0)], dim=1)
    equal = sel.counts.amax(dim=0, keepdim=True).expand_as(sel.counts).contiguous()
    assert_plans_equal(union_page_plan(sel.ranking, equal, table_2d[:, 0], **args),
                       union_page_plan_torch(sel.ranking, equal, table_2d[:, 0], **args))


def test_plan_beyond_the_triton_row_limit_uses_the_torch_ops(rng_seed, monkeypatch):
    sel = selection_of(100, 60, 16, 4, 2, 1)
    table = torch.arange(20, dtype=torch.int32)
    args = dict(ctx=100, q_len=60, block_size=16, page_size=16)
    monkeypatch.setattr(union_pages, "MAX_TRITON_BLOCKS", 4)
    monkeypatch.setattr(union_pages, "_union_plan_kernel", None)  # must not be launched
    assert_plans_equal(union_page_plan(sel.ranking, sel.counts, table, **args),
                       union_page_plan_torch(sel.ranking, sel.counts, table, **args))


def test_plan_rejects_bad_inputs():
    ranking = torch.zeros(2, 3, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="G dividing Hq"):
        union_page_plan(ranking, torch.ones(3, 3, dtype=torch.int32), torch.zeros(8, dtype=torch.int32),
                        ctx=0, q_len=40, block_size=16, page_size=16)
    with pytest.raises(ValueError, match="int32"):
        union_page_plan(ranking.long(), torch.ones(4, 3, dtype=torch.int32), torch.zeros(8, dtype=torch.int32),
                        ctx=0, q_len=40, block_size=16, page_size=16)


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
    # With the tail attended already (the backend's dense call before the selection): the other
    # rows only, and nothing past the tail's first token.
    rest = tail_first_calls(plan, geo, geo.first_tail_row(tail_tokens), tail_done=True)
    if not tail_tokens:
        assert [t for t, _ in rest] == [t for t, _ in calls]
    else:
        tail_start = geo.row_token_start(geo.first_tail_row(tail_tokens))
        assert [(t.start, t.stop) for t, _ in rest] == ([(0, tail_start)] if tail_start > 0 else [])
        for tokens, sub in rest:
            torch.testing.assert_close(varlen_paged_causal(q[tokens], kv_cache, sub, d**-0.5), out[tokens],
                                       atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("groups,page", [(1, 16), (1, 128), (2, 128), (8, 16)])
def test_triton_plan_on_the_gpu_at_the_128k_shape(groups, page):
    """The Triton plan against the torch spec on the H200 at the benchmark shape (last 8K chunk
    of 128K, 32 heads, 64 rows x 1024 key blocks), where the scatter/gather through the scratch
    buffer crosses threads (the barrier matters; the CPU interpreter runs it serially)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ctx, q_len, block, hq = 122880, 8192, 128, 32
    torch.manual_seed(0)
    ranking, counts, table = random_selection(groups, hq, ctx, q_len, block, page, 200, "cuda", 128)
    args = dict(ctx=ctx, q_len=q_len, block_size=block, page_size=page)
    assert_plans_equal(union_page_plan(ranking, counts, table, **args),
                       union_page_plan_torch(ranking, counts, table, **args))


def test_union_call_num_splits():
    """One split once a call has 8 (row, query head) tiles per SM; FA3's choice (0) below that,
    and without a GPU. H200 (132 SMs), 8K chunk: Llama's 63 x 32 rows unsplit, Qwen-0.5B's 63 x 14
    and the dense tail's single row left to FA3."""
    assert union_call_num_splits(63, 32, 132) == 1
    assert union_call_num_splits(63, 14, 132) == 0
    assert union_call_num_splits(1, 32, 132) == 0
    assert union_call_num_splits(33, 32, 132) == 1 and union_call_num_splits(32, 32, 132) == 0  # 1056 = 8 x 132
    assert union_call_num_splits(63, 32, 0) == 0
