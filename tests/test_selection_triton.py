"""Triton selection ops (proxy scores, budgets, select) against their torch specs (naive.py).

On CPU the kernels run under the Triton interpreter on small shapes; the ``gpu`` tests run
realistic sizes in bf16. Keys always come from a shuffled paged cache whose unused slots are
NaN, through vLLM's permuted view; queries are a non-contiguous slice of a packed qkv tensor.
"""
from __future__ import annotations

import math

import pytest
import torch

import proxyattn_kernels.budget.triton as budget_triton
import proxyattn_kernels.common as kernels_common
import proxyattn_kernels.proxy_scores.triton as proxy_triton
from proxyattn_kernels import ChunkGeometry, ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.budget.naive import (
    block_mass_given_lse, fraction_budgets, gamma_block_counts, last_block_mass, last_rows_lse, limit_budget,
)
from proxyattn_kernels.budget.triton import BudgetTileConfig, gamma_budgets, head_budgets_paged, last_block_mass_paged
from proxyattn_kernels.proxy_scores.naive import proxy_block_scores
from proxyattn_kernels.proxy_scores.triton import ProxyTileConfig, proxy_block_scores_paged
from proxyattn_kernels.select import naive as select_naive
from proxyattn_kernels.select.triton import select_blocks
from proxyattn_kernels.selection import select_blocks_paged

from tests._paged import make_paged

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter computes log2(0) of masked rows before discarding them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def poison_workspaces(monkeypatch):
    """Internal workspaces start as NaN: every element a kernel reads must have been written."""
    def nan_workspace(shape, device, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    # Every module that allocates one (each imported the function by name).
    users = [m for m in (proxy_triton, budget_triton) if getattr(m, "workspace", None) is kernels_common.workspace]
    assert len(users) == 2, "a kernel module no longer takes its workspaces from common.workspace"
    for module in users:
        monkeypatch.setattr(module, "workspace", nan_workspace)


def make_chunk(hq, hkv, d, ctx, q_len, dtype, device=DEVICE, q_scale=1.0):
    """``q [q_len, Hq, D]`` as a strided slice of a packed qkv tensor, contiguous ``k, v``."""
    qkv = torch.randn(q_len, hq + 2 * hkv, d, device=device)
    q = (q_scale * qkv).to(dtype)[:, :hq]
    k = torch.randn(ctx + q_len, hkv, d, device=device).to(dtype)
    v = torch.randn(ctx + q_len, hkv, d, device=device).to(dtype)
    return q, k, v


def assert_scores_close(scores, expected, rtol, atol):
    assert scores.shape == expected.shape and scores.dtype == torch.float32
    assert not scores.isnan().any()
    assert torch.equal(torch.isinf(scores), torch.isinf(expected)), "-inf pattern differs"
    assert (scores[torch.isinf(scores)] < 0).all()
    finite = torch.isfinite(expected)
    torch.testing.assert_close(scores[finite], expected[finite], rtol=rtol, atol=atol)


def near_gamma_tie(mass: torch.Tensor, gamma: float, eps: float) -> torch.Tensor:
    """``[Hq]`` True where a perturbation of ``eps`` in the mass could change the gamma count."""
    srt = mass.sort(dim=-1, descending=True).values
    cum = (srt / srt.sum(-1, keepdim=True)).cumsum(-1)
    return ((cum - gamma).abs() < eps).any(-1)


TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-2, 1e-4), torch.bfloat16: (5e-2, 1e-3)}

# (Hq, Hkv, D, ctx, q_len, block, stride, page): GQA 1/2/4/7, chunks starting and ending inside
# blocks and pages, page smaller and larger than the selection block.
CPU_CASES = [
    (4, 2, 32, 37, 90, 32, 4, 16),
    (2, 2, 16, 101, 60, 16, 4, 32),
    (4, 1, 16, 45, 77, 16, 2, 16),
    (7, 1, 16, 61, 67, 32, 4, 32),
]


