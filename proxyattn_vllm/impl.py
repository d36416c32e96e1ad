"""``ProxyAttnImpl``: dense attention for decodes and short prompts, ProxyAttn for long prefills.

Per layer and batch, ``forward`` receives the batch's queries (their K/V are already in the paged
cache: ``do_kv_cache_update`` ran just before) and a :class:`~.metadata.ProxyAttnMetadata`:

* no metadata (memory-profiling run): zero the output;
* no sparse row, or a layer listed in ``dense_layers``: one dense call over the whole batch
  (on CUDA exactly ``FlashAttentionImpl.forward``, so pure-decode batches keep FULL cudagraphs);
* otherwise: one dense varlen call per run of consecutive dense rows (decodes at the front,
  short prefill chunks) and, per sparse row, one dense call for its dense-tail rows (with
  FlashAttention) then one :func:`sparse_prefill` call for the rest (with
  ``sparse_kernel`` "fa3" or "flashinfer": the selection, then one dense paged kernel over each
  query block's union of selected blocks, ``ProxyAttnImpl._union_prefill``).

Configurations the sparse path cannot honour fail here, at startup, with a message naming the
feature and what to use instead.
"""
from __future__ import annotations

import torch

from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

from proxyattn_kernels import ChunkGeometry, ProxyAttnParams
from proxyattn_kernels.block_sparse_attn import flashinfer as fi
from proxyattn_kernels.block_sparse_attn.triton import block_sparse_attn, copy_bytes, default_copy_page
from proxyattn_kernels.block_sparse_attn.union_pages import tail_first_calls, union_call_num_splits, union_page_plan
from proxyattn_kernels.common import SUPPORTED_HEAD_DIMS
from proxyattn_kernels.device import has_tma, sm_count
from proxyattn_kernels.selection import select_blocks_paged

from . import stats, warmup
from ._compat import dense_kernel_is_flash_attn, triton_available
from .config import ProxyAttnConfig, auto_sparse_kernel
from .config import load_config
from .metadata import ProxyAttnMetadata

logger = init_logger("vllm.proxyattn")

SUPPORTED_KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")


class ProxyAttnUnsupportedError(ValueError):
    """The model or deployment uses an attention feature ProxyAttn does not support."""


#: Set when the Triton kernel's contiguous copy of a request once ran out of GPU memory: from
#: then on, this process reads small pages directly (``copy_page=0``, slower but the same result).
_copy_out_of_memory = False


def sparse_prefill(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table_row: torch.Tensor,
    output: torch.Tensor,
    ctx: int,
    scale: float,
    params: ProxyAttnParams,
    layer_index: int | None = None,
    tail_done: bool = False,
    row_lse: torch.Tensor | None = None,
) -> None:
    """ProxyAttn attention of one request's prefill chunk, written into ``output`` in place.

    This is the single boundary between the vLLM glue and the ProxyAttn kernels: the glue
    guarantees the arguments below; the Triton kernels compute proxy scores, budgets, the
    selection and block-sparse attention (kernel launches only, no host sync), and must equal
    ``proxyattn_kernels/reference.py::proxyattn_prefill_reference`` (the oracle, see tests/test_vllm_impl.py).

    Args:
        query: ``[q_len, Hq, D]`` post-RoPE queries of the chunk, absolute positions
            ``[ctx, ctx + q_len)`` (a view into the batch's query tensor).
        kv_cache: the layer's paged cache, logical ``[num_blocks, Hkv, page_size, 2 * D]`` with K in
            ``[..., :D]`` and V in ``[..., D:]`` (a permuted view: use its strides). Keys and
            values ``[0, ctx + q_len)`` of the request are already written.
        block_table_row: ``[max_pages]`` int32, the request's physical page per logical page.
        output: ``[q_len, Hq, D]`` view into the layer's output; fully overwritten.
        ctx: tokens before the chunk (Python int; no device sync needed).
        scale: softmax scale.
        params: the layer's resolved ProxyAttn parameters.
        layer_index: the layer's index, only for the ``PROXYATTN_STATS`` diagnostics.
        tail_done: the caller computes the dense-tail rows (``params.dense_tail_tokens``) with a
            dense kernel: their tokens of ``output`` are not written here. Otherwise the block-
            sparse kernel computes them too, launched first.
        row_lse: optional ``[Hq, min(q_len, block_size)]`` float32 LSE of the chunk's last
            queries from that dense kernel (:func:`budget_rows_lse`): the budget then reuses it.
    """
    selection = select_blocks_paged(
        query, kv_cache, block_table_row, ctx=ctx, scale=scale, params=params, row_lse=row_lse
    )
    if stats.ENABLED:  # diagnostic only (see stats.py); off: this one check
        stats.record(
            query, kv_cache, block_table_row, selection, ctx=ctx, scale=scale,
            block_size=params.block_size, layer_index=layer_index,
        )
    tail_rows = ChunkGeometry(ctx, query.shape[0], params.block_size).num_tail_rows(params.dense_tail_tokens)
    rows = {"skip_rows": tail_rows} if tail_done else {"heavy_rows": tail_rows}

    def attend(copy_page: int) -> None:
        block_sparse_attn(query, kv_cache, block_table_row, selection.ranking, selection.counts, output,
                          ctx=ctx, scale=scale, block_size=params.block_size, copy_page=copy_page, **rows)

    global _copy_out_of_memory
    copy_page = 0 if _copy_out_of_memory else default_copy_page(
        kv_cache.shape[2], params.block_size, query.shape[-1], has_tma(query.device))
    try:
        attend(copy_page)
    except torch.OutOfMemoryError:
        # The memory-profiling run reserves the copy (warmup.reserve_copy_memory), but an engine
        # sized without that run (--kv-cache-memory-bytes) has no room for it. The startup
        # warm-up compiled the kernel for the copy's pages only: the first chunk that reads the
        # small pages compiles that variant (seconds, once).
        if not copy_page:
            raise
        _copy_out_of_memory = True
        logger.warning(
            "proxyattn: out of GPU memory for the sparse kernel's copy of a %d-token prompt's keys and "
            "values in %d-token pages (%.2f GiB); from now on it reads the %d-token pages directly (the "
            "same result, up to 1.4x slower). The KV cache left no room for the copy: without "
            "--kv-cache-memory-bytes vLLM reserves it at startup; or serve with --block-size %d, "
            "which needs no copy.", ctx + query.shape[0], copy_page,
            copy_bytes(ctx + query.shape[0], kv_cache.shape[1], query.shape[-1], query.dtype, copy_page) / 2**30,
            kv_cache.shape[2], copy_page,
        )
        attend(0)


