"""Test helper: build a vLLM-0.26 paged KV cache from contiguous keys and values."""
from __future__ import annotations

import torch


def make_paged(k: torch.Tensor, v: torch.Tensor, page_size: int, extra_pages: int = 3):
    """Scatter ``k, v [seq_len, Hkv, D]`` into an NHD physical cache whose unused slots are NaN
    (so a kernel reading outside the sequence is caught) with a shuffled int32 block table.

    Returns vLLM's permuted logical view ``[pages, Hkv, page_size, 2D]`` and the table row."""
    seq_len, hkv, d = k.shape
    n = -(-seq_len // page_size)
    physical = torch.full((n + extra_pages, page_size, hkv, 2 * d), float("nan"), dtype=k.dtype,
                          device=k.device)
    table = torch.randperm(n + extra_pages, device=k.device)[:n].to(torch.int32)
    pos = torch.arange(seq_len, device=k.device)
    physical[table[pos // page_size].long(), pos % page_size] = torch.cat([k, v], dim=-1)
    return physical.permute(0, 2, 1, 3), table
