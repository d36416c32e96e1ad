"""The CPU simulation harness (benchmarks/quality/sparse_sim.py) on a tiny random Llama.

Checks the attention replacement itself: every block computed reproduces the dense model,
the proxy variants compute exactly what ``proxyattn_prefill_reference`` computes, and
``last_row_dense`` computes every causal block of the final query-block row.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from benchmarks.quality import sparse_sim  # noqa: E402

# Small blocks so a ~200-token prompt has many rows; a minimum budget of one block and a low
# gamma so the proxy selection really skips blocks.
OVERRIDES = {"block_size": 16, "stride": 4, "min_budget_tokens": 16, "min_sparse_len": 64}
SEQ_LEN = 200  # not a multiple of the block size: a partial final row


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from proxyattn_vllm.testing import write_tiny_llama

    path = write_tiny_llama(tmp_path_factory.mktemp("tiny_sim"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    sparse_sim.register_attention()
    ids = torch.randint(4, model.config.vocab_size, (1, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    yield model, ids
    sparse_sim.STATE.set(None)
    sparse_sim.STATE.check_reference = False


@torch.inference_mode()
def _logits(model, ids, attn: str, variant=None, overrides=None, check_reference=False):
    sparse_sim.set_attention(model, attn)
    sparse_sim.STATE.set(variant, overrides)
    sparse_sim.STATE.check_reference = check_reference
    try:
        return model(input_ids=ids).logits[0].float()
    finally:
        sparse_sim.STATE.check_reference = False


def test_full_density_equals_dense(tiny):
    model, ids = tiny
    dense = _logits(model, ids, "sdpa")
    full = _logits(model, ids, sparse_sim.ATTN_NAME, sparse_sim.VARIANTS["gamma1"], OVERRIDES)
    records = sparse_sim.STATE.records
    assert sorted(records) == list(range(model.config.num_hidden_layers))
    assert all(r["density"] == 1.0 and abs(r["kept_mass"] - 1.0) < 1e-5 for r in records.values())
    torch.testing.assert_close(full, dense, atol=1e-4, rtol=1e-4)

    # Greedy decoding (dense decode steps over the cache) gives the dense model's tokens.
    sparse_sim.set_attention(model, "sdpa")
    sparse_sim.STATE.set(None)
    want, _ = sparse_sim.generate(model, ids[0].tolist(), 5, eos=set())
    sparse_sim.set_attention(model, sparse_sim.ATTN_NAME)
    sparse_sim.STATE.set(sparse_sim.VARIANTS["gamma1"], OVERRIDES)
    got, _ = sparse_sim.generate(model, ids[0].tolist(), 5, eos=set())
    assert got == want


@pytest.mark.parametrize("gamma", [0.5, 0.95])
def test_proxy_variant_matches_reference(tiny, gamma):
    model, ids = tiny
    _logits(model, ids, sparse_sim.ATTN_NAME, sparse_sim.VARIANTS["base"], {**OVERRIDES, "gamma": gamma},
            check_reference=True)
    diffs = sparse_sim.STATE.reference_diffs
    assert sorted(diffs) == list(range(model.config.num_hidden_layers))
    for layer, d in diffs.items():
        assert d["same_selection"], (layer, d)
        assert d["max_abs_diff"] < 1e-5, (layer, d)
        assert d["density"] == pytest.approx(d["ref_density"])


def test_last_row_dense_computes_the_whole_final_row(tiny):
    model, ids = tiny
    overrides = {**OVERRIDES, "gamma": 0.5}
    _logits(model, ids, sparse_sim.ATTN_NAME, sparse_sim.VARIANTS["base"], overrides)
    base = {layer: r["mask"] for layer, r in sparse_sim.STATE.records.items()}
    num_k_blocks = -(-SEQ_LEN // OVERRIDES["block_size"])
    # Otherwise the test shows nothing: base skips blocks of the final row somewhere.
    assert any(not bool(m[:, -1].all()) for m in base.values())

    _logits(model, ids, sparse_sim.ATTN_NAME, sparse_sim.VARIANTS["last_row_dense"], overrides)
    for layer, record in sparse_sim.STATE.records.items():
        mask = record["mask"]  # [Hq, R, Kb]
        assert mask.shape[-1] == num_k_blocks
        assert bool(mask[:, -1].all()), layer  # every head, every causal block of the final row
        assert abs(record["kept_mass_last_row"] - 1.0) < 1e-5
    # Earlier rows: still a real selection (some block skipped somewhere).
    assert any(not bool(r["mask"][:, :-1].all()) for r in sparse_sim.STATE.records.values())


def test_oracle_row_mask():
    mass = torch.tensor([[0.5, 0.05, 0.3, 0.1, 0.05], [0.0, 0.0, 0.0, 0.0, 1.0]])
    forced = torch.tensor([True, False, False, False, True])
    mask = sparse_sim.oracle_row_mask(mass, 0.85, forced)
    assert mask.tolist() == [[True, False, True, True, True], [True, False, False, False, True]]
    assert bool(sparse_sim.oracle_row_mask(mass, 1.0, forced).all())


def test_exact_row_mask_keeps_forced_then_heaviest_per_head():
    mass = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.6, 0.0, 0.3, 0.0, 0.1]])
    forced = torch.tensor([False, False, False, False, True])  # the diagonal block
    mask = sparse_sim.exact_row_mask(mass, torch.tensor([2, 3]), forced)
    assert mask.tolist() == [[False, True, False, False, True], [True, False, True, False, True]]


def test_exact_tail_changes_only_the_final_row(tiny):
    model, ids = tiny
    overrides = {**OVERRIDES, "gamma": 0.5}
    _logits(model, ids, sparse_sim.ATTN_NAME, sparse_sim.VARIANTS["base"], overrides)
    base = {layer: r["mask"].clone() for layer, r in sparse_sim.STATE.records.items()}
    base_kept = {layer: r["kept_mass_last_row"] for layer, r in sparse_sim.STATE.records.items()}
    _logits(model, ids, sparse_sim.ATTN_NAME, sparse_sim.VARIANTS["exact_tail"], overrides)
    for layer, record in sparse_sim.STATE.records.items():
        assert torch.equal(record["mask"][:, :-1], base[layer][:, :-1]), layer
        assert torch.equal(record["mask"][:, -1].sum(-1), base[layer][:, -1].sum(-1)), layer  # same counts
        # The heaviest blocks of a given count keep at least the mass of any other choice.
        assert record["kept_mass_last_row"] >= base_kept[layer] - 1e-6, layer
