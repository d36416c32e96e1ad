"""benchmarks/kernels/bench_kernels.py helpers on CPU (Triton interpreter): the composite paths it times
compute the selection exactly, so a timing never measures a wrong kernel."""
from __future__ import annotations

import json
import time

import pytest
import torch

from benchmarks.kernels import bench_kernels
from proxyattn_kernels import ChunkGeometry
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention, selection_block_mask
from proxyattn_kernels.reference import dense_causal_attention, gather_paged_kv

from tests._paged import torch_fa3_varlen, varlen_paged_causal


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


@pytest.mark.parametrize("ctx,q_len,density", [(37, 70, 0.4), (0, 50, 1.0)])
def test_gather_call_equals_the_selection(rng_seed, ctx, q_len, density):
    """The timed "gather" baseline (the kernel on the cache's own 16-token pages, no copy)
    computes the selection; the poisoned output is fully written."""
    hq, hkv, d, block, page = 4, 2, 16, 32, 16
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    ranking, counts, _ = bench_kernels.synthetic_selection(hq, 1, ctx, q_len, block, density, "cpu")
    out = torch.full_like(q, float("nan"))
    bench_kernels.gather_call(q, kv, table, ranking, counts, ctx, block, d**-0.5, out)
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


@pytest.mark.gpu
def test_graph_timing_captures_the_backend_path_on_the_gpu():
    """chunk_costs' CUDA-graph timing captures the whole fa3 path (FA3 calls, Triton kernels,
    torch ops: no host sync, or capture would fail), and what it times are replays that run."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fa_utils = pytest.importorskip("vllm.v1.attention.backends.fa_utils")
    rows = bench_kernels.chunk_costs(fa_utils.flash_attn_varlen_func, "cuda", q_len=2048 + 5, ctxs=(8192 + 37,))
    row = rows[0]
    assert row["path_graph_ms"] is not None and row["selection_graph_ms"] is not None
    assert 0 < row["path_graph_ms"] <= 1.2 * row["path_ms"]
    runs = torch.zeros(1, device="cuda")
    assert bench_kernels.graph_ms(lambda: runs.add_(1)) is not None
    assert runs.item() > 2  # the warm-up once, the capture never, then every timed replay


def test_chunk_costs_runs_the_backend_fa3_path(monkeypatch):
    """chunk_costs composes selection -> union plan -> FA3 calls (tail first) per context; on CPU
    with do_bench replaced by one call and FA3 by a recorder: one row per context, every timing
    present, the selection's density, and the tail's call before the others'."""
    calls = []

    descales = []  # (k_descale shape, sequences) of the calls that pass one, as the backend does

    def fake_fa3(*, q, out, cu_seqlens_q, return_softmax_lse=False, **kwargs):
        calls.append((q.shape[0], int(cu_seqlens_q.numel()) - 1))
        if "k_descale" in kwargs:
            descales.append((tuple(kwargs["k_descale"].shape), int(cu_seqlens_q.numel()) - 1))
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
        assert r["path_graph_ms"] is None and r["selection_graph_ms"] is None  # CUDA graphs: GPU only
        assert r["engine_like_graph_ms"] == {"strided_q": None, "kv_descale": None, "pages_in_order": None}
    # The kv_descale variant's two calls per context (the tail, the union rows) carry [sequences, Hkv].
    assert descales == [((1, 2), 1), ((2, 2), 2)] * 2
    # ctx 0: FA3 dense over the 160 queries (one sequence); the path: the 128-token dense tail
    # as one sequence first (its LSE to the budget), then the union call of the other 2 rows;
    # the path before the one-pass budget: the tail's 8 query-block rows of 16 from the plan, then the other 2.
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


def test_proxy_tile_sweep_checks_each_tile_against_the_default(monkeypatch, rng_seed):
    """Each tile's proxy scores are compared with the default tile's before they are timed; a
    tile the kernel rejects is reported, not timed."""
    from proxyattn_kernels.proxy_scores.naive import proxy_block_scores

    monkeypatch.setattr(bench_kernels, "timed", lambda fn: (fn(), {"median": 3.0, "p10": 3.0, "p90": 3.0})[1])
    ctx, q_len, hq, hkv, d, page, block = 70, 60, 4, 2, 16, 16, 32
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    tiles = ((16, 16, 4, 1), (32, 16, 4, 1), (16, 32, 4, 1), (24, 16, 4, 1))  # the last is invalid
    rows = bench_kernels.proxy_tile_sweep(q, kv, table, ctx, block, 2, 4, tiles)
    assert [r["tile"]["block_m"] for r in rows] == [16, 32, 16, 24]
    assert all(r["ms"] == 3.0 and r["max_score_diff"] < 1e-5 for r in rows[:3])
    assert "error" in rows[3] and "ms" not in rows[3]
    groups = bench_kernels.ProxyAttnConfig().resolve_num_groups  # the sweep's groups: "auto"
    assert groups(32, 8) == 1 and groups(14, 2) == 2
    # The default tile's scores are the spec's (the sweep's reference is right).
    from proxyattn_kernels.proxy_scores.triton import proxy_block_scores_paged

    k, _ = gather_paged_kv(kv, table, ctx + q_len)
    scores = proxy_block_scores_paged(q, kv, table, ctx=ctx, scale=d**-0.5, num_groups=2, stride=4, block_size=block)
    torch.testing.assert_close(scores, proxy_block_scores(q, k, ctx, d**-0.5, 2, 4, block), atol=1e-5, rtol=1e-4)


