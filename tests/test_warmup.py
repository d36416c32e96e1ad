"""Startup compilation of the sparse kernels (``proxyattn_kernels/warmup.py``, ``proxyattn_vllm/warmup.py``).

CPU: the warm-up chunks reach every compile-time variant the selection can need, and the
warm-up runs (interpreter, tiny shapes). GPU: after the warm-up, real chunks of other lengths
and positions compile nothing new.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import triton

from proxyattn_kernels import ChunkGeometry, ProxyAttnParams
from proxyattn_kernels.common import MAX_TRITON_BLOCKS
from proxyattn_kernels.warmup import warm_up, warmup_chunks

# The interpreter computes log2(0) of masked rows before discarding them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _kb_pad(num_k_blocks: int) -> int:
    return max(16, triton.next_power_of_2(num_k_blocks))  # as common.row_pad pads a row


@pytest.mark.parametrize("max_len,block", [(131072, 128), (262144 + 5, 128), (100, 16), (3000, 64),
                                           (10**7, 128)])
def test_chunks_reach_every_select_width_and_budget_tile(max_len, block):
    chunks = warmup_chunks(max_len, block)
    max_blocks = min(math.ceil(max_len / block), MAX_TRITON_BLOCKS)
    pads = {_kb_pad(ChunkGeometry(ctx, q_len, block).num_k_blocks) for ctx, q_len in chunks}
    # every row width a prompt of up to max_len tokens can need
    assert pads == {_kb_pad(kb) for kb in range(1, max_blocks + 1)}
    # every last-block length class of the budget kernel (tiles of 16 .. block queries)
    n_last_tiles = {min(128, max(16, triton.next_power_of_2(min(q_len, block)))) for _, q_len in chunks}
    assert n_last_tiles == {min(128, max(16, triton.next_power_of_2(n))) for n in range(1, block + 1)}
    assert all(q_len <= block for _, q_len in chunks)  # one query block at most: cheap


def test_chunks_reject_bad_limits():
    with pytest.raises(ValueError, match="max_seq_len"):
        warmup_chunks(0, 128)


def test_warm_up_runs_every_chunk_on_a_tiny_cache():
    params = ProxyAttnParams(stride=4, block_size=16, min_sparse_len=0, max_density=0.5)
    ran = warm_up(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=16, dtype=torch.float32,
                  device=torch.device("cpu"), params=params, max_seq_len=20 * 16)
    assert ran == len(warmup_chunks(20 * 16, 16)) == 3  # KB_PAD 16 and 32, one tail of 1 token


def test_engine_shape_and_cpu_is_a_no_op():
    pytest.importorskip("vllm")
    from proxyattn_vllm.warmup import shape_from_vllm_config, warm_up_once

    params = ProxyAttnParams()
    config = SimpleNamespace(model_config=SimpleNamespace(max_model_len=32768),
                             cache_config=SimpleNamespace(block_size=128))
    shape = shape_from_vllm_config(config, 32, 8, 128, params)
    assert (shape.max_seq_len, shape.page_size, shape.num_kv_heads) == (32768, 128, 8)
    assert shape_from_vllm_config(None, 32, 8, 128, params) is None
    assert shape_from_vllm_config(SimpleNamespace(model_config=config.model_config,
                                                  cache_config=SimpleNamespace(block_size=None)),
                                  32, 8, 128, params) is None
    assert warm_up_once(shape, torch.bfloat16, torch.device("cpu")) is False  # nothing to compile


def _compiled_variants() -> dict[str, int]:
    """Compiled variants per Triton kernel of ours on the current device."""
    import proxyattn_kernels.block_sparse_attn.triton as attn
    import proxyattn_kernels.budget.triton as budget
    import proxyattn_kernels.proxy_scores.triton as proxy
    import proxyattn_kernels.block_sparse_attn.union_pages as union
    import proxyattn_kernels.select.triton as select

    device = torch.cuda.current_device()
    counts = {}
    for module in (attn, budget, proxy, select, union):
        for name, fn in vars(module).items():
            if isinstance(fn, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                counts[name] = len(fn.device_caches[device][0])
    return counts


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("page", [128, 16])  # 16: the attention reads a 128-token copy (H200)
def test_gpu_no_compile_after_warm_up(page):
    from proxyattn_kernels.block_sparse_attn.triton import block_sparse_attn
    from proxyattn_kernels.block_sparse_attn.union_pages import union_page_plan
    from proxyattn_kernels.selection import select_blocks_paged

    hq, hkv, d, max_len = 32, 8, 128, 65536
    params = ProxyAttnParams(max_density=0.1)
    warm_up(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, page_size=page, dtype=torch.bfloat16,
            device=torch.device("cuda"), params=params, max_seq_len=max_len, union_plan=True, budget_lse=True)
    torch.cuda.synchronize()
    before = _compiled_variants()
    gen = torch.Generator(device="cuda").manual_seed(0)
    pages = max_len // page + 4
    physical = torch.randn(pages, page, hkv, 2 * d, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_cache = physical.permute(0, 2, 1, 3)
    # A block-table row at an address that is not 16-byte aligned, as vLLM's table rows are for
    # some request slots when a row holds a number of pages that is not a multiple of 4.
    perm = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32)
    table = torch.cat([perm[:1], perm])[1:]
    assert table.data_ptr() % 16
    # positions and lengths unlike the warm-up's: odd ctx, key-block counts of several residues mod 16
    for ctx, q_len in [(0, 8192), (8192, 8192), (1000, 3000), (12345, 8192), (40000, 77),
                       (61000, 4536), (8190, 5)]:
        qkv = torch.randn(q_len, hq + 2 * hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        q = qkv[:, :hq]
        sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=d**-0.5, params=params)
        # The budget from the dense tail's LSE: a slice of FlashAttention's [Hq, tail tokens],
        # here one that starts off a 16-byte boundary.
        n_last = min(q_len, params.block_size)
        tail_lse = torch.randn(hq, n_last + 1, device="cuda", generator=gen)
        select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=d**-0.5, params=params, row_lse=tail_lse[:, 1:])
        block_sparse_attn(q, kv_cache, table, sel.ranking, sel.counts, torch.empty_like(q),
                          ctx=ctx, scale=d**-0.5, block_size=params.block_size)
        union_page_plan(sel.ranking, sel.counts, table, ctx=ctx, q_len=q_len, block_size=params.block_size,
                        page_size=page)
    torch.cuda.synchronize()
    assert _compiled_variants() == before


@pytest.mark.parametrize("sparse_kernel,union_plan", [("triton", False), ("fa3", True)])
def test_engine_profiling_run_asks_for_the_warm_up_with_its_limits(tmp_path, monkeypatch, sparse_kernel,
                                                                  union_plan):
    """Through vLLM on CPU: the memory-profiling forward asks for the warm-up with the engine's
    max_model_len and page size, and for the union page plan's variants where the layer's kernel
    uses it (the call itself compiles nothing on CPU)."""
    from tests._vllm_cpu import (
        honour_custom_backend_on_cpu, kv_cache_layout_restored, run_cpu_warm_up_forward, skip_unless_vllm_on_cpu)

    skip_unless_vllm_on_cpu()
    from proxyattn_vllm import warmup as glue
    from proxyattn_vllm.testing import write_tiny_llama
    from tests._vllm_cpu import tiny_llm

    calls = []
    real = glue.warm_up_once

    def record(shape, dtype, device, **kwargs):
        calls.append((shape, dtype, device, kwargs))
        return real(shape, dtype, device, **kwargs)

    monkeypatch.setattr(glue, "warm_up_once", record)
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    run_cpu_warm_up_forward(monkeypatch.setattr)  # the forward these tests watch
    model_dir = str(write_tiny_llama(tmp_path / "tiny"))
    with kv_cache_layout_restored(), tiny_llm(
            model_dir, attention_backend="proxyattn", max_model_len=192, block_size=32,
            additional_config={"proxyattn": {"block_size": 32, "stride": 4, "sparse_kernel": sparse_kernel}}):
        pass  # the profiling run happens while the engine starts
    assert calls, "the profiling run did not ask for the warm-up"
    shapes = {c[0] for c in calls}
    assert {(s.max_seq_len, s.page_size, s.params.block_size) for s in shapes} == {(192, 32, 32)}
    # (The budget's pass from the tail's LSE needs FlashAttention for the tail: not on CPU.)
    # kv_dtype None: the cache is in the model dtype (an FP8 cache would name its dtype).
    assert all(c[3] == {"flashinfer": False, "union_plan": union_plan, "budget_lse": False, "kv_dtype": None}
               for c in calls)


def test_warm_up_uses_the_page_size_vllm_settles_after_building_the_model(tmp_path, monkeypatch):
    """Without --block-size, vLLM picks the page size from the backend's preferred one only after
    the model (so every impl) is built (``Platform.update_block_size_for_backend``; the CPU
    platform skips that step, so the generic one is put back here, as on CUDA). The warm-up must
    compile for the page served, not the one the impls saw while being built: on the H200 a TP=2
    engine compiled four kernels inside its first long request that way (built with 16, served
    128). Here the CPU platform's own choice (128) is the stale one and the backend prefers 64."""
    from tests._vllm_cpu import (
        honour_custom_backend_on_cpu, kv_cache_layout_restored, run_cpu_warm_up_forward, skip_unless_vllm_on_cpu)

    skip_unless_vllm_on_cpu()
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import Platform

    from proxyattn_vllm import warmup as glue
    from proxyattn_vllm.backend import ProxyAttnBackend
    from proxyattn_vllm.testing import write_tiny_llama
    from tests._vllm_cpu import tiny_llm

    calls = []
    real = glue.warm_up_once
    monkeypatch.setattr(glue, "warm_up_once", lambda shape, *a, **kw: (calls.append(shape), real(shape, *a, **kw))[1])
    monkeypatch.setattr(CpuPlatform, "update_block_size_for_backend",
                        classmethod(Platform.update_block_size_for_backend.__func__))
    monkeypatch.setattr(ProxyAttnBackend, "get_preferred_block_size", classmethod(lambda cls, default: 64))
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    run_cpu_warm_up_forward(monkeypatch.setattr)  # the forward these tests watch
    model_dir = str(write_tiny_llama(tmp_path / "tiny"))
    with kv_cache_layout_restored(), tiny_llm(
            model_dir, attention_backend="proxyattn", max_model_len=256, block_size=None,
            additional_config={"proxyattn": {"block_size": 32, "stride": 4, "sparse_kernel": "triton"}}) as llm:
        served = llm.llm_engine.vllm_config.cache_config.block_size
    assert served == 64
    assert calls and {shape.page_size for shape in calls} == {64}


