"""Per-head block budgets from the block mass: the torch spec's gamma count and limits
(``budget/naive.py``: ``gamma_block_counts``, then ``limit_budget``) in one Triton launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..common import MAX_TRITON_BLOCKS, row_pad, row_warps
from .naive import budget_bounds, gamma_block_counts, limit_budget


@triton.jit(do_not_specialize=["num_k_blocks", "min_blocks", "max_blocks", "stride_mass_head"])
def _gamma_budget_kernel(
    mass_ptr, budget_ptr, counts_ptr,
    num_k_blocks, gamma, min_blocks, max_blocks, stride_mass_head,
    KB_PAD: tl.constexpr, EVERY_BLOCK: tl.constexpr,
):
    head = tl.program_id(0)
    if EVERY_BLOCK:  # gamma >= 1
        count = num_k_blocks
    else:
        cols = tl.arange(0, KB_PAD)
        valid = cols < num_k_blocks
        mass = tl.load(mass_ptr + head * stride_mass_head + cols, mask=valid, other=0.0)
        # Padding (0) sorts behind every real block; positions past the row are not counted.
        share = tl.sort(mass, descending=True)
        share = share / tl.sum(share, 0)
        below = tl.sum(((tl.cumsum(share, 0) < gamma) & valid).to(tl.int32), 0)
        count = tl.minimum(below + 1, num_k_blocks)
    tl.store(counts_ptr + head, count)
    tl.store(budget_ptr + head, tl.minimum(tl.maximum(count, min_blocks), max_blocks))


def gamma_budgets(
    mass: torch.Tensor, gamma: float, min_budget_blocks: int, max_blocks: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``limit_budget(gamma_block_counts(mass, gamma), ...)`` in one launch.

    Args:
        mass: ``[Hq, Kb]`` float32 block mass per head (rows sum to 1, contiguous last dim).
        gamma, min_budget_blocks, max_blocks: as ``budget/naive.py``.

    Returns:
        ``(budget [Hq], gamma_counts [Hq])`` int32 on ``mass.device``, no host sync. A count can
        differ from the torch spec's only where a cumulative share lies within float rounding of
        ``gamma`` (the sums run in a different order).
    """
    if mass.dim() != 2 or mass.dtype != torch.float32 or mass.stride(-1) != 1:
        raise ValueError(f"mass must be float32 [Hq, Kb] with a contiguous last dim; got "
                         f"{mass.dtype}{tuple(mass.shape)}")
    num_q_heads, num_k_blocks = mass.shape
    if num_k_blocks > MAX_TRITON_BLOCKS:
        counts = gamma_block_counts(mass, gamma)
        return limit_budget(counts, num_k_blocks, min_budget_blocks, max_blocks), counts
    lower, upper = budget_bounds(num_k_blocks, min_budget_blocks, max_blocks)
    budget = torch.empty(num_q_heads, dtype=torch.int32, device=mass.device)
    counts = torch.empty_like(budget)
    kb_pad = row_pad(num_k_blocks)
    _gamma_budget_kernel[(num_q_heads,)](
        mass, budget, counts, num_k_blocks, float(gamma), lower, upper, mass.stride(0),
        KB_PAD=kb_pad, EVERY_BLOCK=gamma >= 1.0, num_warps=row_warps(kb_pad),
    )
    return budget, counts


__all__ = ["gamma_budgets"]