# ------------------------------------------------------------------------------------------
# Proxy scores
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,stride,page", CPU_CASES)
@pytest.mark.parametrize("groups", ["one", "per_kv"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_proxy_scores_match_naive(rng_seed, hq, hkv, d, ctx, q_len, block, stride, page, groups, dtype):
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, dtype)
    kv_cache, table = make_paged(k, v, page)
    g = 1 if groups == "one" else hkv
    scale = d**-0.5
    scores = proxy_block_scores_paged(q, kv_cache, table, ctx=ctx, scale=scale, num_groups=g, stride=stride,
                                      block_size=block)
    expected = proxy_block_scores(q, k, ctx, scale, g, stride, block)
    rtol, atol = TOL[dtype]
    assert_scores_close(scores, expected, rtol, atol)


# (block, stride, tile, splits): strided block vs tile: smaller (grouped pooling), equal, larger
# (tile inside a block), incommensurable (masked generic pooling); key range split 1..3 ways.
POOL_CASES = [
    (16, 4, 16, 2),    # strided block 4 < tile 16
    (32, 2, 16, 3),    # 16 == 16
    (64, 1, 32, 2),    # 64 > 32
    (48, 4, 16, 1),    # 12 vs 16: generic path
    (48, 1, 32, 2),    # 48 vs 32: generic path
    (16, 16, 16, 2),   # one strided position per block
]


@pytest.mark.parametrize("block,stride,tile,splits", POOL_CASES)
def test_proxy_scores_tiles_splits_and_pooling(rng_seed, block, stride, tile, splits):
    hq, hkv, d, ctx, q_len, page = 4, 2, 16, 2 * block + 5, 2 * block + 7, 16
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.float32)
    kv_cache, table = make_paged(k, v, page)
    cfg = ProxyTileConfig(tile, tile, 4, 1, num_splits=splits)
    scores = proxy_block_scores_paged(q, kv_cache, table, ctx=ctx, scale=0.2, num_groups=2, stride=stride,
                                      block_size=block, tile=cfg)
    expected = proxy_block_scores(q, k, ctx, 0.2, 2, stride, block)
    assert_scores_close(scores, expected, *TOL[torch.float32])


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,stride,page", CPU_CASES[:2])
def test_proxy_scores_with_the_smallest_heads_tile(rng_seed, monkeypatch, hq, hkv, d, ctx, q_len, block, stride, page):
    """On a GPU the proxy keys' means take 8-row programs when 32-row ones would be too few (a
    context below ~64K tokens); under the interpreter that happens only when asked for many
    programs, as here (poisoned workspaces: every padded row must still be written)."""
    monkeypatch.setattr(proxy_triton, "target_programs", lambda device: 10**6)
    assert proxy_triton._heads_tile(64, 1, 32, torch.device("cpu")) == 8
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.float32)
    kv_cache, table = make_paged(k, v, page)
    scores = proxy_block_scores_paged(q, kv_cache, table, ctx=ctx, scale=d**-0.5, num_groups=hkv, stride=stride,
                                      block_size=block)
    assert_scores_close(scores, proxy_block_scores(q, k, ctx, d**-0.5, hkv, stride, block), *TOL[torch.float32])


def test_heads_tile_halves_until_the_launch_is_wide_enough(monkeypatch):
    monkeypatch.setattr(proxy_triton, "target_programs", lambda device: 1056)  # 8 per SM of an H200
    cpu = torch.device("cpu")
    assert proxy_triton._heads_tile(2048, 1, 64, cpu) == 8     # 8K tokens of strided keys: 256 programs
    assert proxy_triton._heads_tile(32768, 1, 64, cpu) == 16   # 128K tokens: 2048 programs
    assert proxy_triton._heads_tile(65536, 1, 64, cpu) == 32   # already 2048 programs of 32 rows
    assert proxy_triton._heads_tile(8192, 8, 64, cpu) == 32    # 8 groups of 256 programs: enough
    assert proxy_triton._heads_tile(8192, 8, 16, cpu) == 16    # never above the passes' tile


@pytest.mark.parametrize("ctx,q_len", [(46, 100), (46, 1), (45, 2), (16, 2), (0, 1)])
def test_proxy_scores_rows_without_strided_query(rng_seed, ctx, q_len):
    """A row (or the whole chunk) without a position ``p % stride == 0`` stays -inf."""
    q, k, v = make_chunk(4, 2, 16, ctx, q_len, torch.float32)
    kv_cache, table = make_paged(k, v, 16)
    scores = proxy_block_scores_paged(q, kv_cache, table, ctx=ctx, scale=0.25, num_groups=1, stride=4,
                                      block_size=16)
    expected = proxy_block_scores(q, k, ctx, 0.25, 1, 4, 16)
    assert_scores_close(scores, expected, *TOL[torch.float32])


def test_proxy_scores_bf16(rng_seed):
    """bf16 only enters the interpreter through loads, casts and tl.dot."""
    q, k, v = make_chunk(4, 2, 32, 50, 70, torch.bfloat16)
    kv_cache, table = make_paged(k, v, 16)
    scores = proxy_block_scores_paged(q, kv_cache, table, ctx=50, scale=32**-0.5, num_groups=1, stride=4,
                                      block_size=16)
    assert_scores_close(scores, proxy_block_scores(q, k, 50, 32**-0.5, 1, 4, 16), *TOL[torch.bfloat16])


# ------------------------------------------------------------------------------------------
# Budgets
# ------------------------------------------------------------------------------------------


