"""ProxyAttnImpl with an FP8 KV cache (``--kv-cache-dtype fp8``) on vLLM's CPU platform: the
cache is uint8 bytes as vLLM allocates it, the dense rows run vLLM's Triton kernel on it (with
the layer's scales as descales) and the sparse rows the Triton kernels; every row equals the
torch reference on the dequantized cache.

What the CPU cannot run: vLLM's FP8 cache write (``triton_reshape_and_cache_flash`` refuses FP8
without an SM89+ device), so the cache is written here by a torch helper (quantize, as vLLM's
write does: ``round_to_e4m3(x / scale)``); and FlashAttention, so the FP8 query that vLLM's
attention layer gives a FlashAttention impl is tested at the sparse kernels' entry
(``kernel_query``) and its FA3 calls only on a GPU (``gpu`` tests).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from proxyattn_kernels.paged import FP8_KV_DTYPE  # noqa: E402
from proxyattn_kernels.reference import dense_causal_attention, proxyattn_prefill_reference  # noqa: E402

from tests._fake_flashinfer import fake_flashinfer  # noqa: E402,F401 - fixture
from tests.test_vllm_impl import (  # noqa: E402,F401 - vllm_config is a fixture
    HEAD_DIM, MIXED_Q, MIXED_SEQ, NUM_HEADS, NUM_KV_HEADS, PAD_TOKENS, PAGE, SCALE, SPARSE, Batch, _builder, _impl,
    _Layer, vllm_config,
)

K_SCALE, V_SCALE, Q_SCALE = 0.37, 2.5, 0.05


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` as an FP8 cache stores it (e4m3 of ``x / scale``)."""
    return (x.float() / scale).to(FP8_KV_DTYPE)


def dequantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What the kernels must read for ``x`` stored in the FP8 cache: float32."""
    return quantize(x, scale).float() * scale


class Fp8Batch(Batch):
    """:class:`Batch` with its cache in FP8: uint8 pages (vLLM's allocation) holding every
    token's quantized K and V, written by torch (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        physical = torch.zeros(self.kv_cache.permute(0, 2, 1, 3).shape, dtype=torch.uint8)
        fp8 = physical.view(FP8_KV_DTYPE)
        for r, seq_len in enumerate(self.seq_lens):
            pos = torch.arange(seq_len)
            pages, slots = self.block_table[r].long()[pos // PAGE], pos % PAGE
            fp8[pages, slots, :, :HEAD_DIM] = quantize(self.keys[r], K_SCALE)
            fp8[pages, slots, :, HEAD_DIM:] = quantize(self.values[r], V_SCALE)
        self.kv_cache = physical.permute(0, 2, 1, 3)

    def expected_kv(self, r):
        return dequantize(self.keys[r], K_SCALE), dequantize(self.values[r], V_SCALE)

    def run(self, impl, metadata, layer):
        output = torch.full_like(self.query, 7.0)  # sentinel: padded tokens must stay untouched
        assert impl.forward(layer, self.query, self.key, self.value, self.kv_cache, metadata, output) is output
        return output


def fp8_layer(index: int = 0) -> _Layer:
    layer = _Layer(index)
    layer._k_scale = torch.tensor(K_SCALE)  # 0-dim float32, as vLLM's buffers
    layer._v_scale = torch.tensor(V_SCALE)
    return layer


def _params(config):
    from proxyattn_vllm import ProxyAttnConfig

    return ProxyAttnConfig.from_dict(config).kernel_params(NUM_HEADS, NUM_KV_HEADS)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e4m3"])
def test_fp8_is_accepted_and_the_query_stays_unquantized_without_flash_attention(kv_cache_dtype):
    impl = _impl(kv_cache_dtype=kv_cache_dtype)
    assert impl.fp8_dtype == FP8_KV_DTYPE and impl.dense.fp8_dtype == FP8_KV_DTYPE
    # vLLM's Triton kernel (the dense kernel here) takes the model-dtype query: vLLM's attention
    # layer must not quantize it.
    assert not impl.dense.use_flash_attn and impl.supports_quant_query_input is False
    assert _impl().fp8_dtype is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tail_by_dense", [False, True])
def test_mixed_batch_on_fp8_matches_the_reference_on_the_dequantized_cache(vllm_config, dtype, tail_by_dense,
                                                                            monkeypatch):
    """Decodes, short prefills and a long sparse row in one batch over the FP8 cache; with
    ``tail_by_dense`` the sparse row's dense-tail rows go to the dense kernel first."""
    batch = Fp8Batch(MIXED_Q, MIXED_SEQ, dtype, pad_tokens=PAD_TOKENS, seed=21)
    md = _builder(vllm_config).build(0, batch.common)
    assert [r.req_idx for r in md.plan.sparse_rows] == [3]
    impl = _impl(kv_cache_dtype="fp8")
    monkeypatch.setattr(impl.dense, "tail_first", tail_by_dense)
    output = batch.run(impl, md, fp8_layer())
    assert impl.sparse_kernel.name == "triton"
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for r, tokens, ctx in batch.rows():
        q = batch.query[tokens]
        k, v = batch.expected_kv(r)
        if r == 3:
            expected, selection = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=_params(SPARSE), scale=SCALE)
            assert selection.density < 0.9, selection.stats()
        else:
            expected = dense_causal_attention(q, k, v, ctx, SCALE)
        torch.testing.assert_close(output[tokens], expected.to(dtype), **tol, msg=f"row {r}")
        # Within FP8 rounding of the unquantized attention, and not what a missing scale gives.
        if r != 3:
            exact = dense_causal_attention(q, batch.keys[r], batch.values[r], ctx, SCALE).float()
            assert (output[tokens].float() - exact).norm() / exact.norm() < 0.08, f"row {r}"
    assert (output[batch.qsl[-1]:] == 7.0).all(), "padded tokens were written"


def test_a_batch_without_sparse_rows_on_fp8(vllm_config):
    """Decodes and short prefills only: one dense call over the batch, on the FP8 cache."""
    batch = Fp8Batch([1, 9, 1], [37, 9, 60], torch.float32, pad_tokens=3, seed=25)
    md = _builder(vllm_config).build(0, batch.common)
    assert not md.plan.has_sparse
    output = batch.run(_impl(kv_cache_dtype="fp8"), md, fp8_layer())
    for r, tokens, ctx in batch.rows():
        k, v = batch.expected_kv(r)
        expected = dense_causal_attention(batch.query[tokens], k, v, ctx, SCALE)
        torch.testing.assert_close(output[tokens], expected, atol=2e-5, rtol=1e-4, msg=f"row {r}")
    assert (output[batch.qsl[-1]:] == 7.0).all(), "padded tokens were written"


def test_fa3_union_kernel_on_fp8(vllm_config):
    """``sparse_kernel: "fa3"``: the union pseudo-requests go through the dense kernel with the
    FP8 cache and its descales (vLLM's Triton kernel here); the result is the union-mask
    attention on the dequantized cache."""
    from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention
    from proxyattn_kernels.block_sparse_attn.union_pages import union_block_mask

    config = {**SPARSE, "sparse_kernel": "fa3", "dense_tail_tokens": 0}
    batch = Fp8Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS, seed=22)
    md = _builder(vllm_config).build(0, batch.common)
    impl = _impl(config, kv_cache_dtype="fp8")
    output = batch.run(impl, md, fp8_layer())
    assert impl.sparse_kernel.name == "fa3"
    r, tokens, ctx = next(row for row in batch.rows() if row[0] == 3)
    q = batch.query[tokens]
    k, v = batch.expected_kv(r)
    _, selection = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=_params(config), scale=SCALE)
    mask = union_block_mask(selection.ranking, selection.counts, selection.geometry.num_k_blocks)
    expected = block_sparse_attention(q, k, v, ctx, mask.expand(NUM_HEADS, -1, -1), SCALE, 16)
    torch.testing.assert_close(output[tokens], expected, atol=2e-5, rtol=1e-4)


def test_a_quantized_query_is_dequantized_for_the_sparse_kernels(vllm_config):
    """Under FlashAttention vLLM's attention layer hands the impl an FP8 query (its ``_q_scale``):
    the Triton kernels read it dequantized, in the output dtype; a model-dtype query is passed
    through as it is."""
    from proxyattn_vllm.sparse.base import SparseChunk, kernel_query
    from proxyattn_vllm.sparse.triton import TritonSparseKernel

    batch = Fp8Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS, seed=23)
    md = _builder(vllm_config).build(0, batch.common)
    layer = fp8_layer()
    layer._q_scale = torch.tensor(Q_SCALE)
    r, tokens, ctx = next(row for row in batch.rows() if row[0] == 3)
    q8 = quantize(batch.query[tokens], Q_SCALE)
    out = torch.full_like(batch.query[tokens], float("nan"))
    chunk = SparseChunk(q8, batch.kv_cache.view(FP8_KV_DTYPE), batch.block_table[r], out, ctx)
    q = kernel_query(chunk, layer)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, q8.float() * Q_SCALE, atol=0, rtol=0)
    assert kernel_query(chunk._replace(query=q), layer) is q
    impl = _impl(kv_cache_dtype="fp8")
    TritonSparseKernel(impl.sparse_layer).run(layer, chunk)
    k, v = batch.expected_kv(r)
    expected, _ = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=_params(SPARSE), scale=SCALE)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert md.plan.sparse_rows[0].req_idx == r


