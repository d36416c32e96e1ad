"""Dense causal attention over the paged cache: vLLM's own kernels, called for part of a batch.

The impl sends decode rows, short prefill chunks and each sparse chunk's dense-tail rows here;
the "fa3" sparse kernel sends its union pseudo-requests here too. The kernel is chosen once per
layer (see ``_compat``): FlashAttention when vLLM's ``vllm_flash_attn`` is usable (CUDA), else
vLLM's Triton ``unified_attention`` (CPU CI), which reads the same cache layout.

An FP8 cache (``--kv-cache-dtype fp8``) is handled as ``FlashAttentionImpl.forward`` handles it:
the cache (uint8 bytes as vLLM allocates it) is viewed as ``torch.float8_e4m3fn`` (``fp8_dtype``,
vLLM's FP8 dtype on CUDA) and the layer's ``_k_scale``/``_v_scale`` go in as per-sequence,
per-KV-head descales; a query that vLLM's attention layer quantized to FP8 (FlashAttention only,
``ProxyAttnImpl``) gets ``_q_scale`` the same way. vLLM's Triton kernel is told the cache's
quantization mode, as ``TritonAttentionImpl`` tells it.
"""
from __future__ import annotations

import torch

from ._compat import dense_kernel_is_flash_attn, triton_available
from .errors import ProxyAttnUnsupportedError