def test_a_failing_warm_up_stops_startup_with_the_shape(monkeypatch):
    pytest.importorskip("vllm")
    from proxyattn_vllm import warmup as glue

    def broken(**kwargs):
        raise ValueError("no kernel for this shape")

    monkeypatch.setattr(glue, "warm_up", broken)
    shape = glue.WarmupShape(32, 8, 128, 128, 65536, ProxyAttnParams())
    with pytest.raises(RuntimeError, match="compiling the sparse-prefill kernels at startup failed.*"
                                           "no kernel for this shape.*FLASH_ATTN"):
        glue.warm_up_once(shape, torch.bfloat16, torch.device("cuda"))


@pytest.mark.parametrize("page,tma,max_len,expected", [
    (16, True, 131072, (128, 131072 * 8 * 256 * 2)),  # Llama-8B shape, bf16: 512 MiB
    (16, True, 1000 + 3, (0, 0)),                      # below min_sparse_len: never sparse, no copy
    (128, True, 131072, (0, 0)),                       # pages hold whole TMA tiles: no copy
    (16, False, 131072, (0, 0)),                       # no TMA on the device: no copy
])
def test_copy_reservation_is_the_longest_prompts_copy(page, tma, max_len, expected):
    pytest.importorskip("vllm")
    from proxyattn_vllm import warmup as glue

    shape = glue.WarmupShape(32, 8, 128, page, max_len, ProxyAttnParams())
    assert glue.copy_reservation(shape, torch.bfloat16, tma) == expected
    assert glue.copy_reservation(None, torch.bfloat16, tma) == (0, 0)


