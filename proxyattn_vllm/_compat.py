"""Which dense kernels the backend runs on this machine, decided once per process.

ProxyAttn only replaces the attention of long prefill chunks; everything else (decode rows,
short prefill chunks, the KV-cache write) runs vLLM's own dense kernels on the same packed
``(num_blocks, Hkv, block_size, 2 * D)`` cache:

* **CUDA with vLLM's FlashAttention** (the deployment target, e.g. H200/FA3): the inherited
  ``FlashAttentionImpl`` path: ``flash_attn_varlen_func`` for attention and the
  ``reshape_and_cache_flash`` custom op for the KV write. Pure-decode batches go through
  ``FlashAttentionImpl.forward`` unchanged, so FULL cudagraphs and FA3 AOT scheduling still apply.
* **Anywhere else** (CPU CI: ``vllm_flash_attn`` and the CUDA cache op do not exist there):
  vLLM's Triton kernels, which read and write the same layout through explicit strides:
  ``unified_attention`` for attention and ``triton_reshape_and_cache_flash`` for the KV write.
  On CPU they run under ``TRITON_INTERPRET=1``; this path exists for tests, not for speed.

The choice is made at impl/builder construction, never per batch.
"""
from __future__ import annotations

import functools


@functools.cache
def dense_kernel_is_flash_attn() -> bool:
    """True when vLLM's FlashAttention (varlen + KV-write op) is usable in this process."""
    from vllm.v1.attention.backends.fa_utils import (
        get_flash_attn_version,
        is_flash_attn_varlen_func_available,
    )

    return is_flash_attn_varlen_func_available() and get_flash_attn_version() is not None


def triton_available() -> bool:
    """True when vLLM kept the real Triton module (it swaps in a placeholder otherwise)."""
    from vllm.triton_utils import HAS_TRITON

    return bool(HAS_TRITON)