def test_stats_on_fp8_measure_the_dequantized_keys(vllm_config, tmp_path, monkeypatch):
    """``PROXYATTN_STATS`` on an FP8 cache: the kept mass is computed (finite, in [0, 1])."""
    from proxyattn_vllm import stats

    path = tmp_path / "stats.jsonl"
    stats.configure(str(path))
    try:
        batch = Fp8Batch(MIXED_Q, MIXED_SEQ, torch.float16, pad_tokens=PAD_TOKENS, seed=24)
        md = _builder(vllm_config).build(0, batch.common)
        batch.run(_impl(kv_cache_dtype="fp8"), md, fp8_layer())
        stats.flush()
    finally:
        stats.configure(None)
    (line,) = stats.read_lines(path)
    assert 0.0 < line["kept_mass"] <= 1.0 and 0.0 < line["density"] < 1.0, line


def test_flashinfer_on_fp8_falls_back_to_triton_with_one_warning(fake_flashinfer, monkeypatch):
    from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi_release

    from proxyattn_vllm import impl as impl_module
    from proxyattn_vllm.sparse import choose

    monkeypatch.setattr(fi_release, "SUPPORTED_DTYPES", (torch.float32,))  # the stand-in takes the rest
    monkeypatch.setattr(fi_release, "SUPPORTED_HEAD_DIMS", (HEAD_DIM,))
    warnings = []
    monkeypatch.setattr(choose, "_warned_fallbacks", set())
    monkeypatch.setattr(impl_module.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    kv_cache = torch.zeros(4, PAGE, NUM_KV_HEADS, 2 * HEAD_DIM, dtype=FP8_KV_DTYPE).permute(0, 2, 1, 3)
    for _ in range(2):  # two layers: one warning
        impl = _impl({**SPARSE, "sparse_kernel": "flashinfer"}, kv_cache_dtype="fp8")
        assert impl._choose_sparse_kernel(kv_cache).name == "triton"
    assert len(warnings) == 1, warnings
    assert 'sparse_kernel "flashinfer" does not read an FP8 KV cache (--kv-cache-dtype fp8)' in warnings[0]
    # The same layer on a float32 cache keeps FlashInfer.
    wide = torch.zeros(4, PAGE, NUM_KV_HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)
    assert _impl({**SPARSE, "sparse_kernel": "flashinfer"})._choose_sparse_kernel(wide).name == "flashinfer"


def test_fp8_e5m2_and_other_dtypes_fail_in_one_line():
    from proxyattn_vllm.impl import ProxyAttnUnsupportedError

    for dtype in ("fp8_e5m2", "int8"):
        with pytest.raises(ProxyAttnUnsupportedError) as info:
            _impl(kv_cache_dtype=dtype)
        msg = str(info.value)
        assert "\n" not in msg and f"kv_cache_dtype={dtype!r} is not supported" in msg, msg
        assert "accepted: auto, float16, bfloat16, fp8, fp8_e4m3" in msg and "FLASH_ATTN" in msg, msg


def test_backend_takes_fp8_where_the_dense_kernels_store_it(monkeypatch):
    """Without FlashAttention the dense part is vLLM's Triton kernels, whose FP8 cache write needs
    a CUDA device with native FP8 (SM89+): not this CPU, so startup refuses fp8 here (with
    vLLM's reason and ProxyAttn's hint, test_vllm_plugin.py); on such a device it is taken."""
    from vllm.platforms import current_platform

    from proxyattn_vllm.backend import ProxyAttnBackend

    assert not ProxyAttnBackend.supports_kv_cache_dtype("fp8")
    monkeypatch.setattr(type(current_platform), "is_cuda", lambda *args: True)
    monkeypatch.setattr(type(current_platform), "has_device_capability", lambda *args, **kwargs: True)
    assert ProxyAttnBackend.supports_kv_cache_dtype("fp8") and ProxyAttnBackend.supports_kv_cache_dtype("fp8_e4m3")
    assert not ProxyAttnBackend.supports_kv_cache_dtype("fp8_e5m2")
    assert ProxyAttnBackend.supports_kv_cache_dtype("auto")

