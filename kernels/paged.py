"""Triton helpers shared by the kernels that read vLLM's paged KV cache."""
from __future__ import annotations

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
