"""The torch reference of ProxyAttn prefill (proxyattn_kernels/reference.py and the naive ops)."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from proxyattn_kernels import ChunkGeometry, ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.budget.naive import gamma_block_counts, last_block_mass
from proxyattn_kernels.proxy_scores.naive import proxy_block_scores
from proxyattn_kernels.reference import dense_causal_attention, gather_paged_kv

from tests._paged import make_paged

# (Hq, Hkv, D, ctx, q_len, block_size): GQA 1:1 .. 7:1, chunk starts and ends off block boundaries.
SHAPES = [
    (4, 2, 32, 0, 200, 32),
    (6, 2, 16, 77, 150, 32),
    (8, 8, 64, 130, 61, 64),
    (7, 1, 32, 45, 300, 16),
    (4, 4, 16, 250, 5, 32),
    (14, 2, 64, 1000, 129, 128),
    (4, 2, 32, 95, 70, 32),  # starts on a block's last token
]


def full_params(block_size: int, **overrides) -> ProxyAttnParams:
    """Sparse path forced on (min_sparse_len=0) with a budget that keeps every block."""
    base = dict(gamma=1.0, stride=4, block_size=block_size, num_groups=1,
                min_budget_blocks=1, min_sparse_len=0)
    base.update(overrides)
    return ProxyAttnParams(**base)


def random_chunk(hq, hkv, d, ctx, q_len, dtype=torch.float32):
    q = torch.randn(q_len, hq, d, dtype=dtype)
    k = torch.randn(ctx + q_len, hkv, d, dtype=dtype)
    v = torch.randn(ctx + q_len, hkv, d, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block", SHAPES)
@pytest.mark.parametrize("groups", ["one", "per_kv"])
def test_full_budget_equals_dense(rng_seed, hq, hkv, d, ctx, q_len, block, groups):
    q, k, v = random_chunk(hq, hkv, d, ctx, q_len)
    params = full_params(block, num_groups=1 if groups == "one" else hkv)
    out, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    ref = dense_causal_attention(q, k, v, ctx, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert sel.density == 1.0
    assert torch.equal(sel.counts, sel.extents()[None].expand_as(sel.counts).to(torch.int32))


def test_dense_oracle_matches_sdpa(rng_seed):
    q, k, v = random_chunk(8, 2, 32, 0, 100)
    ref = dense_causal_attention(q, k, v, 0, 32**-0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(4, 1).transpose(0, 1),
        v.repeat_interleave(4, 1).transpose(0, 1), is_causal=True,
    ).transpose(0, 1)
    torch.testing.assert_close(ref, sdpa, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("page_size", [16, 32])
def test_paged_cache_equals_contiguous(rng_seed, page_size):
    hq, hkv, d, ctx, q_len, block = 8, 2, 32, 290, 200, 32
    q, k, v = random_chunk(hq, hkv, d, ctx, q_len)
    kv_cache, table = make_paged(k, v, page_size)
    k2, v2 = gather_paged_kv(kv_cache, table, ctx + q_len)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    params = ProxyAttnParams(gamma=0.8, block_size=block, num_groups=2, min_budget_blocks=2,
                             min_sparse_len=0)
    out_c, sel_c = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    out_p, sel_p = proxyattn_prefill_reference(q, ctx=ctx, params=params, kv_cache=kv_cache,
                                               block_table=table)
    assert sel_c.density < 1.0  # a real sparse selection, not a dense one
    assert torch.equal(sel_c.ranking, sel_p.ranking) and torch.equal(sel_c.counts, sel_p.counts)
    torch.testing.assert_close(out_p, out_c, rtol=0, atol=0)


@pytest.mark.parametrize("cuts", [(97, 200), (128, 256), (1, 2, 250)])
def test_chunked_prompt_equals_single_chunk_at_full_selection(rng_seed, cuts):
    hq, hkv, d, seq_len, block = 6, 3, 32, 300, 32
    q, k, v = random_chunk(hq, hkv, d, 0, seq_len)
    params = full_params(block, num_groups=3)
    whole, _ = proxyattn_prefill_reference(q, k, v, ctx=0, params=params)
    bounds = [0, *cuts, seq_len]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        out, _ = proxyattn_prefill_reference(q[start:end], k[:end], v[:end], ctx=start, params=params)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces), whole, rtol=1e-5, atol=1e-5)


def test_planted_needle_is_selected_by_every_head(rng_seed):
    hq, hkv, d, ctx, q_len, block = 8, 2, 32, 256, 256, 16
    q, k, v = random_chunk(hq, hkv, d, ctx, q_len)
    q, k = 0.3 * q, 0.3 * k
    u = torch.nn.functional.normalize(torch.randn(d), dim=0)
    needle_block = 2
    q += 5.0 * u
    k[needle_block * block:(needle_block + 1) * block] += 8.0 * u
    params = ProxyAttnParams(gamma=0.5, block_size=block, num_groups=1, min_budget_blocks=2,
                             sink_blocks=0, local_blocks=1, min_sparse_len=0)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    mask = sel.block_mask()  # [Hq, R, Kb]
    assert sel.density < 0.5
    assert mask[:, :, needle_block].all(), "every head and row must keep the needle block"
    # The needle is the top-ranked block after the one forced (diagonal) block.
    assert (sel.ranking[:, :, 1] == needle_block).all()


def test_budget_grows_with_gamma(rng_seed):
    hq, hkv, d, ctx, q_len, block = 8, 2, 32, 400, 112, 16
    q, k, _ = random_chunk(hq, hkv, d, ctx, q_len)
    k[:, :, :] *= torch.linspace(0.2, 2.0, ctx + q_len)[:, None, None]  # uneven attention
    mass = last_block_mass(q, k, ctx, d**-0.5, block)
    assert torch.allclose(mass.sum(-1), torch.ones(hq), atol=1e-5)
    gammas = [0.3, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0]
    counts = torch.stack([gamma_block_counts(mass, g) for g in gammas])  # [len(gammas), Hq]
    assert (counts[1:] >= counts[:-1]).all()
    assert (counts[-1] > counts[0]).all()
    assert (counts[-1] == mass.shape[-1]).all()
    # Each count is the fewest blocks that cover gamma.
    top = mass.sort(-1, descending=True).values.cumsum(-1)
    for g, c in zip(gammas[:-1], counts[:-1]):
        covered = top.gather(-1, (c.long() - 1)[:, None]).squeeze(-1)
        assert (covered >= g - 1e-6).all()
        fewer = top.gather(-1, (c.long() - 2).clamp(min=0)[:, None]).squeeze(-1)
        assert ((c == 1) | (fewer < g)).all()


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block", SHAPES)
def test_selection_has_forced_blocks_and_respects_causality(rng_seed, hq, hkv, d, ctx, q_len, block):
    q, k, v = random_chunk(hq, hkv, d, ctx, q_len)
    params = ProxyAttnParams(gamma=0.6, block_size=block, num_groups=hkv, min_budget_blocks=1,
                             sink_blocks=2, local_blocks=2, min_sparse_len=0)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params)
    geo = sel.geometry
    mask = sel.block_mask()
    extents = sel.extents()
    for row in range(geo.num_q_blocks):
        qb = geo.first_q_block + row
        assert not mask[:, row, qb + 1:].any(), "selected a block past the causal frontier"
        forced = {qb, max(qb - 1, 0), 0, min(1, qb)}
        for kb in forced:
            assert mask[:, row, kb].all(), f"forced block {kb} missing in row {row}"
        valid = sel.ranking[:, row, : extents[row]]
        assert (valid >= 0).all() and (sel.ranking[:, row, extents[row]:] == -1).all()
        for g in range(valid.shape[0]):
            assert sorted(valid[g].tolist()) == list(range(extents[row])), "ranking is a permutation"
        assert (sel.num_forced[row] == len(forced)).item()
    assert ((sel.counts >= sel.num_forced.clamp(max=extents)) & (sel.counts <= extents)).all()
    assert torch.equal(mask.sum(-1).to(torch.int32), sel.counts)


def test_budget_limits_min_and_max_density(rng_seed):
    hq, hkv, d, ctx, q_len, block = 4, 2, 16, 1000, 200, 16  # 75 key blocks
    q, k, v = random_chunk(hq, hkv, d, ctx, q_len)
    base = dict(block_size=block, num_groups=1, min_sparse_len=0, sink_blocks=0, local_blocks=1)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=ProxyAttnParams(
        gamma=0.05, min_budget_blocks=9, **base))
    assert (sel.gamma_counts < 9).all() and (sel.budget == 9).all()
    assert (sel.counts == torch.minimum(torch.tensor(9), sel.extents())).all()
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=ProxyAttnParams(
        gamma=1.0, min_budget_blocks=1, max_density=0.1, **base))
    # 13 rows of extent 63..75 (897 causal blocks, 89.7 allowed): 6 per row is 78, 7 would be 91.
    assert (sel.budget == 6).all()
    assert 0.08 < sel.density <= 0.1


@pytest.mark.parametrize("seed", range(12))
def test_max_density_caps_the_whole_chunk_and_is_the_largest_such_budget(seed):
    """``max_density`` bounds what the chunk computes, forced blocks and dense tail included
    (with every head at the cap), and the cap is the largest budget that does: one block more
    per row would exceed it (unless the forced blocks and the tail alone already do)."""
    from proxyattn_kernels.params import density_budget_cap
    from proxyattn_kernels.select.naive import select_blocks

    gen = torch.Generator().manual_seed(seed)
    pick = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    block = (16, 32)[pick(0, 1)]
    ctx, q_len = pick(0, 3000), pick(40, 700)
    sink, local, tail = pick(0, 2), pick(1, 3), (0, 16, 128)[pick(0, 2)]
    max_density = (0.05, 0.1, 0.3, 0.7, 1.0)[pick(0, 4)]
    geo = ChunkGeometry(ctx, q_len, block)
    causal = sum(geo.row_extent(r) for r in range(geo.num_q_blocks))
    scores = torch.randn(1, geo.num_q_blocks, geo.num_k_blocks, generator=gen)

    def density(budget: int) -> float:
        _, counts, _ = select_blocks(scores, torch.full((2,), budget, dtype=torch.int32), ctx, q_len, block,
                                     sink, local, tail)
        return float(counts[0].sum()) / causal

    cap = density_budget_cap(ctx, q_len, block, max_density, sink, local, tail)
    assert 1 <= cap <= geo.num_k_blocks
    if density(1) <= max_density:
        assert density(cap) <= max_density + 1e-9
    else:
        assert cap == 1  # the forced blocks and the tail alone exceed the cap
    if cap < geo.num_k_blocks:
        assert density(cap + 1) > max_density
    assert ProxyAttnParams(max_density=max_density, block_size=block, sink_blocks=sink, local_blocks=local,
                           dense_tail_tokens=tail).budget_cap_blocks(geo) == cap
    assert ProxyAttnParams(block_size=block).budget_cap_blocks(geo) is None


def test_short_sequences_run_dense(rng_seed):
    q, k, v = random_chunk(4, 2, 32, 100, 60)
    params = ProxyAttnParams(gamma=0.3, block_size=16, min_budget_blocks=1, min_sparse_len=161)
    out, sel = proxyattn_prefill_reference(q, k, v, ctx=100, params=params)
    assert sel.dense_reason == "short" and sel.density == 1.0
    torch.testing.assert_close(out, dense_causal_attention(q, k, v, 100, 32**-0.5), rtol=1e-5, atol=1e-5)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=100, params=dataclasses.replace(params, min_sparse_len=160))
    assert sel.dense_reason is None and sel.density < 1.0


def test_row_without_strided_query_is_dense(rng_seed):
    # Chunk starts 2 tokens before a block boundary: its first row holds positions 46, 47 only,
    # neither a multiple of the stride, so that row has no estimate and must run dense.
    q, k, v = random_chunk(4, 2, 16, 46, 100)
    params = ProxyAttnParams(gamma=0.3, block_size=16, min_budget_blocks=1, sink_blocks=0,
                             min_sparse_len=0)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=46, params=params)
    assert torch.isinf(sel.scores[:, 0]).all()
    assert (sel.counts[:, 0] == 3).all()
    assert (sel.counts[:, 1:] < sel.extents()[1:]).any()


def test_proxy_scores_match_brute_force(rng_seed):
    hq, hkv, d, ctx, q_len, block, stride, groups = 4, 2, 8, 21, 40, 8, 2, 2
    q, k, _ = random_chunk(hq, hkv, d, ctx, q_len)
    scale = 0.3
    scores = proxy_block_scores(q, k, ctx, scale, groups, stride, block)
    geo = ChunkGeometry(ctx, q_len, block)
    expected = torch.full_like(scores, float("-inf"))
    for g in range(groups):
        qg = q[:, 2 * g:2 * g + 2].mean(1)  # 2 query heads per group
        kg = k[:, g]  # 1 KV head per group
        for i, pos in enumerate(range(ctx, ctx + q_len)):
            if pos % stride:
                continue
            keys = list(range(0, pos + 1, stride))
            p = torch.softmax(torch.stack([qg[i] @ kg[j] * scale for j in keys]), 0)
            row = pos // block - geo.first_q_block
            for j, prob in zip(keys, p):
                expected[g, row, j // block] = max(expected[g, row, j // block], prob)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


def test_geometry():
    geo = ChunkGeometry(ctx=130, q_len=200, block_size=64)
    assert (geo.seq_len, geo.first_q_block, geo.num_q_blocks, geo.num_k_blocks) == (330, 2, 4, 6)
    assert [geo.row_extent(r) for r in range(4)] == [3, 4, 5, 6]
    assert ChunkGeometry(ctx=0, q_len=1, block_size=64).num_q_blocks == 1
    edge = ChunkGeometry(ctx=63, q_len=2, block_size=64)  # starts on a block's last token
    assert (edge.first_q_block, edge.num_q_blocks, edge.num_k_blocks) == (0, 2, 2)


def test_forced_block_count_matches_the_selection():
    """``num_forced_blocks`` (host-side, for the density cap) counts what ``select_blocks`` forces."""
    from proxyattn_kernels.params import num_forced_blocks
    from proxyattn_kernels.select.naive import select_blocks

    for sink, local in itertools.product(range(4), range(1, 5)):
        geo = ChunkGeometry(0, 16 * 12, 16)
        scores = torch.zeros(1, geo.num_q_blocks, geo.num_k_blocks)
        _, _, num_forced = select_blocks(scores, torch.ones(1, dtype=torch.int32), 0, geo.q_len, 16, sink, local)
        expected = [num_forced_blocks(r, sink, local) for r in range(geo.num_q_blocks)]
        assert num_forced.tolist() == expected, (sink, local)
