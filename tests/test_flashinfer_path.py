"""The FlashInfer sparse path on the GPU (marker ``gpu``; skipped without CUDA or FlashInfer):
FlashInfer's kernels over the union page lists equal the naive union reference in bf16, the
"fa2" path reuses one plan across layers without a host sync, and "fa3" replans per layer.

The first test of each (backend, head size) compiles FlashInfer's kernel with nvcc (1-2 min;
set FLASHINFER_WORKSPACE_BASE to keep the compiled kernels between runs)."""
from __future__ import annotations

import pytest
import torch

from proxyattn_kernels.block_sparse_attn import flashinfer as fi
from proxyattn_kernels.block_sparse_attn import flashinfer_plan as fi_plan
from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi_release

from tests._union_cases import CASE_IDS, CASES, random_cache, random_selection, union_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or not fi_release.flashinfer_available(),
        reason=f"needs CUDA and {fi_release.FLASHINFER_REQUIREMENT}"
        + (f" ({fi_release.flashinfer_import_error()})" if fi_release.flashinfer_import_error() else ""),
    ),
]

DTYPE = torch.bfloat16
# Slots outside the sequence: a large finite value (a real cache holds stale finite data there);
# a kernel that let them into a softmax would be far off.
POISON = 3e4


def _head_dim(hq):
    return 64 if hq in (7, 14, 28) else 128  # the Qwen-like 7:1 shapes use D 64, others D 128


def _chunk(ctx, q_len, page, hq, hkv, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(q_len, hq, d, generator=gen).to("cuda", DTYPE)
    torch.manual_seed(seed)
    kv_cache, table = random_cache(ctx + q_len, hkv, d, page, DTYPE, device="cuda", poison=POISON)
    return q, kv_cache, table, gen


@pytest.mark.parametrize("backend", fi_plan.BACKENDS)
@pytest.mark.parametrize("ctx,q_len,block,page,hq,hkv,groups", CASES, ids=CASE_IDS)
def test_flashinfer_equals_the_union_reference(backend, ctx, q_len, block, page, hq, hkv, groups):
    d = _head_dim(hq)
    q, kv_cache, table, gen = _chunk(ctx, q_len, page, hq, hkv, d, seed=ctx + q_len)
    for density in (1.0, 0.3):
        ranking, counts = random_selection(hq, groups, ctx, q_len, block, density, "cuda", gen)
        out = torch.full_like(q, float("nan"))
        fi.block_sparse_attn_flashinfer(q, kv_cache, table, ranking, counts, out, ctx=ctx,
                                        scale=d**-0.5, block_size=block, backend=backend)
        ref = union_reference(q, kv_cache, table, ranking, counts, ctx, block, d**-0.5)
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2,
                                   msg=f"{backend} density {density}")


@pytest.mark.parametrize("backend", fi_plan.BACKENDS)
def test_plan_reuse_across_layers(backend):
    """Layers 1..3 of one step: the same chunk shape over other caches and selections. Every
    result is right; "fa2" planned once and its later layers run with no host sync at all."""
    fi_plan.clear_plan_cache()
    ctx, q_len, block, page, hq, hkv, groups = 4133, 2051, 128, 16, 32, 8, 1
    d = 128
    layers = []
    for layer in range(3):
        q, kv_cache, table, gen = _chunk(ctx, q_len, page, hq, hkv, d, seed=100 + layer)
        ranking, counts = random_selection(hq, groups, ctx, q_len, block, (0.5, 0.1, 0.25)[layer], "cuda", gen)
        layers.append((q, kv_cache, table, ranking, counts, torch.full_like(q, float("nan"))))
    for i, (q, kv_cache, table, ranking, counts, out) in enumerate(layers):
        if backend == "fa2" and i > 0:
            torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
        try:
            fi.block_sparse_attn_flashinfer(q, kv_cache, table, ranking, counts, out, ctx=ctx,
                                            scale=d**-0.5, block_size=block, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # All layers were queued before any check: each kernel read its own layer's buffers.
    for q, kv_cache, table, ranking, counts, out in layers:
        ref = union_reference(q, kv_cache, table, ranking, counts, ctx, block, d**-0.5)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    (plan,) = fi_plan._STATES[q.device].plans.values()
    assert plan.plans == (1 if backend == "fa2" else 3)
