"""What the Triton steps (proxy scores, budget, select, block-sparse attention) share: the inputs
they accept, launch sizing, scratch buffers and the log2-domain softmax arithmetic.

Reading the paged KV cache lives in ``paged.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .device import sm_count

#: log2(e). The kernels compute softmax with ``exp2`` (the GPU's native exponential), so logits
#: are scaled by ``scale * LOG2E`` on the host and natural-log LSEs are converted with it.
LOG2E = 1.4426950408889634
#: :data:`LOG2E` for use inside kernels (a kernel may only read ``constexpr`` globals).
LOG2E_JIT = tl.constexpr(LOG2E)

#: Head sizes the Triton kernels accept: a head is one power-of-two tile (``tl.arange(0, D)``)
#: and the contraction of a ``tl.dot``, which needs at least 16.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
#: Input dtypes of the selection kernels (fp32 for tests; the model runs fp16 or bf16).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

#: Longest row of key blocks a kernel holds in registers (select, the budget count, the union
#: plan, the head lists): up to 8192 int64 per program (over 1M tokens at block 128). Longer
#: rows use the torch specs, also on the device.
MAX_TRITON_BLOCKS = 8192


def check_head_dim(head_dim: int) -> None:
    """Raise ``ValueError`` unless ``head_dim`` is one of :data:`SUPPORTED_HEAD_DIMS`."""
    if head_dim not in SUPPORTED_HEAD_DIMS:
        accepted = ", ".join(map(str, SUPPORTED_HEAD_DIMS))
        raise ValueError(f"head_dim={head_dim} unsupported; accepted: {accepted}")


def input_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` for inputs of ``dtype``."""
    # fp32 inputs (tests, not production): exact fp32 products rather than tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


def row_pad(num_k_blocks: int) -> int:
    """``KB_PAD`` of every kernel that holds a row of key blocks in registers (select, the budget
    count, the union plan, the head lists): the next power of two, at least 16.
    proxyattn_kernels/warmup.py compiles one variant per value."""
    return max(16, triton.next_power_of_2(num_k_blocks))


def row_warps(kb_pad: int) -> int:
    """Warps of a program holding a ``kb_pad`` row of 32-bit values (the budget count, the union
    plan, the head lists; the select kernel's int64 row has its own rule)."""
    return 4 if kb_pad <= 2048 else 8


def target_programs(device: torch.device) -> int:
    """How many programs a streamed pass should have: about 8 per SM on a GPU (fine-grained
    enough that the last wave is short); a few under the CPU interpreter, to exercise splits."""
    if device.type != "cuda":
        return 4
    return 8 * sm_count(device)


def even_splits(num_items: int, wanted: int) -> tuple[int, int]:
    """Share ``num_items`` (key tiles or key blocks) among about ``wanted`` programs:
    ``(splits, items_per_split)``, with ``1 <= splits <= num_items`` and no empty split."""
    splits = max(1, min(wanted, num_items))
    per_split = -(-num_items // splits)
    return -(-num_items // per_split), per_split


def workspace(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised scratch buffer of a kernel pass: every element a kernel reads must have
    been written (tests replace this function with a NaN-filled one to check it)."""
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def safe_max(m):
    """-inf -> 0 so that ``exp2(x - m)`` stays NaN-free on fully masked rows."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def lse_tile_update(m_i, l_i, s):
    """Fold a tile of log2-domain logits ``s [M, N]`` into each row's running maximum ``m_i [M]``
    and sum ``l_i [M]`` of ``exp2(s - m_i)``; returns the new ``(m_i, l_i)``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = safe_max(m_new)
    l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), 1)
    return m_new, l_i


@triton.jit
def lse_merge(m_i, l_i, part):
    """Fold one key split's partial log2-sum-exp ``part [M]`` into the running maximum ``m_i`` and
    sum ``l_i`` of the same rows (their LSE is then ``m_i + log2(l_i)``); returns the new
    ``(m_i, l_i)``."""
    m_new = tl.maximum(m_i, part)
    m_use = safe_max(m_new)
    l_i = l_i * tl.exp2(m_i - m_use) + tl.exp2(part - m_use)
    return m_new, l_i


__all__ = [
    "LOG2E", "LOG2E_JIT", "MAX_TRITON_BLOCKS", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "check_head_dim",
    "even_splits", "input_precision", "lse_merge", "lse_tile_update", "row_pad", "row_warps", "safe_max",
    "target_programs", "workspace",
]
