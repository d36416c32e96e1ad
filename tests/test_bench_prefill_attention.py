"""benchmarks/kernels/bench_prefill_attention.py off the GPU: its chunking, its budget variants
and its table (the timings themselves need CUDA and vLLM's FA3)."""
from __future__ import annotations

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
           "fa3_dense": {"median_ms": 8100.0}, "speedup": 9.0}
    table = bench.format_table({"gpu": "G", "rows": [row]})
    assert table.splitlines()[-2].split("|")[-1].strip() == "9.00x" and "paper: up to 10.3x" in table
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
