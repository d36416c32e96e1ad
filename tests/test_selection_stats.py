"""kernels/selection_stats.py against brute force, and the PROXYATTN_STATS collector through
``impl.sparse_prefill`` on a paged cache (Triton interpreter on CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from proxyattn_kernels import ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.selection_stats import (
    causal_blocks,
    kept_attention_mass,
    sample_heads,
    selection_density,
)

HQ, HKV, D, BLOCK = 4, 2, 16, 16
SCALE = D**-0.5


def _brute_kept(q, k, ranking, counts, ctx, block, heads, num_queries):
    """Loops over heads, queries and keys: the definition of the kept mass."""
    q_len, hq, _ = q.shape
    out = []
    for h in heads:
        g, kv = h // (hq // ranking.shape[0]), h // (hq // k.shape[1])
        total = 0.0
        queries = range(max(0, q_len - num_queries), q_len)
        for i in queries:
            p = ctx + i
            logits = torch.stack([(q[i, h].double() @ k[j, kv].double()) * SCALE for j in range(p + 1)])
            probs = torch.softmax(logits, dim=0)
            row = p // block - ctx // block
            chosen = set(ranking[g, row, : counts[h, row]].tolist())
            total += float(sum(probs[j] for j in range(p + 1) if j // block in chosen))
        out.append(total / len(queries))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("ctx,q_len", [(0, 70), (37, 50), (64, 16)], ids=["first-chunk", "mid-block", "aligned"])
def test_density_and_kept_mass_match_brute_force(ctx, q_len, rng_seed):
    q = torch.randn(q_len, HQ, D)
    k = torch.randn(ctx + q_len, HKV, D) * 2
    v = torch.randn(ctx + q_len, HKV, D)
    params = ProxyAttnParams(gamma=0.6, stride=4, block_size=BLOCK, num_groups=1,
                             min_budget_blocks=1, min_sparse_len=0, max_density=0.5)
    _, sel = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params, scale=SCALE)

    assert float(selection_density(sel.counts, ctx, q_len, BLOCK)) == pytest.approx(sel.density)
    assert causal_blocks(ctx, q_len, BLOCK) == int(sel.extents().sum())

    heads = [0, 3]
    kept = kept_attention_mass(q, k, sel.ranking, sel.counts, ctx=ctx, scale=SCALE,
                               block_size=BLOCK, heads=heads, num_queries=20)
    expected = _brute_kept(q, k, sel.ranking, sel.counts, ctx, BLOCK, heads, 20)
    torch.testing.assert_close(kept.double(), expected, atol=1e-5, rtol=0)


def test_full_selection_keeps_all_mass_and_is_dense():
    ctx, q_len = 40, 60
    q, k = torch.randn(q_len, HQ, D), torch.randn(ctx + q_len, HKV, D)
    params = ProxyAttnParams(gamma=1.0, block_size=BLOCK, min_budget_blocks=1000, min_sparse_len=0)
    _, sel = proxyattn_prefill_reference(q, k, k, ctx=ctx, params=params, scale=SCALE)
    assert float(selection_density(sel.counts, ctx, q_len, BLOCK)) == 1.0
    kept = kept_attention_mass(q, k, sel.ranking, sel.counts, ctx=ctx, scale=SCALE,
                               block_size=BLOCK, heads=list(range(HQ)))
    torch.testing.assert_close(kept, torch.ones(HQ))


def test_hand_built_selection_exact_value():
    """One query at position 31 (block 1), uniform attention over its 32 keys: a head keeping
    only block 1 keeps 16/32 of the mass; one keeping blocks 1 and 0 keeps all of it."""
    q = torch.zeros(32, 2, D)
    k = torch.zeros(32, 1, D)
    ranking = torch.tensor([[[0, -1], [1, 0]]], dtype=torch.int32)  # [G=1, R=2, Kb=2]
    counts = torch.tensor([[1, 1], [1, 2]], dtype=torch.int32)  # head 0: 1 block, head 1: 2
    kept = kept_attention_mass(q, k, ranking, counts, ctx=0, scale=1.0, block_size=BLOCK,
                               heads=[0, 1], num_queries=1)
    torch.testing.assert_close(kept, torch.tensor([0.5, 1.0]))
    assert float(selection_density(counts, 0, 32, BLOCK)) == pytest.approx((1 + 1 + 1 + 2) / (2 * 3))


def test_sample_heads_evenly_spaced():
    assert sample_heads(32, 4) == [0, 8, 16, 24]
    assert sample_heads(14, 4) == [0, 3, 7, 10]
    assert sample_heads(3, 8) == [0, 1, 2]


# ------------------------------------------------------------------------------------------
# The collector (needs vLLM: impl.py is the glue)


@pytest.fixture
def collector(tmp_path):
    pytest.importorskip("vllm")
    from proxyattn_vllm import stats

    path = tmp_path / "stats.jsonl"
    yield stats, path
    stats.configure(None)


def _chunk(ctx, q_len, seed=0):
    from tests._paged import make_paged

    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(q_len, HQ, 32, generator=gen)
    k = torch.randn(ctx + q_len, HKV, 32, generator=gen) * 2
    v = torch.randn(ctx + q_len, HKV, 32, generator=gen)
    kv_cache, table = make_paged(k, v, page_size=16)
    return q, kv_cache, table


@pytest.mark.parametrize(
    "params,full",
    [
        (dict(gamma=1.0, min_budget_blocks=1000), True),
        (dict(gamma=0.5, min_budget_blocks=1, max_density=0.3), False),
    ],
    ids=["full-density", "sparse"],
)
def test_collector_writes_sane_lines(collector, params, full):
    from proxyattn_vllm.impl import sparse_prefill

    stats, path = collector
    stats.configure(path, mass_heads=2)
    p = ProxyAttnParams(stride=4, block_size=16, min_sparse_len=0, **params)
    for ctx, q_len in [(0, 48), (48, 40)]:
        q, kv_cache, table = _chunk(ctx, q_len)
        out = torch.empty_like(q)
        sparse_prefill(q, kv_cache, table, out, ctx, 32**-0.5, p, layer_index=5)
    assert not path.exists() or not path.read_text()  # buffered until flush
    stats.flush()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(x["layer"], x["ctx"], x["q_len"]) for x in lines] == [(5, 0, 48), (5, 48, 40)]
    # blocks of 16: rows 0..2 see 1+2+3 blocks; rows 3..5 (ctx 48) see 4+5+6
    assert [x["causal_blocks"] for x in lines] == [6, 15]
    for line in lines:
        assert 0.0 < line["density"] <= 1.0 and 0.0 <= line["kept_mass"] <= 1.0
        if full:
            assert line["density"] == 1.0 and line["kept_mass"] == pytest.approx(1.0, abs=1e-5)
    if not full:
        assert any(line["density"] < 1.0 for line in lines)

    (row,) = stats.summarize(lines)
    assert row["layer"] == 5 and row["chunks"] == 2
    # selected / causal blocks of both chunks: each chunk's density weighs its causal blocks
    assert row["density"] == pytest.approx((6 * lines[0]["density"] + 15 * lines[1]["density"]) / 21)


def test_collector_off_writes_nothing_and_density_only_mode(collector):
    from proxyattn_vllm.impl import sparse_prefill

    stats, path = collector
    q, kv_cache, table = _chunk(0, 32)
    p = ProxyAttnParams(stride=4, block_size=16, min_sparse_len=0)
    assert not stats.ENABLED
    sparse_prefill(q, kv_cache, table, torch.empty_like(q), 0, 32**-0.5, p)
    stats.configure(path, mass_heads=0)
    sparse_prefill(q, kv_cache, table, torch.empty_like(q), 0, 32**-0.5, p)
    stats.configure(None)  # flushes
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["layer"] is None and line["kept_mass"] is None and 0.0 < line["density"] <= 1.0
    assert stats.overall([line])["density"] == line["density"]
