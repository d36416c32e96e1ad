"""Helpers shared by the kernels that read vLLM's paged KV cache."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
    copy = kv_cache.permute(0, 2, 1, 3).index_select(0, pages)  # [num_out * per_page, page, Hkv, 2D]
    copy = copy.view(num_out, page_size, *copy.shape[2:]).permute(0, 2, 1, 3)
    return copy, torch.arange(num_out, dtype=torch.int32, device=kv_cache.device)