def test_proxy_tile_sweep_reports_scores_that_differ(monkeypatch):
    """NaN or shifted scores from a tile are reported, not timed (-inf equals -inf)."""
    from proxyattn_kernels.proxy_scores import triton as proxy_triton

    real = proxy_triton.proxy_block_scores_paged
    calls = []

    def wrong_after_first(*args, **kwargs):
        scores = real(*args, **kwargs)
        calls.append(1)
        return scores if len(calls) == 1 else scores.nan_to_num(nan=0.0) + (0.5 if len(calls) == 2 else float("nan"))

    monkeypatch.setattr(proxy_triton, "proxy_block_scores_paged", wrong_after_first)
    monkeypatch.setattr(bench_kernels, "timed", lambda fn: {"median": 1.0})
    q = torch.randn(40, 4, 16)
    kv, table = bench_kernels.make_cache(110, 2, 16, 16, torch.float32, "cpu")
    rows = bench_kernels.proxy_tile_sweep(q, kv, table, 70, 32, 1, 4, ((16, 16, 4, 1),) * 3)
    assert rows[0]["ms"] == 1.0 and rows[0]["max_score_diff"] == 0.0
    assert all("differ" in r["error"] and "ms" not in r for r in rows[1:])


def test_host_launch_probe_refuses_to_run_without_cuda(monkeypatch, capsys):
    """The probe times the CUDA launch path; under the interpreter it would time something else."""
    from benchmarks.kernels import host_launch_probe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sys.argv", ["host_launch_probe.py", "--out", "/nonexistent/x.json"])
    assert host_launch_probe.main() == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_auto_table_from_the_cases_of_a_run(tmp_path):
    """``--auto-table``: the density-0.1 cases of a run become the table ``sparse_kernel: "auto"``
    reads; a union kernel is chosen only where it beats Triton by more than the union ratio."""
    from proxyattn_vllm.sparse.choose import auto_sparse_kernel
    from proxyattn_vllm.sparse.choose import auto_table as read_table

    def case(name, shape, page, ms, hq=32, hkv=8, d=128):
        return {"name": f"{shape} page{page} density0.1{name}", "model_shape": shape, "page_size": page,
                "hq": hq, "hkv": hkv, "head_dim": d, "attn_ms": ms}

    cases = [case("", "llama", 16, 5.0), case(" fa3-union", "llama", 16, 3.0), case(" flashinfer-union", "llama", 16, 4.0),
             case("", "llama", 128, 4.0), case(" fa3-union", "llama", 128, 3.5),
             case(" gather", "llama", 128, 9.0), case("", "qwen", 16, 1.3, 14, 2, 64)]
    table = bench_kernels.auto_table(cases, gpu="GPU", date="2026-01-02T00:00:00+00:00", source="k.json",
                                     union_ratio=1.2)
    assert [(e["model"], e["page_size"], e["kernel"]) for e in table["shapes"]] == [
        ("llama", 16, "fa3"), ("llama", 128, "triton"), ("qwen", 16, "triton")]  # 5/3 > 1.2; 4/3.5 < 1.2
    assert table["shapes"][0]["attn_ms"] == {"triton": 5.0, "fa3": 3.0, "flashinfer": 4.0}
    assert (table["gpu"], table["date"], table["source"]) == ("GPU", "2026-01-02", "k.json")
    path = tmp_path / "auto.json"
    path.write_text(json.dumps(table))
    loaded = read_table.__wrapped__(path)
    assert auto_sparse_kernel(128, 16, 32, 8, table=loaded) == "fa3"
    assert auto_sparse_kernel(128, 128, 32, 8, table=loaded) == "triton"
    with pytest.raises(SystemExit):
        bench_kernels.parse_args(["--auto-table", str(path)])  # no union ratio