class DenseAttention:
    """One layer's dense varlen attention.

    Attributes:
        use_flash_attn: FlashAttention (True) or vLLM's Triton kernel (False).
        tail_first: whether a sparse chunk's dense-tail rows run here, before the sparse kernel
            (:meth:`tail`); only with FlashAttention, which splits their keys across the GPU
            and returns their LSE. Without it (CPU) the sparse kernel keeps them.
    """

    def __init__(self, *, head_size: int, num_kv_heads: int, scale: float, sliding_window, flash_attn_version,
                 kv_cache_dtype: str = "auto", fp8_dtype: torch.dtype | None = None):
        self.head_size = head_size
        self.num_kv_heads = num_kv_heads
        self.scale = scale
        self.sliding_window = sliding_window
        self.flash_attn_version = flash_attn_version
        self.fp8_dtype = fp8_dtype  # the FP8 cache's dtype, or None (cache in the model dtype)
        self.use_flash_attn = dense_kernel_is_flash_attn()
        self.tail_first = self.use_flash_attn
        if not self.use_flash_attn:
            if not triton_available():
                raise ProxyAttnUnsupportedError(
                    "proxyattn: no dense attention kernel on this machine: it needs vLLM's "
                    "FlashAttention (CUDA) or Triton."
                )
            from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (
                triton_reshape_and_cache_flash,
            )
            from vllm.v1.attention.ops.triton_unified_attention import unified_attention
            from vllm.v1.kv_cache_interface import get_kv_quant_mode

            self.triton_attention = unified_attention
            # As TritonAttentionImpl: the kernel dequantizes an FP8 cache only when told its mode.
            self.triton_kv_quant_mode = get_kv_quant_mode(kv_cache_dtype)
            self.triton_kv_write = triton_reshape_and_cache_flash

    def varlen(
        self, layer, query, kv_cache, output, cu_seqlens_q, max_query_len, seq_lens,
        max_seq_len, block_table, return_lse=False, num_splits=0,
    ) -> torch.Tensor | None:
        """Causal varlen attention of ``query [tokens, Hq, D]`` (rows given by ``cu_seqlens_q``,
        rebased to 0) over the paged cache, written into ``output [tokens, Hq, D]``.
        ``seq_lens [rows]``, ``block_table [rows, max_pages]``: the rows' key counts and pages.
        With ``return_lse`` and FlashAttention: returns the rows' ``[Hq, tokens]`` float32
        natural-log LSE; otherwise None. ``num_splits``: FlashAttention's split-KV count (0: its
        heuristic; the Triton kernel has no such choice)."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        if self.fp8_dtype is not None:
            key_cache, value_cache = key_cache.view(self.fp8_dtype), value_cache.view(self.fp8_dtype)
        descale_shape = (seq_lens.shape[0], self.num_kv_heads)
        k_descale = layer._k_scale.expand(descale_shape)
        v_descale = layer._v_scale.expand(descale_shape)
        # vLLM's attention layer quantized the query (FlashAttention with an FP8 cache, as
        # FlashAttentionImpl: FA3 takes Q, K and V in one dtype).
        fp8_query = self.fp8_dtype is not None and query.dtype == self.fp8_dtype
        q_descale = layer._q_scale.expand(descale_shape) if fp8_query else None
        if self.use_flash_attn:
            from vllm.utils.torch_utils import canonicalize_singleton_dim_strides
            from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func

            # As FlashAttentionImpl.forward: FA3's TMA needs sane strides on size-1 dims.
            key_cache = canonicalize_singleton_dim_strides(key_cache)
            value_cache = canonicalize_singleton_dim_strides(value_cache)
            result = flash_attn_varlen_func(
                q=query, k=key_cache, v=value_cache, out=output,
                cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_query_len,
                seqused_k=seq_lens, max_seqlen_k=max_seq_len,
                softmax_scale=self.scale, causal=True, block_table=block_table,
                scheduler_metadata=None,  # an AOT schedule is built for the whole batch only
                fa_version=self.flash_attn_version,
                q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                return_softmax_lse=return_lse, num_splits=num_splits,
            )
            return result[1] if return_lse else None
        self.triton_attention(
            q=query, k=key_cache, v=value_cache, out=output,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_query_len,
            seqused_k=seq_lens, max_seqlen_k=max_seq_len,
            softmax_scale=self.scale, causal=True, window_size=self.sliding_window,
            block_table=block_table, softcap=0,
            q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
            kv_quant_mode=self.triton_kv_quant_mode,
        )
        return None

    def batch(self, layer, query, kv_cache, output, dense) -> None:
        """Every row of the batch (``dense``: its FlashAttention metadata) in one Triton call;
        with FlashAttention the impl runs ``FlashAttentionImpl.forward`` instead."""
        n = dense.num_actual_tokens
        self.varlen(
            layer, query[:n], kv_cache, output[:n], dense.query_start_loc, dense.max_query_len,
            dense.seq_lens, dense.max_seq_len, dense.block_table,
        )

    def runs(self, layer, query, kv_cache, output, dense_runs, dense) -> None:
        """One call per run of consecutive dense rows of the plan (``DenseRun``)."""
        for run in dense_runs:
            self.varlen(
                layer, query[run.token_start : run.token_end], kv_cache,
                output[run.token_start : run.token_end], run.cu_seqlens_q, run.max_query_len,
                dense.seq_lens[run.req_start : run.req_end], run.max_seq_len,
                dense.block_table[run.req_start : run.req_end],
            )

    def tail(self, layer, query, kv_cache, output, row, dense) -> tuple[bool, torch.Tensor | None]:
        """Attend the dense-tail rows of sparse chunk ``row`` (a ``SparseRow``) here, first:
        ``(done, their LSE [Hq, tail_tokens] or None)``. Those rows read every causal key: in the
        block-sparse kernel each of their query tiles walks the whole context in one program,
        which bounds the kernel's time at long context (H200, last 8K chunk of 128K,
        Qwen2.5-0.5B shape: 2.94 ms with the tail, 1.31 without, for 14% more blocks); FA3
        splits their keys across the GPU. Their LSE spares the budget its own pass over the same
        rows (``row_lse`` of the selection). ``(False, None)`` without :attr:`tail_first`."""
        if not (self.tail_first and row.tail_tokens):
            return False, None
        tokens = slice(row.token_end - row.tail_tokens, row.token_end)
        req = slice(row.req_idx, row.req_idx + 1)
        lse = self.varlen(
            layer, query[tokens], kv_cache, output[tokens], row.tail_cu_seqlens_q, row.tail_tokens,
            dense.seq_lens[req], row.seq_len, dense.block_table[req], return_lse=True,
        )
        return True, lse

    def write_kv(self, layer, key, value, kv_cache, slot_mapping, kv_cache_dtype) -> None:
        """The KV-cache write of the Triton path (FlashAttention's is the parent impl's)."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        self.triton_kv_write(
            key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
            layer._k_scale, layer._v_scale,
        )