def budget_rows_lse(tail_lse: torch.Tensor | None, q_len: int, block_size: int) -> torch.Tensor | None:
    """The budget rows' part of the dense tail's LSE: ``tail_lse [Hq, tail_tokens]`` (the LSE a
    dense kernel returned for the chunk's last ``tail_tokens`` queries) -> ``[Hq, n]`` for the
    last ``n = min(q_len, block_size)`` queries, or None when the tail does not cover them (a
    ``dense_tail_tokens`` below ``block_size``)."""
    n_last = min(q_len, block_size)
    if tail_lse is None or tail_lse.shape[-1] < n_last:
        return None
    return tail_lse[:, tail_lse.shape[-1] - n_last :]


class ProxyAttnImpl(FlashAttentionImpl):
    """FlashAttentionImpl whose forward sends long prefill chunks to :func:`sparse_prefill`.

    The dense kernels are chosen once, here (see ``_compat``): FlashAttention when vLLM's
    ``vllm_flash_attn`` is usable (CUDA), else vLLM's Triton ``unified_attention`` and
    ``triton_reshape_and_cache_flash`` (CPU CI), which use the same cache layout.
    """

    _warned_kernel_fallbacks: set[str] = set()  # one warning per reason and process, not per layer
    _warned_sliding_window = False
    _warned_page_mismatch = False
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
        if proxyattn_config.sparse_kernel == "flashinfer" and not fi.flashinfer_available():
            raise ProxyAttnUnsupportedError(
                f"proxyattn: sparse_kernel \"flashinfer\" needs {fi.FLASHINFER_REQUIREMENT}, "
                f"which cannot be used here ({fi.flashinfer_import_error()}): "
                f"{fi.INSTALL_HINT}, or set sparse_kernel to \"triton\" or \"fa3\"."
            )
        self._sparse_kernel: str | None = None  # resolved on the first sparse forward (page size)
        # Read again when the memory-profiling run compiles the kernels (_warmup_shape): vLLM
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

        super().__init__(
            num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
            kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks,
        )
        if getattr(self, "dcp_world_size", 1) > 1:
            raise ProxyAttnUnsupportedError(
                "proxyattn: decode context parallelism (--decode-context-parallel-size > 1) is "
                "not supported; run with --decode-context-parallel-size 1."
            )

        self.use_flash_attn = dense_kernel_is_flash_attn()
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

            self._triton_attention = unified_attention
            self._triton_kv_write = triton_reshape_and_cache_flash

    # --------------------------------------------------------------------------------------
    # KV write
    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.use_flash_attn:
            return super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        self._triton_kv_write(
            key, value, key_cache, value_cache, slot_mapping, self.kv_cache_dtype,
            layer._k_scale, layer._v_scale,
        )

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
        if attn_metadata is None:  # memory-profiling run: compile the sparse kernels now
            if not dense_layer and not self.sliding_window_layer:
                shape = self._warmup_shape()
                if shape is not None and query.is_cuda:
                    self._warmed_page_size = shape.page_size
                kernel = self._warmup_kernel(shape, query.dtype)
                if kernel == "triton":
                    warmup.reserve_copy_memory(shape, query.dtype, query.device)
                tail_first = self._tail_by_dense_kernel() and self.proxyattn_params.dense_tail_tokens > 0
                warmup.warm_up_once(shape, query.dtype, query.device,
                                    flashinfer=kernel == "flashinfer", union_plan=kernel in ("fa3", "flashinfer"),
                                    budget_lse=tail_first and kernel in ("triton", "fa3"))
            return output.fill_(0)

        plan = attn_metadata.plan
        if not plan.has_sparse or dense_layer or self.sliding_window_layer:
            return self._dense_batch(layer, query, key, value, kv_cache, attn_metadata, output)

        dense = attn_metadata.dense
        for run in plan.dense_runs:
            self._dense_varlen(
                layer, query[run.token_start : run.token_end], kv_cache,
                output[run.token_start : run.token_end], run.cu_seqlens_q, run.max_query_len,
                dense.seq_lens[run.req_start : run.req_end], run.max_seq_len,
                dense.block_table[run.req_start : run.req_end],
            )
        layer_index = stats.layer_index(layer) if stats.ENABLED else None
        kernel = self._sparse_kernel or self._resolve_sparse_kernel(kv_cache)
        block_size = self.proxyattn_params.block_size
        for row in plan.sparse_rows:
            chunk = (query[row.token_start : row.token_end], kv_cache, dense.block_table[row.req_idx],
                     output[row.token_start : row.token_end], row.ctx)
            tail_done, tail_lse = False, None
            if kernel != "flashinfer":
                tail_done, tail_lse = self._dense_tail_first(layer, query, kv_cache, output, row, dense)
                if tail_done and row.tail_tokens == row.q_len and not stats.ENABLED:
                    continue  # a short chunk that is all dense tail: nothing left to select
            row_lse = budget_rows_lse(tail_lse, row.q_len, block_size)
            if kernel == "triton":
                sparse_prefill(*chunk, self.scale, self.proxyattn_params, layer_index=layer_index,
                               tail_done=tail_done, row_lse=row_lse)
            else:
                self._union_prefill(layer, *chunk, kernel=kernel, layer_index=layer_index, tail_done=tail_done,
                                    row_lse=row_lse)
        return output

    def _dense_tail_first(self, layer, query, kv_cache, output, row, dense) -> tuple[bool, torch.Tensor | None]:
        """Attend the dense-tail rows of a chunk with FlashAttention, first: ``(done, their LSE
        [Hq, tail_tokens] or None)``. Those rows read every causal key: in the block-sparse
        kernel each of their query tiles walks the whole context in one program, which bounds
        the kernel's time at long context (H200, last 8K chunk of 128K, Qwen2.5-0.5B shape: 2.94
        ms with the tail, 1.31 without, for 14% more blocks); FA3 splits their keys across the
        GPU. Their LSE spares the budget its own pass over the same rows (``row_lse`` of the
        selection). Without FlashAttention (CPU) the sparse kernel keeps them."""
        if not (self._tail_by_dense_kernel() and row.tail_tokens):
            return False, None
        tokens = slice(row.token_end - row.tail_tokens, row.token_end)
        req = slice(row.req_idx, row.req_idx + 1)
        lse = self._dense_varlen(
            layer, query[tokens], kv_cache, output[tokens], row.tail_cu_seqlens_q, row.tail_tokens,
            dense.seq_lens[req], row.seq_len, dense.block_table[req], return_lse=True,
        )
        return True, lse

    def _tail_by_dense_kernel(self) -> bool:
        """Whether dense-tail rows go to the dense kernel (:meth:`_dense_tail_first`)."""
        return self.use_flash_attn

    def _resolve_sparse_kernel(self, kv_cache: torch.Tensor) -> str:
        """The kernel of this layer's sparse chunks (:meth:`_choose_sparse_kernel`), with one
        warning per reason where a union kernel falls back to Triton, and one if the startup
        warm-up compiled for another page size. Decided once (the page size and dtype are fixed
        for the layer's lifetime)."""
        page_size = kv_cache.shape[2]
        if self._warmed_page_size not in (None, page_size) and not ProxyAttnImpl._warned_page_mismatch:
            ProxyAttnImpl._warned_page_mismatch = True
            logger.warning(
                "proxyattn: the sparse kernels were compiled at startup for KV pages of %d tokens, but "
                "the cache has pages of %d: the first long prompts compile them again (seconds each). "
                "Please report this with your vllm serve command.", self._warmed_page_size, page_size,
            )
        kernel, fallback = self._choose_sparse_kernel(page_size, kv_cache.dtype)
        if fallback is not None:
            if fallback not in ProxyAttnImpl._warned_kernel_fallbacks:
                ProxyAttnImpl._warned_kernel_fallbacks.add(fallback)
                logger.warning("proxyattn: %s; using the Triton block-sparse kernel.", fallback)
            kernel = "triton"
        self._sparse_kernel = kernel
        return kernel

    def _choose_sparse_kernel(self, page_size: int, dtype: torch.dtype) -> tuple[str, str | None]:
        """``(kernel, why it cannot run or None)``: ``sparse_kernel``, with "auto" looked up by
        shape; a union kernel ("fa3", "flashinfer") needs pages that divide the selection block,
        and FlashInfer needs to be importable and to support the head size and dtype."""
        configured = self.proxyattn_config.sparse_kernel
        block_size = self.proxyattn_params.block_size
        kernel = configured
        if configured == "auto":
            kernel = auto_sparse_kernel(self.head_size, page_size, self.num_heads, self.num_kv_heads,
                                        self.proxyattn_params.num_groups)
        name = {"fa3": "FA3", "flashinfer": "FlashInfer"}.get(kernel)
        reason = None
        if name is not None and block_size % page_size:
            reason = (
                f"needs KV pages that divide block_size={block_size}, got pages of {page_size} "
                f"tokens; set --block-size to a divisor of {block_size} to use {name}"
            )
        elif kernel == "flashinfer" and not fi.flashinfer_available():
            reason = f"cannot import FlashInfer ({fi.flashinfer_import_error()}); {fi.INSTALL_HINT}"
        elif kernel == "flashinfer" and not fi.flashinfer_supports(dtype, self.head_size):
            reason = (
                f"FlashInfer takes head sizes {fi.SUPPORTED_HEAD_DIMS} in float16/bfloat16, got "
                f"{self.head_size} in {dtype}"
            )
        if reason is None:
            return kernel, None
        chosen = f'sparse_kernel "{configured}"' + (f' (chose "{kernel}")' if configured == "auto" else "")
        return kernel, f"{chosen} {reason}"

    def _warmup_shape(self) -> warmup.WarmupShape | None:
        """What the memory-profiling run compiles the kernels for: this layer's shape and the
        engine's limits as they are now (None: not known). Called in that run, after vLLM has
        settled the page size: a shape taken in ``__init__`` had a page of 16 where vLLM then
        served 128 (H200, TP=2, no --block-size: four kernels compiled inside the first long
        request)."""
        return warmup.shape_from_vllm_config(
            self._vllm_config, self.num_heads, self.num_kv_heads, self.head_size, self.proxyattn_params)

    def _warmup_kernel(self, shape: warmup.WarmupShape | None, dtype: torch.dtype) -> str | None:
        """The kernel this layer's sparse chunks will run (:meth:`_choose_sparse_kernel` with the
        engine's page size; "triton" where a union kernel falls back), None if not known yet:
        FlashInfer's first use compiles it for minutes, and the union kernels' page plan has
        variants per prompt length."""
        if shape is None:
            return None
        kernel, fallback = self._choose_sparse_kernel(shape.page_size, dtype)
        return "triton" if fallback is not None else kernel

    def _union_prefill(self, layer, query, kv_cache, block_table_row, output, ctx, *, kernel, layer_index=None,
                       tail_done=False, row_lse=None):
        """Like :func:`sparse_prefill`, but the selected blocks run through a dense paged kernel,
        one pseudo-request per query block over the union of what its heads selected
        (``proxyattn_kernels/block_sparse_attn/union_pages.py``): ``kernel`` "fa3" is vLLM's varlen kernel
        (FA3 on Hopper), "flashinfer" FlashInfer's paged prefill
        (``proxyattn_kernels/block_sparse_attn/flashinfer.py``). ``tail_done``, ``row_lse``: as
        :func:`sparse_prefill` ("fa3" only)."""
        params = self.proxyattn_params
        selection = select_blocks_paged(
            query, kv_cache, block_table_row, ctx=ctx, scale=self.scale, params=params, row_lse=row_lse
        )
        pages = union_page_plan(
            selection.ranking, selection.counts, block_table_row, ctx=ctx, q_len=query.shape[0],
            block_size=params.block_size, page_size=kv_cache.shape[2],
        )
        if stats.ENABLED:  # what this path computes: every head gets its row's union
            union = selection._replace(
                ranking=pages.union_ranking, counts=pages.union_blocks.expand(query.shape[1], -1))
            stats.record(query, kv_cache, block_table_row, union, ctx=ctx, scale=self.scale,
                         block_size=params.block_size, layer_index=layer_index)
        if kernel == "flashinfer":
            fi.flashinfer_union_attention(
                query, kv_cache, pages, output, ctx=ctx, scale=self.scale, block_size=params.block_size
            )
            return
        # The dense tail rows read every causal page: their own call first (tail_first_calls), or
        # already done by _dense_tail_first.
        geometry = ChunkGeometry(ctx, query.shape[0], params.block_size)
        first_tail_row = geometry.first_tail_row(params.dense_tail_tokens)
        for tokens, rows in tail_first_calls(pages, geometry, first_tail_row, tail_done):
            self._dense_varlen(
                layer, query[tokens], kv_cache, output[tokens], rows.cu_seqlens_q, rows.max_seqlen_q,
                rows.seqused_k, rows.max_seqlen_k, rows.block_table,
                num_splits=union_call_num_splits(rows.seqused_k.shape[0], self.num_heads, sm_count(query.device)),
            )

    def _is_dense_layer(self, layer: torch.nn.Module) -> bool:
        if self._dense_layer is None:
            dense_layers = self.proxyattn_config.dense_layers
            if not dense_layers:
                self._dense_layer = False
            else:
                self._dense_layer = _layer_index(layer) in dense_layers
        return self._dense_layer

    def _dense_batch(self, layer, query, key, value, kv_cache, md: ProxyAttnMetadata, output):
        """Dense attention over the whole batch."""
        if self.use_flash_attn:
            return super().forward(layer, query, key, value, kv_cache, md.dense, output)
        dense = md.dense
        n = dense.num_actual_tokens
        self._dense_varlen(
            layer, query[:n], kv_cache, output[:n], dense.query_start_loc, dense.max_query_len,
            dense.seq_lens, dense.max_seq_len, dense.block_table,
        )
        return output

    def _dense_varlen(
        self, layer, query, kv_cache, output, cu_seqlens_q, max_query_len, seq_lens,
        max_seq_len, block_table, return_lse=False, num_splits=0,
    ) -> torch.Tensor | None:
        """Causal varlen attention of ``query`` (rows given by ``cu_seqlens_q``, rebased to 0)
        over the paged cache, written into ``output``. With ``return_lse`` and FlashAttention:
        returns the rows' ``[Hq, tokens]`` float32 natural-log LSE; otherwise None.
        ``num_splits``: FlashAttention's split-KV count (0: its heuristic; the Triton kernel
        has no such choice)."""
        key_cache, value_cache = kv_cache.transpose(1, 2).split(self.head_size, dim=-1)
        descale_shape = (seq_lens.shape[0], self.num_kv_heads)
        k_descale = layer._k_scale.expand(descale_shape)
        v_descale = layer._v_scale.expand(descale_shape)
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
                fa_version=self.vllm_flash_attn_version,
                q_descale=None, k_descale=k_descale, v_descale=v_descale,
                return_softmax_lse=return_lse, num_splits=num_splits,
            )
            return result[1] if return_lse else None
        self._triton_attention(
            q=query, k=key_cache, v=value_cache, out=output,
            cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_query_len,
            seqused_k=seq_lens, max_seqlen_k=max_seq_len,
            softmax_scale=self.scale, causal=True, window_size=self.sliding_window,
            block_table=block_table, softcap=0,
            q_descale=None, k_descale=k_descale, v_descale=v_descale,
        )


def _layer_index(layer: torch.nn.Module) -> int:
    from vllm.model_executor.models.utils import extract_layer_index

    name = getattr(layer, "layer_name", None)
    try:
        return extract_layer_index(name)
    except (AssertionError, ValueError, AttributeError) as exc:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: cannot find the layer index in the attention layer name {name!r}, so "
            "'dense_layers' cannot be applied; remove 'dense_layers' from the proxyattn config."
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
            f"proxyattn: kv_cache_dtype={kv_cache_dtype!r} (quantized KV cache) is not "
            f"supported; use --kv-cache-dtype auto (or bfloat16/float16), or {fallback}."
        )
    if sinks is not None:
        raise ProxyAttnUnsupportedError(
            f"proxyattn: attention sinks (learned per-head sink logits) are not supported: "
            f"{fallback}."
        )
