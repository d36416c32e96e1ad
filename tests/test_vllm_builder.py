"""ProxyAttnMetadataBuilder: the CPU-side plan of a batch, on vLLM's CPU platform."""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

pytest.importorskip("vllm")

PAGE = 16  # kernel block (page) size
CONFIG = {"min_sparse_len": 64, "block_size": 16, "stride": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from proxyattn_vllm.testing import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def vllm_config(model_dir):
    from proxyattn_vllm.testing import make_vllm_config

    return make_vllm_config(model_dir, CONFIG, block_size=PAGE)


def _builder(vllm_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from proxyattn_vllm.metadata import ProxyAttnMetadataBuilder
    from proxyattn_vllm.testing import HEAD_DIM, NUM_KV_HEADS

    spec = FullAttentionSpec(
        block_size=PAGE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32
    )
    names = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    return ProxyAttnMetadataBuilder(spec, names, vllm_config, torch.device("cpu"))


def common_metadata(q_lens, seq_lens, pad_tokens=0, device_seq_lens=None, max_pages=16):
    """CommonAttentionMetadata for rows with these query and total lengths (CPU tensors)."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
    num_tokens = int(qsl[-1]) + pad_tokens
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    # Distinct physical pages per request, in a shuffled order.
    perm = torch.randperm(len(q_lens) * max_pages, generator=torch.Generator().manual_seed(0))
    block_table = perm.view(len(q_lens), max_pages).to(torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(),
        query_start_loc_cpu=qsl,
        seq_lens=seq.clone() if device_seq_lens is None else device_seq_lens,
        num_reqs=len(q_lens),
        num_actual_tokens=num_tokens,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=block_table,
        slot_mapping=torch.zeros(num_tokens, dtype=torch.int64),
        causal=True,
        seq_lens_cpu_upper_bound=seq,
    )


# 2 decodes, a short first chunk, a long chunk with ctx = 53 (not a multiple of 16),
# a short extend, 2 padded rows (query_len 0) and 8 padded tokens.
MIXED_Q = [1, 1, 9, 40, 5, 0, 0]
MIXED_SEQ = [37, 20, 9, 93, 15, 0, 0]


def test_builder_class_settings(vllm_config):
    from vllm.v1.attention.backend import AttentionCGSupport

    builder = _builder(vllm_config)
    assert builder.reorder_batch_threshold == 1
    assert builder.get_cudagraph_support(vllm_config, None) is AttentionCGSupport.UNIFORM_BATCH
    assert builder.use_cascade_attention(common_prefix_len=64) is False
    assert builder.supports_update_block_table is False
    assert builder.aot_schedule is False  # no vllm_flash_attn on CPU: no FA3 AOT scheduling
    assert builder.proxyattn_config.min_sparse_len == 64


def test_mixed_batch_plan(vllm_config, monkeypatch):
    from vllm.v1.attention.backend import CommonAttentionMetadata
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    from proxyattn_vllm.metadata import DenseRun, SparseRow
    from proxyattn_vllm.vllm_compat import uses_cascade

    def _forbidden(self):
        raise AssertionError("the builder read seq_lens_cpu (a device sync)")

    # (Both are gone from vLLM 0.32's CommonAttentionMetadata: raising=False puts them back as traps.)
    monkeypatch.setattr(CommonAttentionMetadata, "seq_lens_cpu", property(_forbidden), raising=False)
    monkeypatch.setattr(CommonAttentionMetadata, "num_computed_tokens_cpu", property(_forbidden), raising=False)
    # Device seq_lens deliberately disagree with the CPU bound: the plan must use the CPU one.
    cm = common_metadata(
        MIXED_Q, MIXED_SEQ, pad_tokens=8,
        device_seq_lens=torch.tensor(MIXED_SEQ, dtype=torch.int32) + 1000,
    )
    md = _builder(vllm_config).build(0, cm)

    assert isinstance(md.dense, FlashAttentionMetadata)
    assert md.dense.num_actual_tokens == 64 and not uses_cascade(md.dense)
    assert md.dense.block_table is cm.block_table_tensor
    plan = md.plan
    assert plan.num_reqs == 7 and plan.num_tokens == 56
    assert plan.decode_rows == (0, 1) and plan.num_decodes == 2 and plan.num_decode_tokens == 2
    assert plan.short_rows == (2, 4)
    assert plan.padded_rows == (5, 6)
    # The default dense tail (128 tokens) covers this whole 40-token chunk.
    assert plan.sparse_rows == (SparseRow(req_idx=3, token_start=11, q_len=40, ctx=53, seq_len=93, tail_tokens=40),)
    assert plan.sparse_rows[0].tail_cu_seqlens_q.tolist() == [0, 40]
    row = plan.sparse_rows[0]
    assert all(type(v) is int for v in (row.req_idx, row.token_start, row.q_len, row.ctx, row.seq_len))
    assert row.token_end == 51
    # Dense rows are grouped into runs of consecutive rows around the sparse one.
    assert plan.dense_runs == (
        DenseRun(req_start=0, req_end=3, token_start=0, token_end=11, max_query_len=9, max_seq_len=37),
        DenseRun(req_start=4, req_end=5, token_start=51, token_end=56, max_query_len=5, max_seq_len=15),
    )
    assert plan.dense_runs[0].cu_seqlens_q.tolist() == [0, 1, 2, 11]
    assert plan.dense_runs[1].cu_seqlens_q.tolist() == [0, 5]
    assert plan.dense_runs[0].cu_seqlens_q.dtype == torch.int32


class _Untouchable(torch.Tensor):
    """A CPU tensor that fails the test on any torch operation (indexing, ``.numpy()``,
    ``np.asarray``, ``.tolist()``, arithmetic): proof that the fast path does no per-row work."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"the decode fast path used a per-row CPU tensor ({func})")


def _assert_same_fa_metadata(ours, expected):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    assert type(ours) is FlashAttentionMetadata
    for f in dataclasses.fields(FlashAttentionMetadata):
        a, b = getattr(ours, f.name), getattr(expected, f.name)
        if isinstance(a, torch.Tensor):
            assert a is b or torch.equal(a, b), f.name
        else:
            assert a == b, f.name


# Decode-only batches: one row, cudagraph padding rows (query_len 0), long rows (seq_len far
# above min_sparse_len, so only the query lengths keep them dense).
DECODE_BATCHES = [([1], [4000]), ([1, 1, 1, 0], [70, 90, 5, 0]), ([1] * 8 + [0] * 8, [200] * 8 + [0] * 8)]


@pytest.mark.parametrize("q_lens,seq_lens", DECODE_BATCHES)
def test_decode_batches_take_the_fast_path(vllm_config, monkeypatch, q_lens, seq_lens):
    """Every decode step: FlashAttention's build with the same arguments plus O(1) work; no
    plan_batch, no operation on the per-row CPU tensors, exactly FA's metadata."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadataBuilder

    from proxyattn_vllm import metadata

    def _forbidden(*args, **kwargs):
        raise AssertionError("plan_batch ran for a decode-only batch")

    fa_calls = []
    fa_build = FlashAttentionMetadataBuilder.build

    def recording_build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        fa_calls.append((common_prefix_len, fast_build))
        return fa_build(self, common_prefix_len, common_attn_metadata, fast_build)

    monkeypatch.setattr(metadata, "plan_batch", _forbidden)
    monkeypatch.setattr(FlashAttentionMetadataBuilder, "build", recording_build)
    cm = common_metadata(q_lens, seq_lens, pad_tokens=3)
    expected = FlashAttentionMetadataBuilder(
        _builder(vllm_config).kv_cache_spec, ["model.layers.0.self_attn.attn"], vllm_config,
        torch.device("cpu"),
    ).build(0, cm)
    cm.query_start_loc_cpu = cm.query_start_loc_cpu.as_subclass(_Untouchable)
    cm.seq_lens_cpu_upper_bound = cm.seq_lens_cpu_upper_bound.as_subclass(_Untouchable)

    builder = _builder(vllm_config)
    assert builder.is_decode_only(cm)
    fa_calls.clear()
    md = builder.build(0, cm)
    assert fa_calls == [(0, False)]  # as FA's own build: no cascade, AOT schedule allowed
    _assert_same_fa_metadata(md.dense, expected)
    plan = md.plan
    assert plan.num_reqs == len(q_lens) and not plan.has_sparse
    assert plan.sparse_rows == () and plan.dense_runs == () and not plan.is_classified
    assert plan is metadata.ProxyAttnPlan.dense_only(len(q_lens))  # one shared immutable plan
    # The FULL-cudagraph capture of decode batches builds through the same path.
    assert builder.build_for_cudagraph_capture(cm).plan is plan


def test_batches_with_prefill_rows_are_planned(vllm_config):
    """One prefill row, however short, sends the batch through plan_batch (and its per-row
    classification); the fast path must not swallow it."""
    builder = _builder(vllm_config)
    for q_lens, seq_lens in (([1, 2], [80, 70]), ([1, 30, 12], [80, 63, 12])):
        cm = common_metadata(q_lens, seq_lens)
        assert not builder.is_decode_only(cm)
        assert builder.build(0, cm).plan.is_classified
    md = builder.build(0, common_metadata([1, 2], [80, 70]))
    assert [r.req_idx for r in md.plan.sparse_rows] == [1]  # a 2-token chunk of a long prompt
    md = builder.build(0, common_metadata([1, 30, 12], [80, 63, 12]))
    assert md.plan.decode_rows == (0,) and md.plan.short_rows == (1, 2) and not md.plan.has_sparse


def test_fast_path_never_hides_a_sparse_row(vllm_config):
    """Random batches (with and without speculative decoding): whenever the builder takes the
    fast path, plan_batch would not have sparsified any row either."""
    from proxyattn_vllm.metadata import plan_batch

    gen = torch.Generator().manual_seed(0)
    builder = _builder(vllm_config)
    taken = 0
    for trial in range(400):
        builder.max_dense_query_len = 1 + (trial % 3)  # 0, 1 or 2 speculative tokens
        n = int(torch.randint(1, 9, (1,), generator=gen))
        q_lens = torch.randint(0, builder.max_dense_query_len + 2, (n,), generator=gen).tolist()
        if not any(q_lens):
            q_lens[0] = 1
        seq_lens = [q + int(torch.randint(0, 130, (1,), generator=gen)) if q else 0 for q in q_lens]
        cm = common_metadata(q_lens, seq_lens)
        config = builder.proxyattn_config
        plan = plan_batch(cm.query_start_loc_cpu, cm.seq_lens_cpu_upper_bound, n, config.min_sparse_len,
                          builder.max_dense_query_len, config.block_size, config.dense_tail_tokens)
        if builder.is_decode_only(cm):
            taken += 1
            assert not plan.has_sparse, (q_lens, seq_lens)
            assert builder.build(0, cm).plan == builder.build(0, cm).plan.dense_only(n)
        else:
            assert builder.build(0, cm).plan == plan
    assert 50 < taken < 350  # both paths exercised


def test_decode_batch_classification():
    """plan_batch (the general path) still classifies decode and padded rows."""
    from proxyattn_vllm.metadata import plan_batch

    qsl = torch.tensor([0, 1, 2, 3, 3], dtype=torch.int32)
    plan = plan_batch(qsl, torch.tensor([70, 90, 5, 0], dtype=torch.int32), 4, min_sparse_len=64)
    assert plan.decode_rows == (0, 1, 2) and plan.padded_rows == (3,) and plan.num_decodes == 3
    assert plan.num_tokens == 3 and plan.num_decode_tokens == 3 and not plan.has_sparse


def test_min_sparse_len_boundary_and_spec_decode_guard():
    from proxyattn_vllm.metadata import plan_batch

    qsl = torch.tensor([0, 20, 40, 43], dtype=torch.int32)
    plan = plan_batch(qsl, torch.tensor([63, 64, 500], dtype=torch.int32), 3, min_sparse_len=64)
    assert [r.req_idx for r in plan.sparse_rows] == [1, 2]
    assert plan.short_rows == (0,)
    # With 2 speculative tokens a 3-token row may be a verify step with an optimistic bound.
    plan = plan_batch(qsl, torch.tensor([63, 64, 500], dtype=torch.int32), 3, 64, max_dense_query_len=3)
    assert [r.req_idx for r in plan.sparse_rows] == [1] and plan.short_rows == (0, 2)
    # No CPU bound at all: nothing is sparsified (never a device sync to find out).
    plan = plan_batch(qsl, None, 3, min_sparse_len=64)
    assert not plan.has_sparse and plan.short_rows == (0, 1, 2)
    # min_sparse_len 0 sparsifies every prefill chunk, never a decode row.
    plan = plan_batch(torch.tensor([0, 1, 9], dtype=torch.int32), torch.tensor([5, 8]), 2, 0)
    assert plan.decode_rows == (0,) and [r.req_idx for r in plan.sparse_rows] == [1]
    assert plan.dense_runs[0].req_start == 0 and plan.dense_runs[0].req_end == 1
    assert plan.sparse_rows[0].tail_tokens == 0  # no dense tail unless asked for


@pytest.mark.parametrize("ctx,q_len,tail,expected", [
    (0, 300, 128, 140),    # the last 128 tokens [172, 300) start in block 10 = [160, 176)
    (53, 40, 8, 13),       # block 5 = [80, 96) holds the last 8 tokens; the chunk's tokens 80-92
    (53, 40, 128, 40),     # the tail covers the whole chunk
    (100, 28, 0, 0),       # no tail
    (96, 64, 16, 16),      # block-aligned end: exactly one block
])
def test_sparse_rows_know_their_dense_tail(ctx, q_len, tail, expected):
    """``tail_tokens``: the chunk's tokens in whole 16-token query blocks that hold its last
    ``tail`` tokens (what the dense kernel computes first when FlashAttention is there)."""
    from proxyattn_vllm.metadata import plan_batch

    qsl = torch.tensor([0, q_len], dtype=torch.int32)
    plan = plan_batch(qsl, torch.tensor([ctx + q_len]), 1, 0, block_size=16, dense_tail_tokens=tail)
    assert plan.sparse_rows[0].tail_tokens == expected


def test_missing_upper_bound_runs_dense(vllm_config):
    cm = common_metadata(MIXED_Q, MIXED_SEQ)
    cm.seq_lens_cpu_upper_bound = None
    md = _builder(vllm_config).build(0, cm)
    assert not md.plan.has_sparse and md.plan.short_rows == (2, 3, 4)


def test_config_is_logged_once_per_process(model_dir):
    from proxyattn_vllm.impl import ProxyAttnImpl
    from proxyattn_vllm.testing import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, make_vllm_config
    from vllm.config import set_current_vllm_config

    lines: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler = _Collect()
    log = logging.getLogger("vllm.proxyattn")
    log.addHandler(handler)
    try:
        # A config no other test uses, so this process has not logged it yet.
        cfg = make_vllm_config(model_dir, {"gamma": 0.8125, "min_sparse_len": 64})
        for _ in range(2):
            _builder(cfg)
        with set_current_vllm_config(cfg):
            for _ in range(3):  # one impl per layer
                ProxyAttnImpl(NUM_HEADS, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, None, None, "auto")
    finally:
        log.removeHandler(handler)
    ours = [line for line in lines if line.startswith("ProxyAttn config:")]
    assert len(ours) == 1 and "gamma=0.8125" in ours[0] and "min_sparse_len=64" in ours[0]


def test_bad_config_fails_at_builder_construction(model_dir):
    from proxyattn_vllm import ProxyAttnConfigError
    from proxyattn_vllm.testing import make_vllm_config

    cfg = make_vllm_config(model_dir, {"gama": 0.9})
    with pytest.raises(ProxyAttnConfigError, match="unknown key 'gama'"):
        _builder(cfg)
