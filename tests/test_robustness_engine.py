"""Engine behaviour on CPU: prefix-cache hits, chunked prefill and preemption with
recompute give the same greedy tokens as a plain run and as vLLM's dense CPU backend.

The tiny random Llama in fp32 with a full-density config (gamma 1, no minimum budget), so the
sparse path must reproduce dense attention. Pages (vLLM ``block_size``) are 16 tokens and
ProxyAttn blocks 32, so a prefix-cache hit ends mid-block: the first chunk after it starts at
``ctx = 80`` (5 cached pages), inside selection block 2. ``max_num_batched_tokens = 32`` splits
every prompt into several chunks, so sparse chunks with ``ctx > 0`` run in every scenario.
"""
from __future__ import annotations

import pytest

from tests._vllm_cpu import (
    SparseChunks, count_preemptions, greedy, honour_custom_backend_on_cpu, kv_cache_layout_restored,
    skip_unless_vllm_on_cpu, tiny_llm,
)

skip_unless_vllm_on_cpu()


PAGE = 16
PROXYATTN = {"gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 48, "block_size": 32, "stride": 4}
ENGINE = dict(block_size=PAGE, max_num_batched_tokens=32, max_num_seqs=4)
MAX_TOKENS = 6
SHARED_PREFIX = 88  # tokens every prompt shares: 5 full pages (80 tokens) are cacheable
CACHED = SHARED_PREFIX // PAGE * PAGE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from proxyattn_vllm.testing import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """Four prompts of 100-112 tokens sharing their first SHARED_PREFIX tokens."""
    from proxyattn_vllm.testing import prompt_words

    prefix = prompt_words(0, SHARED_PREFIX)
    return [f"{prefix} {prompt_words(500 + 37 * i, 12 + 4 * i)}" for i in range(4)]


@pytest.fixture(scope="module")
def reference(model_dir, prompts) -> list[list[int]]:
    """Greedy tokens without prefix caching and with ample KV cache; proxyattn must equal the
    dense CPU backend (CPU_ATTN) here, before the scenarios below are compared with it."""
    with pytest.MonkeyPatch.context() as mp, kv_cache_layout_restored():
        honour_custom_backend_on_cpu(mp.setattr)
        with tiny_llm(model_dir, attention_backend="proxyattn",
                      additional_config={"proxyattn": PROXYATTN}, **ENGINE) as llm:
            proxy_tokens, _ = greedy(llm, prompts, MAX_TOKENS)
        with tiny_llm(model_dir, attention_backend="CPU_ATTN", **ENGINE) as llm:
            dense_tokens, _ = greedy(llm, prompts, MAX_TOKENS)
    assert all(len(t) == MAX_TOKENS for t in dense_tokens)
    assert proxy_tokens == dense_tokens
    return dense_tokens


@pytest.fixture
def proxyattn_on_cpu(monkeypatch):
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    with kv_cache_layout_restored():
        yield SparseChunks(monkeypatch)


def test_prefix_cache_hit_mid_block_matches_uncached(model_dir, prompts, reference, proxyattn_on_cpu):
    with tiny_llm(model_dir, attention_backend="proxyattn", additional_config={"proxyattn": PROXYATTN},
                  enable_prefix_caching=True, **ENGINE) as llm:
        first, first_cached = greedy(llm, prompts[:1], MAX_TOKENS)
        proxyattn_on_cpu.chunks.clear()
        rest, rest_cached = greedy(llm, prompts[1:], MAX_TOKENS)

    assert first_cached == [0]
    assert rest_cached == [CACHED] * 3, rest_cached  # the shared pages were reused
    assert first + rest == reference
    # The first chunks after the hit start at ctx = 80, mid-way through selection block 2.
    assert any(c.ctx == CACHED for c in proxyattn_on_cpu.chunks), proxyattn_on_cpu.chunks
    assert CACHED % PROXYATTN["block_size"] != 0
    # Nothing before the cached prefix was recomputed.
    assert min(c.ctx for c in proxyattn_on_cpu.chunks) == CACHED


def test_preemption_and_recompute_match_unpressured_run(model_dir, prompts, reference, proxyattn_on_cpu, monkeypatch):
    """18 pages of 16 tokens for 4 requests that need 7-8 pages each: the scheduler must
    preempt (V1 recomputes a preempted request's prompt and generated tokens, which runs the
    sparse path again) and every request still completes with the same tokens.

    vLLM 0.26 admits a request only when its whole prompt fits (``scheduler_reserve_full_isl``),
    so with short generations nothing would ever be preempted; admitting on the first chunk
    instead lets later chunks of running requests run out of pages."""
    preempted = count_preemptions(monkeypatch)
    with tiny_llm(model_dir, attention_backend="proxyattn", additional_config={"proxyattn": PROXYATTN},
                  num_gpu_blocks_override=18, scheduler_reserve_full_isl=False, **ENGINE) as llm:
        tokens, _ = greedy(llm, prompts, MAX_TOKENS)

    assert preempted, "no request was preempted: the KV cache was not small enough"
    assert tokens == reference
    # Chunked prefill: every prompt ran sparse chunks after its first (ctx > 0).
    assert sum(c.ctx > 0 for c in proxyattn_on_cpu.chunks) >= len(prompts)
    assert max(c.q_len for c in proxyattn_on_cpu.chunks) <= ENGINE["max_num_batched_tokens"]
