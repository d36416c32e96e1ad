"""The per-layer sparse path issues kernel launches only: no host synchronisation (GPU only).

With ``torch.cuda.set_sync_debug_mode("error")`` every synchronising CUDA call raises, so a
``.item()``, a device-to-host copy or a data-dependent shape anywhere in the selection, the
Triton attention or the FA3 union planning fails the test. The first run of each chunk shape
happens before the check (Triton's first launch compiles and may query the device).
"""
from __future__ import annotations

import pytest
import torch

from proxyattn_kernels import ProxyAttnParams
from proxyattn_kernels.block_sparse_attn.triton import block_sparse_attn
from proxyattn_kernels.block_sparse_attn.union_pages import union_page_plan
from proxyattn_kernels.selection import select_blocks_paged

from tests._paged import make_paged

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _layer(ctx, q_len, page, hq, hkv, d, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(ctx + q_len, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(ctx + q_len, hkv, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    kv_cache, table = make_paged(k, v, page)
    q = torch.randn(q_len, hq, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, kv_cache, table


def _sparse_layer(q, kv_cache, table, ctx, params, union: bool):
    sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=q.shape[-1] ** -0.5, params=params)
    if union:  # sparse_kernel "fa3": only the plan (FA3 itself is vLLM's, tested elsewhere)
        return union_page_plan(sel.ranking, sel.counts, table, ctx=ctx, q_len=q.shape[0],
                               block_size=params.block_size, page_size=kv_cache.shape[2])
    out = torch.empty_like(q)
    return block_sparse_attn(q, kv_cache, table, sel.ranking, sel.counts, out, ctx=ctx,
                             scale=q.shape[-1] ** -0.5, block_size=params.block_size)


@pytest.mark.parametrize("union", [False, True], ids=["triton", "fa3-union-plan"])
@pytest.mark.parametrize("hq,hkv,d,page", [(32, 8, 128, 128), (14, 2, 64, 16)])
def test_sparse_layer_never_syncs(union, hq, hkv, d, page):
    params = ProxyAttnParams(max_density=0.2, min_sparse_len=0)
    ctx, q_len = 5000, 3001  # neither block- nor page-aligned
    warm = _layer(ctx, q_len, page, hq, hkv, d, seed=0)
    _sparse_layer(*warm, ctx, params, union)
    torch.cuda.synchronize()
    layers = [_layer(ctx, q_len, page, hq, hkv, d, seed=s) for s in (1, 2)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [_sparse_layer(*layer, ctx, params, union) for layer in layers]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    if not union:
        assert all(torch.isfinite(out).all() for out in results)
