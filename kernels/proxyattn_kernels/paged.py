"""Helpers shared by the kernels that read vLLM's paged KV cache: its input checks, row
addressing through the block table, tile loads, a contiguous copy of one request, and the FP8
cache's dequantization.

An FP8 cache (vLLM's ``--kv-cache-dtype fp8``, e4m3) holds ``round(x / scale)`` with one float32
scale per layer for K and one for V (1-element device tensors). The kernels take it as a
``torch.float8_e4m3fn`` view with ``k_scale``/``v_scale``, convert each loaded tile to the query's
dtype (exact: every e4m3 value is a bf16/fp16 value) and apply the scales to the fp32 logits
(``k_scale``) and to the fp32 output (``v_scale``), which equals attending the dequantized cache.
Without scales (a bf16/fp16/fp32 cache) the ``None`` scale pointers compile the scale code away.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import SUPPORTED_DTYPES, check_head_dim

#: The FP8 cache dtype the kernels read (vLLM's "fp8" / "fp8_e4m3" on CUDA).
FP8_KV_DTYPE = torch.float8_e4m3fn


@triton.jit
def paged_row_offsets(block_table_ptr, pos, valid, stride_page, stride_tok, PAGE_SIZE: tl.constexpr):
    """Element offsets (int64) of the cache rows holding absolute token positions ``pos``: the
    logical page ``pos // PAGE_SIZE`` goes through the request's block table. ``valid`` masks
    the table lookup (positions past the sequence read page 0); pass None when all are valid."""
    if valid is None:
        page = tl.load(block_table_ptr + pos // PAGE_SIZE)
    else:
        page = tl.load(block_table_ptr + pos // PAGE_SIZE, mask=valid, other=0)
    return page.to(tl.int64) * stride_page + (pos % PAGE_SIZE).to(tl.int64) * stride_tok


@triton.jit
def load_paged_tile(kv_base, block_table_ptr, pos, valid, offs_d, stride_page, stride_tok,
                    PAGE_SIZE: tl.constexpr, V_OFFSET: tl.constexpr = None):
    """Keys ``[N, D]`` (``N = len(pos)``, ``D = len(offs_d)``) of the cache rows at absolute token
    positions ``pos [N]``, each found through the request's block table (:func:`paged_row_offsets`);
    ``kv_base`` is the cache pointer plus the KV head's offset.

    ``valid [N]`` masks the rows: rows where it is False read 0 (positions past the sequence). Pass
    None when every row is valid: the loads then carry no mask. With ``V_OFFSET`` (``D`` for vLLM's
    rows, which pack ``[K | V]``) the values that many columns further along the same rows come
    too, from the same block-table lookup: returns ``(k, v)`` instead of ``k``."""
    row_off = paged_row_offsets(block_table_ptr, pos, valid, stride_page, stride_tok, PAGE_SIZE)
    k_ptrs = kv_base + row_off[:, None] + offs_d[None, :]
    if valid is None:
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
    if V_OFFSET is None:
        return k
    else:
        if valid is None:
            v = tl.load(k_ptrs + V_OFFSET)
        else:
            v = tl.load(k_ptrs + V_OFFSET, mask=valid[:, None], other=0.0)
        return k, v


def check_kv_scale(kv_cache: torch.Tensor, scale: torch.Tensor | None, name: str) -> None:
    """Raise ``ValueError`` unless ``scale`` fits the cache: a 1-element float32 tensor on the
    cache's device for an FP8 cache (:data:`FP8_KV_DTYPE`), None otherwise."""
    if kv_cache.dtype != FP8_KV_DTYPE:
        if scale is not None:
            raise ValueError(f"{name} is only for an FP8 ({FP8_KV_DTYPE}) cache; got a {kv_cache.dtype} cache")
        return
    if scale is None or scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != kv_cache.device:
        got = None if scale is None else f"{scale.dtype}{tuple(scale.shape)} on {scale.device}"
        raise ValueError(f"an FP8 cache needs {name}: a 1-element float32 tensor on {kv_cache.device}; got {got}")


