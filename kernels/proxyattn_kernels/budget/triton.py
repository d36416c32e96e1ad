"""Per-query-head block budgets from a vLLM-0.26 paged KV cache (Triton).

Semantics: exactly ``budget/naive.py`` (``last_block_mass``, then ``gamma_block_counts`` and
``limit_budget`` fused into one small kernel, ``_gamma_budget_kernel``; no host sync).

The attention mass per key block of the chunk's last ``n = min(q_len, block_size)`` queries is
streamed in one pass over the keys plus a small reduction, instead of the classic two passes
(row max/sum, then recompute and accumulate the normalised mass):

1. ``_block_lse_kernel``: for every (head, query row, key block) the log2-sum-exp of the row's
   causal logits inside the block, ``blse [Hq, Kb, NPAD]``, and for every (head, row, key split)
   the log2-sum-exp over the split, ``lse_part [Hq, S, NPAD]``. One online softmax per tile,
   exactly the work of a flash-attention forward pass without the PV product.
2. ``_block_mass_kernel``: ``mass[h, b] = mean_q exp2(blse[h, b, q] - lse[h, q])`` with the row's
   total ``lse`` combined from the split partials. Deterministic (no atomics).

3. ``_gamma_budget_kernel`` (``budget/gamma.py``): one program per head sorts its ``[Kb]`` mass row in registers,
   counts the blocks whose cumulative share stays below gamma and applies the budget limits:
   one launch where the torch spec takes about ten (sort, sum, divide, cumsum, compare, sum,
   clamps and casts), which matters because the selection runs for every layer of every chunk
   and its small launches add a fixed cost per chunk. Rows longer than ``MAX_TRITON_BLOCKS``
   use the torch spec.

Where a dense kernel has already attended those rows and returned their log-sum-exp (the
backend sends the dense tail, which covers the chunk's last ``block_size`` queries by default,
to FlashAttention before the selection), steps 1-2 become one pass,
``_block_mass_from_lse_kernel``: ``exp2(s - lse)`` summed per key block over the rows, with no
row maximum, no workspace and no reduction launch (``row_lse`` of :func:`last_block_mass_paged`).

An FP8 cache (``k_scale``) is read as its dequantized keys: key tiles converted to the query
dtype, ``k_scale`` folded into the logits' scale (``paged.py``).

This computes each logit once instead of twice (the QK^T of the last ``n`` queries against all
keys at full resolution is the most expensive part of the whole selection), at the price of an
``O(Hq * n * Kb)`` fp32 workspace (``n <= block_size``: 16 MiB for Hq=32, 128K tokens, block
128), which is linear in the sequence length, never quadratic.

Programs are ordered (m-tile and head fastest, then key split, then KV head) so that the query
heads sharing a KV head read the same key tiles at about the same time (L2 reuse).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..common import (
    LOG2E, LOG2E_JIT, even_splits, input_precision, lse_merge, lse_tile_update, safe_max, target_programs, workspace,
)
from ..paged import check_paged_inputs, kv_scaled, load_paged_tile
from ..params import ChunkGeometry
from .gamma import gamma_budgets


@dataclass(frozen=True)
class BudgetTileConfig:
    """Launch parameters of the block-LSE pass.

    ``block_m`` query rows (of one head) x ``block_n`` keys per tile; ``block_n`` must divide the
    selection block size. ``num_splits`` programs share the key range (None: for occupancy).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_splits: int | None = None


