"""Triton block-sparse paged attention against its torch spec (block_sparse_attn/naive.py).

On CPU the kernel runs under the Triton interpreter (small shapes); on a GPU the ``gpu`` tests
run real sizes in bf16.
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from proxyattn_kernels import ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention
from proxyattn_kernels.block_sparse_attn import head_lists, triton as bs_triton
from proxyattn_kernels.block_sparse_attn.triton import (
    TileConfig, block_sparse_attn, default_tile_config, head_block_lists, head_lists_and_tile_rows, heaviest_first,
    ranked_tile_rows,
)
from proxyattn_kernels.device import has_tma
from proxyattn_kernels.paged import contiguous_pages
from proxyattn_kernels.reference import dense_causal_attention, gather_paged_kv
from proxyattn_kernels.select.naive import select_blocks

from tests._paged import ATTN_TOL, make_paged, random_selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_case(hq, hkv, d, ctx, q_len, block, page, dtype, *, groups=1, gamma=0.6, full=False, tile=None,
             atol=None, tail_tokens=0, heavy_rows=0, skip_rows=0, copy_page=None):
    q = torch.randn(q_len, hq, d, device=DEVICE).to(dtype)
    k = torch.randn(ctx + q_len, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(ctx + q_len, hkv, d, device=DEVICE).to(dtype)
    params = ProxyAttnParams(gamma=1.0 if full else gamma, block_size=block, num_groups=groups,
                             min_budget_blocks=1, sink_blocks=1, local_blocks=1, min_sparse_len=0,
                             dense_tail_tokens=tail_tokens)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    assert (sel.ranking[:, :, 0] == sel.geometry.first_q_block + torch.arange(
        sel.geometry.num_q_blocks, device=DEVICE)).all(), "the kernel relies on the diagonal first"
    kv_cache, table = make_paged(k, v, page)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    block_sparse_attn(q, kv_cache, table, sel.ranking, sel.counts, out, ctx=ctx, scale=scale,
                      block_size=block, tile=tile, heavy_rows=heavy_rows, skip_rows=skip_rows, copy_page=copy_page)
    expected = block_sparse_attention(q, k, v, ctx, sel.block_mask(), scale, block)
    geo = sel.geometry
    # Tokens of the skipped last rows stay as they were (NaN); every other element is written.
    split = geo.row_token_start(geo.num_q_blocks - skip_rows)
    assert out[split:].isnan().all(), "a skipped row was written"
    out, expected = out[:split], expected[:split]
    assert not out.isnan().any(), "every output element must be written"
    tol = atol if atol is not None else ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    if full:
        dense = dense_causal_attention(q, k, v, ctx, scale)
        torch.testing.assert_close(out.float(), dense.float(), rtol=tol, atol=tol)
    return sel


# (Hq, Hkv, D, ctx, q_len, block, page): GQA 1/2/4/7, chunk starts/ends inside blocks and pages.
CPU_CASES = [
    (2, 2, 16, 0, 70, 16, 16),
    (4, 2, 32, 37, 90, 32, 16),
    (4, 1, 16, 100, 45, 16, 32),
    (7, 1, 16, 61, 67, 32, 32),
    (8, 2, 32, 130, 33, 32, 48),
]


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,page", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sparse_matches_naive(rng_seed, hq, hkv, d, ctx, q_len, block, page, dtype):
    sel = run_case(hq, hkv, d, ctx, q_len, block, page, dtype, groups=hkv)
    assert sel.density < 1.0 or sel.geometry.num_k_blocks <= 2


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,page", CPU_CASES[:3])
def test_full_density_equals_dense(rng_seed, hq, hkv, d, ctx, q_len, block, page):
    run_case(hq, hkv, d, ctx, q_len, block, page, torch.float32, full=True)


def test_bf16(rng_seed):
    run_case(4, 2, 32, 50, 60, 16, 16, torch.bfloat16)


def test_query_and_key_tiles_smaller_than_the_block(rng_seed):
    run_case(4, 2, 16, 75, 100, 32, 16, torch.float32, tile=TileConfig(16, 16, 4, 1, use_tma=False))


@pytest.mark.parametrize("page", [16, 32, 64])
def test_tma_path(rng_seed, page):
    # A page holding whole key tiles is read with tensor descriptors (TMA on Hopper), through
    # the ranked tiles pre-translated to cache rows.
    run_case(4, 2, 16, 75, 100, 32, page, torch.float32, tile=TileConfig(32, 16, 4, 1, use_tma=True))


@pytest.mark.parametrize("use_tma", [False, True])
def test_sequential_key_baseline_equals_dense(rng_seed, use_tma):
    # The benchmark baseline that skips the ranking must still be exact at full density.
    run_case(4, 2, 16, 75, 100, 32, 32, torch.float32, full=True,
             tile=TileConfig(32, 16, 4, 1, use_tma=use_tma, sequential_keys=True))


def test_score_order_equals_naive(rng_seed):
    """The previous visiting order (by score, shared per group) stays available and exact."""
    run_case(8, 2, 32, 37, 70, 32, 16, torch.float32, groups=2,
             tile=TileConfig(32, 32, 4, 1, use_tma=False, position_order=False))


@pytest.mark.parametrize("tail_tokens,heavy_rows", [(20, 1), (40, 2), (40, 3), (1000, None)])
@pytest.mark.parametrize("tile", [None, TileConfig(16, 16, 4, 1, use_tma=False)])
def test_heavy_rows_first_covers_every_tile_once(rng_seed, tail_tokens, heavy_rows, tile):
    """Launching the dense tail rows first (``heavy_rows``) changes only the programs' order:
    every query tile of every head is still computed (the output is NaN-poisoned), with several
    query tiles per block too. ``None``: every row of the chunk is heavy."""
    geometry_rows = (61 + 67 - 1) // 32 - 61 // 32 + 1
    run_case(6, 2, 16, 61, 67, 32, 16, torch.float32, groups=2, tile=tile, tail_tokens=tail_tokens,
             heavy_rows=geometry_rows if heavy_rows is None else heavy_rows)


def test_heaviest_first_orders_programs_by_their_blocks(rng_seed):
    """Every (head, query tile) program once, in descending order of its row's block count for
    that head, ties by program id; only the first ``num_rows`` rows (the rest are skipped)."""
    hq, rows, tiles_per_row = 5, 4, 3
    counts = torch.randint(1, 9, (hq, rows), dtype=torch.int32, device=DEVICE)
    order = heaviest_first(counts, rows - 1, tiles_per_row).tolist()
    per_head = (rows - 1) * tiles_per_row
    work = {h * per_head + t: int(counts[h, t // tiles_per_row]) for h in range(hq) for t in range(per_head)}
    assert order == sorted(work, key=lambda p: (-work[p], p))


@pytest.mark.parametrize("hq,hkv,groups,ctx,q_len,tail_tokens,skip_rows",
                         [(6, 2, 2, 61, 67, 20, 0), (6, 2, 2, 61, 67, 20, 1), (7, 1, 1, 300, 45, 0, 0),
                          (4, 2, 1, 0, 70, 40, 0)])
def test_heaviest_first_launch_equals_naive_and_the_default_order(rng_seed, hq, hkv, groups, ctx, q_len,
                                                                   tail_tokens, skip_rows):
    """The heaviest-first launch order changes only when each program runs: with unequal budgets
    per head (gamma 0.6), several query tiles per block, a dense tail and skipped rows, every
    written token equals the spec and, bitwise, the default order's output."""
    block, d = 32, 16
    # Heads from flat to peaked attention, so their budgets differ whatever the seed (with equal
    # scales, one seed in twelve gave every head of the one-group case the same budget).
    q = torch.randn(q_len, hq, d, device=DEVICE) * torch.linspace(0.25, 3.0, hq, device=DEVICE).view(1, hq, 1)
    k, v = torch.randn(2, ctx + q_len, hkv, d, device=DEVICE)
    params = ProxyAttnParams(gamma=0.6, block_size=block, num_groups=groups, min_budget_blocks=1, sink_blocks=1,
                             local_blocks=1, min_sparse_len=0, dense_tail_tokens=tail_tokens)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    assert len(set(sel.counts[:, : sel.geometry.num_q_blocks - skip_rows].flatten().tolist())) > 1, "budgets must differ"
    kv_cache, table = make_paged(k, v, 16)
    base = TileConfig(16, 16, 4, 1, use_tma=False)
    outs = []
    for tile in (base, replace(base, launch_heaviest_first=True)):
        out = torch.full_like(q, float("nan"))
        block_sparse_attn(q, kv_cache, table, sel.ranking, sel.counts, out, ctx=ctx, scale=d**-0.5, block_size=block,
                          tile=tile, skip_rows=skip_rows)
        outs.append(out)
    split = sel.geometry.row_token_start(sel.geometry.num_q_blocks - skip_rows)
    assert outs[1][split:].isnan().all() and not outs[1][:split].isnan().any()
    expected = block_sparse_attention(q, k, v, ctx, sel.block_mask(), d**-0.5, block)
    torch.testing.assert_close(outs[1][:split], expected[:split], rtol=ATTN_TOL[torch.float32], atol=ATTN_TOL[torch.float32])
    assert torch.equal(outs[0][:split], outs[1][:split])


