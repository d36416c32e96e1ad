"""An FP8 (e4m3) KV cache through FlashAttention 3 (Hopper): what the CPU tier cannot run
(tests/test_vllm_impl_fp8.py runs the same paths with vLLM's Triton kernel as the dense kernel).

The query is quantized as vLLM's attention layer quantizes it for a FlashAttention impl (static
per-tensor ``_q_scale``), the cache is uint8 bytes as vLLM allocates it. Each path is compared
with the torch spec on the dequantized query, keys and values; FA3 computes with FP8 operands
(its probabilities too), so those comparisons allow FP8 rounding.
"""
from __future__ import annotations

import pytest
import torch

from proxyattn_kernels import ProxyAttnParams
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention, selection_block_mask
from proxyattn_kernels.block_sparse_attn.union_pages import union_block_mask
from proxyattn_kernels.paged import FP8_KV_DTYPE
from proxyattn_kernels.reference import dense_causal_attention
from proxyattn_kernels.selection import select_blocks_paged

from tests._paged import make_paged

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU")]

Q_SCALE, K_SCALE, V_SCALE = 0.05, 0.37, 2.5
HQ, HKV, D, BLOCK = 32, 8, 128, 128
CTX, Q_LEN = 4096 + 37, 2048 + 5


class _Layer(torch.nn.Module):
    """vLLM's attention layer as the impl reads it: the 0-dim float32 scales on the device."""

    def __init__(self):
        super().__init__()
        for name, value in (("_q_scale", Q_SCALE), ("_k_scale", K_SCALE), ("_v_scale", V_SCALE)):
            setattr(self, name, torch.tensor(value, device="cuda"))


def fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x.float() / scale).clamp(-448, 448).to(FP8_KV_DTYPE)


def chunk_inputs(page: int):
    """``(q8, q, k, v, raw cache, table)``: the FP8 query and its dequantized bf16 value, the
    dequantized float32 keys and values, the uint8 paged cache (logical view) and its table."""
    torch.manual_seed(0)
    q8 = fp8(torch.randn(Q_LEN, HQ, D, device="cuda") * 2, Q_SCALE)
    k8 = fp8(torch.randn(CTX + Q_LEN, HKV, D, device="cuda"), K_SCALE)
    v8 = fp8(torch.randn(CTX + Q_LEN, HKV, D, device="cuda"), V_SCALE)
    wide, table = make_paged(k8.float(), v8.float(), page)
    raw = wide.permute(0, 2, 1, 3).to(FP8_KV_DTYPE).view(torch.uint8).permute(0, 2, 1, 3)
    q = (q8.float() * Q_SCALE).to(torch.bfloat16)
    return q8, q, k8.float() * K_SCALE, v8.float() * V_SCALE, raw, table


def dense_attention():
    pytest.importorskip("vllm.vllm_flash_attn")
    from proxyattn_vllm.dense import DenseAttention

    dense = DenseAttention(head_size=D, num_kv_heads=HKV, scale=D**-0.5, sliding_window=None, flash_attn_version=3,
                           kv_cache_dtype="fp8", fp8_dtype=FP8_KV_DTYPE)
    assert dense.use_flash_attn
    return dense


def rel_err(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("page", [16, 128])
def test_gpu_fa3_dense_varlen_on_fp8(page):
    """The dense path (decode/short rows, the dense tail): FA3 with the FP8 query, the FP8 cache
    view and the layer's descales, as FlashAttentionImpl calls it."""
    dense = dense_attention()
    q8, q, k, v, raw, table = chunk_inputs(page)
    out = torch.full((Q_LEN, HQ, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    i32 = dict(dtype=torch.int32, device="cuda")
    dense.varlen(_Layer(), q8, raw, out, torch.tensor([0, Q_LEN], **i32), Q_LEN,
                 torch.tensor([CTX + Q_LEN], **i32), CTX + Q_LEN, table[None])
    expected = dense_causal_attention(q, k, v, CTX, D**-0.5)
    assert not out.isnan().any() and rel_err(out, expected) < 0.05


@pytest.mark.parametrize("page", [16, 128])
def test_gpu_fa3_union_kernel_on_fp8(page):
    """``sparse_kernel: "fa3"``: the selection on the dequantized query, then FA3 over each query
    block's union of selected pages with the FP8 operands; equals the union-mask attention."""
    from proxyattn_vllm.sparse.base import SparseChunk, SparseLayer
    from proxyattn_vllm.sparse.fa3 import FA3UnionKernel

    dense = dense_attention()
    q8, q, k, v, raw, table = chunk_inputs(page)
    params = ProxyAttnParams(gamma=0.9, block_size=BLOCK, min_sparse_len=0, dense_tail_tokens=128)
    layer = SparseLayer(HQ, HKV, D, D**-0.5, params, dense)
    out = torch.full((Q_LEN, HQ, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    kv = raw.view(FP8_KV_DTYPE)
    FA3UnionKernel(layer).run(_Layer(), SparseChunk(q8, kv, table, out, CTX))
    sel = select_blocks_paged(q, kv, table, ctx=CTX, scale=D**-0.5, params=params,
                              k_scale=torch.tensor(K_SCALE, device="cuda"))
    mask = union_block_mask(sel.ranking, sel.counts, sel.ranking.shape[-1]).expand(HQ, -1, -1)
    expected = block_sparse_attention(q, k, v, CTX, mask, D**-0.5, BLOCK)
    assert not out.isnan().any() and rel_err(out, expected) < 0.05


@pytest.mark.parametrize("page", [16, 128])
def test_gpu_triton_kernel_with_the_fp8_query_of_flash_attention(page):
    """``sparse_kernel: "triton"`` under FlashAttention: the FP8 query is dequantized for the
    Triton kernels (TMA tiles on 128-token pages, the copy on 16-token pages)."""
    from proxyattn_vllm.sparse.base import SparseChunk, SparseLayer
    from proxyattn_vllm.sparse.triton import TritonSparseKernel

    dense = dense_attention()
    q8, q, k, v, raw, table = chunk_inputs(page)
    params = ProxyAttnParams(gamma=0.9, block_size=BLOCK, min_sparse_len=0, dense_tail_tokens=128)
    out = torch.full((Q_LEN, HQ, D), float("nan"), dtype=torch.bfloat16, device="cuda")
    kv = raw.view(FP8_KV_DTYPE)
    kernel = TritonSparseKernel(SparseLayer(HQ, HKV, D, D**-0.5, params, dense))
    kernel.run(_Layer(), SparseChunk(q8, kv, table, out, CTX))
    sel = select_blocks_paged(q, kv, table, ctx=CTX, scale=D**-0.5, params=params,
                              k_scale=torch.tensor(K_SCALE, device="cuda"))
    mask = selection_block_mask(sel.ranking, sel.counts, sel.ranking.shape[-1])
    expected = block_sparse_attention(q, k, v, CTX, mask, D**-0.5, BLOCK)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)
