"""A model that mixes sliding-window and global layers (Gemma 3) on CPU: the
sliding layers run dense with their window, the global layers run the sparse path, and at full
density the greedy tokens equal vLLM's dense CPU backend (CPU_ATTN)."""
from __future__ import annotations

import random

import pytest

from tests._vllm_cpu import honour_custom_backend_on_cpu, kv_cache_layout_restored, skip_unless_vllm_on_cpu, tiny_llm

skip_unless_vllm_on_cpu()

WINDOW = 16
PROXYATTN = {"gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 48, "block_size": 16, "stride": 4}
ENGINE = dict(load_format="dummy", skip_tokenizer_init=True, block_size=16, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def mixed_model_dir(tmp_path_factory) -> str:
    """2-layer Gemma 3 text model with random (dummy) weights: layer 0 slides (a 16-token
    window), layer 1 is global. (vLLM refuses Qwen2 configs that mix the two.)"""
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
    )
    cfg.architectures = ["Gemma3ForCausalLM"]
    path = tmp_path_factory.mktemp("gemma3_mixed")
    cfg.save_pretrained(path)
    return str(path)


def _greedy(llm, prompts):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    return [list(o.outputs[0].token_ids) for o in outs]


def test_mixed_sliding_and_global_layers_match_dense(mixed_model_dir, monkeypatch):
    import proxyattn_vllm.impl as impl_module
    import proxyattn_vllm.sparse.triton as triton_module

    rng = random.Random(7)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (90, 70, 20)]
    sparse_calls, sliding_impls = [], []
    original = triton_module.sparse_prefill

    def recording(query, *args, **kwargs):
        sparse_calls.append(query.shape[0])
        return original(query, *args, **kwargs)

    original_init = impl_module.ProxyAttnImpl.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        sliding_impls.append(self.sliding_window_layer)

    monkeypatch.setattr(triton_module, "sparse_prefill", recording)
    monkeypatch.setattr(impl_module.ProxyAttnImpl, "__init__", recording_init)
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    with kv_cache_layout_restored():
        with tiny_llm(mixed_model_dir, attention_backend="proxyattn",
                      additional_config={"proxyattn": PROXYATTN}, **ENGINE) as llm:
            proxy_tokens = _greedy(llm, prompts)
        with tiny_llm(mixed_model_dir, attention_backend="CPU_ATTN", **ENGINE) as llm:
            dense_tokens = _greedy(llm, prompts)
    assert sorted(sliding_impls) == [False, True], "one global and one sliding-window layer"
    assert sparse_calls, "the global layer never ran the sparse path"
    assert proxy_tokens == dense_tokens