def check_mass(mass, q, k, ctx, scale, block, gamma, rtol, atol):
    """Mass close to naive; gamma counts equal to naive's wherever rounding cannot flip them."""
    expected_mass = last_block_mass(q, k, ctx, scale, block)
    torch.testing.assert_close(mass, expected_mass, rtol=rtol, atol=atol)
    torch.testing.assert_close(mass.sum(-1), torch.ones_like(mass[:, 0]), rtol=0, atol=1e-4)
    stable = ~near_gamma_tie(expected_mass, gamma, 10 * atol + 1e-6)
    naive_counts = gamma_block_counts(expected_mass, gamma)
    assert torch.equal(gamma_block_counts(mass, gamma)[stable], naive_counts[stable])


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,stride,page", CPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_budget_matches_naive(rng_seed, hq, hkv, d, ctx, q_len, block, stride, page, dtype):
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, dtype, q_scale=2.0)  # peakier attention
    kv_cache, table = make_paged(k, v, page)
    scale = d**-0.5
    out = torch.full((hq, ChunkGeometry(ctx, q_len, block).num_k_blocks), float("nan"))
    mass = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=scale, block_size=block, out=out)
    assert mass is out and not out.isnan().any()
    budget, gamma_counts = head_budgets_paged(q, kv_cache, table, ctx=ctx, scale=scale, block_size=block,
                                              gamma=0.7, min_budget_blocks=2, max_blocks=None)
    check_mass(mass, q, k, ctx, scale, block, 0.7, *TOL[dtype])
    # The budgets are the naive count and limits applied to this mass (the fused kernel sums in
    # another order: only a share within rounding of gamma may count differently).
    counts = gamma_block_counts(mass, 0.7)
    stable = ~near_gamma_tie(mass, 0.7, 1e-5)
    assert torch.equal(gamma_counts[stable], counts[stable])
    assert torch.equal(budget, limit_budget(gamma_counts, mass.shape[-1], 2, None))


# (Hq, Hkv, D, ctx, q_len, block, page, tile_m): one query tile (the GPU default) and several
# (rows reloaded per block), a chunk shorter than a block, ctx 0, pages across blocks.
LSE_CASES = [
    (4, 2, 32, 37, 90, 32, 16, None),
    (4, 1, 16, 45, 77, 64, 16, None),    # 64 rows in 2 tiles of 32 under the interpreter
    (7, 1, 16, 61, 67, 32, 32, 16),      # 2 tiles of 16
    (2, 2, 16, 0, 23, 32, 16, None),     # q_len < block: 23 rows, chunk from 0
    (6, 3, 16, 100, 33, 16, 32, None),   # page larger than the block
]


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,page,tile_m", LSE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_budget_mass_from_given_lse(rng_seed, hq, hkv, d, ctx, q_len, block, page, tile_m, dtype):
    """With the rows' LSE given (as the dense tail's kernel returns it), the one-pass mass equals
    the two-pass one and the naive spec; a shifted LSE scales it (the LSE is really used)."""
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, dtype, q_scale=2.0)
    kv_cache, table = make_paged(k, v, page)
    scale = d**-0.5
    lse = last_rows_lse(q, k, ctx, scale, block)
    wide = torch.randn(hq, lse.shape[1] + 5)  # a strided [Hq, n] view, as a slice of FA's [Hq, tokens]
    wide[:, 5:] = lse
    lse = wide[:, 5:]
    tile = None if tile_m is None else BudgetTileConfig(tile_m, 16, 4, 1)
    out = torch.full((hq, ChunkGeometry(ctx, q_len, block).num_k_blocks), float("nan"))
    mass = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=scale, block_size=block, out=out,
                                 row_lse=lse, tile=tile)
    assert mass is out and not out.isnan().any()
    check_mass(mass, q, k, ctx, scale, block, 0.7, *TOL[dtype])
    two_pass = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=scale, block_size=block, tile=tile)
    torch.testing.assert_close(mass, two_pass, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    shift = torch.linspace(-0.5, 0.5, hq)[:, None]
    shifted = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=scale, block_size=block,
                                    row_lse=(lse + shift).contiguous(), tile=tile)
    torch.testing.assert_close(shifted, block_mass_given_lse(q, k, ctx, scale, block, lse + shift),
                               rtol=TOL[dtype][0], atol=TOL[dtype][1])
    torch.testing.assert_close(shifted, mass * torch.exp(-shift), rtol=TOL[dtype][0], atol=TOL[dtype][1])


