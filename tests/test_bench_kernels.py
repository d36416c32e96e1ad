"""benchmarks/bench_kernels.py helpers on CPU (Triton interpreter): the composite paths it times
compute the selection exactly, so a timing never measures a wrong kernel."""
from __future__ import annotations

import time

import pytest
import torch

from benchmarks import bench_kernels
from proxyattn_kernels import ChunkGeometry
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention, selection_block_mask
from proxyattn_kernels.reference import dense_causal_attention, gather_paged_kv


def torch_fa3(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
              causal, block_table, fa_version, return_softmax_lse=False):
    """vLLM's flash_attn_varlen_func for one sequence (all that fa3_dense passes), in torch:
    the queries are the sequence's last ``len(q)`` tokens, causal; ``(out, lse [Hq, len(q)])``
    with ``return_softmax_lse``."""
    assert causal and fa_version == 3 and cu_seqlens_q.tolist() == [0, q.shape[0]] and block_table.shape[0] == 1
    seq_len = int(seqused_k[0])
    kv = torch.cat([k, v], dim=-1).transpose(1, 2)  # back to the logical [pages, Hkv, page, 2D] view
    keys, values = gather_paged_kv(kv, block_table[0], seq_len)
    out.copy_(dense_causal_attention(q, keys, values, seq_len - q.shape[0], softmax_scale))
    if not return_softmax_lse:
        return out
    keys = keys.float().repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
    logits = torch.einsum("qhd,khd->hqk", q.float(), keys) * softmax_scale
    q_pos = torch.arange(seq_len - q.shape[0], seq_len)
    causal_mask = torch.arange(seq_len)[None, None, :] > q_pos[None, :, None]
    return out, torch.logsumexp(logits.masked_fill(causal_mask, float("-inf")), dim=-1)


@pytest.mark.parametrize("ctx,q_len", [(37, 70), (0, 10), (130, 40)])
def test_tail_lse_rows_are_the_budget_rows_lse(rng_seed, ctx, q_len):
    """The bench's dense tail through FA3 first: the tail rows' output, and the LSE of the
    chunk's last min(q_len, block) queries, which the budget's one-pass mass takes."""
    from proxyattn_kernels.budget.naive import last_rows_lse

    hq, hkv, d, block, page = 4, 2, 16, 32, 16
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    out = torch.full_like(q, float("nan"))
    lse = bench_kernels.tail_lse_rows(torch_fa3, q, kv, table, ctx, block, d**-0.5, out, tail_tokens=min(q_len, 45))
    k, v = gather_paged_kv(kv, table, ctx + q_len)
    torch.testing.assert_close(lse, last_rows_lse(q, k, ctx, d**-0.5, block), atol=1e-5, rtol=1e-5)
    tail = slice(q_len - min(q_len, 45), q_len)
    torch.testing.assert_close(out[tail], dense_causal_attention(q, k, v, ctx, d**-0.5)[tail], atol=2e-5, rtol=1e-4)
    assert out[: tail.start].isnan().all()


