"""Kernel-side parameters and per-chunk geometry shared by every ProxyAttn op.

Nothing here imports vLLM: ``proxyattn_vllm.config.ProxyAttnConfig`` resolves the user's
configuration (e.g. ``num_proxy_groups="auto"``) into a :class:`ProxyAttnParams` for one layer.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ProxyAttnParams:
    """Resolved ProxyAttn parameters for one attention layer.

    Attributes:
        gamma: cumulative attention mass a head's budget must cover, in (0, 1].
        stride: keep every ``stride``-th position (``p % stride == 0``) for the proxy scores.
        block_size: tokens per selection block (query and key blocks, aligned to absolute
            positions). Must be a multiple of ``stride``.
        num_groups: number of proxy heads; divides the number of KV heads.
        min_budget_blocks: lower bound of a head's per-row block budget.
        sink_blocks: leading key blocks every row keeps.
        local_blocks: key blocks ending at the diagonal block that every row keeps (>= 1).
        min_sparse_len: sequences shorter than this (total tokens) run dense.
        max_density: optional cap on the fraction of a chunk's causal key blocks it computes,
            the forced blocks and the dense tail included: each head's per-row budget is capped
            at :meth:`budget_cap_blocks` (the forced blocks of a row are always computed, so a
            cap below them is exceeded).
        dense_tail_tokens: the query blocks holding a chunk's last ``dense_tail_tokens``
            tokens compute every causal key block (0: none).
    """

    gamma: float = 0.95
    stride: int = 4
    block_size: int = 128
    num_groups: int = 1
    min_budget_blocks: int = 16
    sink_blocks: int = 1
    local_blocks: int = 1
    min_sparse_len: int = 8192
    max_density: float | None = None
    dense_tail_tokens: int = 0

    def __post_init__(self) -> None:
        # Config validation with user-facing messages lives in ProxyAttnConfig; these are
        # internal invariants the kernels rely on.
        assert 0.0 < self.gamma <= 1.0, self.gamma
        assert self.stride >= 1 and self.block_size % self.stride == 0, (self.stride, self.block_size)
        assert self.num_groups >= 1 and self.min_budget_blocks >= 1
        assert self.sink_blocks >= 0 and self.local_blocks >= 1
        assert self.max_density is None or 0.0 < self.max_density <= 1.0
        assert self.dense_tail_tokens >= 0

    def budget_cap_blocks(self, geo: "ChunkGeometry") -> int | None:
        """The per-row budget cap that ``max_density`` gives one chunk (None: no cap); see
        :func:`density_budget_cap`."""
        if self.max_density is None:
            return None
        return density_budget_cap(geo.ctx, geo.q_len, geo.block_size, self.max_density,
                                  self.sink_blocks, self.local_blocks, self.dense_tail_tokens)


def num_forced_blocks(diagonal: int, sink_blocks: int, local_blocks: int) -> int:
    """Forced blocks of the row whose diagonal key block is ``diagonal``: the ``local_blocks``
    blocks ending at the diagonal and the ``sink_blocks`` first blocks, each counted once and
    only if causal (``select/naive.py``)."""
    first_local = max(0, diagonal - local_blocks + 1)
    sinks = min(sink_blocks, diagonal + 1)
    return (diagonal - first_local + 1) + sinks - max(0, sinks - first_local)


@functools.lru_cache(maxsize=4096)  # one computation per chunk, shared by its layers
def density_budget_cap(ctx: int, q_len: int, block_size: int, max_density: float, sink_blocks: int,
                       local_blocks: int, dense_tail_tokens: int) -> int:
    """The largest per-row budget ``b`` (blocks, >= 1) for which the chunk computes at most
    ``max_density`` of its causal blocks when every head uses ``b``: the dense-tail rows count
    their whole extent, every other row ``min(extent, max(b, forced))``. 1 when even ``b = 1``
    exceeds it (the forced blocks and the tail alone do). Host-side, O(rows * log(blocks))."""
    geo = ChunkGeometry(ctx, q_len, block_size)
    first_tail = geo.first_tail_row(dense_tail_tokens)
    extents = [geo.row_extent(r) for r in range(geo.num_q_blocks)]
    tail_blocks = sum(extents[first_tail:])
    rows = [(e, num_forced_blocks(e - 1, sink_blocks, local_blocks)) for e in extents[:first_tail]]
    allowed = max_density * sum(extents)

    def computed(budget: int) -> int:
        return tail_blocks + sum(min(e, max(budget, forced)) for e, forced in rows)

    lo, hi = 1, geo.num_k_blocks  # computed() is nondecreasing in the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if computed(mid) <= allowed + 1e-9:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(frozen=True)
class ChunkGeometry:
    """Block geometry of one prefill chunk: queries at ``[ctx, ctx + q_len)``, keys ``[0, ctx + q_len)``.

    Query blocks are aligned to absolute positions, so a chunk that starts or ends inside a block
    has a partial first or last query-block row. Row ``r`` of the chunk is query block
    ``first_q_block + r`` and may see key blocks ``0 .. first_q_block + r`` (its causal extent).
    """

    ctx: int
    q_len: int
    block_size: int

    def __post_init__(self) -> None:
        assert self.ctx >= 0 and self.q_len >= 1 and self.block_size >= 1

    @property
    def seq_len(self) -> int:
        return self.ctx + self.q_len

    @property
    def first_q_block(self) -> int:
        return self.ctx // self.block_size

    @property
    def num_q_blocks(self) -> int:
        return (self.seq_len - 1) // self.block_size - self.first_q_block + 1

    @property
    def num_k_blocks(self) -> int:
        return math.ceil(self.seq_len / self.block_size)

    def row_extent(self, row: int) -> int:
        """Number of key blocks row ``row`` may attend to (causal frontier + 1)."""
        return self.first_q_block + row + 1

    def first_tail_row(self, tail_tokens: int) -> int:
        """The first row holding one of the chunk's last ``tail_tokens`` query tokens
        (``num_q_blocks`` when ``tail_tokens`` is 0)."""
        if tail_tokens <= 0:
            return self.num_q_blocks
        first_tail_token = max(self.ctx, self.seq_len - tail_tokens)
        return first_tail_token // self.block_size - self.first_q_block

    def num_tail_rows(self, tail_tokens: int) -> int:
        """Rows from :meth:`first_tail_row` to the chunk's end (0 when ``tail_tokens`` is 0)."""
        return self.num_q_blocks - self.first_tail_row(tail_tokens)

    def row_token_start(self, row: int) -> int:
        """Chunk-relative index of row ``row``'s first query token (``q_len`` for ``num_q_blocks``)."""
        if row >= self.num_q_blocks:
            return self.q_len
        return max(self.ctx, (self.first_q_block + row) * self.block_size) - self.ctx