def test_budget_default_tiles_follow_the_h200_sweep():
    """The one-pass mass at head_dim 128 takes 128x128 tiles with 8 warps on 128-token pages (0.36
    vs 0.41 ms on the H200), else 128x64 with 4 warps (0.40 vs 0.61 ms with 8); the two-pass mass
    and head_dim 64 keep 128x64 with 8 (proxyattn_kernels/budget/triton.py)."""
    from proxyattn_kernels.budget.triton import default_budget_tile_config

    assert default_budget_tile_config(128, 128, False, 128, from_lse=True) == BudgetTileConfig(128, 64, 4, 3)
    assert default_budget_tile_config(128, 128, False, 128, from_lse=True, page_size=16) == BudgetTileConfig(
        128, 64, 4, 3)
    for page in (128, 256):
        assert default_budget_tile_config(128, 128, False, 128, from_lse=True, page_size=page) == BudgetTileConfig(
            128, 128, 8, 2)
    # A selection block of 64 keys cannot hold a 128-key tile, and a short chunk keeps small tiles.
    assert default_budget_tile_config(64, 64, False, 128, from_lse=True, page_size=128) == BudgetTileConfig(
        64, 64, 4, 3)
    assert default_budget_tile_config(20, 128, False, 128, from_lse=True, page_size=128) == BudgetTileConfig(
        32, 64, 4, 3)
    assert default_budget_tile_config(128, 128, False, 128, page_size=128) == BudgetTileConfig(128, 64, 8, 3)
    assert default_budget_tile_config(128, 128, False, 128) == BudgetTileConfig(128, 64, 8, 3)
    assert default_budget_tile_config(128, 128, False, 64, from_lse=True) == BudgetTileConfig(128, 64, 8, 3)
    assert default_budget_tile_config(20, 128, False, 128) == BudgetTileConfig(32, 64, 4, 3)


def test_budget_given_lse_validated():
    q, k, v = make_chunk(4, 2, 16, 10, 20, torch.float32)
    kv_cache, table = make_paged(k, v, 16)
    for bad in (torch.zeros(4, 19), torch.zeros(4, 20, dtype=torch.float16), torch.zeros(20, 4).T):
        with pytest.raises(ValueError, match="row_lse"):
            last_block_mass_paged(q, kv_cache, table, ctx=10, scale=0.25, block_size=32, row_lse=bad)


def random_mass(num_heads: int, num_k_blocks: int, peak: float) -> torch.Tensor:
    """``[Hq, Kb]`` float32 rows summing to 1, from nearly flat (small peak) to a few dominant blocks."""
    logits = torch.randn(num_heads, num_k_blocks) * peak
    return torch.softmax(logits, dim=-1).to(DEVICE)


# (heads, key blocks, gamma, min budget, cap): one block, rows shorter and longer than 16 and
# not powers of two, every gamma regime, a minimum above the count, a cap below it.
GAMMA_CASES = [
    (3, 1, 0.9, 1, None),
    (5, 7, 0.5, 1, None),
    (4, 33, 0.95, 4, None),
    (7, 100, 0.9, 2, 10),
    (2, 257, 0.99, 16, 300),
    (6, 64, 0.3, 40, 20),
]


@pytest.mark.parametrize("heads,blocks,gamma,min_blocks,cap", GAMMA_CASES)
@pytest.mark.parametrize("peak", [0.3, 1.0, 4.0])
def test_gamma_budgets_match_naive(rng_seed, heads, blocks, gamma, min_blocks, cap, peak):
    mass = random_mass(heads, blocks, peak)
    budget, counts = gamma_budgets(mass, gamma, min_blocks, cap)
    expected = gamma_block_counts(mass, gamma)
    stable = ~near_gamma_tie(mass, gamma, 1e-5)
    assert stable.any()
    assert torch.equal(counts[stable], expected[stable])
    assert (counts - expected).abs().max() <= 1  # a rounding tie moves a count by one at most
    assert counts.dtype == budget.dtype == torch.int32
    assert torch.equal(budget, limit_budget(counts, blocks, min_blocks, cap))


def test_gamma_budgets_exact_ties_and_limits(rng_seed):
    # Equal masses: the count is exactly ceil(gamma * Kb) whatever the sort order of ties.
    mass = torch.full((3, 40), 1 / 40, device=DEVICE)
    budget, counts = gamma_budgets(mass, 0.5 + 1e-3, 1, None)
    assert (counts == 21).all() and (budget == 21).all()
    # gamma 1 keeps every block without looking at the mass (NaN would show otherwise).
    budget, counts = gamma_budgets(torch.full((2, 9), float("nan"), device=DEVICE), 1.0, 1, 4)
    assert (counts == 9).all() and (budget == 4).all()
    # One dominant block: count 1; the minimum and the cap apply after.
    peaked = torch.zeros(2, 50, device=DEVICE)
    peaked[:, 17] = 1.0
    assert gamma_budgets(peaked, 0.95, 1, None)[1].tolist() == [1, 1]
    assert gamma_budgets(peaked, 0.95, 8, 5)[0].tolist() == [5, 5]


def test_gamma_budgets_rejects_bad_mass():
    with pytest.raises(ValueError, match="float32"):
        gamma_budgets(torch.ones(2, 4, dtype=torch.float16, device=DEVICE), 0.9, 1, None)
    with pytest.raises(ValueError, match=r"\[Hq, Kb\]"):
        gamma_budgets(torch.ones(4, device=DEVICE), 0.9, 1, None)


