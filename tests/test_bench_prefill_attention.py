"""benchmarks/kernels/bench_prefill_attention.py off the GPU: its chunking, its budget variants
and its table (the timings themselves need CUDA and vLLM's FA3)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks.kernels import bench_prefill_attention as bench


def test_chunks_cover_the_prompt():
    assert bench.chunks(20000, 8192) == [(0, 8192), (8192, 8192), (16384, 3616)]
    assert bench.parse_tokens("128K") == 131072 and bench.parse_tokens("4096") == 4096


def test_variants_set_a_cap_or_per_head_fractions():
    params = bench.ProxyAttnParams(block_size=128, min_budget_blocks=16, dense_tail_tokens=128)
    flat = bench.Variant("density0.2", "cpu", params)
    assert flat.params.max_density == 0.2 and flat.fraction(3, 65536) is None
    prof = bench.Variant("paper-llama8b-gamma0.95", "cpu", params)
    frac = prof.fraction(3, 131072)
    assert prof.params.max_density is None and frac.shape == (32,)
    torch.testing.assert_close(frac, torch.tensor([prof.profile.fraction(3, h, 131072) for h in range(32)]))
    assert float(frac.max()) > 2 * float(frac.min()), "a profile's heads have unequal budgets"


def test_table_and_help(capsys):
    row = {"length": 131072, "variant": "density0.1", "kernel": "triton", "median_ms": 900.0, "density": 0.1,
           "fa3_dense": {"median_ms": 8100.0}, "speedup": 9.0, "selection_share": 0.045}
    older = {**row, "selection_share": None}  # a result written before the selection was timed
    table = bench.format_table({"gpu": "G", "rows": [row, older]})
    cells = [c.strip() for c in table.splitlines()[-3].split("|")]
    assert cells[-1] == "9.00x" and cells[4] == "4.5" and "paper: up to 10.3x" in table
    assert [c.strip() for c in table.splitlines()[-2].split("|")][4] == "-"
    with pytest.raises(SystemExit) as exc:
        bench.main(["--help"])
    assert exc.value.code == 0 and "--layer-stride" in capsys.readouterr().out


def test_heaviest_first_kernel_runs_the_backend_path_with_that_launch_order(monkeypatch):
    """"triton-heaviest-first" is the backend's own Triton path (sparse_prefill) with only the
    launch order changed; "triton" passes no tile (the kernel's default)."""
    from proxyattn_vllm.sparse import triton as sparse_triton

    calls = []
    monkeypatch.setattr(bench, "tail_lse_rows", lambda *a, **k: None)
    monkeypatch.setattr(sparse_triton, "sparse_prefill", lambda *a, **k: calls.append(k))
    params = bench.ProxyAttnParams(block_size=128, num_groups=1, min_budget_blocks=16, dense_tail_tokens=128)
    q, kv = torch.zeros(8, 32, 128), torch.zeros(4, 8, 128, 256)
    for kernel in ("triton", "triton-heaviest-first"):
        bench.sparse_chunk(kernel, None, q, kv, None, 0, 1.0, params, q, None)
    default = bench.default_tile_config(128, 128, False, 128)
    assert calls[0]["tile"] is None
    assert calls[1]["tile"] == bench.dataclasses.replace(default, launch_heaviest_first=True)


def test_selection_is_timed_alone_per_chunk_and_layer_with_its_tail_lse(monkeypatch):
    """The selection's share: select_blocks_paged once per chunk and timed layer, as the backend
    calls it (the chunk's dense-tail LSE, the layer's budget fractions), nothing else timed."""
    calls = []
    monkeypatch.setattr(bench, "tail_lse_rows", lambda fa3, q, kv, table, ctx, *a: f"lse@{ctx}")
    monkeypatch.setattr(bench, "select_blocks_paged", lambda q, *a, **k: calls.append((len(q), k)))
    monkeypatch.setattr(bench, "time_passes", lambda fn, repeats: fn() or [2.0, 4.0, 3.0])
    params = bench.ProxyAttnParams(block_size=128, min_budget_blocks=16, dense_tail_tokens=128)
    variant = bench.Variant("paper-llama8b-gamma0.95", "cpu", params)
    args = bench.argparse.Namespace(chunk=8192, layer_stride=8, repeats=3)
    result = bench.measure_selection(variant, 20000, None, torch.zeros(8192, 32, 128), None, None, 1.0, args)
    assert result == {"median_ms": 24.0, "min_ms": 16.0, "max_ms": 32.0, "n": 3}  # scaled by the stride
    assert [(n, k["ctx"], k["row_lse"]) for n, k in calls] == [
        (n, ctx, f"lse@{ctx}") for ctx, n in ((0, 8192), (8192, 8192), (16384, 3616)) for _ in range(4)]
    torch.testing.assert_close(calls[5][1]["budget_fraction"], variant.fraction(8, 8192 + 8192))  # chunk 2, layer 8


def test_fa3_kernels_route_to_the_union_or_to_each_heads_own_blocks(monkeypatch):
    """"fa3" computes each row's union over heads (density counted as the union), "fa3-heads"
    each head's own blocks (density counted per head, as Triton's), "fa3-kvheads" each KV head's
    union over its query heads."""
    calls = []
    monkeypatch.setattr(bench, "tail_lse_rows", lambda *a, **k: None)
    monkeypatch.setattr(bench, "select_blocks_paged", lambda *a, **k: SimpleNamespace(ranking=None, counts=None))
    monkeypatch.setattr(bench, "fa3_union", lambda *a, **k: calls.append("union"))
    monkeypatch.setattr(bench, "fa3_per_head", lambda *a, **k: calls.append("per head"))
    monkeypatch.setattr(bench, "fa3_per_kv_head", lambda *a, **k: calls.append("per KV head"))
    params = bench.ProxyAttnParams(block_size=128, num_groups=1, min_budget_blocks=16, dense_tail_tokens=128)
    q = torch.zeros(8, 32, 128)
    for kernel in ("fa3", "fa3-heads", "fa3-kvheads"):
        bench.sparse_chunk(kernel, None, q, None, None, 0, 1.0, params, q, None)
    assert calls == ["union", "per head", "per KV head"]
    assert "fa3-heads" in bench.KERNELS and "fa3-heads" in bench.EXACT_KERNELS and "fa3" not in bench.EXACT_KERNELS
    assert "fa3-kvheads" in bench.KERNELS and "fa3-kvheads" not in bench.EXACT_KERNELS