@pytest.mark.parametrize("ctx,q_len,hq,hkv,groups", [(96, 70, 4, 2, 1), (33, 100, 6, 2, 2), (0, 64, 4, 1, 4)])
def test_fa3_per_head_computes_each_heads_own_blocks(rng_seed, ctx, q_len, hq, hkv, groups):
    """The per-head FA3 candidate (one call per KV head, pseudo-requests per query head and row)
    computes each head over exactly its own selected blocks, not its row's union, with heads of
    unequal budgets, GQA, chunks that start mid-block; the dense-tail rows are left untouched."""
    d, block, page = 16, 16, 16
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    k, v = gather_paged_kv(kv, table, ctx + q_len)
    ranking, counts, _ = bench_kernels.synthetic_selection(hq, groups, ctx, q_len, block, 0.4, "cpu",
                                                           tail_tokens=block, spread=0.5)
    assert len(set(counts.sum(dim=1).tolist())) > 1, "the heads' budgets differ"
    out = torch.full_like(q, float("nan"))
    bench_kernels.fa3_per_head(torch_fa3_varlen, q, kv, table, ranking, counts, ctx, block, d**-0.5, out,
                               tail_tokens=block)
    geo = ChunkGeometry(ctx, q_len, block)
    tokens = geo.row_token_start(geo.first_tail_row(block))
    mask = selection_block_mask(ranking, counts, ranking.shape[-1])
    expected = block_sparse_attention(q, k, v, ctx, mask, d**-0.5, block)
    torch.testing.assert_close(out[:tokens], expected[:tokens], atol=2e-5, rtol=1e-4)
    assert out[tokens:].isnan().all(), "the tail rows belong to the dense tail call"
    union = bench_kernels.union_block_mask(ranking, counts, ranking.shape[-1])
    assert (mask[:, : geo.first_tail_row(block)] != union[: geo.first_tail_row(block)]).any(), \
        "a case where the union would compute other blocks"


@pytest.mark.parametrize("ctx,q_len,hq,hkv,groups", [(96, 70, 4, 2, 1), (33, 100, 6, 2, 2), (0, 64, 4, 1, 1),
                                                     (40, 90, 8, 4, 2)])
def test_fa3_per_kv_head_computes_each_kv_heads_union(rng_seed, ctx, q_len, hq, hkv, groups):
    """The per-KV-head FA3 candidate (one call per KV head, its query heads packed as GQA)
    computes every query head over the union of its KV head's query heads' blocks: more than a
    head's own blocks, less than the all-heads union; its density helper counts just that.
    The dense-tail rows are left untouched."""
    d, block, page = 16, 16, 16
    per_kv = hq // hkv
    q = torch.randn(q_len, hq, d)
    kv, table = bench_kernels.make_cache(ctx + q_len, hkv, d, page, torch.float32, "cpu")
    k, v = gather_paged_kv(kv, table, ctx + q_len)
    ranking, counts, _ = bench_kernels.synthetic_selection(hq, groups, ctx, q_len, block, 0.4, "cpu",
                                                           tail_tokens=block, spread=0.5)
    # Budgets that make the three block sets differ whatever the seed: the first KV head's heads
    # keep at most two blocks, the last head every block, the one before it only the diagonal.
    extents = (ranking >= 0).sum(dim=-1, dtype=torch.int32)[torch.arange(hq) // (hq // groups)]  # [Hq, R]
    counts[:per_kv] = counts[:per_kv].clamp(max=2)
    counts[0], counts[-2], counts[-1] = 1, 1, extents[-1]
    out = torch.full_like(q, float("nan"))
    bench_kernels.fa3_per_kv_head(torch_fa3_varlen, q, kv, table, ranking, counts, ctx, block, d**-0.5, out,
                                  tail_tokens=block)
    geo = ChunkGeometry(ctx, q_len, block)
    rows = geo.first_tail_row(block)
    tokens = geo.row_token_start(rows)
    own = selection_block_mask(ranking, counts, ranking.shape[-1])  # [Hq, R, Kb]
    kv_union = own.view(hkv, per_kv, *own.shape[1:]).any(dim=1).repeat_interleave(per_kv, dim=0)
    expected = block_sparse_attention(q, k, v, ctx, kv_union, d**-0.5, block)
    torch.testing.assert_close(out[:tokens], expected[:tokens], atol=2e-5, rtol=1e-4)
    assert out[tokens:].isnan().all(), "the tail rows belong to the dense tail call"
    assert (kv_union[:, :rows] != own[:, :rows]).any(), "more than each head's own blocks"
    all_heads = bench_kernels.union_block_mask(ranking, counts, ranking.shape[-1])
    if hkv > 1:
        assert (kv_union[:, :rows] != all_heads[:rows]).any(), "less than the all-heads union"
    causal = float((geo.first_q_block + 1 + torch.arange(geo.num_q_blocks)).sum())
    density = bench_kernels.kv_head_union_density(ranking, counts, ctx, q_len, block, hkv)
    assert density == pytest.approx(float(kv_union.sum()) / (hq * causal))
    assert float(own.sum()) / (hq * causal) < density <= bench_kernels.union_density(ranking, counts, ctx, q_len,
                                                                                      block)
