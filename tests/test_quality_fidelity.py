"""benchmarks/quality/fidelity.py: the agreement / KL math and the vLLM prompt-logprob reader."""
from __future__ import annotations

import math

import numpy as np
import pytest

from benchmarks.quality import fidelity
from tests._essays import needs_essays  # noqa: E402

pytestmark = needs_essays


def _lp(ids, probs, actual):
    """One position-list of top-K as PromptLogprobs (probs need not sum to 1: a tail remains)."""
    return fidelity.PromptLogprobs(
        np.asarray(ids, dtype=np.int64), np.log(np.asarray(probs, dtype=np.float64)),
        np.log(np.asarray(actual, dtype=np.float64)),
    )


def test_identical_distributions():
    rng = np.random.default_rng(0)
    probs = np.sort(rng.dirichlet(np.ones(50), size=30), axis=-1)[:, ::-1][:, :5]
    ids = np.stack([rng.permutation(100)[:5] for _ in range(30)])
    d = _lp(ids, probs, probs[:, 0])
    np.testing.assert_array_equal(fidelity.approx_kl(d, d), 0.0)
    row = fidelity.compare([d, d], [d, d])
    assert row["top1_agreement"] == 1.0 and row["mean_kl"] == 0.0 and row["positions"] == 60
    assert row["nll_dense"] == row["nll_sparse"]


def test_kl_hand_computed():
    # Dense top-2 {7: .6, 8: .3}, rest .1. Sparse top-2 {8: .5, 9: .4}: token 7 is missing and
    # gets the sparse 2nd logprob (.4); rest_q = 1 - .4 - .5 = .1.
    dense = _lp([[7, 8]], [[0.6, 0.3]], [0.6])
    sparse = _lp([[8, 9]], [[0.5, 0.4]], [0.4])
    expected = 0.6 * math.log(0.6 / 0.4) + 0.3 * math.log(0.3 / 0.5) + 0.1 * math.log(0.1 / 0.1)
    assert fidelity.approx_kl(dense, sparse)[0] == pytest.approx(expected)
    row = fidelity.compare([dense], [sparse])
    assert row["top1_agreement"] == 0.0
    assert row["nll_dense"] == pytest.approx(-math.log(0.6)) and row["nll_sparse"] == pytest.approx(-math.log(0.4))


def test_from_vllm_flat_and_dict_layouts():
    pytest.importorskip("vllm")
    from vllm.logprobs import FlatLogprobs, Logprob

    prompt = [11, 12, 13]
    # Positions 1 and 2: actual token first (with its rank), then ranks 1..2.
    positions = [
        None,
        {12: Logprob(-0.5, 1), 40: Logprob(-1.5, 2)},
        {13: Logprob(-3.0, 3), 50: Logprob(-0.2, 1), 51: Logprob(-2.0, 2)},
    ]
    flat = FlatLogprobs()
    flat.append(None)
    flat.append_fast([12, 12, 40], [-0.5, -0.5, -1.5], iter([1, 1, 2]), [None] * 3)
    flat.append_fast([13, 50, 51], [-3.0, -0.2, -2.0], iter([3, 1, 2]), [None] * 3)
    for source in (flat, positions):
        out = fidelity.from_vllm(source, prompt, 2)
        np.testing.assert_array_equal(out.top_ids, [[12, 40], [50, 51]])
        np.testing.assert_allclose(out.top_logprobs, [[-0.5, -1.5], [-0.2, -2.0]])
        np.testing.assert_allclose(out.token_logprobs, [-0.5, -3.0])


def test_fidelity_prompts_exact_and_seeded(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from proxyattn_vllm.testing import write_tiny_llama

    tok = AutoTokenizer.from_pretrained(write_tiny_llama(tmp_path / "tiny"))
    a = fidelity.fidelity_prompts(tok, [64, 100], 2, seed=1)
    assert [(n, len(ids)) for n, ids in a] == [(64, 64), (64, 64), (100, 100), (100, 100)]
    assert a == fidelity.fidelity_prompts(tok, [64, 100], 2, seed=1)