def test_reserve_copy_memory_allocates_the_copy_once(monkeypatch):
    pytest.importorskip("vllm")
    from proxyattn_vllm import warmup as glue

    shape = glue.WarmupShape(4, 2, 32, 16, 16384, ProxyAttnParams())
    allocated = []
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: (allocated.append((a, kw)), real_empty(*a, **kw))[1])
    assert glue.reserve_copy_memory(shape, torch.float32, torch.device("cpu")) == (0, 0)  # CPU: no TMA
    assert allocated == []
    monkeypatch.setattr(glue, "has_tma", lambda device: True)
    nbytes = 16384 * 2 * 64 * 4
    assert glue.reserve_copy_memory(shape, torch.float32, torch.device("cpu")) == (128, nbytes)
    assert allocated == [((nbytes,), {"dtype": torch.uint8, "device": torch.device("cpu")})]


@pytest.mark.parametrize("sparse_kernel,reserved", [("triton", True), ("fa3", False)])
def test_engine_profiling_run_reserves_the_copy_of_the_longest_prompt(tmp_path, monkeypatch, sparse_kernel,
                                                                      reserved):
    """Through vLLM on CPU, as if on Hopper (``has_tma`` forced): with 16-token pages the
    memory-profiling forward of a Triton layer allocates the copy of a max_model_len prompt
    (the KV cache is sized from that run's peak); a union-kernel layer has no copy."""
    from tests._vllm_cpu import (
        honour_custom_backend_on_cpu, kv_cache_layout_restored, run_cpu_warm_up_forward, skip_unless_vllm_on_cpu)

    skip_unless_vllm_on_cpu()
    from proxyattn_vllm import warmup as glue
    from proxyattn_vllm.testing import HEAD_DIM, NUM_KV_HEADS, write_tiny_llama
    from tests._vllm_cpu import tiny_llm

    results = []
    real = glue.reserve_copy_memory
    monkeypatch.setattr(glue, "has_tma", lambda device: True)
    monkeypatch.setattr(glue, "reserve_copy_memory", lambda *a: (results.append(real(*a)), results[-1])[1])
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    run_cpu_warm_up_forward(monkeypatch.setattr)  # the forward these tests watch
    model_dir = str(write_tiny_llama(tmp_path / "tiny"))
    with kv_cache_layout_restored(), tiny_llm(
            model_dir, attention_backend="proxyattn", max_model_len=300, block_size=16,
            additional_config={"proxyattn": {"block_size": 128, "min_sparse_len": 0,
                                              "sparse_kernel": sparse_kernel}}):
        pass  # the profiling run happens while the engine starts
    if reserved:
        assert results and set(results) == {(128, 384 * NUM_KV_HEADS * 2 * HEAD_DIM * 4)}  # fp32, 3 copy pages
    else:
        assert results == []