# (ctx, q_len, block, tile_m, tile_n, splits): several m-tiles per head (q_len > tile), fewer
# queries than a block, a key tile smaller than the block, splits that do not divide the blocks.
BUDGET_TILE_CASES = [
    (70, 40, 32, 16, 16, 3),
    (300, 5, 16, 16, 16, 2),
    (37, 100, 32, 32, 32, 1),
    (129, 64, 48, 32, 16, 4),
]


@pytest.mark.parametrize("ctx,q_len,block,tile_m,tile_n,splits", BUDGET_TILE_CASES)
def test_budget_tiles_and_splits(rng_seed, ctx, q_len, block, tile_m, tile_n, splits):
    hq, hkv, d = 4, 2, 16
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.float32, q_scale=3.0)
    kv_cache, table = make_paged(k, v, 16)
    cfg = BudgetTileConfig(tile_m, tile_n, 4, 1, num_splits=splits)
    mass = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=0.3, block_size=block, tile=cfg)
    check_mass(mass, q, k, ctx, 0.3, block, 0.9, *TOL[torch.float32])


def test_budget_gamma_one_keeps_every_block(rng_seed):
    q, k, v = make_chunk(4, 2, 16, 90, 30, torch.float32)
    kv_cache, table = make_paged(k, v, 32)
    budget, counts = head_budgets_paged(q, kv_cache, table, ctx=90, scale=0.25, block_size=16, gamma=1.0,
                                        min_budget_blocks=1, max_blocks=None)
    assert (counts == 8).all() and (budget == 8).all()


# ------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------


def random_scores(geo: ChunkGeometry, groups: int) -> torch.Tensor:
    """Scores with many exact ties, -0.0, -inf entries and rows without any estimate."""
    s = torch.randint(0, 6, (groups, geo.num_q_blocks, geo.num_k_blocks), device=DEVICE).float() / 8
    s[s == 0.125] = float("-inf")
    s[s == 0.25] = -0.0
    s[torch.rand(s.shape, device=DEVICE) < 0.3] = torch.rand(1, device=DEVICE).item()  # shared value
    s[:, torch.rand(geo.num_q_blocks, device=DEVICE) < 0.2] = float("-inf")  # no estimate
    return s


# (ctx, q_len, block, groups, Hq, sink, local)
SELECT_CASES = [
    (37, 90, 16, 2, 4, 1, 1),
    (0, 100, 16, 1, 7, 2, 3),
    (130, 33, 32, 3, 6, 0, 1),
    (260, 40, 16, 1, 2, 4, 2),
    (15, 2, 16, 2, 2, 1, 1),
]


@pytest.mark.parametrize("ctx,q_len,block,groups,hq,sink,local", SELECT_CASES)
def test_select_matches_naive(rng_seed, ctx, q_len, block, groups, hq, sink, local):
    geo = ChunkGeometry(ctx, q_len, block)
    scores = random_scores(geo, groups)
    budget = torch.randint(1, geo.num_k_blocks + 3, (hq,), dtype=torch.int32, device=DEVICE)
    out = (torch.full((groups, geo.num_q_blocks, geo.num_k_blocks), -7, dtype=torch.int32, device=DEVICE),
           torch.full((hq, geo.num_q_blocks), -7, dtype=torch.int32, device=DEVICE),
           torch.full((geo.num_q_blocks,), -7, dtype=torch.int32, device=DEVICE))
    result = select_blocks(scores, budget, ctx, q_len, block, sink, local, out=out)
    expected = select_naive.select_blocks(scores, budget, ctx, q_len, block, sink, local)
    for name, got, want, buf in zip(("ranking", "counts", "num_forced"), result, expected, out):
        assert got is buf
        assert got.dtype == torch.int32 and torch.equal(got, want), name
    # The torch fallback for very long rows gives the same answer.
    fallback = select_blocks(scores, budget, ctx, q_len, block, sink, local, max_triton_blocks=1)
    for got, want in zip(fallback, expected):
        assert torch.equal(got, want)


# (ctx, q_len, block, tail tokens): the tail inside the last block, across a block boundary,
# longer than the chunk, a chunk ending mid-block and one starting mid-block.
TAIL_CASES = [(0, 100, 16, 1), (37, 90, 16, 20), (130, 33, 32, 500), (260, 40, 16, 16), (15, 2, 16, 3)]


