"""Kernel-side parameters and per-chunk geometry shared by every ProxyAttn op.

Nothing here imports vLLM: ``proxyattn_vllm.config.ProxyAttnConfig`` resolves the user's
configuration (e.g. ``num_proxy_groups="auto"``) into a :class:`ProxyAttnParams` for one layer.
"""
from __future__ import annotations

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
        max_density: optional cap on a head's budget as a fraction of the key blocks.
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
