"""The Triton kernels on an FP8 (e4m3) paged cache, as vLLM's ``--kv-cache-dtype fp8`` stores it:
each kernel against its torch spec run on the dequantized cache (``fp8 * scale`` in float32),
and the whole sparse prefill against the unquantized data it came from.

Keys and values are quantized with scales far from 1 (``K_SCALE``, ``V_SCALE``), so a kernel that
ignores a scale, or applies one where it does not belong, fails. The cache is built as vLLM
allocates it (uint8 bytes, here viewed as ``torch.float8_e4m3fn``, what the backend hands the
kernels); unused slots hold FP8 NaN. The Triton interpreter on CPU loads float8_e4m3fn pointers
and converts them like the GPU (fp8e4nv), so these run in the CPU tier.
"""
from __future__ import annotations

import pytest
import torch

import proxyattn_kernels.budget.triton as budget_triton
import proxyattn_kernels.common as kernels_common
import proxyattn_kernels.proxy_scores.triton as proxy_triton
from proxyattn_kernels import ChunkGeometry, ProxyAttnParams, proxyattn_prefill_reference
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention
from proxyattn_kernels.block_sparse_attn.triton import block_sparse_attn
from proxyattn_kernels.budget.naive import last_block_mass, last_rows_lse
from proxyattn_kernels.budget.triton import last_block_mass_paged
from proxyattn_kernels.paged import FP8_KV_DTYPE
from proxyattn_kernels.proxy_scores.naive import proxy_block_scores
from proxyattn_kernels.proxy_scores.triton import proxy_block_scores_paged
from proxyattn_kernels.reference import dequantize_kv, gather_paged_kv
from proxyattn_kernels.selection import select_blocks_paged
from proxyattn_kernels.warmup import warm_up

from tests._paged import ATTN_TOL, make_paged

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
K_SCALE, V_SCALE = 0.37, 2.5
# The interpreter computes log2(0) of masked rows before discarding them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# Tolerances of the bf16/fp16/fp32 tests of the same kernels (test_block_sparse_triton.py,
# test_selection_triton.py): the kernels see the same values as the spec, only rounded to the
# query dtype where the spec keeps float32.
# float32 on CUDA: TF32 dots (see ATTN_TOL), held to the float16 bound.
SCORE_TOL = {torch.float32: (2e-2, 1e-4) if torch.cuda.is_available() else (1e-5, 1e-6), torch.float16: (2e-2, 1e-4), torch.bfloat16: (5e-2, 1e-3)}

# (Hq, Hkv, D, ctx, q_len, block, page): GQA 1/2/4/7, chunks that start and end inside blocks
# and pages, pages smaller, equal to and larger than the block.
CASES = [
    (4, 2, 32, 37, 90, 32, 16),
    (4, 1, 16, 100, 45, 16, 32),
    (7, 1, 16, 61, 67, 32, 32),
    (6, 3, 16, 130, 33, 16, 48),
]


@pytest.fixture(autouse=True)
def poison_workspaces(monkeypatch):
    """Internal workspaces start as NaN: every element a kernel reads must have been written."""
    def nan_workspace(shape, device, dtype=torch.float32):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (proxy_triton, budget_triton):
        assert module.workspace is kernels_common.workspace
        monkeypatch.setattr(module, "workspace", nan_workspace)


def scale_tensor(value: float) -> torch.Tensor:
    """A layer's KV scale as vLLM keeps it: a 0-dim float32 tensor on the device."""
    return torch.tensor(value, dtype=torch.float32, device=DEVICE)


def fp8_chunk(hq, hkv, d, ctx, q_len, page, dtype, q_scale=1.0):
    """Random ``q [q_len, Hq, D]`` (a strided slice, as vLLM's packed qkv) and keys/values
    ``[ctx + q_len, Hkv, D]`` in ``dtype``; the FP8 paged cache of those keys and values (the
    logical view of an NHD tensor with a shuffled table, NaN in unused slots) and its table."""
    q = (q_scale * torch.randn(q_len, hq + 2 * hkv, d, device=DEVICE)).to(dtype)[:, :hq]
    k = torch.randn(ctx + q_len, hkv, d, device=DEVICE).to(dtype)
    v = torch.randn(ctx + q_len, hkv, d, device=DEVICE).to(dtype)
    # Quantize (round to e4m3 after dividing by the scale, as vLLM's cache write does), then place
    # the exactly representable values in a float32 cache and narrow it to FP8.
    kq = (k.float() / K_SCALE).to(FP8_KV_DTYPE).float()
    vq = (v.float() / V_SCALE).to(FP8_KV_DTYPE).float()
    wide, table = make_paged(kq, vq, page)
    physical = wide.permute(0, 2, 1, 3).to(FP8_KV_DTYPE)  # NHD, NaN -> FP8 NaN
    raw = physical.view(torch.uint8)  # what vLLM allocates
    return q, k, v, raw.view(FP8_KV_DTYPE).permute(0, 2, 1, 3), table


