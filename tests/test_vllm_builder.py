"""ProxyAttnMetadataBuilder: the CPU-side plan of a batch, on vLLM's CPU platform."""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("vllm")

PAGE = 16  # kernel block (page) size
CONFIG = {"min_sparse_len": 64, "block_size": 16, "stride": 4}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tests._tiny_llama import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def vllm_config(model_dir):
    from tests._tiny_llama import make_vllm_config

    return make_vllm_config(model_dir, CONFIG, block_size=PAGE)


def _builder(vllm_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from proxyattn_vllm.metadata import ProxyAttnMetadataBuilder
    from tests._tiny_llama import HEAD_DIM, NUM_KV_HEADS

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

    def _forbidden(self):
        raise AssertionError("the builder read seq_lens_cpu (a device sync)")

    monkeypatch.setattr(CommonAttentionMetadata, "seq_lens_cpu", property(_forbidden))
    monkeypatch.setattr(CommonAttentionMetadata, "num_computed_tokens_cpu", property(_forbidden))
    # Device seq_lens deliberately disagree with the CPU bound: the plan must use the CPU one.
    cm = common_metadata(
        MIXED_Q, MIXED_SEQ, pad_tokens=8,
        device_seq_lens=torch.tensor(MIXED_SEQ, dtype=torch.int32) + 1000,
    )
    md = _builder(vllm_config).build(0, cm)

    assert isinstance(md.dense, FlashAttentionMetadata)
    assert md.dense.num_actual_tokens == 64 and md.dense.use_cascade is False
    assert md.dense.block_table is cm.block_table_tensor
    plan = md.plan
    assert plan.num_reqs == 7 and plan.num_tokens == 56
    assert plan.decode_rows == (0, 1) and plan.num_decodes == 2 and plan.num_decode_tokens == 2
    assert plan.short_rows == (2, 4)
    assert plan.padded_rows == (5, 6)
    assert plan.sparse_rows == (SparseRow(req_idx=3, token_start=11, q_len=40, ctx=53, seq_len=93),)
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


def test_pure_decode_and_short_batches_have_no_sparse_work(vllm_config):
    builder = _builder(vllm_config)
    md = builder.build(0, common_metadata([1, 1, 1, 0], [70, 90, 5, 0]))
    assert md.plan.decode_rows == (0, 1, 2) and md.plan.padded_rows == (3,)
    assert not md.plan.has_sparse and md.plan.dense_runs == ()
    md = builder.build(0, common_metadata([1, 30, 12], [80, 63, 12]))
    assert md.plan.short_rows == (1, 2) and not md.plan.has_sparse


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


def test_missing_upper_bound_runs_dense(vllm_config):
    cm = common_metadata(MIXED_Q, MIXED_SEQ)
    cm.seq_lens_cpu_upper_bound = None
    md = _builder(vllm_config).build(0, cm)
    assert not md.plan.has_sparse and md.plan.short_rows == (2, 3, 4)


def test_config_is_logged_once_per_process(model_dir):
    from proxyattn_vllm.impl import ProxyAttnImpl
    from tests._tiny_llama import HEAD_DIM, NUM_HEADS, NUM_KV_HEADS, make_vllm_config
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
    from tests._tiny_llama import make_vllm_config

    cfg = make_vllm_config(model_dir, {"gama": 0.9})
    with pytest.raises(ProxyAttnConfigError, match="unknown key 'gama'"):
        _builder(cfg)
