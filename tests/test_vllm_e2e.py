"""End to end on CPU: ``LLM(..., attention_backend="proxyattn").generate`` on a tiny random Llama
gives the same greedy tokens as vLLM's dense CPU backend (CPU_ATTN).

With ``gamma = 1.0`` and no minimum budget ProxyAttn keeps every block, so it must reproduce
dense attention; ``min_sparse_len`` is small and ``max_num_batched_tokens`` smaller than the
long prompts, so the sparse path runs on chunked prefills with ``ctx > 0``, mixed with decodes.
Layer 1 is listed in ``dense_layers``, so both per-layer paths run.

TEST-ONLY monkeypatch (tests/_vllm_cpu.py): vLLM's ``CpuPlatform`` always answers CPU_ATTN; it is
patched to honour a ``CUSTOM`` selection the way ``CudaPlatform`` does. The product code patches
nothing. The engine runs in-process (conftest sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the
patch and the plugin registration apply.
"""
from __future__ import annotations


import pytest

from tests._vllm_cpu import honour_custom_backend_on_cpu, kv_cache_layout_restored, skip_unless_vllm_on_cpu, tiny_llm

skip_unless_vllm_on_cpu()

PROXYATTN = {
    "gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 48, "block_size": 16, "stride": 4,
    "dense_layers": [1],
}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from proxyattn_vllm.testing import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    from proxyattn_vllm.testing import prompt_words

    # 100 and 70 tokens (sparse, prefilled in chunks of <= 64 tokens), 20 tokens (short).
    return [prompt_words(0, 100), prompt_words(3, 20), prompt_words(11, 70)]


def _generate(model_dir: str, prompts: list[str], **kwargs) -> list[list[int]]:
    from vllm import SamplingParams

    with tiny_llm(model_dir, block_size=32, kv_cache_memory_bytes=64 << 20, **kwargs) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture
def restore_kv_cache_layout():
    with kv_cache_layout_restored():
        yield


def test_greedy_tokens_match_dense_cpu_backend(model_dir, prompts, monkeypatch, restore_kv_cache_layout):
    import proxyattn_vllm.sparse.triton as triton_module

    honour_custom_backend_on_cpu(monkeypatch.setattr)
    calls: list[tuple[int, int]] = []
    original_sparse_prefill = triton_module.sparse_prefill

    def counting_sparse_prefill(query, kv_cache, block_table_row, output, ctx, scale, params, **kwargs):
        calls.append((ctx, query.shape[0]))
        return original_sparse_prefill(
            query, kv_cache, block_table_row, output, ctx, scale, params, **kwargs
        )

    monkeypatch.setattr(triton_module, "sparse_prefill", counting_sparse_prefill)
    # ProxyAttn first: it then runs with vLLM's default (NHD) cache layout, as in production.
    proxy_tokens = _generate(
        model_dir, prompts, attention_backend="proxyattn",
        additional_config={"proxyattn": PROXYATTN},
    )
    dense_tokens = _generate(model_dir, prompts, attention_backend="CPU_ATTN")

    assert all(len(t) == MAX_TOKENS for t in dense_tokens)
    assert proxy_tokens == dense_tokens
    # The sparse path really ran, in layer 0 only (layer 1 is dense), on the long prompts'
    # chunks: the first 64-token chunk and later chunks with ctx > 0.
    assert calls, "no prefill chunk went through sparse_prefill"
    assert any(ctx > 0 for ctx, _ in calls), calls
    assert all(q_len > 1 and ctx + q_len >= PROXYATTN["min_sparse_len"] for ctx, q_len in calls)
