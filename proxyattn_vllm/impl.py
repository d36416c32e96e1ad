"""``ProxyAttnImpl``: dense attention for decodes and short prompts, ProxyAttn for long prefills.

Per layer and batch, ``forward`` receives the batch's queries (their K/V are already in the paged
cache: ``do_kv_cache_update`` ran just before) and a :class:`~.metadata.ProxyAttnMetadata`:

* no metadata (memory-profiling run): compile the sparse kernels (``warmup.py``), zero the output;
* no sparse row, or a layer listed in ``dense_layers``: one dense call over the whole batch
  (on CUDA exactly ``FlashAttentionImpl.forward``, so pure-decode batches keep FULL cudagraphs);
* otherwise: one dense varlen call per run of consecutive dense rows (decodes at the front,
  short prefill chunks; ``dense.py``) and, per sparse row, one dense call for its dense-tail
  rows (with FlashAttention) then the layer's sparse kernel for the rest (``sparse/``: chosen
  once per layer from ``sparse_kernel``, ``sparse/choose.py``).

An FP8 KV cache (``--kv-cache-dtype fp8`` / ``fp8_e4m3``) is taken as FlashAttentionImpl takes
it: vLLM allocates it as bytes, the forward views it as ``torch.float8_e4m3fn``; the dense calls
pass the layer's scales as descales and, with FlashAttention, vLLM's attention layer hands
``forward`` an FP8 query (``supports_quant_query_input``); the sparse kernels read the cache
with ``_k_scale``/``_v_scale`` and the query dequantized (``sparse/base.py``).

Configurations the sparse path cannot honour fail here, at startup, with a message naming the
feature and what to use instead.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

from proxyattn_kernels.common import SUPPORTED_HEAD_DIMS
from proxyattn_kernels.paged import FP8_KV_DTYPE

from . import stats, warmup
from ._compat import dense_kernel_is_flash_attn
from .config import ProxyAttnConfig, load_config
from .dense import DenseAttention
from .errors import ProxyAttnUnsupportedError
from .metadata import ProxyAttnMetadata
from .sparse.base import SparseChunk, SparseKernel, SparseLayer, budget_rows_lse
from .sparse.choose import check_configured, sparse_kernel_for_layer

logger = init_logger("vllm.proxyattn")

#: ``--kv-cache-dtype`` values the backend takes; the last two are the FP8 (e4m3) cache.
SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3")
FP8_KV_CACHE_DTYPES = ("fp8", "fp8_e4m3")

__all__ = ["ProxyAttnImpl", "ProxyAttnUnsupportedError", "SUPPORTED_KV_CACHE_DTYPES"]


class ProxyAttnImpl(FlashAttentionImpl):
    """FlashAttentionImpl whose forward sends long prefill chunks to the layer's sparse kernel.

    Its dense attention (``self.dense``, :class:`~.dense.DenseAttention`) is FlashAttention when
    vLLM's ``vllm_flash_attn`` is usable (CUDA), else vLLM's Triton ``unified_attention`` and
    ``triton_reshape_and_cache_flash`` (CPU CI), which use the same cache layout.
    """

    _warned_sliding_window = False
    supports_dcp = False  # decode context parallel splits the cache; the sparse path does not

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
        proxyattn_config: ProxyAttnConfig | None = None,
    ) -> None:
        _check_supported(attn_type, head_size, alibi_slopes, logits_soft_cap, kv_cache_dtype, sinks)
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
        if proxyattn_config is None:
            proxyattn_config = load_config(vllm_config)
        self.proxyattn_config = proxyattn_config
        # Validates the config against this layer's per-rank head counts (num_proxy_groups).
        self.proxyattn_params = proxyattn_config.kernel_params(num_heads, num_kv_heads)
        check_configured(proxyattn_config.sparse_kernel)
        # Chosen on the first sparse forward, from the cache's page size (fixed for the layer).
        self.sparse_kernel: SparseKernel | None = None
        # Read again when the memory-profiling run compiles the kernels (_warm_up): vLLM
        # sets the page size it serves after building the model (when no --block-size was given,
        # from our backend's preferred size), so the value seen here can be stale.
        self._vllm_config = vllm_config
        self._warmed_page_size: int | None = None  # the page size the profiling run compiled for (CUDA)
        self._dense_layer: bool | None = None  # resolved from the layer name on first forward
        # A sliding-window layer attends to its window only, so it has little to skip: it runs
        # dense with its window (the parent's FlashAttention path) and is never sparsified.
        self.sliding_window_layer = sliding_window is not None
        if self.sliding_window_layer and not ProxyAttnImpl._warned_sliding_window:
            ProxyAttnImpl._warned_sliding_window = True
            logger.warning(
                "proxyattn: this model has sliding-window attention layers (window %d): they run "
                "dense (FlashAttention with the window); ProxyAttn sparsifies its global-attention "
                "layers only.", sliding_window,
            )

        # FlashAttentionImpl refuses an FP8 cache that FlashAttention cannot read on this device.
        # Without FlashAttention (vLLM's Triton kernels run the dense part) that check is not
        # about this impl: the parent gets "auto", and the real value is set after it.
        parent_kv_dtype = kv_cache_dtype if dense_kernel_is_flash_attn() else "auto"
        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            parent_kv_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )
        self.kv_cache_dtype = kv_cache_dtype
        if getattr(self, "dcp_world_size", 1) > 1:
            raise ProxyAttnUnsupportedError(
                "proxyattn: decode context parallelism (--decode-context-parallel-size > 1) is "
                "not supported; run with --decode-context-parallel-size 1."
            )
        # The FP8 cache's dtype (vLLM's cache tensor is uint8 bytes), or None.
        self.fp8_dtype = FP8_KV_DTYPE if kv_cache_dtype in FP8_KV_CACHE_DTYPES else None
        self.dense = DenseAttention(
            head_size=self.head_size, num_kv_heads=self.num_kv_heads, scale=self.scale,
            sliding_window=self.sliding_window, flash_attn_version=getattr(self, "vllm_flash_attn_version", None),
            kv_cache_dtype=kv_cache_dtype, fp8_dtype=self.fp8_dtype,
        )
        # vLLM's attention layer quantizes the query to FP8 when the cache is FP8 and this is
        # True (FlashAttentionImpl sets it: FA3 takes Q, K and V in one dtype). vLLM's Triton
        # kernel, the dense kernel without FlashAttention, takes the model-dtype query.
        self.supports_quant_query_input = bool(getattr(self, "supports_quant_query_input", False)
                                               and self.dense.use_flash_attn)
        self.sparse_layer = SparseLayer(self.num_heads, self.num_kv_heads, self.head_size, self.scale,
                                        self.proxyattn_params, self.dense)

    # --------------------------------------------------------------------------------------
    # KV write
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.dense.use_flash_attn:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        self.dense.write_kv(layer, key, value, kv_cache, slot_mapping, self.kv_cache_dtype)

    # --------------------------------------------------------------------------------------
    # forward
    def forward(
        self,
        layer: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: ProxyAttnMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("proxyattn: fused output quantization is not supported")
        # Resolved before the profiling-run exit, so a bad layer name fails during startup.
        dense_layer = self._is_dense_layer(layer)
        if self.proxyattn_config.budget_profile is not None and self.sparse_layer.budget_profile is None:
            self._attach_budget_profile(layer, query.device)
        if attn_metadata is None:  # memory-profiling run: compile the sparse kernels now
            if not dense_layer and not self.sliding_window_layer:
                self._warm_up(output.dtype, query.device)
            return output.fill_(0)

        plan, dense = attn_metadata.plan, attn_metadata.dense
        if not plan.has_sparse or dense_layer or self.sliding_window_layer:
            if self.dense.use_flash_attn:
                return super().forward(layer, query, key, value, kv_cache, dense, output)
            self.dense.batch(layer, query, kv_cache, output, dense)
            return output

        if self.fp8_dtype is not None:
            kv_cache = kv_cache.view(self.fp8_dtype)  # a view of vLLM's uint8 bytes (no copy)
        self.dense.runs(layer, query, kv_cache, output, plan.dense_runs, dense)
        layer_index = stats.layer_index(layer) if stats.ENABLED else None
        kernel = self.sparse_kernel or self._choose_sparse_kernel(kv_cache)
        for row in plan.sparse_rows:
            tail_done, tail_lse = False, None
            if kernel.dense_tail_first:
                tail_done, tail_lse = self.dense.tail(layer, query, kv_cache, output, row, dense)
                if tail_done and row.tail_tokens == row.q_len and not stats.ENABLED:
                    continue  # a short chunk that is all dense tail: nothing left to select
            chunk = SparseChunk(query[row.token_start : row.token_end], kv_cache, dense.block_table[row.req_idx],
                                output[row.token_start : row.token_end], row.ctx)
            kernel.run(layer, chunk, tail_done=tail_done, layer_index=layer_index,
                       row_lse=budget_rows_lse(tail_lse, row.q_len, self.proxyattn_params.block_size))
        return output

    def _choose_sparse_kernel(self, kv_cache: torch.Tensor) -> SparseKernel:
        """This layer's sparse kernel for the cache's page size and dtype (``kv_cache``: the FP8
        view for an FP8 cache; fixed for the layer's lifetime, so decided once; ``sparse/choose.py``)."""
        page_size = kv_cache.shape[2]
        warmup.check_page_size(self._warmed_page_size, page_size)
        self.sparse_kernel = sparse_kernel_for_layer(
            self.proxyattn_config.sparse_kernel, self.sparse_layer, page_size, kv_cache.dtype)
        return self.sparse_kernel

    def _warm_up(self, dtype: torch.dtype, device: torch.device) -> None:
        """The memory-profiling run's part (``warmup.py``): compile, for the engine's page size
        and longest prompt as vLLM has settled them by now, what this layer's sparse kernel
        runs, with queries in the model ``dtype`` and the cache in its own. (A shape taken in ``__init__`` had a page of 16 where vLLM then served 128: H200,
        TP=2, no --block-size, four kernels compiled inside the first long request.)"""
        shape = warmup.shape_from_vllm_config(
            self._vllm_config, self.num_heads, self.num_kv_heads, self.head_size, self.proxyattn_params)
        kernel = None
        kv_dtype = self.fp8_dtype or dtype
        if shape is not None:
            if device.type == "cuda":
                self._warmed_page_size = shape.page_size
            # No warning here: the first sparse forward gives it, with the cache's real pages.
            kernel = sparse_kernel_for_layer(self.proxyattn_config.sparse_kernel, self.sparse_layer,
                                             shape.page_size, kv_dtype, warn=False)
        warmup.warm_up_layer(shape, kernel, dtype, device, self.dense.tail_first, kv_dtype=kv_dtype)

    def _attach_budget_profile(self, layer: torch.nn.Module, device: torch.device) -> None:
        """This layer's rank of the ``budget_profile`` (benchmarks only; ``budget_profile.py``)."""
        from vllm.distributed import parallel_state

        profile = self.proxyattn_config.load_budget_profile()
        rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        self.sparse_layer = replace(self.sparse_layer, budget_profile=profile.for_layer(
            _layer_index(layer, "budget_profile"), rank * self.num_heads, self.num_heads, device))

    def _is_dense_layer(self, layer: torch.nn.Module) -> bool:
        if self._dense_layer is None:
            dense_layers = self.proxyattn_config.dense_layers
            if not dense_layers:
                self._dense_layer = False
            else:
                self._dense_layer = _layer_index(layer) in dense_layers
        return self._dense_layer


def _layer_index(layer: torch.nn.Module, setting: str = "dense_layers") -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    name = getattr(layer, "layer_name", None)
    try:
        return extract_layer_index(name)
    except (AssertionError, ValueError, AttributeError) as exc:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: cannot find the layer index in the attention layer name {name!r}, so "
            f"'{setting}' cannot be applied; remove '{setting}' from the proxyattn config."
        ) from exc


