"""proxyattn_kernels/selection_stats.py against brute force, and the PROXYATTN_STATS collector through
``sparse_prefill`` (``proxyattn_vllm/sparse/triton.py``) on a paged cache (Triton interpreter on CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from proxyattn_kernels import ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.selection_stats import (
    causal_blocks,
    dense_tail_rows,
    kept_attention_mass,
    kept_mass_per_query,
    query_rows,
    sample_heads,
    selection_density,
)

HQ, HKV, D, BLOCK = 4, 2, 16, 16
SCALE = D**-0.5


def _spread(q_len, num_queries):
    """Chunk offsets of ``num_queries`` queries spread evenly over ``q_len`` (first and last
    included; all of them when there are no more), rounded down."""
    if q_len <= num_queries:
        return list(range(q_len))
    return [int(i * (q_len - 1) / (num_queries - 1)) for i in range(num_queries)]


def _brute_kept(q, k, ranking, counts, ctx, block, heads, num_queries=None, queries=None):
    """Loops over heads, queries and keys: the definition of the kept mass, averaged over the
    chunk offsets ``queries`` (default: ``num_queries`` spread evenly over the chunk)."""
    q_len, hq, _ = q.shape
    queries = _spread(q_len, num_queries) if queries is None else list(queries)
    out = []
    for h in heads:
        g, kv = h // (hq // ranking.shape[0]), h // (hq // k.shape[1])
        total = 0.0
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


def test_query_rows_spread_over_the_whole_chunk():
    # 1000 queries, 128 samples: first and last query, strictly increasing, gaps 7 or 8
    positions, rows = query_rows(ctx=300, q_len=1000, block_size=64, num_queries=128)
    assert positions.tolist() == [300 + i for i in _spread(1000, 128)]
    assert len(positions) == 128 and int(positions[0]) == 300 and int(positions[-1]) == 1299
    assert set(positions.diff().tolist()) == {7, 8}
    assert rows.tolist() == [int(p) // 64 - 300 // 64 for p in positions]
    assert int(rows[0]) == 0 and int(rows[-1]) == (1299 // 64) - (300 // 64)
    # no more queries than samples: every query
    positions, rows = query_rows(ctx=10, q_len=50, block_size=16, num_queries=128)
    assert positions.tolist() == list(range(10, 60)) and rows.tolist() == [p // 16 for p in range(10, 60)]
    assert query_rows(ctx=10, q_len=5, block_size=16, num_queries=5)[0].tolist() == [10, 11, 12, 13, 14]
    # two samples: the chunk's ends; one: its last query
    assert query_rows(ctx=0, q_len=70, block_size=16, num_queries=2)[0].tolist() == [0, 69]
    assert query_rows(ctx=0, q_len=70, block_size=16, num_queries=1)[0].tolist() == [69]
    with pytest.raises(ValueError, match="num_queries"):
        query_rows(ctx=0, q_len=70, block_size=16, num_queries=0)


def test_kept_mass_is_the_whole_chunk_not_its_dense_last_row():
    """Uniform attention (q = k = 0); 4 rows of 16 queries. Rows 0..2 compute only their diagonal
    block, the last row (a dense tail) every block. Sampling the chunk's last 16 queries (the old
    rule) measured only the dense row: 1.0. The whole-chunk average is far lower."""
    q_len = 64
    q, k = torch.zeros(q_len, 1, D), torch.zeros(q_len, 1, D)
    ranking = torch.tensor([[[r] + [b for b in range(4) if b != r] for r in range(4)]], dtype=torch.int32)
    counts = torch.tensor([[1, 1, 1, 4]], dtype=torch.int32)
    kept = kept_attention_mass(q, k, ranking, counts, ctx=0, scale=1.0, block_size=BLOCK,
                               heads=[0], num_queries=16)

    def kept_of(p):  # query p sees p + 1 keys; rows 0..2 keep those of their own block
        r = p // BLOCK
        return 1.0 if r == 3 else (p - BLOCK * r + 1) / (p + 1)

    offsets = [i * 63 // 15 for i in range(16)]  # 0, 4, 8, ..., 63
    assert offsets[0] == 0 and offsets[-1] == 63
    expected = sum(kept_of(p) for p in offsets) / 16
    torch.testing.assert_close(kept, torch.tensor([expected]))
    assert float(kept) < 0.7
    # the old sampling: the chunk's last 16 queries, all in the dense row
    old = _brute_kept(q, k, ranking, counts, 0, BLOCK, [0], queries=range(q_len - 16, q_len))
    assert float(old) == pytest.approx(1.0)
    # per query: the dense row's samples keep 1, the others less
    per_query = kept_mass_per_query(q, k, ranking, counts, ctx=0, scale=1.0, block_size=BLOCK,
                                    heads=[0], num_queries=16)
    torch.testing.assert_close(per_query, torch.tensor([[kept_of(p) for p in offsets]]))
    assert dense_tail_rows(counts, 0, q_len, BLOCK).tolist() == [False, False, False, True]


def test_kept_mass_with_a_dense_tail_matches_a_direct_computation(rng_seed):
    """A reference selection with ``dense_tail_tokens``: the kept mass equals the mean over the
    evenly spaced queries computed directly in torch, and is below the tail's 1.0."""
    ctx, q_len, tail, n = 48, 200, 32, 24
    q = torch.randn(q_len, HQ, D)
    k = torch.randn(ctx + q_len, HKV, D) * 2
    params = ProxyAttnParams(gamma=0.6, stride=4, block_size=BLOCK, num_groups=1, min_budget_blocks=1,
                             min_sparse_len=0, max_density=0.3, dense_tail_tokens=tail)
    _, sel = proxyattn_prefill_reference(q, k, k, ctx=ctx, params=params, scale=SCALE)
    heads = list(range(HQ))
    kept = kept_attention_mass(q, k, sel.ranking, sel.counts, ctx=ctx, scale=SCALE, block_size=BLOCK,
                               heads=heads, num_queries=n)

    # direct: dense softmax of every query, masked to the selected blocks, at the spread offsets
    offsets = torch.tensor(_spread(q_len, n))
    pos = ctx + offsets
    rows = pos // BLOCK - ctx // BLOCK
    key_pos = torch.arange(ctx + q_len)
    expected = []
    for h in heads:
        logits = (q[offsets, h].double() @ k[:, h // (HQ // HKV)].double().T) * SCALE
        probs = torch.softmax(logits.masked_fill(key_pos[None] > pos[:, None], float("-inf")), dim=-1)
        chosen = torch.zeros(len(offsets), ctx + q_len, dtype=torch.bool)
        for j, r in enumerate(rows.tolist()):
            for b in sel.ranking[0, r, : sel.counts[h, r]].tolist():
                chosen[j, b * BLOCK : (b + 1) * BLOCK] = True
        expected.append(float((probs * chosen).sum(-1).mean()))
    torch.testing.assert_close(kept.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)

    # the tail rows are dense; the last queries (the old sampling) keep everything
    tail_rows = dense_tail_rows(sel.counts, ctx, q_len, BLOCK)
    first_tail = sel.geometry.first_tail_row(tail)
    assert tail_rows.tolist() == [r >= first_tail for r in range(sel.geometry.num_q_blocks)]
    old = _brute_kept(q, k, sel.ranking, sel.counts, ctx, BLOCK, heads, queries=range(q_len - tail, q_len))
    torch.testing.assert_close(old, torch.ones(HQ, dtype=torch.float64), atol=1e-6, rtol=0)
    assert float(kept.mean()) < 0.99


def test_dense_tail_rows_is_the_trailing_fully_dense_run():
    # ctx 32, 4 rows of 16: extents 3, 4, 5, 6
    counts = torch.tensor([[3, 2, 5, 6], [3, 4, 5, 6]])  # row 0 dense, row 1 sparse (head 0), 2..3 dense
    assert dense_tail_rows(counts, 32, 64, 16).tolist() == [False, False, True, True]
    counts[0, 3] = 5  # the last row sparse for one head: no tail
    assert dense_tail_rows(counts, 32, 64, 16).tolist() == [False] * 4
    assert dense_tail_rows(torch.tensor([[3, 4, 5, 6]]), 32, 64, 16).tolist() == [True] * 4


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
    only block 1 keeps 16/32 of the mass; one keeping blocks 1 and 0 keeps all of it. Two
    queries: the chunk's first (position 0, its one key in block 0, kept by both heads) too."""
    q = torch.zeros(32, 2, D)
    k = torch.zeros(32, 1, D)
    ranking = torch.tensor([[[0, -1], [1, 0]]], dtype=torch.int32)  # [G=1, R=2, Kb=2]
    counts = torch.tensor([[1, 1], [1, 2]], dtype=torch.int32)  # head 0: 1 block, head 1: 2
    kept = kept_attention_mass(q, k, ranking, counts, ctx=0, scale=1.0, block_size=BLOCK,
                               heads=[0, 1], num_queries=1)
    torch.testing.assert_close(kept, torch.tensor([0.5, 1.0]))
    kept = kept_attention_mass(q, k, ranking, counts, ctx=0, scale=1.0, block_size=BLOCK,
                               heads=[0, 1], num_queries=2)
    torch.testing.assert_close(kept, torch.tensor([0.75, 1.0]))
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
        (dict(gamma=0.5, min_budget_blocks=1, max_density=0.3, dense_tail_tokens=16), False),
    ],
    ids=["full-density", "sparse", "sparse-dense-tail"],
)
def test_collector_writes_sane_lines(collector, params, full):
    from proxyattn_vllm.sparse.triton import sparse_prefill

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
            assert line["kept_mass_sparse_rows"] is None  # every row dense: no sparse row
        elif line["kept_mass_sparse_rows"] is not None:
            # the tail keeps everything, so leaving it out can only lower the mean
            assert 0.0 <= line["kept_mass_sparse_rows"] <= line["kept_mass"] + 1e-6
    if not full:
        assert any(line["density"] < 1.0 for line in lines)
        assert any(line["kept_mass_sparse_rows"] is not None for line in lines)
        if p.dense_tail_tokens:
            assert any(x["kept_mass_sparse_rows"] is not None and x["kept_mass_sparse_rows"] < x["kept_mass"] - 1e-4
                       for x in lines)

    (row,) = stats.summarize(lines)
    assert row["layer"] == 5 and row["chunks"] == 2
    # selected / causal blocks of both chunks: each chunk's density weighs its causal blocks
    assert row["density"] == pytest.approx((6 * lines[0]["density"] + 15 * lines[1]["density"]) / 21)
    assert row["kept_mass"] == pytest.approx((lines[0]["kept_mass"] + lines[1]["kept_mass"]) / 2)
    sparse_rows = [x["kept_mass_sparse_rows"] for x in lines if x["kept_mass_sparse_rows"] is not None]
    assert row["kept_mass_sparse_rows"] == (pytest.approx(sum(sparse_rows) / len(sparse_rows)) if sparse_rows else None)


def test_collector_off_writes_nothing_and_density_only_mode(collector):
    from proxyattn_vllm.sparse.triton import sparse_prefill

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
    assert line["kept_mass_sparse_rows"] is None
    assert stats.overall([line])["density"] == line["density"]
