"""Engine scenarios on CPU with a real sparse selection (not full density): a prefix-cache hit
that ends mid-block, preemption and recompute, chunk sizes that are not multiples of the
selection block, and short requests batched with one long prompt.

The tiny random Llama has no answer to get right, so each scenario asserts what must hold
whatever the selection: every request completes with all its tokens; the sparse path ran on the
chunks the scenario creates (after the cached prefix, after a recompute, at unaligned chunk
starts); and those chunks computed a strict subset of their causal blocks. Whether answers stay
right under sparse attention is a question for a real model (``benchmarks/robustness/gpu_robustness.py``
on the GPU); that the sparse chunks equal the torch reference is ``tests/test_vllm_impl.py``'s.
"""
from __future__ import annotations

import pytest

from tests._vllm_cpu import (
    SparseChunks, count_preemptions, greedy, honour_custom_backend_on_cpu, kv_cache_layout_restored,
    skip_unless_vllm_on_cpu, tiny_llm,
)

skip_unless_vllm_on_cpu()

PAGE = 16
BLOCK = 32
# A low gamma, no minimum budget and a density cap: most rows keep a strict subset of their
# blocks. The dense tail covers each chunk's last 8 tokens only.
PROXYATTN = {"gamma": 0.5, "min_budget_tokens": 0, "min_sparse_len": 48, "block_size": BLOCK, "stride": 4,
             "max_density": 0.3, "sink_blocks": 1, "local_blocks": 1, "dense_tail_tokens": 8}
MAX_TOKENS = 4
SHARED_PREFIX = 88  # 5 full pages (80 tokens) are cacheable; 80 is mid-way through block 2
CACHED = SHARED_PREFIX // PAGE * PAGE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from proxyattn_vllm.testing import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def long_prompts(n: int, suffix: int = 100) -> list[str]:
    """``n`` prompts of about ``SHARED_PREFIX + suffix`` tokens sharing their first SHARED_PREFIX."""
    from proxyattn_vllm.testing import prompt_words

    prefix = prompt_words(0, SHARED_PREFIX)
    return [f"{prefix} {prompt_words(500 + 37 * i, suffix + 4 * i)}" for i in range(n)]


def assert_sparse(recorder: SparseChunks) -> None:
    """The sparse path ran and some chunk computed a strict subset of its causal blocks."""
    assert recorder.chunks, "the sparse path never ran"
    assert any(c.selected < c.causal for c in recorder.chunks), recorder.chunks


@pytest.fixture
def selections(monkeypatch):
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    with kv_cache_layout_restored():
        yield SparseChunks(monkeypatch)


def sparse_llm(model_dir: str, **kwargs):
    args = dict(attention_backend="proxyattn", additional_config={"proxyattn": PROXYATTN}, block_size=PAGE,
                max_num_batched_tokens=48, max_num_seqs=4)
    return tiny_llm(model_dir, **{**args, **kwargs})


def test_prefix_cache_hit_mid_block_runs_sparse(model_dir, selections):
    with sparse_llm(model_dir, enable_prefix_caching=True) as llm:
        prompts = long_prompts(3)
        first, first_cached = greedy(llm, prompts[:1], MAX_TOKENS)
        selections.chunks.clear()
        rest, rest_cached = greedy(llm, prompts[1:], MAX_TOKENS)
    assert first_cached == [0] and rest_cached == [CACHED, CACHED], rest_cached
    assert all(len(t) == MAX_TOKENS for t in first + rest)
    assert CACHED % BLOCK and min(c.ctx for c in selections.chunks) == CACHED, selections.chunks
    assert_sparse(selections)


def test_preemption_and_recompute_run_sparse(model_dir, selections, monkeypatch):
    """A KV cache of 20 pages for 4 requests of 12-13 pages each: the scheduler preempts and
    recomputes (see tests/test_robustness_engine.py for why ``scheduler_reserve_full_isl`` is off)."""
    preempted = count_preemptions(monkeypatch)
    with sparse_llm(model_dir, num_gpu_blocks_override=20, scheduler_reserve_full_isl=False) as llm:
        tokens, _ = greedy(llm, long_prompts(4), MAX_TOKENS)
    assert preempted, "no request was preempted: the KV cache was not small enough"
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert_sparse(selections)


@pytest.mark.parametrize("chunk", [40, 72])
def test_chunks_not_aligned_to_blocks_run_sparse(model_dir, selections, chunk):
    with sparse_llm(model_dir, max_num_batched_tokens=chunk) as llm:
        tokens, _ = greedy(llm, long_prompts(2), MAX_TOKENS)
    assert all(len(t) == MAX_TOKENS for t in tokens)
    assert max(c.q_len for c in selections.chunks) <= chunk
    assert any(c.ctx % BLOCK for c in selections.chunks), "every chunk started on a block boundary"
    assert_sparse(selections)


def test_short_requests_batched_with_a_long_prompt(model_dir, selections):
    """Eight short requests decode while one long prompt prefills in chunks: the batches mix
    decodes, short prefills and a sparse chunk."""
    from proxyattn_vllm.testing import prompt_words

    short = [prompt_words(900 + 11 * i, 12 + i) for i in range(8)]
    with sparse_llm(model_dir, max_num_seqs=9, max_num_batched_tokens=64) as llm:
        tokens, _ = greedy(llm, long_prompts(1, suffix=140) + short, 12)
    assert all(len(t) == 12 for t in tokens)
    assert len({c.ctx for c in selections.chunks}) >= 2, "the long prompt ran one sparse chunk at most"
    assert_sparse(selections)
