"""Startup: a bad ProxyAttn config or a model ProxyAttn cannot serve stops
``LLM(...)`` on CPU with an error that names the key or the feature and says what to do.

Engines are built in-process on vLLM's CPU platform (see ``tests/_vllm_cpu.py`` for the
TEST-ONLY patch that makes it select the proxyattn backend the way CUDA does). Models other than
the tiny Llama are written as config files only and built with ``load_format="dummy"`` (random
weights, no tokenizer), which is enough to reach attention-layer construction.
"""
from __future__ import annotations

import pytest

from tests._vllm_cpu import honour_custom_backend_on_cpu, kv_cache_layout_restored, skip_unless_vllm_on_cpu, tiny_llm

skip_unless_vllm_on_cpu()

import torch  # noqa: E402

from proxyattn_vllm import ProxyAttnConfigError  # noqa: E402

FALLBACK = "--attention-backend FLASH_ATTN"
# Shapes shared by the architecture configs below: 2 layers, 4 query heads, 2 KV heads, D = 32.
SMALL = dict(
    vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> str:
    from proxyattn_vllm.testing import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(autouse=True)
def cpu_selects_proxyattn(monkeypatch):
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    with kv_cache_layout_restored():
        yield


def _start(model_dir: str, **kwargs) -> None:
    with tiny_llm(model_dir, attention_backend="proxyattn", **kwargs):
        pass


@pytest.mark.parametrize(
    "proxyattn, expected",
    [
        ({"gamma": 2}, ["gamma=2", "(0, 1]"]),
        ({"gama": 0.9}, ["unknown key 'gama'", "accepted keys: gamma"]),
        ({"stride": True}, ["stride=True", "an integer in [1, 64]"]),
        ({"stride": 3, "block_size": 16}, ["stride=3", "a divisor of block_size=16"]),
        # The tiny Llama has 2 KV heads (TP=1): 4 groups cannot nest in them.
        ({"num_proxy_groups": 4}, ["num_proxy_groups=4", "2 KV heads per rank", "[1, 2]"]),
        # It has 2 layers: layer 5 does not exist.
        ({"dense_layers": [1, 5]}, ["dense_layers=[1, 5]", "0..1 (not [5])"]),
    ],
    ids=["gamma", "unknown-key", "bool-as-int", "stride-vs-block", "groups-vs-kv-heads", "dense-layers"],
)
def test_bad_config_stops_llm_startup(tiny_llama_dir, proxyattn, expected):
    with pytest.raises(ProxyAttnConfigError) as err:
        _start(tiny_llama_dir, additional_config={"proxyattn": proxyattn})
    msg = str(err.value)
    assert all(part in msg for part in expected), msg
    assert "--additional-config" in msg or "accepted keys" in msg, msg


def _write_config(path, arch: str) -> str:
    """config.json of a 2-layer model of ``arch`` that uses the feature under test."""
    import transformers

    if arch == "mistral-sliding-window":  # every layer slides (Mistral-7B-v0.1 style)
        cfg = transformers.MistralConfig(**SMALL, num_key_value_heads=2, head_dim=32, sliding_window=64)
    elif arch == "qwen2-sliding-window":
        cfg = transformers.Qwen2Config(
            **SMALL, num_key_value_heads=2, use_sliding_window=True, sliding_window=64,
            max_window_layers=0,  # layers i >= max_window_layers slide: all of them
        )
    elif arch == "gemma2-interleaved":  # sliding and global layers, plus logit soft-capping
        cfg = transformers.Gemma2Config(
            **SMALL, num_key_value_heads=2, head_dim=32, sliding_window=64, attn_logit_softcapping=50.0
        )
    elif arch == "gemma2-softcap-only":  # no sliding layer, so soft-capping is what fails
        cfg = transformers.Gemma2Config(
            **SMALL, num_key_value_heads=2, head_dim=32, sliding_window=None,
            layer_types=["full_attention"] * 2, attn_logit_softcapping=50.0,
        )
    elif arch == "llama-head-dim-80":  # e.g. Phi-2 / some Pythia sizes use D = 80
        cfg = transformers.LlamaConfig(**{**SMALL, "hidden_size": 320}, num_key_value_heads=2, head_dim=80)
    else:
        raise ValueError(arch)
    cfg.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "arch, error, expected",
    [
        ("gemma2-interleaved", "ProxyAttnUnsupportedError", "logit soft-capping (logits_soft_cap=50.0)"),
        ("gemma2-softcap-only", "ProxyAttnUnsupportedError", "logit soft-capping (logits_soft_cap=50.0)"),
        ("llama-head-dim-80", "ProxyAttnUnsupportedError", "head size 80 is not supported"),
    ],
)
def test_unsupported_model_stops_llm_startup(tmp_path, arch, error, expected):
    """Features the sparse path cannot serve stop startup in ProxyAttnImpl with a message that
    names the feature and the dense fallback (sliding window is served: see below)."""
    from proxyattn_vllm.impl import ProxyAttnUnsupportedError

    error = ProxyAttnUnsupportedError if error == "ProxyAttnUnsupportedError" else error
    model_dir = _write_config(tmp_path / arch, arch)
    with pytest.raises(error) as err:
        _start(model_dir, load_format="dummy", skip_tokenizer_init=True)
    msg = str(err.value)
    assert expected in msg and FALLBACK in msg, msg


