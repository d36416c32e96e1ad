"""``ProxyAttnBackend``: FlashAttention's backend with ProxyAttn's builder and impl.

vLLM imports this module lazily in the worker, when a layer asks for the ``CUSTOM`` backend
(registered by :func:`proxyattn_vllm.register`). Everything about the KV cache (shape, stride
order, packed K|V layout, kernel block sizes) is inherited from FLASH_ATTN, so FA3, vLLM's Triton
kernels and our sparse kernels all read the same cache.

Capabilities are narrowed to what the sparse prefill path handles: decoder self-attention,
causal, no attention sinks, no multimodal prefix-LM, no batch invariance. Sliding-window layers
are accepted and always run dense (FlashAttention with the window).
``is_sparse()`` stays False: in vLLM it means *model-native* sparse attention (DeepSeek V3.2
style), which a Llama/Qwen layer does not ask for.
"""
from __future__ import annotations

from typing import ClassVar

import torch

from .vllm_version import check_vllm_version

# Before anything of vLLM's backend API is imported: on an unsupported release, one clear line.
check_vllm_version()

from vllm.v1.attention.backend import AttentionType, MultipleOf  # noqa: E402
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend  # noqa: E402

from ._compat import dense_kernel_is_flash_attn  # noqa: E402

#: KV-cache page size this backend asks vLLM for when ``--block-size`` is not given.
PREFERRED_PAGE_SIZE = 128


def _supported_dtypes() -> list[torch.dtype]:
    dtypes = [torch.float16, torch.bfloat16]
    if not dense_kernel_is_flash_attn():
        dtypes.append(torch.float32)  # vLLM's Triton kernels (the non-FA path) take fp32 too
    return dtypes


class ProxyAttnBackend(FlashAttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = _supported_dtypes()
    # vLLM 0.33's and 0.34's FlashAttentionBackend set this True: a model's fused op (QK-norm +
    # RoPE + cache write) may then call forward() with key/value omitted. ProxyAttn's forward has
    # not been run that way, so it declares False: such models take their unfused path, which
    # passes key/value and writes the cache through do_kv_cache_update. (vLLM before 0.33 never
    # reads the attribute.)
    supports_kv_cache_update_bypass: ClassVar[bool] = False

    @staticmethod
    def get_name() -> str:
        # Attention.__init__ looks the name up in AttentionBackendEnum: it must be a member name.
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        from .impl import ProxyAttnImpl

        return ProxyAttnImpl

    @staticmethod
    def get_builder_cls():
        from .metadata import ProxyAttnMetadataBuilder

        return ProxyAttnMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # The optional argument is the signature of vLLM 0.32 and later; 0.26 calls it without one.
        return [MultipleOf(16)]

    @classmethod
    def supports_sliding_window(cls) -> bool:
        # Sliding-window layers run dense through FlashAttention with their window (one warning,
        # ProxyAttnImpl); the global layers of the same model (Gemma 3 style) run sparse.
        return True

    @classmethod
    def supports_rswa(cls) -> bool:
        # vLLM 0.32+: "reference sliding window" (a prompt-prefix + window mask, Unlimited-OCR),
        # which FlashAttention applies through a mask function; the sparse path does not.
        return False

    @classmethod
    def supports_device_cpu_query_lens_mismatch(cls) -> bool:
        # vLLM 0.32+: adaptive speculative verification trims drafts on the device only. The
        # plan slices the batch by the CPU query lengths (dense runs included), so it opts out.
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_batch_invariance(cls) -> bool:
        return False

    @classmethod
    def supports_per_head_quant_scales(cls) -> bool:
        return False

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        # 128-token pages hold whole 64-key tiles, so the sparse kernel reads them with TMA:
        # 1.43x faster than on 16-token pages at full density (benchmarks/results/
        # kernels_h200.json). vLLM asks only when the user gave no --block-size.
        return max(super().get_preferred_block_size(default_block_size), PREFERRED_PAGE_SIZE)

    @classmethod
    def validate_configuration(cls, *args, **kwargs) -> list[str]:
        # vLLM's reasons are terse ("sliding window not supported") and its error names the
        # backend CUSTOM: add one reason that says what ProxyAttn takes and what to do instead.
        reasons = super().validate_configuration(*args, **kwargs)
        if reasons:
            reasons.append(
                "proxyattn (ProxyAttn sparse prefill) supports causal decoder self-attention "
                "(not MLA) without attention sinks, with an auto/float16/bfloat16 KV cache, or fp8 "
                "(e4m3) where vLLM's dense kernels take it (FA3 on Hopper): serve this model with "
                "--attention-backend FLASH_ATTN (dense) instead"
            )
        return reasons

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        # FP8 (e4m3, not e5m2): the sparse kernels dequantize it (fp8e4nv, SM89+); the dense
        # part is vLLM's, so FP8 needs what it needs there: FlashAttention's own answer (FA3 on
        # Hopper), or for vLLM's Triton kernels (no FlashAttention) a device with native FP8.
        if kv_cache_dtype in ("fp8", "fp8_e4m3"):
            if dense_kernel_is_flash_attn():
                return super().supports_kv_cache_dtype(kv_cache_dtype)
            from vllm.platforms import current_platform

            return current_platform.is_cuda() and current_platform.has_device_capability(89)
        return kv_cache_dtype is None or kv_cache_dtype in ("auto", "float16", "bfloat16")