@pytest.mark.parametrize("ctx,q_len,block,tail", TAIL_CASES)
def test_dense_tail_rows(rng_seed, ctx, q_len, block, tail):
    geo = ChunkGeometry(ctx, q_len, block)
    scores = random_scores(geo, 2)
    budget = torch.ones(4, dtype=torch.int32, device=DEVICE)  # sparse everywhere but the tail
    expected = select_naive.select_blocks(scores, budget, ctx, q_len, block, 1, 1, tail)
    result = select_blocks(scores, budget, ctx, q_len, block, 1, 1, tail)
    for got, want in zip(result, expected):
        assert torch.equal(got, want)
    # Rows holding one of the last `tail` tokens (absolute positions) count every causal block.
    last_tokens = range(max(ctx, ctx + q_len - tail), ctx + q_len)
    tail_rows = sorted({p // block - geo.first_q_block for p in last_tokens})
    assert geo.first_tail_row(tail) == tail_rows[0]
    counts = result[1].cpu()
    for row in range(geo.num_q_blocks):
        if row in tail_rows:
            assert (counts[:, row] == geo.row_extent(row)).all(), row
    without = select_naive.select_blocks(scores, budget, ctx, q_len, block, 1, 1)[1].cpu()
    head_rows = slice(0, tail_rows[0])
    assert torch.equal(counts[:, head_rows], without[:, head_rows])
    assert geo.first_tail_row(0) == geo.num_q_blocks


def test_dense_tail_rejects_negative():
    geo = ChunkGeometry(0, 64, 16)
    with pytest.raises(ValueError, match="dense_tail_tokens"):
        select_blocks(random_scores(geo, 1), torch.ones(2, dtype=torch.int32, device=DEVICE), 0, 64, 16, 1, 1, -1)


# ------------------------------------------------------------------------------------------
# Composition
# ------------------------------------------------------------------------------------------


def check_against_reference(sel, ref, q, k, ctx, scale, params, rtol, atol):
    """Scores and mass within tolerance of the reference; everything derived from them exact."""
    assert_scores_close(sel.scores, ref.scores, rtol, atol)
    expected_mass = last_block_mass(q, k, ctx, scale, params.block_size)
    expected_counts = gamma_block_counts(expected_mass, params.gamma)
    stable = ~near_gamma_tie(expected_mass, params.gamma, 10 * atol + 1e-6)
    assert torch.equal(sel.gamma_counts[stable], expected_counts[stable])
    if ref.dense_reason is None:
        budget = limit_budget(sel.gamma_counts, ref.geometry.num_k_blocks, params.min_budget_blocks,
                              params.budget_cap_blocks(ref.geometry))
    else:
        budget = torch.full_like(sel.gamma_counts, ref.geometry.num_k_blocks)
    assert torch.equal(sel.budget, budget)
    ranking, counts, num_forced = select_naive.select_blocks(
        sel.scores, sel.budget, ctx, q.shape[0], params.block_size, params.sink_blocks, params.local_blocks,
        params.dense_tail_tokens)
    assert torch.equal(sel.ranking, ranking) and torch.equal(sel.counts, counts)
    assert torch.equal(sel.num_forced, num_forced) and torch.equal(sel.num_forced, ref.num_forced)


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,stride,page", CPU_CASES[:3])
@pytest.mark.parametrize("groups", ["one", "per_kv"])
def test_select_blocks_paged_matches_reference(rng_seed, hq, hkv, d, ctx, q_len, block, stride, page, groups):
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.float32, q_scale=2.0)
    kv_cache, table = make_paged(k, v, page)
    params = ProxyAttnParams(gamma=0.8, stride=stride, block_size=block, num_groups=1 if groups == "one" else hkv,
                             min_budget_blocks=2, sink_blocks=1, local_blocks=2, min_sparse_len=0)
    scale = d**-0.5
    sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=scale, params=params)
    assert isinstance(sel, tuple) and len(sel) == 6
    _, ref = proxyattn_prefill_reference(q, ctx=ctx, params=params, scale=scale, kv_cache=kv_cache,
                                         block_table=table)
    check_against_reference(sel, ref, q, k, ctx, scale, params, *TOL[torch.float32])
    assert (sel.counts < ref.extents()[None]).any(), "a real sparse selection"


def test_prescribed_budget_fractions_replace_the_gamma_budget(rng_seed):
    """``budget_fraction``: each head keeps ``ceil(fraction * key blocks)`` (floored at the
    minimum, capped by max_density and the key blocks) instead of its gamma budget; the gamma
    counts are still computed; the kernels equal the reference given the same fractions."""
    hq, hkv, d, ctx, q_len, block = 4, 2, 16, 150, 70, 16
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.float32, q_scale=2.0)
    kv_cache, table = make_paged(k, v, 16)
    params = ProxyAttnParams(gamma=0.8, stride=4, block_size=block, num_groups=1, min_budget_blocks=3,
                             sink_blocks=1, local_blocks=1, min_sparse_len=0, max_density=0.8)
    geo = ChunkGeometry(ctx, q_len, block)  # 14 key blocks
    cap = params.budget_cap_blocks(geo)
    fraction = torch.tensor([0.05, 0.3, 0.5, 2.0])  # below the minimum, two free, above every block
    expected = torch.tensor([3, math.ceil(0.3 * 14), 7, min(cap, 14)], dtype=torch.int32)
    assert torch.equal(fraction_budgets(fraction, 14, 3, cap), expected)
    scale = d**-0.5
    sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=scale, params=params, budget_fraction=fraction)
    free = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=scale, params=params)
    assert torch.equal(sel.budget, expected) and not torch.equal(free.budget, expected)
    assert torch.equal(sel.gamma_counts, free.gamma_counts)
    _, ref = proxyattn_prefill_reference(q, ctx=ctx, params=params, scale=scale, kv_cache=kv_cache,
                                         block_table=table, budget_fraction=fraction)
    assert torch.equal(ref.budget, expected)
    assert torch.equal(sel.ranking, ref.ranking) and torch.equal(sel.counts, ref.counts)
    assert (sel.counts[0] < sel.counts[2]).any(), "heads with unequal budgets compute unequal blocks"