def default_budget_tile_config(n_last: int, block_size: int, on_cpu: bool, head_dim: int = 64,
                               from_lse: bool = False, page_size: int | None = None) -> BudgetTileConfig:
    """128x64 tiles with 8 warps on the GPU (as a flash-attention forward on H100/H200), 16/32
    under the CPU interpreter.

    The one-pass mass from a given LSE (``from_lse``) at ``head_dim >= 128``, measured on the H200
    (``budget_tile_sweep`` of the kernel benchmark, two runs on 2026-11-29 equal within 3%; last 8K chunk of 128K, Llama-3.1-8B shape):

    * pages of 128 tokens (``page_size`` a multiple of 128): 128x128 tiles, 8 warps, 2 stages,
      0.36 ms against 0.41 for 128x64 with 4 warps (presumably because a 128-key tile is then
      one page: one page-table lookup and one contiguous run of rows);
    * other pages: 128x64 with 4 warps, 0.40 ms (128x128 with 8 warps: 0.40; 128x64 with 8 warps,
      the two-pass default: 0.61).

    At head_dim 64 (Qwen2.5-0.5B shape) the tiles are within 3% (0.13-0.14 ms): 8 warps stay."""
    cap_m, cap_n = (32, 32) if on_cpu else (128, 64)
    block_m = min(cap_m, max(16, triton.next_power_of_2(n_last)))
    block_n = min(cap_n, block_size & -block_size)  # largest power of two dividing block_size
    if on_cpu:
        return BudgetTileConfig(block_m, block_n, 4, 1)
    if from_lse and head_dim >= 128 and block_m == 128:
        if page_size is not None and page_size % 128 == 0 and block_size % 128 == 0:
            return BudgetTileConfig(128, 128, 8, 2)
        return BudgetTileConfig(128, block_n, 4, 3)
    if block_m < 128:
        return BudgetTileConfig(block_m, block_n, 4, 3)
    return BudgetTileConfig(block_m, block_n, 8, 3)