def dequantized(kv_cache, table, seq_len):
    """Keys and values ``[seq_len, Hkv, D]`` float32 of the FP8 cache, as the kernels must see them."""
    return gather_paged_kv(kv_cache, table, seq_len, scale_tensor(K_SCALE), scale_tensor(V_SCALE))


def test_cache_helper_quantizes_with_the_scales(rng_seed):
    q, k, v, kv_cache, table = fp8_chunk(2, 2, 16, 10, 20, 16, torch.float32)
    assert kv_cache.dtype == FP8_KV_DTYPE and kv_cache.stride(-1) == 1
    kd, vd = dequantized(kv_cache, table, 30)
    assert kd.dtype == vd.dtype == torch.float32 and not kd.isnan().any()
    # e4m3 keeps 3 mantissa bits: within 1/16 relative of the data (plus the subnormal floor).
    torch.testing.assert_close(kd, k, rtol=0.07, atol=K_SCALE * 2**-9)
    torch.testing.assert_close(vd, v, rtol=0.07, atol=V_SCALE * 2**-9)
    assert torch.equal(dequantize_kv(k, None), k)


# ------------------------------------------------------------------------------------------
# Block-sparse attention
# ------------------------------------------------------------------------------------------


def run_attention(hq, hkv, d, ctx, q_len, block, page, dtype, copy_page=None, groups=1, gamma=0.6):
    """One chunk's block-sparse attention on an FP8 cache against the spec on its dequantized
    values: ``(q, k, v, kv_cache, table, selection, out)``."""
    q, k, v, kv_cache, table = fp8_chunk(hq, hkv, d, ctx, q_len, page, dtype)
    kd, vd = dequantized(kv_cache, table, ctx + q_len)
    params = ProxyAttnParams(gamma=gamma, block_size=block, num_groups=groups, min_budget_blocks=1,
                             sink_blocks=1, local_blocks=1, min_sparse_len=0)
    _, sel = proxyattn_prefill_reference(q, kd, vd, ctx=ctx, params=params)
    out = torch.full_like(q, float("nan"))
    scale = d**-0.5
    block_sparse_attn(q, kv_cache, table, sel.ranking, sel.counts, out, ctx=ctx, scale=scale, block_size=block,
                      copy_page=copy_page, k_scale=scale_tensor(K_SCALE), v_scale=scale_tensor(V_SCALE))
    assert not out.isnan().any(), "every output element must be written"
    expected = block_sparse_attention(q, kd, vd, ctx, sel.block_mask(), scale, block)
    tol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
    return q, k, v, kv_cache, table, sel, out


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,page", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sparse_on_fp8_matches_naive_on_the_dequantized_cache(rng_seed, hq, hkv, d, ctx, q_len, block,
                                                                     page, dtype):
    run_attention(hq, hkv, d, ctx, q_len, block, page, dtype, groups=hkv)


@pytest.mark.parametrize("page,copy_page", [(16, 32), (16, 64)])
def test_block_sparse_on_fp8_over_a_contiguous_copy(rng_seed, page, copy_page):
    """The copy into larger pages (vLLM's 16-token pages on Hopper) moves FP8 bytes."""
    run_attention(4, 2, 32, 37, 90, 32, page, torch.bfloat16, copy_page=copy_page)


def test_block_sparse_on_fp8_is_close_to_the_unquantized_attention(rng_seed):
    """Full density: the FP8 result is within FP8 rounding of attention on the bf16 data it was
    quantized from; without either scale it is far from it."""
    q, k, v, kv_cache, table, sel, out = run_attention(4, 2, 32, 45, 83, 16, 16, torch.bfloat16, gamma=1.0)
    expected = block_sparse_attention(q, k, v, 45, sel.block_mask(), 32**-0.5, 16).float()
    err = (out.float() - expected).norm() / expected.norm()
    assert err < 0.08, f"relative error {err:.3f} vs the unquantized attention"
    for k_scale, v_scale in ((1.0, V_SCALE), (K_SCALE, 1.0)):
        wrong = torch.empty_like(q)
        block_sparse_attn(q, kv_cache, table, sel.ranking, sel.counts, wrong, ctx=45, scale=32**-0.5, block_size=16,
                          k_scale=scale_tensor(k_scale), v_scale=scale_tensor(v_scale))
        assert (wrong.float() - expected).norm() / expected.norm() > 0.2


# ------------------------------------------------------------------------------------------
# Selection: proxy scores, budget mass, the whole selection
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,page", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_proxy_scores_on_fp8_match_naive(rng_seed, hq, hkv, d, ctx, q_len, block, page, dtype):
    q, _, _, kv_cache, table = fp8_chunk(hq, hkv, d, ctx, q_len, page, dtype)
    kd, _ = dequantized(kv_cache, table, ctx + q_len)
    scale = d**-0.5
    scores = proxy_block_scores_paged(q, kv_cache, table, ctx=ctx, scale=scale, num_groups=hkv, stride=4,
                                      block_size=block, k_scale=scale_tensor(K_SCALE))
    expected = proxy_block_scores(q, kd, ctx, scale, hkv, 4, block)
    assert torch.equal(torch.isinf(scores), torch.isinf(expected)) and not scores.isnan().any()
    finite = torch.isfinite(expected)
    rtol, atol = SCORE_TOL[dtype]
    torch.testing.assert_close(scores[finite], expected[finite], rtol=rtol, atol=atol)