@pytest.mark.parametrize("ctx,q_len,skip_rows", [(61, 67, 1), (61, 67, 2), (64, 64, 1), (61, 67, 3), (0, 30, 1)])
@pytest.mark.parametrize("tile", [None, TileConfig(16, 16, 4, 1, use_tma=False)])
def test_skipped_tail_rows_are_left_to_the_caller(rng_seed, ctx, q_len, skip_rows, tile):
    """``skip_rows``: the chunk's last rows get no program (a dense kernel computes the dense
    tail instead); the others are exact, including a partial first row and every row skipped."""
    run_case(6, 2, 16, ctx, q_len, 32, 16, torch.float32, groups=2, tile=tile, tail_tokens=20,
             skip_rows=skip_rows)


def test_head_block_lists_are_each_heads_selection_by_position(rng_seed):
    groups, rows, num_k_blocks, hq = 2, 3, 9, 6

    def ranked_row(diagonal):  # the diagonal first, the earlier blocks in random order, -1 padding
        row = torch.cat([torch.tensor([diagonal]), torch.randperm(diagonal)])
        return torch.cat([row, torch.full((num_k_blocks - len(row),), -1)])

    ranking = torch.stack([torch.stack([ranked_row(6 + r) for r in range(rows)]) for _ in range(groups)])
    ranking = ranking.to(torch.int32)
    counts = torch.randint(1, 7, (hq, rows), dtype=torch.int32)
    lists = head_block_lists(ranking, counts)
    assert lists.shape == (hq, rows, num_k_blocks)
    for h in range(hq):
        for r in range(rows):
            n = int(counts[h, r])
            chosen = ranking[h // (hq // groups), r, :n]
            assert lists[h, r, 0] == ranking[0, r, 0], "the diagonal stays first"
            assert lists[h, r, :n].tolist() == sorted(chosen.tolist(), reverse=True)
            assert (lists[h, r, n:] == -1).all()


# (ctx, q_len, block, page, block_n, Hq, groups): one and several key tiles per block, pages of
# one tile and of several, partial first and last rows, 1-4 heads per group, Kb not a power of 2.
HEAD_LIST_CASES = [
    (0, 100, 32, 16, 16, 4, 1),
    (37, 70, 32, 32, 16, 8, 2),
    (250, 53, 16, 16, 16, 6, 3),
    (130, 170, 64, 64, 32, 8, 2),
    (1000, 300, 128, 128, 64, 4, 1),
]


@pytest.mark.parametrize("ctx,q_len,block,page,block_n,hq,groups", HEAD_LIST_CASES)
def test_head_lists_kernel_equals_the_torch_ops(rng_seed, ctx, q_len, block, page, block_n, hq, groups):
    num_k_blocks = -(-(ctx + q_len) // block)
    ranking, counts, table = random_selection(groups, hq, ctx, q_len, block, page, num_k_blocks + 1, DEVICE)
    table = torch.cat([table[:1], table])[1:]  # a row view that is not 16-byte aligned
    lists, rows = head_lists_and_tile_rows(ranking, counts, table, block, block_n, page, True)
    expected = head_block_lists(ranking, counts)
    assert torch.equal(lists, expected)
    assert torch.equal(rows, ranked_tile_rows(expected, table, block, block_n, page))
    lists_only, none = head_lists_and_tile_rows(ranking, counts, table, block, block_n, page, False)
    assert torch.equal(lists_only, expected) and none is None


@pytest.mark.gpu
@pytest.mark.parametrize("page,block_n,groups", [(128, 64, 1), (16, 128, 2), (128, 128, 8)])
def test_gpu_head_lists_kernel_at_the_128k_shape(page, block_n, groups):
    """The same on the H200 at the benchmark shape (32 heads, 64 rows x 1024 key blocks)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ctx, q_len, block, hq = 122880, 8192, 128, 32
    torch.manual_seed(0)
    ranking, counts, table = random_selection(groups, hq, ctx, q_len, block, page, 256, "cuda", 128)
    lists, rows = head_lists_and_tile_rows(ranking, counts, table, block, block_n, page, True)
    expected = head_block_lists(ranking, counts)
    assert torch.equal(lists, expected)
    assert torch.equal(rows, ranked_tile_rows(expected, table, block, block_n, page))


def test_head_lists_beyond_the_triton_row_limit_use_the_torch_ops(rng_seed, monkeypatch):
    scores = torch.rand(1, 4, 10, device=DEVICE)
    ranking, counts, _ = select_blocks(scores, torch.full((2,), 5, dtype=torch.int32, device=DEVICE),
                                       96, 64, 16, 1, 1, 0)
    table = torch.arange(20, dtype=torch.int32, device=DEVICE)
    monkeypatch.setattr(head_lists, "MAX_TRITON_BLOCKS", 4)
    monkeypatch.setattr(head_lists, "_head_lists_kernel", None)  # must not be launched
    lists, rows = head_lists_and_tile_rows(ranking, counts, table, 16, 16, 16, True)
    assert torch.equal(lists, head_block_lists(ranking, counts))
    assert torch.equal(rows, ranked_tile_rows(lists, table, 16, 16, 16))


@pytest.mark.parametrize("page,copy_page,seq_len,spare", [(16, 64, 150, 5), (16, 32, 32, 0), (32, 32, 77, 1),
                                                           (16, 128, 250, 0)])
def test_contiguous_pages_hold_the_requests_tokens_in_order(rng_seed, page, copy_page, seq_len, spare):
    """The copy reads back the same keys and values as the paged cache, through its own table
    (0, 1, ...), from an NHD tensor; a block table that ends inside the copy's last page (no
    spare entries) is padded."""
    k, v = torch.randn(2, seq_len, 3, 16, device=DEVICE)
    kv_cache, table = make_paged(k, v, page)
    table = torch.cat([table, table[:1].expand(spare)])
    copy, copy_table = contiguous_pages(kv_cache, table, seq_len, copy_page)
    n = -(-seq_len // copy_page)
    assert copy.shape == (n, 3, copy_page, 32) and copy.permute(0, 2, 1, 3).is_contiguous()
    assert copy_table.dtype == torch.int32 and copy_table.tolist() == list(range(n))
    got_k, got_v = gather_paged_kv(copy, copy_table, seq_len)
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_contiguous_pages_rejects_pages_that_do_not_nest():
    kv_cache, table = make_paged(*torch.randn(2, 40, 1, 16), 16)
    for seq_len, copy_page in ((40, 24), (40, 8), (0, 32)):
        with pytest.raises(ValueError, match="multiple of the cache's page 16"):
            contiguous_pages(kv_cache, table, seq_len, copy_page)


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,page,copy_page,skip_rows", [
    (4, 2, 32, 37, 90, 32, 16, 32, 0), (7, 1, 16, 61, 67, 32, 16, 64, 1), (4, 4, 16, 0, 40, 32, 32, 96, 0)])
def test_block_sparse_over_a_contiguous_copy(rng_seed, hq, hkv, d, ctx, q_len, block, page, copy_page, skip_rows):
    """``copy_page``: the kernel reads a copy of the request's keys and values in larger pages
    (the tile follows the copy's page size) and still computes exactly the selection."""
    run_case(hq, hkv, d, ctx, q_len, block, page, torch.float32, copy_page=copy_page, skip_rows=skip_rows)


@pytest.mark.parametrize("page,block,d,tma,expected", [
    (16, 128, 128, True, 128),   # vLLM's default page on Hopper: the measured case
    (16, 128, 64, True, 128),
    (32, 128, 128, True, 128),
    (48, 128, 128, True, 384),   # the copy's pages must hold whole cache pages: lcm(48, 128)
    (64, 128, 128, True, 0),     # 64-key tiles fit (D 128)
    (64, 128, 64, True, 128),    # D 64 reads 128-key tiles: a 64-token page does not hold one
    (128, 128, 128, True, 0),
    (16, 128, 128, False, 0),    # no TMA (pre-Hopper GPUs, CPU): nothing to gain from a copy
    (16, 32, 128, True, 0),      # blocks of 32 keys: no TMA tile at any page size
])
def test_default_copy_page(page, block, d, tma, expected):
    assert bs_triton.default_copy_page(page, block, d, tma) == expected


def test_default_copy_page_is_none_on_cpu():
    assert bs_triton.default_copy_page(16, 128, 128, has_tma(torch.device("cpu"))) == 0


def test_copy_bytes_rounds_up_to_whole_copy_pages():
    assert bs_triton.copy_bytes(131072, 8, 128, torch.bfloat16, 128) == 131072 * 8 * 256 * 2  # 512 MiB
    assert bs_triton.copy_bytes(129, 2, 64, torch.float32, 128) == 256 * 2 * 128 * 4
    assert bs_triton.copy_bytes(131072, 8, 128, torch.bfloat16, 0) == 0


def test_rejects_bad_inputs():
    q = torch.zeros(10, 4, 32)
    kv = torch.zeros(4, 2, 16, 64)
    table = torch.arange(4, dtype=torch.int32)
    sel = select_blocks(torch.zeros(1, 1, 1), torch.ones(4, dtype=torch.int32), 0, 10, 16, 1, 1)
    with pytest.raises(ValueError, match="page_size=24"):
        block_sparse_attn(q, torch.zeros(4, 2, 24, 64), table, sel[0], sel[1], q.clone(), ctx=0, scale=1.0,
                          block_size=16)
    with pytest.raises(ValueError, match="last dim 32"):
        block_sparse_attn(q, torch.zeros(4, 2, 16, 32), table, sel[0], sel[1], q.clone(), ctx=0, scale=1.0,
                          block_size=16)
    with pytest.raises(ValueError, match="ranking shape"):
        block_sparse_attn(q, kv, table, sel[0], sel[1], q.clone(), ctx=20, scale=1.0, block_size=16)
    with pytest.raises(ValueError, match=r"heavy_rows=2 must be in \[0, 1\]"):
        block_sparse_attn(q, kv, table, sel[0], sel[1], q.clone(), ctx=0, scale=1.0, block_size=16, heavy_rows=2)
    with pytest.raises(ValueError, match=r"skip_rows=1 must be in \[0, 1\], with heavy_rows 0 \(got 1\)"):
        block_sparse_attn(q, kv, table, sel[0], sel[1], q.clone(), ctx=0, scale=1.0, block_size=16,
                          heavy_rows=1, skip_rows=1)
    with pytest.raises(ValueError, match="copy_page=24 must be 0"):
        block_sparse_attn(q, kv, table, sel[0], sel[1], q.clone(), ctx=0, scale=1.0, block_size=16, copy_page=24)
    with pytest.raises(ValueError, match="covers 16 tokens"):
        block_sparse_attn(q, kv, table[:1], sel[0], sel[1], q.clone(), ctx=7, scale=1.0, block_size=16) \
            if False else block_sparse_attn(torch.zeros(20, 4, 32), kv, table[:1], *select_blocks(
                torch.zeros(1, 2, 2), torch.ones(4, dtype=torch.int32), 0, 20, 16, 1, 1)[:2],
                torch.zeros(20, 4, 32), ctx=0, scale=1.0, block_size=16)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (14, 2, 64)])
@pytest.mark.parametrize("page", [16, 128])
@pytest.mark.parametrize("full", [True, False])
def test_gpu_real_sizes_bf16(rng_seed, hq, hkv, d, page, full):
    run_case(hq, hkv, d, 8192 + 37, 2048 + 5, 128, page, torch.bfloat16, groups=1, gamma=0.5, full=full,
             atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (14, 2, 64)])
@pytest.mark.parametrize("full", [True, False])
def test_gpu_16_token_pages_gathered_without_the_copy(rng_seed, hq, hkv, d, full):
    """On the H200 the kernel reads 16-token pages from a 128-token copy by default (the TMA
    path, test_gpu_real_sizes_bf16); without it (``copy_page=0``) it gathers rows from the
    pages, which must compute the same."""
    assert bs_triton.default_copy_page(16, 128, d, has_tma(torch.device("cuda"))) == 128, "H200: TMA expected"
    assert default_tile_config(128, d, on_cpu=False, page_size=128).use_tma
    run_case(hq, hkv, d, 8192 + 37, 2048 + 5, 128, 16, torch.bfloat16, groups=1, gamma=0.5, full=full,
             atol=2e-2, copy_page=0)