def test_short_sequence_budget_is_every_block(rng_seed):
    q, k, v = make_chunk(4, 2, 16, 100, 60, torch.float32)
    kv_cache, table = make_paged(k, v, 16)
    params = ProxyAttnParams(gamma=0.3, block_size=16, min_budget_blocks=1, min_sparse_len=161)
    sel = select_blocks_paged(q, kv_cache, table, ctx=100, scale=0.25, params=params)
    _, ref = proxyattn_prefill_reference(q, k, v, ctx=100, params=params, scale=0.25)
    assert ref.dense_reason == "short"
    check_against_reference(sel, ref, q, k, 100, 0.25, params, *TOL[torch.float32])
    assert (sel.budget == 10).all() and torch.equal(sel.counts, ref.counts)
    assert (sel.gamma_counts < 10).any()


def test_invalid_inputs_raise_clear_errors():
    q, k, v = make_chunk(4, 2, 16, 10, 20, torch.float32)
    kv_cache, table = make_paged(k, v, 16)
    kw = dict(ctx=10, scale=0.25, num_groups=1, stride=4, block_size=16)
    with pytest.raises(ValueError, match="dtype"):
        proxy_block_scores_paged(q.half(), kv_cache, table, **kw)
    with pytest.raises(ValueError, match="int32"):
        proxy_block_scores_paged(q, kv_cache, table.long(), **kw)
    with pytest.raises(ValueError, match="block_table covers"):
        proxy_block_scores_paged(q, kv_cache, table[:1], **kw)
    with pytest.raises(ValueError, match="num_groups"):
        proxy_block_scores_paged(q, kv_cache, table, **{**kw, "num_groups": 3})
    with pytest.raises(ValueError, match="head_dim"):
        proxy_block_scores_paged(q[..., :8], kv_cache[..., :16], table, **kw)
    with pytest.raises(ValueError, match="2 \\* head_dim"):
        last_block_mass_paged(q, kv_cache[..., :24], table, ctx=10, scale=0.25, block_size=16)
    with pytest.raises(ValueError, match="block_size"):
        last_block_mass_paged(q, kv_cache, table, ctx=10, scale=0.25, block_size=24)
    with pytest.raises(ValueError, match="out must be"):
        last_block_mass_paged(q, kv_cache, table, ctx=10, scale=0.25, block_size=16, out=torch.empty(4, 3))
    geo = ChunkGeometry(10, 20, 16)
    scores = torch.zeros(1, geo.num_q_blocks, geo.num_k_blocks)
    with pytest.raises(ValueError, match="does not match"):
        select_blocks(scores[:, :, :1], torch.ones(4, dtype=torch.int32), 10, 20, 16, 1, 1)
    with pytest.raises(ValueError, match="budget"):
        select_blocks(scores, torch.ones(4), 10, 20, 16, 1, 1)


# ------------------------------------------------------------------------------------------
# GPU: realistic sizes in bf16 (skipped without CUDA)
# ------------------------------------------------------------------------------------------

GPU_CASES = [(1, 16), (1, 128), (8, 128)]  # (groups, page_size)


