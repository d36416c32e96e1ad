"""benchmarks/quality/union_density.py: the union vs exact block counts, on a hand-made selection
and through a chunked prefill of a tiny random Llama."""
from __future__ import annotations

import pytest
import torch

from proxyattn_kernels.block_sparse_attn.naive import selection_block_mask
from proxyattn_kernels.block_sparse_attn.union_pages import union_block_mask
from proxyattn_kernels.params import ChunkGeometry


def _ud():
    pytest.importorskip("transformers")
    from benchmarks.quality import union_density

    return union_density


def test_block_counts_hand_made():
    ud = _ud()
    # Chunk of 3 rows after one block of context (ctx 4, block 4): extents 2, 3, 4 -> 9 causal blocks.
    geo = ChunkGeometry(4, 12, 4)
    # 2 groups, 4 heads (heads 0,1 -> group 0; heads 2,3 -> group 1); -1 = past the frontier.
    ranking = torch.tensor([
        [[1, 0, -1, -1], [2, 0, 1, -1], [3, 0, 2, 1]],
        [[1, 0, -1, -1], [2, 1, 0, -1], [3, 1, 2, 0]],
    ], dtype=torch.int32)
    counts = torch.tensor([[1, 2, 2], [2, 2, 3], [1, 2, 3], [2, 3, 4]], dtype=torch.int32)
    mask = selection_block_mask(ranking, counts, geo.num_k_blocks)
    c = ud.block_counts(mask, geo)
    assert c["exact"] == int(counts.sum()) == 27
    assert c["causal"] == 9 * 4
    # Unions per row: {1,0}, {2,0,1}, {3,0,2,1} -> 2 + 3 + 4 blocks, for each of 4 heads.
    assert c["union"] == int(union_block_mask(ranking, counts, geo.num_k_blocks).sum()) * 4 == 36
    d = ud.densities(c)
    assert d["exact_density"] == pytest.approx(27 / 36) and d["union_density"] == 1.0
    assert d["ratio"] == pytest.approx(36 / 27)


def test_chunked_prefill_tiny(tmp_path):
    ud = _ud()
    from transformers import AutoModelForCausalLM

    from benchmarks.quality import sparse_sim
    from proxyattn_vllm.testing import write_tiny_llama

    model = AutoModelForCausalLM.from_pretrained(write_tiny_llama(tmp_path), dtype=torch.float32).eval()
    sparse_sim.register_attention()
    sparse_sim.set_attention(model, sparse_sim.ATTN_NAME)
    ids = torch.randint(4, model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    heads, bs = model.config.num_attention_heads, 16
    overrides = {"block_size": bs, "stride": 4, "min_budget_tokens": 16, "min_sparse_len": 64, "dense_tail_tokens": 0}
    try:
        for gamma, dense in ((0.5, False), (1.0, True)):
            sparse_sim.STATE.set(sparse_sim.Variant("t", config={"gamma": gamma}), overrides)
            layers = ud.chunked_prefill(model, ids, 96, heads, bs)  # chunks 96 + 96 + 8 tokens
            geos = [ChunkGeometry(s, min(96, 200 - s), bs) for s in (0, 96, 192)]
            causal = sum(int((g.first_q_block + 1 + torch.arange(g.num_q_blocks)).sum()) for g in geos) * heads
            assert len(layers) == model.config.num_hidden_layers
            for c in layers:
                assert c["causal"] == causal
                assert c["exact"] <= c["union"] <= c["causal"]
                if dense:
                    assert c["exact"] == c["union"] == c["causal"]
            if not dense:
                assert any(c["exact"] < c["causal"] for c in layers)
    finally:
        sparse_sim.STATE.set(None)
