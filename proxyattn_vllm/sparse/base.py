"""The interface of the sparse attention kernels (``sparse_kernel`` "triton", "fa3", "flashinfer").

A layer holds one :class:`SparseKernel`, chosen once (``choose.py``). Per batch, the impl runs
the dense rows itself and, per sparse row of the metadata builder's CPU plan (``SparseRow``:
Python ints, so no host sync), hands the kernel one :class:`SparseChunk`. :meth:`SparseKernel.run`
launches kernels only: the selection (proxy scores, budgets, ranking) and attention over the
selected blocks, written into the chunk's output in place.

The dense-tail rows of a chunk (``dense_tail_tokens``) read every causal key. Where the dense
kernel can take them (FlashAttention, ``DenseAttention.tail_first``) and the sparse kernel lets
it (:attr:`SparseKernel.dense_tail_first`), the impl attends them densely first and passes
``tail_done`` and their LSE (``row_lse``, see :func:`budget_rows_lse`) to :meth:`SparseKernel.run`.

With an FP8 cache the chunk's cache is the FP8 view and, with FlashAttention, its queries are
FP8 too (vLLM's attention layer quantizes them for FA3): the Triton kernels take the queries in
the model dtype (:func:`kernel_query`) and the cache with its scales (:func:`kv_scales`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch

from proxyattn_kernels import ProxyAttnParams
from proxyattn_kernels.paged import FP8_KV_DTYPE

from ..budget_profile import LayerBudgetProfile
from ..dense import DenseAttention


@dataclass(frozen=True)
class SparseLayer:
    """What a sparse kernel needs of its attention layer (fixed for the layer's lifetime).

    Attributes:
        num_heads, num_kv_heads, head_size: ``Hq``, ``Hkv`` and ``D`` per tensor-parallel rank.
        scale: the softmax scale.
        params: the layer's resolved ProxyAttn parameters.
        dense: the layer's dense attention (the "fa3" kernel's union calls go through it).
        budget_profile: the layer's prescribed budgets (``budget_profile`` setting, benchmarks
            only), or None: budgets from gamma.
    """

    num_heads: int
    num_kv_heads: int
    head_size: int
    scale: float
    params: ProxyAttnParams
    dense: DenseAttention
    budget_profile: LayerBudgetProfile | None = None

    def budget_fraction(self, chunk: "SparseChunk") -> torch.Tensor | None:
        """``[Hq]`` prescribed budget fractions of ``chunk`` (None without a profile)."""
        if self.budget_profile is None:
            return None
        return self.budget_profile.fractions(chunk.ctx + chunk.query.shape[0])


class SparseChunk(NamedTuple):
    """One request's prefill chunk, views into the batch's tensors.

    Attributes:
        query: ``[q_len, Hq, D]`` post-RoPE queries at absolute positions ``[ctx, ctx + q_len)``
            (FP8 where vLLM quantized them: :func:`kernel_query`).
        kv_cache: the layer's paged cache, logical ``[num_blocks, Hkv, page_size, 2 * D]`` (K in
            ``[..., :D]``, V in ``[..., D:]``; an FP8 cache as its ``FP8_KV_DTYPE`` view); keys
            and values ``[0, ctx + q_len)`` are written.
        block_table_row: ``[max_pages]`` int32, the request's physical page per logical page.
        output: ``[q_len, Hq, D]`` in the model dtype; the kernel writes every token (but the
            dense tail's when ``tail_done``).
        ctx: tokens before the chunk (a Python int).
    """

    query: torch.Tensor
    kv_cache: torch.Tensor
    block_table_row: torch.Tensor
    output: torch.Tensor
    ctx: int


def kernel_query(chunk: SparseChunk, attn_layer: torch.nn.Module) -> torch.Tensor:
    """``[q_len, Hq, D]`` the chunk's queries in the output's (model) dtype, as the Triton kernels
    read them: ``chunk.query`` itself, or, where vLLM's attention layer quantized it to FP8 (an
    FP8 cache under FlashAttention), dequantized with the layer's ``_q_scale`` (one elementwise
    op on the device, no host sync)."""
    query, dtype = chunk.query, chunk.output.dtype
    if query.dtype == dtype:
        return query
    return query.to(dtype).mul_(attn_layer._q_scale)


def kv_scales(attn_layer: torch.nn.Module, kv_cache: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The kernels' ``k_scale``/``v_scale`` keywords: the layer's 1-element float32 device scales
    for an FP8 cache view, None otherwise (a cache in the model dtype)."""
    if kv_cache.dtype != FP8_KV_DTYPE:
        return {"k_scale": None, "v_scale": None}
    return {"k_scale": attn_layer._k_scale, "v_scale": attn_layer._v_scale}


class SparseKernel(ABC):
    """One layer's sparse attention of long prefill chunks.

    Class attributes (what the impl and the startup warm-up need to know):
        name: the ``sparse_kernel`` value.
        dense_tail_first: the dense-tail rows may go to the dense kernel first.
        union_pages: runs through the union page plan (``union_pages.py``), which the warm-up
            compiles.
        copies_pages: may read a contiguous copy of the request's pages, whose memory the
            memory-profiling run reserves.
    """

    name: ClassVar[str]
    dense_tail_first: ClassVar[bool] = True
    union_pages: ClassVar[bool] = False
    copies_pages: ClassVar[bool] = False

    def __init__(self, layer: SparseLayer) -> None:
        self.layer = layer

    @abstractmethod
    def run(self, attn_layer: torch.nn.Module, chunk: SparseChunk, *, tail_done: bool = False,
            row_lse: torch.Tensor | None = None, layer_index: int | None = None) -> None:
        """Attention of ``chunk`` into ``chunk.output``: kernel launches only, no host sync.

        Args:
            attn_layer: vLLM's attention module (its Q/K/V scales: FP8 cache).
            chunk: the chunk.
            tail_done: the impl computed the dense-tail rows already: not written here.
            row_lse: optional ``[Hq, min(q_len, block_size)]`` float32 LSE of the chunk's last
                queries (:func:`budget_rows_lse`): the budget reuses it.
            layer_index: the layer's index, only for the ``PROXYATTN_STATS`` diagnostics.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def budget_rows_lse(tail_lse: torch.Tensor | None, q_len: int, block_size: int) -> torch.Tensor | None:
    """The budget rows' part of the dense tail's LSE: ``tail_lse [Hq, tail_tokens]`` (the LSE a
    dense kernel returned for the chunk's last ``tail_tokens`` queries) -> ``[Hq, n]`` for the
    last ``n = min(q_len, block_size)`` queries, or None when the tail does not cover them (a
    ``dense_tail_tokens`` below ``block_size``)."""
    n_last = min(q_len, block_size)
    if tail_lse is None or tail_lse.shape[-1] < n_last:
        return None
    return tail_lse[:, tail_lse.shape[-1] - n_last :]