@triton.jit
def _logits_tile(q, kv_base, block_table_ptr, key_start, q_pos, seq_len, qk_scale,
                 offs_n, offs_d, stride_kv_page, stride_kv_tok,
                 PAGE_SIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Scaled logits (log2 domain) of the query tile against keys ``key_start + offs_n`` from the
    paged cache; with ``MASKED``, -inf past the sequence and above the causal diagonal."""
    k_pos = key_start + offs_n
    in_seq = k_pos < seq_len if MASKED else None
    k = load_paged_tile(kv_base, block_table_ptr, k_pos, in_seq, offs_d, stride_kv_page, stride_kv_tok, PAGE_SIZE)
    k = k.to(q.dtype)  # FP8 -> the query dtype (exact); no-op otherwise
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where((k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :], s, float("-inf"))
    return s


@triton.jit
def _block_lse_tile(m_b, l_b, q, kv_base, block_table_ptr, key_start, q_pos, seq_len, qk_scale,
                    offs_n, offs_d, stride_kv_page, stride_kv_tok,
                    PAGE_SIZE: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    s = _logits_tile(q, kv_base, block_table_ptr, key_start, q_pos, seq_len, qk_scale, offs_n, offs_d,
                     stride_kv_page, stride_kv_tok, PAGE_SIZE, INPUT_PRECISION, MASKED)
    return lse_tile_update(m_b, l_b, s)


@triton.jit
def _block_lse_step(m_b, l_b, m_r, l_r, t, q, kv_base, block_table_ptr, blse_base, q_pos, seq_len, num_tiles,
                    qk_scale, offs_n, offs_d, stride_kv_page, stride_kv_tok, stride_blse_block,
                    PAGE_SIZE: tl.constexpr, TILES_PER_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Key tile ``t``; at the last tile of a key block, store the block's LSE and fold it into
    the row's running LSE (branch-free, so the loop stays flat and software-pipelined)."""
    m_b, l_b = _block_lse_tile(m_b, l_b, q, kv_base, block_table_ptr, t * BLOCK_N, q_pos, seq_len, qk_scale,
                               offs_n, offs_d, stride_kv_page, stride_kv_tok, PAGE_SIZE, INPUT_PRECISION, MASKED)
    block_end = ((t + 1) % TILES_PER_BLOCK == 0) | (t == num_tiles - 1)
    tl.store(blse_base + (t // TILES_PER_BLOCK) * stride_blse_block,
             tl.where(l_b > 0.0, m_b + tl.log2(l_b), float("-inf")), mask=block_end)
    m_new = tl.maximum(m_r, m_b)
    m_use = safe_max(m_new)
    l_new = l_r * tl.exp2(m_r - m_use) + l_b * tl.exp2(m_b - m_use)
    m_r = tl.where(block_end, m_new, m_r)
    l_r = tl.where(block_end, l_new, l_r)
    m_b = tl.where(block_end, float("-inf"), m_b)
    l_b = tl.where(block_end, 0.0, l_b)
    return m_b, l_b, m_r, l_r


@triton.jit(do_not_specialize=["block_table_ptr", "q_tok0", "q_pos0", "n_last", "seq_len", "blocks_per_split"])
def _block_lse_kernel(
    q_ptr, kv_ptr, block_table_ptr, blse_ptr, lse_part_ptr, k_scale_ptr,
    q_tok0, q_pos0, n_last, seq_len, blocks_per_split, qk_scale,
    stride_q_tok, stride_q_head,
    stride_kv_page, stride_kv_head, stride_kv_tok,
    stride_blse_head, stride_blse_block, stride_lp_head, stride_lp_split,
    HEADS_PER_KV: tl.constexpr, NUM_M_TILES: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_N
    pid = tl.program_id(0)
    split = tl.program_id(1)
    kv_head = tl.program_id(2)
    mt = pid % NUM_M_TILES
    head = kv_head * HEADS_PER_KV + pid // NUM_M_TILES
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = mt * BLOCK_M + offs_m
    row_valid = rows < n_last
    q_pos = q_pos0 + rows
    q = tl.load(
        q_ptr + (q_tok0 + rows).to(tl.int64)[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
        mask=row_valid[:, None], other=0.0,
    )
    kv_base = kv_ptr + kv_head.to(tl.int64) * stride_kv_head
    qk_scale = kv_scaled(qk_scale, k_scale_ptr)  # FP8: q . (k * k_scale) = (q . k) * k_scale
    blse_base = blse_ptr + head.to(tl.int64) * stride_blse_head + rows

    # This split's key tiles (whole key blocks); tiles up to the tile's first query need no mask.
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    t_lo = split * blocks_per_split * TILES_PER_BLOCK
    t_hi = tl.minimum(t_lo + blocks_per_split * TILES_PER_BLOCK, num_tiles)
    q_min = q_pos0 + mt * BLOCK_M
    t_full = tl.maximum(tl.minimum((q_min + 1) // BLOCK_N, t_hi), t_lo)

    m_b = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_b = tl.zeros([BLOCK_M], tl.float32)
    m_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_r = tl.zeros([BLOCK_M], tl.float32)
    for t in range(t_lo, t_full):
        m_b, l_b, m_r, l_r = _block_lse_step(
            m_b, l_b, m_r, l_r, t, q, kv_base, block_table_ptr, blse_base, q_pos, seq_len, num_tiles, qk_scale,
            offs_n, offs_d, stride_kv_page, stride_kv_tok, stride_blse_block,
            PAGE_SIZE, TILES_PER_BLOCK, BLOCK_N, INPUT_PRECISION, False)
    for t in range(t_full, t_hi):
        m_b, l_b, m_r, l_r = _block_lse_step(
            m_b, l_b, m_r, l_r, t, q, kv_base, block_table_ptr, blse_base, q_pos, seq_len, num_tiles, qk_scale,
            offs_n, offs_d, stride_kv_page, stride_kv_tok, stride_blse_block,
            PAGE_SIZE, TILES_PER_BLOCK, BLOCK_N, INPUT_PRECISION, True)
    tl.store(lse_part_ptr + head * stride_lp_head + split * stride_lp_split + rows,
             tl.where(l_r > 0.0, m_r + tl.log2(l_r), float("-inf")))


# Values and row strides that follow the chunk are not specialized: no compile per new chunk
# shape while serving (proxyattn_kernels/warmup.py compiles the rest at startup).
@triton.jit(do_not_specialize=["n_last", "num_k_blocks", "num_splits", "stride_mass_head"])
def _block_mass_kernel(
    blse_ptr, lse_part_ptr, mass_ptr,
    n_last, num_k_blocks, num_splits, inv_n,
    stride_blse_head, stride_blse_block, stride_lp_head, stride_lp_split, stride_mass_head,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    head = tl.program_id(0)
    kb = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    kb_valid = kb < num_k_blocks
    acc = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(0, n_last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rv = rows < n_last
        m = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_R], tl.float32)
        for s in range(num_splits):
            part = tl.load(lse_part_ptr + head * stride_lp_head + s * stride_lp_split + rows, mask=rv,
                           other=float("-inf"))
            m, l = lse_merge(m, l, part)
        lse = tl.where(rv, m + tl.log2(l), 0.0)  # every real row sees key 0: l > 0
        x = tl.load(
            blse_ptr + head.to(tl.int64) * stride_blse_head + kb[:, None] * stride_blse_block + rows[None, :],
            mask=kb_valid[:, None] & rv[None, :], other=float("-inf"),
        )
        acc += tl.sum(tl.exp2(x - lse[None, :]), 1)
    tl.store(mass_ptr + head * stride_mass_head + kb, acc * inv_n, mask=kb_valid)


@triton.jit
def _rows_block_mass(q, lse2, kv_base, block_table_ptr, block_start, q_pos, seq_len, qk_scale,
                     offs_n, offs_d, stride_kv_page, stride_kv_tok,
                     PAGE_SIZE: tl.constexpr, TILES_PER_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """``sum(exp2(s - lse2))`` over one query tile's rows and one key block's keys."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for j in tl.static_range(TILES_PER_BLOCK):
        s = _logits_tile(q, kv_base, block_table_ptr, block_start + j * BLOCK_N, q_pos, seq_len, qk_scale,
                         offs_n, offs_d, stride_kv_page, stride_kv_tok, PAGE_SIZE, INPUT_PRECISION, MASKED)
        acc += tl.exp2(s - lse2[:, None])  # padding rows: lse2 = +inf -> 0
    return tl.sum(tl.sum(acc, 1), 0)


# The LSE is a slice of the dense tail's [Hq, tail tokens]: its address and row stride follow the
# chunk (not specialized, so serving compiles nothing new; proxyattn_kernels/warmup.py).
@triton.jit(do_not_specialize=["block_table_ptr", "lse_ptr", "q_tok0", "q_pos0", "n_last", "seq_len",
                               "num_k_blocks", "blocks_per_split", "stride_lse_head", "stride_mass_head"])
def _block_mass_from_lse_kernel(
    q_ptr, kv_ptr, block_table_ptr, lse_ptr, mass_ptr, k_scale_ptr,
    q_tok0, q_pos0, n_last, seq_len, num_k_blocks, blocks_per_split, qk_scale, inv_n,
    stride_q_tok, stride_q_head, stride_kv_page, stride_kv_head, stride_kv_tok,
    stride_lse_head, stride_mass_head,
    HEADS_PER_KV: tl.constexpr, NUM_M_TILES: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program per (query head, key split): for each of the split's key blocks, the mass
    ``sum_rows sum_keys exp2(s - lse2) / n`` written once (each program owns whole blocks and
    every row: no atomics, no workspace)."""
    TILES_PER_BLOCK: tl.constexpr = BLOCK_SIZE // BLOCK_N
    head = tl.program_id(2) * HEADS_PER_KV + tl.program_id(0)
    split = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_base = kv_ptr + tl.program_id(2).to(tl.int64) * stride_kv_head
    qk_scale = kv_scaled(qk_scale, k_scale_ptr)  # FP8: as in _block_lse_kernel
    q_head_ptr = q_ptr + head * stride_q_head + offs_d[None, :]
    lse_head_ptr = lse_ptr + head * stride_lse_head

    b_lo = split * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, num_k_blocks)
    b_full = tl.maximum(tl.minimum((q_pos0 + 1) // BLOCK_SIZE, b_hi), b_lo)  # before every row: no mask
    if NUM_M_TILES == 1:  # the usual case (n <= 128): the query tile stays in registers
        rv = offs_m < n_last
        q = tl.load(q_head_ptr + (q_tok0 + offs_m).to(tl.int64)[:, None] * stride_q_tok, mask=rv[:, None], other=0.0)
        lse2 = tl.load(lse_head_ptr + offs_m, mask=rv, other=float("inf")) * LOG2E_JIT
        q_pos = q_pos0 + offs_m
        for b in range(b_lo, b_full):
            total = _rows_block_mass(q, lse2, kv_base, block_table_ptr, b * BLOCK_SIZE, q_pos, seq_len, qk_scale,
                                     offs_n, offs_d, stride_kv_page, stride_kv_tok,
                                     PAGE_SIZE, TILES_PER_BLOCK, BLOCK_M, BLOCK_N, INPUT_PRECISION, False)
            tl.store(mass_ptr + head * stride_mass_head + b, total * inv_n)
        for b in range(b_full, b_hi):
            total = _rows_block_mass(q, lse2, kv_base, block_table_ptr, b * BLOCK_SIZE, q_pos, seq_len, qk_scale,
                                     offs_n, offs_d, stride_kv_page, stride_kv_tok,
                                     PAGE_SIZE, TILES_PER_BLOCK, BLOCK_M, BLOCK_N, INPUT_PRECISION, True)
            tl.store(mass_ptr + head * stride_mass_head + b, total * inv_n)
    else:  # more rows than one tile: reload each tile per block (small tiles, interpreter, big blocks)
        for b in range(b_lo, b_hi):
            total = tl.zeros([], tl.float32)
            for mt in tl.static_range(NUM_M_TILES):
                rows = mt * BLOCK_M + offs_m
                rv = rows < n_last
                q = tl.load(q_head_ptr + (q_tok0 + rows).to(tl.int64)[:, None] * stride_q_tok, mask=rv[:, None],
                            other=0.0)
                lse2 = tl.load(lse_head_ptr + rows, mask=rv, other=float("inf")) * LOG2E_JIT
                total += _rows_block_mass(q, lse2, kv_base, block_table_ptr, b * BLOCK_SIZE, q_pos0 + rows, seq_len,
                                          qk_scale, offs_n, offs_d, stride_kv_page, stride_kv_tok,
                                          PAGE_SIZE, TILES_PER_BLOCK, BLOCK_M, BLOCK_N, INPUT_PRECISION, True)
            tl.store(mass_ptr + head * stride_mass_head + b, total * inv_n)


def last_block_mass_paged(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    *,
    ctx: int,
    scale: float,
    block_size: int,
    out: torch.Tensor | None = None,
    tile: BudgetTileConfig | None = None,
    row_lse: torch.Tensor | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention mass per key block of the chunk's last ``min(q_len, block_size)`` queries.

    Args:
        q: ``[q_len, Hq, D]`` queries at absolute positions ``[ctx, ctx + q_len)`` (any strides
            with a contiguous last dim; fp16, bf16 or fp32).
        kv_cache: ``[num_pages, Hkv, page_size, 2 * D]`` vLLM-0.26 cache view, same dtype as ``q``
            or FP8 with ``k_scale`` (a 1-element float32 device tensor; else None).
        block_table: ``[max_pages]`` int32 physical page per logical page.
        ctx: tokens before the chunk. scale: softmax scale.
        block_size: selection block size (a multiple of 16).
        out: optional ``[Hq, Kb]`` float32 output (every element is written).
        tile: launch parameters; default :func:`default_budget_tile_config`.
        row_lse: optional ``[Hq, n]`` float32 natural-log LSE of those ``n`` query rows' scaled
            causal logits (contiguous last dim), e.g. from the dense kernel that attended them:
            then one pass (``_block_mass_from_lse_kernel``, no workspace) instead of the
            block-LSE pass and its reduction; ``budget.naive.block_mass_given_lse``.

    Returns:
        ``[Hq, num_k_blocks]`` float32, each row sums to 1 (with ``row_lse``: to within the
        given LSE's error), as ``budget.naive.last_block_mass``.
    """
    q_len = q.shape[0] if q.dim() == 3 else 0
    if q_len < 1 or ctx < 0:
        raise ValueError(f"need q_len >= 1 and ctx >= 0; got q {tuple(q.shape)}, ctx={ctx}")
    if block_size % 16 or block_size < 16:
        raise ValueError(f"block_size={block_size} must be a positive multiple of 16")
    geo = ChunkGeometry(ctx, q_len, block_size)
    check_paged_inputs(q, kv_cache, block_table, geo.seq_len, k_scale)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[1]
    device = q.device
    n_last = min(q_len, block_size)
    num_k_blocks = geo.num_k_blocks
    if out is None:
        out = torch.empty((num_q_heads, num_k_blocks), dtype=torch.float32, device=device)
    elif out.shape != (num_q_heads, num_k_blocks) or out.dtype != torch.float32 or out.stride(-1) != 1:
        raise ValueError(f"out must be float32 {(num_q_heads, num_k_blocks)} with a contiguous last dim; "
                         f"got {out.dtype}{tuple(out.shape)}")
    tile = tile or default_budget_tile_config(n_last, block_size, device.type == "cpu", head_dim,
                                              from_lse=row_lse is not None, page_size=kv_cache.shape[2])
    bm, bn = tile.block_m, tile.block_n
    if bm < 16 or bm & (bm - 1) or bn < 16 or bn & (bn - 1) or block_size % bn:
        raise ValueError(f"tile {tile}: sizes must be powers of two >= 16 and block_n must divide {block_size}")

    num_m_tiles = -(-n_last // bm)
    if row_lse is not None:
        if row_lse.shape != (num_q_heads, n_last) or row_lse.dtype != torch.float32 or row_lse.stride(-1) != 1:
            raise ValueError(f"row_lse must be float32 {(num_q_heads, n_last)} with a contiguous last dim; "
                             f"got {row_lse.dtype}{tuple(row_lse.shape)}")
    grid_m = 1 if row_lse is not None else num_m_tiles  # with the LSE one program covers every row
    if tile.num_splits is not None:
        splits = tile.num_splits
    else:
        splits = target_programs(device) // (num_q_heads * grid_m)
    splits, blocks_per_split = even_splits(num_k_blocks, splits)
    if row_lse is not None:
        _block_mass_from_lse_kernel[(num_q_heads // num_kv_heads, splits, num_kv_heads)](
            q, kv_cache, block_table, row_lse, out, k_scale,
            q_len - n_last, geo.seq_len - n_last, n_last, geo.seq_len, num_k_blocks, blocks_per_split,
            scale * LOG2E, 1.0 / n_last,
            q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
            row_lse.stride(0), out.stride(0),
            HEADS_PER_KV=num_q_heads // num_kv_heads, NUM_M_TILES=num_m_tiles,
            HEAD_DIM=head_dim, PAGE_SIZE=kv_cache.shape[2], BLOCK_SIZE=block_size,
            BLOCK_M=bm, BLOCK_N=bn, INPUT_PRECISION=input_precision(q.dtype),
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )
        return out

    n_pad = num_m_tiles * bm
    blse = workspace((num_q_heads, num_k_blocks, n_pad), device)
    lse_part = workspace((num_q_heads, splits, n_pad), device)
    _block_lse_kernel[(num_m_tiles * (num_q_heads // num_kv_heads), splits, num_kv_heads)](
        q, kv_cache, block_table, blse, lse_part, k_scale,
        q_len - n_last, geo.seq_len - n_last, n_last, geo.seq_len, blocks_per_split, scale * LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        blse.stride(0), blse.stride(1), lse_part.stride(0), lse_part.stride(1),
        HEADS_PER_KV=num_q_heads // num_kv_heads, NUM_M_TILES=num_m_tiles,
        HEAD_DIM=head_dim, PAGE_SIZE=kv_cache.shape[2], BLOCK_SIZE=block_size,
        BLOCK_M=bm, BLOCK_N=bn, INPUT_PRECISION=input_precision(q.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    block_k, block_r = (32, 16) if device.type == "cpu" else (64, 32)
    _block_mass_kernel[(num_q_heads, triton.cdiv(num_k_blocks, block_k))](
        blse, lse_part, out, n_last, num_k_blocks, splits, 1.0 / n_last,
        blse.stride(0), blse.stride(1), lse_part.stride(0), lse_part.stride(1), out.stride(0),
        BLOCK_K=block_k, BLOCK_R=block_r, num_warps=4,
    )
    return out


def head_budgets_paged(
    q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor, *, gamma: float, min_budget_blocks: int,
    max_blocks: int | None, **mass_args,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head block budgets of one chunk, keys from the paged cache: the block mass
    (:func:`last_block_mass_paged`, which takes ``mass_args``: ``ctx``, ``scale``,
    ``block_size``, optional ``tile``, ``row_lse``, ``k_scale``), then the budget limits (see
    ``budget/naive.py``). Returns ``(budget [Hq], gamma_counts [Hq])`` int32, on the device,
    without any host synchronisation.
    """
    mass = last_block_mass_paged(q, kv_cache, block_table, **mass_args)
    return gamma_budgets(mass, gamma, min_budget_blocks, max_blocks)


__all__ = ["BudgetTileConfig", "default_budget_tile_config", "gamma_budgets", "last_block_mass_paged",
           "head_budgets_paged"]