@pytest.mark.parametrize("ctx,q_len,tail", [(37, 70, 20), (64, 64, 16), (0, 50, 100)])
def test_triton_with_the_tail_through_fa3_equals_the_selection(rng_seed, ctx, q_len, tail):
    hq, hkv, d, block, page = 4, 2, 16, 16, 16
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    ranking, counts, _ = bench_kernels.synthetic_selection(hq, 1, ctx, q_len, block, 0.3, "cpu", tail)
    tail_rows = ChunkGeometry(ctx, q_len, block).num_tail_rows(tail)
    out = torch.full_like(q, float("nan"))
    bench_kernels.triton_fa3_tail(torch_fa3, q, kv, table, ranking, counts, ctx, block, d**-0.5, out, tail_rows)
    k, v = gather_paged_kv(kv, table, ctx + q_len)
    mask = selection_block_mask(ranking, counts, -(-(ctx + q_len) // block))
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, ctx, mask, d**-0.5, block), atol=2e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("hq,hkv,d,page", [(32, 8, 128, 128), (14, 2, 64, 16)])
def test_triton_with_the_tail_through_real_fa3_on_the_gpu(hq, hkv, d, page):
    """The same with vLLM's FA3 on the H200 in bf16 (what the backend runs where FlashAttention
    exists): the chunk's dense-tail rows by FA3, the rest by the block-sparse kernel."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fa_utils = pytest.importorskip("vllm.v1.attention.backends.fa_utils")
    ctx, q_len, block, tail = 8192 + 37, 2048 + 5, 128, 128  # as the benchmark gate
    torch.manual_seed(0)
    q = torch.randn(q_len, hq, d, device="cuda", dtype=torch.bfloat16)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.bfloat16, "cuda")
    ranking, counts, _ = bench_kernels.synthetic_selection(hq, 1, ctx, q_len, block, 0.2, "cuda", tail)
    tail_rows = ChunkGeometry(ctx, q_len, block).num_tail_rows(tail)
    out = torch.full_like(q, float("nan"))
    bench_kernels.triton_fa3_tail(fa_utils.flash_attn_varlen_func, q, kv, table, ranking, counts, ctx, block,
                                  d**-0.5, out, tail_rows)
    k, v = gather_paged_kv(kv, table, ctx + q_len)
    mask = selection_block_mask(ranking, counts, -(-(ctx + q_len) // block))
    expected = block_sparse_attention(q, k, v, ctx, mask, d**-0.5, block)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_chunk_costs_runs_the_backend_fa3_path(monkeypatch):
    """chunk_costs composes selection -> union plan -> FA3 calls (tail first) per context; on CPU
    with do_bench replaced by one call and FA3 by a recorder: one row per context, every timing
    present, the selection's density, and the tail's call before the others'."""
    calls = []

    def fake_fa3(*, q, out, cu_seqlens_q, return_softmax_lse=False, **kwargs):
        calls.append((q.shape[0], int(cu_seqlens_q.numel()) - 1))
        out.zero_()
        return (out, torch.zeros(q.shape[1], q.shape[0])) if return_softmax_lse else out

    monkeypatch.setattr(bench_kernels, "timed", lambda fn: (fn(), {"median": 1.0, "p10": 1.0, "p90": 1.0})[1])
    rows = bench_kernels.chunk_costs(fake_fa3, "cpu", shape=(4, 2, 16), q_len=160, page=16, block=16,
                                     ctxs=(0, 200), dtype=torch.float32)
    assert [r["ctx"] for r in rows] == [0, 200]
    for r in rows:
        assert r["selection_ms"] == r["selection_plan_ms"] == r["path_ms"] == r["fa3_dense_ms"] == 1.0
        assert r["triton_path_ms"] == r["path_before_ms"] == 1.0
        assert 0 < r["density"] <= 1 and r["path_host_ms"] > 0  # short prompts run dense
    # ctx 0: FA3 dense over the 160 queries (one sequence); the path: the 128-token dense tail
    # as one sequence first (its LSE to the budget), then the union call of the other 2 rows;
    # session 7's path: the tail's 8 query-block rows of 16 from the plan, then the other 2.
    assert calls[:5] == [(160, 1), (128, 1), (32, 2), (128, 8), (32, 2)]


def test_budget_tile_sweep_checks_each_tile_against_the_default(monkeypatch, rng_seed):
    monkeypatch.setattr(bench_kernels, "timed", lambda fn: (fn(), {"median": 2.0, "p10": 2.0, "p90": 2.0})[1])
    ctx, q_len, hq, hkv, d, page, block = 70, 40, 4, 2, 16, 16, 32
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    tiles = ((32, 32, 4, 1), (16, 16, 4, 1), (16, 32, 4, 1), (24, 16, 4, 1))  # the last is invalid
    rows = bench_kernels.budget_tile_sweep(q, kv, table, ctx, block, tiles)
    assert [r["tile"]["block_m"] for r in rows] == [32, 16, 16, 24]
    assert all(r["ms"] == 2.0 and r["max_mass_diff"] < 1e-5 for r in rows[:3])
    assert "error" in rows[3] and "ms" not in rows[3]
    # With the budget rows' LSE: each tile's one-pass mass too, checked the same way; a wrong LSE
    # is reported, not timed.
    from proxyattn_kernels.budget.naive import last_rows_lse

    k, _ = gather_paged_kv(kv, table, ctx + q_len)
    lse = last_rows_lse(q, k, ctx, d**-0.5, block)
    rows = bench_kernels.budget_tile_sweep(q, kv, table, ctx, block, tiles[:2], row_lse=lse)
    assert all(r["ms"] == r["from_lse_ms"] == 2.0 and r["max_mass_diff"] < 1e-5 for r in rows)
    rows = bench_kernels.budget_tile_sweep(q, kv, table, ctx, block, tiles[:1], row_lse=lse + 0.1)
    assert rows[0]["ms"] == 2.0 and "from_lse_ms" not in rows[0] and "differs" in rows[0]["from_lse_error"]


def test_host_launch_time_counts_the_host_work_per_call():
    calls = []
    ms = bench_kernels.host_launch_ms(lambda: (calls.append(1), time.sleep(0.002)), calls=5)
    assert len(calls) == 5 and 2.0 <= ms < 50


def torch_fa3_varlen(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                     causal, block_table, fa_version, num_splits=0):
    """vLLM's flash_attn_varlen_func over several paged sequences, in torch: sequence ``i`` has
    queries ``q[cu[i]:cu[i+1]]`` (its last tokens), keys through ``block_table[i]`` up to
    ``seqused_k[i]``, causal aligned to the end (as FA3 with seqused_k)."""
    assert causal and fa_version == 3 and num_splits >= 0
    kv = torch.cat([k, v], dim=-1).transpose(1, 2)
    cu = cu_seqlens_q.tolist()
    for i in range(len(cu) - 1):
        used = int(seqused_k[i])
        keys, values = gather_paged_kv(kv, block_table[i], used)
        rows = slice(cu[i], cu[i + 1])
        out[rows] = dense_causal_attention(q[rows], keys, values, used - (cu[i + 1] - cu[i]), softmax_scale)
    return out


@pytest.mark.parametrize("ctx,q_len", [(96, 70), (0, 64), (33, 100)])
def test_union_call_probes_compute_the_selection(rng_seed, ctx, q_len):
    """Each probe of the union call computes its selection exactly: the call alone, with one
    split, with the rows in reverse order (outputs permuted back), and the recent-blocks
    selection, whose rows rank their latest blocks first."""
    hq, hkv, d, block, page = 4, 2, 16, 16, 16
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    k, v = gather_paged_kv(kv, table, ctx + q_len)
    out = torch.full_like(q, float("nan"))
    probes = bench_kernels.union_call_probes(torch_fa3_varlen, q, kv, table, ctx, block, d**-0.5, out, density=0.3)
    assert sorted(probes) == ["call", "call recent", "call reversed", "call splits1"]
    plan = bench_kernels.union_page_plan(*probes["call"][:2], table, ctx=ctx, q_len=q_len, block_size=block,
                                         page_size=page)
    back, order = bench_kernels.reversed_rows(plan)
    assert sorted(order.tolist()) == list(range(q_len)) and order.tolist() != list(range(q_len))
    for label, (ranking, counts, fn) in probes.items():
        out.fill_(float("nan"))
        result = fn()
        if label == "call reversed":
            result = torch.empty_like(q).index_copy_(0, order, result)
        mask = bench_kernels.union_block_mask(ranking, counts, ranking.shape[-1])
        expected = block_sparse_attention(q, k, v, ctx, mask[None].expand(hq, -1, -1), d**-0.5, block)
        torch.testing.assert_close(result, expected, atol=2e-5, rtol=1e-4, msg=label)
    # The recent selection keeps each row's latest blocks: a window ending at the diagonal.
    ranking, counts, _ = probes["call recent"]
    mask = bench_kernels.union_block_mask(ranking, counts, ranking.shape[-1])
    geo = ChunkGeometry(ctx, q_len, block)
    for row in range(geo.num_q_blocks):
        chosen = mask[row].nonzero().flatten().tolist()
        diagonal = geo.first_q_block + row
        window = [b for b in chosen if b != 0]  # the sink block is forced
        assert window == list(range(diagonal - len(window) + 1, diagonal + 1))