@pytest.mark.parametrize("hq,hkv,d,ctx,q_len,block,page", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("given_lse", [False, True])
def test_budget_mass_on_fp8_matches_naive(rng_seed, hq, hkv, d, ctx, q_len, block, page, dtype, given_lse):
    """Both passes: from the kernel's own row LSE, and from a dense kernel's (``row_lse``)."""
    q, _, _, kv_cache, table = fp8_chunk(hq, hkv, d, ctx, q_len, page, dtype, q_scale=2.0)
    kd, _ = dequantized(kv_cache, table, ctx + q_len)
    scale = d**-0.5
    lse = last_rows_lse(q, kd, ctx, scale, block).contiguous() if given_lse else None
    out = torch.full((hq, ChunkGeometry(ctx, q_len, block).num_k_blocks), float("nan"), device=DEVICE)
    mass = last_block_mass_paged(q, kv_cache, table, ctx=ctx, scale=scale, block_size=block, out=out, row_lse=lse,
                                 k_scale=scale_tensor(K_SCALE))
    assert not mass.isnan().any()
    rtol, atol = SCORE_TOL[dtype]
    torch.testing.assert_close(mass, last_block_mass(q, kd, ctx, scale, block), rtol=rtol, atol=atol)


def test_selection_on_fp8_matches_the_reference_on_the_dequantized_cache(rng_seed):
    hq, hkv, d, ctx, q_len, block, page = 4, 2, 32, 37, 90, 32, 16
    q, _, _, kv_cache, table = fp8_chunk(hq, hkv, d, ctx, q_len, page, torch.float32, q_scale=2.0)
    params = ProxyAttnParams(gamma=0.8, stride=4, block_size=block, num_groups=hkv, min_budget_blocks=2,
                             sink_blocks=1, local_blocks=2, min_sparse_len=0)
    scale = d**-0.5
    sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=scale, params=params, k_scale=scale_tensor(K_SCALE))
    _, ref = proxyattn_prefill_reference(q, ctx=ctx, params=params, scale=scale, kv_cache=kv_cache, block_table=table,
                                         k_scale=scale_tensor(K_SCALE), v_scale=scale_tensor(V_SCALE))
    torch.testing.assert_close(sel.scores, ref.scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(sel.gamma_counts, ref.gamma_counts) and torch.equal(sel.budget, ref.budget)
    assert torch.equal(sel.ranking, ref.ranking) and torch.equal(sel.counts, ref.counts)


# ------------------------------------------------------------------------------------------
# Inputs and the startup warm-up
# ------------------------------------------------------------------------------------------


def test_scales_must_match_the_cache():
    q, _, _, kv_cache, table = fp8_chunk(2, 2, 16, 0, 40, 16, torch.float32)
    kwargs = dict(ctx=0, scale=0.25, num_groups=1, stride=4, block_size=16)
    with pytest.raises(ValueError, match="an FP8 cache needs k_scale"):
        proxy_block_scores_paged(q, kv_cache, table, **kwargs)
    with pytest.raises(ValueError, match="1-element float32"):
        proxy_block_scores_paged(q, kv_cache, table, **kwargs, k_scale=torch.ones(2, device=DEVICE))
    wide = torch.zeros(kv_cache.shape, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="only for an FP8"):
        proxy_block_scores_paged(q, wide, table, **kwargs, k_scale=scale_tensor(1.0))
    ranking = torch.zeros(1, 3, 3, dtype=torch.int32)
    counts = torch.ones(2, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="v_scale"):
        block_sparse_attn(q, kv_cache, table, ranking, counts, torch.empty_like(q), ctx=0, scale=0.25, block_size=16,
                          k_scale=scale_tensor(1.0))


def test_warm_up_compiles_the_fp8_variants():
    params = ProxyAttnParams(block_size=16, min_sparse_len=0, dense_tail_tokens=16)
    chunks = warm_up(num_q_heads=2, num_kv_heads=1, head_dim=16, page_size=16, dtype=torch.bfloat16,
                     device=torch.device(DEVICE), params=params, max_seq_len=48, budget_lse=True,
                     kv_dtype=FP8_KV_DTYPE)
    assert chunks > 0


@pytest.mark.gpu
@pytest.mark.parametrize("page", [16, 128])
def test_gpu_block_sparse_on_fp8_real_sizes(rng_seed, page):
    """Hopper: the TMA path (128-token pages) and the copy (16-token pages) on FP8 tiles."""
    q, k, v, _, _, sel, out = run_attention(32, 8, 128, 4096, 2048, 128, page, torch.bfloat16, groups=1)
    expected = block_sparse_attention(q, k, v, 4096, sel.block_mask(), 128**-0.5, 128).float()
    assert (out.float() - expected).norm() / expected.norm() < 0.08