def _check_supported(attn_type, head_size, alibi_slopes, logits_soft_cap, kv_cache_dtype, sinks):
    fallback = "serve this model with --attention-backend FLASH_ATTN (dense) instead"
    if attn_type != AttentionType.DECODER:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: attention type {attn_type!r} is not supported (only decoder "
            f"self-attention; no encoder, encoder-only or cross-attention): {fallback}."
        )
    # Checked here because the kernels would otherwise only reject it at the first long prompt,
    # after startup, killing the engine mid-serving.
    if head_size not in SUPPORTED_HEAD_DIMS:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: head size {head_size} is not supported by the sparse kernels "
            f"(accepted: {', '.join(map(str, SUPPORTED_HEAD_DIMS))}): {fallback}."
        )
    if alibi_slopes is not None:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: ALiBi (alibi_slopes) is not supported: {fallback}."
        )
    if logits_soft_cap:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: logit soft-capping (logits_soft_cap={logits_soft_cap}) is not "
            f"supported: {fallback}."
        )
    if kv_cache_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: kv_cache_dtype={kv_cache_dtype!r} is not supported (accepted: "
            f"{', '.join(SUPPORTED_KV_CACHE_DTYPES)}); use --kv-cache-dtype fp8 (e4m3) or auto, or {fallback}."
        )
    if sinks is not None:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: attention sinks (learned per-head sink logits) are not supported: "
            f"{fallback}."
        )