@pytest.fixture
def exact_fp32_matmul():
    """The naive oracle's fp32 einsums must not run in TF32."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("groups,page", GPU_CASES)
def test_gpu_realistic_bf16(rng_seed, exact_fp32_matmul, groups, page):
    hq, hkv, d, ctx, q_len = 32, 8, 128, 32768 + 37, 4096
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.bfloat16, q_scale=2.0)
    kv_cache, table = make_paged(k, v, page)
    params = ProxyAttnParams(gamma=0.9, stride=4, block_size=128, num_groups=groups, min_budget_blocks=16,
                             sink_blocks=1, local_blocks=1, min_sparse_len=8192)
    scale = d**-0.5
    sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=scale, params=params)
    torch.cuda.synchronize()

    expected_scores = proxy_block_scores(q, k, ctx, scale, groups, 4, 128)
    assert_scores_close(sel.scores, expected_scores, rtol=5e-2, atol=1e-6)
    mass = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=scale, block_size=128)
    expected_mass = last_block_mass(q, k, ctx, scale, 128)
    torch.testing.assert_close(mass, expected_mass, rtol=2e-3, atol=1e-6)
    counts = gamma_block_counts(mass, params.gamma)
    assert torch.equal(sel.gamma_counts, counts)
    naive_counts = gamma_block_counts(expected_mass, params.gamma)
    assert (sel.gamma_counts - naive_counts).abs().max() <= 2
    ranking, counts, num_forced = select_naive.select_blocks(
        sel.scores, sel.budget, ctx, q_len, 128, params.sink_blocks, params.local_blocks)
    assert torch.equal(sel.ranking, ranking) and torch.equal(sel.counts, counts)
    assert torch.equal(sel.num_forced, num_forced)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,page", [(32, 8, 128, 16), (32, 8, 128, 128), (14, 2, 64, 128)])
def test_gpu_budget_from_fa3_tail_lse(rng_seed, hq, hkv, d, page):
    """The backend's flow with FlashAttention: the dense tail (rows holding the last 128 queries)
    through vLLM's FA3 first, its LSE of the budget rows into the one-pass mass. Equal to the
    two-pass mass (and so the same budgets) in bf16 at a long, unaligned chunk."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fa = pytest.importorskip("vllm.vllm_flash_attn")
    ctx, q_len, block = 32768 + 37, 4096 + 5, 128
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.bfloat16, q_scale=2.0)
    kv_cache, table = make_paged(k, v, page)
    del k, v
    geo = ChunkGeometry(ctx, q_len, block)
    tail = q_len - geo.row_token_start(geo.first_tail_row(128))
    assert tail > 128  # the chunk's last row is partial: the tail spans two rows
    key_cache, value_cache = kv_cache.transpose(1, 2).split(d, dim=-1)
    i32 = dict(dtype=torch.int32, device="cuda")
    _, lse = fa.flash_attn_varlen_func(
        q=q[q_len - tail:], k=key_cache, v=value_cache, out=torch.empty_like(q[q_len - tail:]),
        cu_seqlens_q=torch.tensor([0, tail], **i32), max_seqlen_q=tail,
        seqused_k=torch.tensor([geo.seq_len], **i32), max_seqlen_k=geo.seq_len, softmax_scale=d**-0.5,
        causal=True, block_table=table[None], fa_version=3, return_softmax_lse=True,
    )
    assert lse.shape == (hq, tail)
    row_lse = lse[:, tail - block:]
    mass = torch.full((hq, geo.num_k_blocks), float("nan"), device="cuda")
    last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=d**-0.5, block_size=block, row_lse=row_lse, out=mass)
    two_pass = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=d**-0.5, block_size=block)
    torch.testing.assert_close(mass, two_pass, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(mass.sum(-1), torch.ones(hq, device="cuda"), rtol=0, atol=1e-3)
    stable = ~near_gamma_tie(two_pass, 0.9, 1e-4)
    assert torch.equal(gamma_block_counts(mass, 0.9)[stable], gamma_block_counts(two_pass, 0.9)[stable])


@pytest.mark.gpu
def test_gpu_128k_chunk_runs_and_is_consistent(rng_seed, monkeypatch):
    """The performance-target shape (ctx=120K, q_len=8K): sanity and a printed timing (run with
    ``-s`` to see it; the budget is about 1.4 ms on an H200)."""
    monkeypatch.undo()  # time the real allocations, not the NaN-filled workspaces
    hq, hkv, d, ctx, q_len, page = 32, 8, 128, 122880, 8192, 16
    q, k, v = make_chunk(hq, hkv, d, ctx, q_len, torch.bfloat16)
    kv_cache, table = make_paged(k, v, page)
    del k, v
    params = ProxyAttnParams(gamma=0.95, stride=4, block_size=128, num_groups=1)
    scale = d**-0.5
    run = lambda: select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=scale, params=params)  # noqa: E731
    for _ in range(3):
        sel = run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        sel = run()
    end.record()
    torch.cuda.synchronize()
    print(f"select_blocks_paged 128K chunk: {start.elapsed_time(end) / 10:.3f} ms")
    geo = ChunkGeometry(ctx, q_len, 128)
    assert sel.scores.shape == (1, geo.num_q_blocks, geo.num_k_blocks)
    extents = geo.first_q_block + 1 + torch.arange(geo.num_q_blocks, device=DEVICE)
    assert torch.equal(torch.isfinite(sel.scores[0]).sum(-1), extents)  # exactly the causal blocks
    ranking, counts, num_forced = select_naive.select_blocks(sel.scores, sel.budget, ctx, q_len, 128, 1, 1)
    assert torch.equal(sel.ranking, ranking) and torch.equal(sel.counts, counts)
    assert ((sel.budget >= 16) & (sel.budget <= geo.num_k_blocks)).all()
    assert math.isfinite(float(sel.scores[torch.isfinite(sel.scores)].sum()))