@pytest.mark.parametrize("arch", ["mistral-sliding-window", "qwen2-sliding-window"])
def test_sliding_window_models_start_with_one_warning(tmp_path, arch, monkeypatch):
    """Every layer slides: the model is served, all dense (FlashAttention with the window), and
    the log says so once. Mixed sliding/global models: test_robustness_engine.py."""
    from proxyattn_vllm import impl

    warnings = []
    monkeypatch.setattr(impl.ProxyAttnImpl, "_warned_sliding_window", False)
    monkeypatch.setattr(impl.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    model_dir = _write_config(tmp_path / arch, arch)
    _start(model_dir, load_format="dummy", skip_tokenizer_init=True)
    sliding = [w for w in warnings if "sliding-window attention layers (window 64)" in w]
    assert len(sliding) == 1, warnings


def test_fp8_kv_cache_without_a_dense_kernel_for_it_stops_llm_startup(tiny_llama_dir):
    """fp8 is served where vLLM's dense kernels store and read it (FA3 on Hopper, Triton on
    SM89+); this CPU has neither, so startup stops and says which KV caches are taken."""
    with pytest.raises(ValueError) as err:
        _start(tiny_llama_dir, kv_cache_dtype="fp8")
    msg = str(err.value)
    assert "kv_cache_dtype not supported" in msg and "auto/float16/bfloat16 KV cache, or fp8 (e4m3)" in msg, msg


# ALiBi (BLOOM, MPT), encoder-only attention (BERT) and attention sinks (gpt-oss) are tested at
# the level of vLLM's attention layer, not through LLM(...): on this CPU setup BLOOM, MPT and
# BERT run on vLLM's V1 GPU model runner, which pins host memory and so needs a CUDA driver
# (the stock CPU_ATTN backend fails the same way), and gpt-oss needs fused-MoE kernels. The layer
# is what a model builds: vLLM's Attention runs the same backend selection and impl construction.
@pytest.mark.parametrize(
    "feature, expected",
    [
        ("alibi", "ALiBi (alibi_slopes) is not supported"),
        ("encoder_only", "attention type AttentionType.ENCODER_ONLY not supported"),
        ("sinks", "attention sinks not supported"),
    ],
)
def test_unsupported_attention_layer_fails_at_construction(tiny_llama_dir, feature, expected):
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.attention.encoder_only_attention import EncoderOnlyAttention
    from vllm.model_executor.models.bloom import _get_alibi_slopes

    from proxyattn_vllm.testing import make_vllm_config

    heads, head_dim = 4, 32
    args = dict(num_heads=heads, head_size=head_dim, scale=head_dim**-0.5, num_kv_heads=heads)
    layer_cls = Attention
    if feature == "alibi":  # exactly what vLLM's BLOOM passes
        args["alibi_slopes"] = _get_alibi_slopes(heads).tolist()
    elif feature == "encoder_only":
        layer_cls = EncoderOnlyAttention
    else:
        args["sinks"] = torch.zeros(heads)
    with set_current_vllm_config(make_vllm_config(tiny_llama_dir)):
        with pytest.raises(ValueError) as err:
            layer_cls(**args, prefix=f"model.layers.0.self_attn.{feature}")
    msg = str(err.value)
    assert expected in msg and FALLBACK in msg, msg


def test_mla_models_fail_at_backend_selection(tiny_llama_dir):
    """MLA (DeepSeek-V2/V3 style) layers ask vLLM's selector for an MLA backend; proxyattn is
    not one, so the selection fails with MLA named and the dense fallback. (A DeepSeek-V2 model
    cannot be built on this CPU setup: it runs on the GPU model runner, as BLOOM does above.)"""
    from vllm.config import set_current_vllm_config
    from vllm.v1.attention.selector import get_attn_backend

    from proxyattn_vllm.testing import make_vllm_config

    with set_current_vllm_config(make_vllm_config(tiny_llama_dir)):
        with pytest.raises(ValueError) as err:
            get_attn_backend(576, torch.bfloat16, "auto", use_mla=True)
    msg = str(err.value)
    assert "MLA not supported" in msg and "(not MLA)" in msg and FALLBACK in msg, msg