def check_paged_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                       k_scale: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` unless the inputs are what the selection kernels read: ``q``
    ``[q_len, Hq, D]`` in one of :data:`~proxyattn_kernels.common.SUPPORTED_DTYPES` and
    ``kv_cache`` ``[num_pages, Hkv, page_size, 2 * D]`` in the same dtype, or in
    :data:`FP8_KV_DTYPE` with ``k_scale`` (:func:`check_kv_scale`), with a supported ``D``,
    ``Hkv`` dividing ``Hq``, pages of a multiple of 16 tokens, contiguous last dimensions, and a
    1-D int32 ``block_table`` covering ``seq_len`` tokens, all on one device."""
    if q.dim() != 3 or kv_cache.dim() != 4:
        raise ValueError(f"q must be [q_len, Hq, D] and kv_cache [pages, Hkv, page_size, 2D]; got "
                         f"{tuple(q.shape)} and {tuple(kv_cache.shape)}")
    head_dim = q.shape[2]
    if kv_cache.shape[3] != 2 * head_dim:
        raise ValueError(f"kv_cache last dim {kv_cache.shape[3]} != 2 * head_dim {2 * head_dim}")
    check_head_dim(head_dim)
    if q.dtype not in SUPPORTED_DTYPES or kv_cache.dtype not in (q.dtype, FP8_KV_DTYPE):
        raise ValueError(f"q and kv_cache must share one dtype among fp16/bf16/fp32 (or kv_cache {FP8_KV_DTYPE}); "
                         f"got {q.dtype}, {kv_cache.dtype}")
    check_kv_scale(kv_cache, k_scale, "k_scale")
    if q.shape[1] % kv_cache.shape[1]:
        raise ValueError(f"Hq={q.shape[1]} is not a multiple of Hkv={kv_cache.shape[1]}")
    if kv_cache.shape[2] % 16:
        raise ValueError(f"page_size={kv_cache.shape[2]} must be a multiple of 16")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last dimension")
    if block_table.dim() != 1 or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be 1-D int32; got {block_table.dtype}{tuple(block_table.shape)}")
    if block_table.numel() * kv_cache.shape[2] < seq_len:
        raise ValueError(f"block_table covers {block_table.numel() * kv_cache.shape[2]} tokens < seq_len={seq_len}")
    if q.device != kv_cache.device or q.device != block_table.device:
        raise ValueError(f"q, kv_cache and block_table must be on one device; got {q.device}, "
                         f"{kv_cache.device}, {block_table.device}")


def contiguous_pages(kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
                     page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's keys and values ``[0, seq_len)`` copied out of a paged cache into pages of
    ``page_size`` tokens that follow one another in memory (one gather, no host sync).

    A kernel that reads whole key tiles with TMA needs pages that hold whole tiles; on smaller
    pages (vLLM's 16) it gathers row by row instead. With the copy it reads tiles again, at the
    price of reading and writing the request's K/V once.

    Args:
        kv_cache: ``[num_pages, Hkv, page, 2 * D]`` logical view of vLLM's cache (any strides).
        block_table: ``[max_pages]`` int32, the request's physical page per logical page.
        seq_len: tokens to copy (host int, >= 1).
        page_size: the copy's page size, a multiple of the cache's.

    Returns:
        ``(copy, table)``: ``copy`` is ``[n, Hkv, page_size, 2 * D]`` with
        ``n = ceil(seq_len / page_size)``, the same kind of logical view of a contiguous NHD
        tensor (``[n, page_size, Hkv, 2 * D]``); ``table`` is ``arange(n)`` int32. Positions at
        and past ``seq_len`` in the last page hold whatever the table's next entries point at
        (page 0 past its end): kernels mask them.
    """
    page = kv_cache.shape[2]
    if seq_len < 1 or page_size < page or page_size % page:
        raise ValueError(f"need seq_len >= 1 and page_size a multiple of the cache's page {page}; "
                         f"got seq_len={seq_len}, page_size={page_size}")
    per_page = page_size // page
    num_out = -(-seq_len // page_size)
    pages = block_table[: num_out * per_page]
    if pages.numel() < num_out * per_page:  # the table ends inside the last copy page
        pages = torch.nn.functional.pad(pages, (0, num_out * per_page - pages.numel()))
    # Copied as raw bytes when FP8: index_select need not support float8 dtypes on every device.
    raw = kv_cache.view(torch.uint8) if kv_cache.dtype == FP8_KV_DTYPE else kv_cache
    copy = raw.permute(0, 2, 1, 3).index_select(0, pages)  # [num_out * per_page, page, Hkv, 2D]
    copy = copy.view(num_out, page_size, *copy.shape[2:]).permute(0, 2, 1, 3).view(kv_cache.dtype)
    return copy, torch.arange(num_out, dtype=torch.int32, device=kv_cache.device)


@triton.jit
def kv_scaled(x, scale_ptr):
    """``x * scale`` with an FP8 cache's float32 scale read from ``scale_ptr`` (one load per
    program); ``x`` itself when ``scale_ptr`` is None (compiled away)."""
    if scale_ptr is not None:
        x = x * tl.load(scale_ptr)
    return x
