"""Proxy block scores from a vLLM-0.26 paged KV cache (Triton).

Semantics: exactly ``proxy_scores/naive.py`` (``proxy_block_scores``), with keys read from the
paged cache instead of a contiguous tensor. Five launches (the ``-inf`` fill of the output and
the four kernels below), all on the device, no host sync:

1. ``_proxy_heads_kernel`` (twice): the strided proxy queries ``[G, NQ_PAD, D]`` (mean of each
   group's query heads at positions ``p % stride == 0`` of the chunk) and the strided proxy keys
   ``[G, NK_PAD, D]`` (mean of each group's KV heads, gathered through the block table). Means
   are taken in fp32 and stored in the input dtype so that the main passes run on tensor cores.
   Padding rows are zero. This is O(tokens / stride) memory, read many times by the passes:
   averaging the KV heads inside the passes instead would re-read ``Hkv / G`` cache rows per
   strided key for every query tile. Rounding the means to bf16/fp16 is the only numerical
   difference from the naive spec (which keeps them in fp32) beyond summation order.
2. ``_proxy_lse_kernel`` (pass 1): per strided query, the log2-sum-exp of its causal strided
   logits, streamed over key tiles with an online softmax. The key range is split over
   ``num_splits`` programs for occupancy; each writes a partial ``[G, S, NQ_PAD]``.
3. ``_proxy_pool_kernel`` (pass 2): recomputes the logits tile by tile, normalises them with the
   combined row statistics and max-pools them into the ``[G, R, Kb]`` block grid with float
   ``atomic_max`` (exact and order-independent, so deterministic). Because ``exp2`` is
   monotone, the pooling runs on ``logit - lse`` and only the pooled values are exponentiated.

Extra memory: the proxies (O(tokens / stride)), the row statistics (O(strided queries x
splits)) and the output grid (O(blocks^2)); never O(tokens^2).

An FP8 cache (``k_scale``) is read as its dequantized keys: each group's key mean is taken in
fp32 from the FP8 values and multiplied by ``k_scale`` before it is stored (``paged.py``).

Tiles are aligned to absolute strided positions, so a tile covers whole selection blocks, or
lies inside one, whenever the strided block size ``block_size // stride`` divides the tile size
or is a multiple of it (pooling by reshape and reduce); other ratios (e.g. block 48, stride 4)
use a slower masked pooling path (``POOL_GENERIC``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..common import LOG2E, even_splits, input_precision, lse_merge, lse_tile_update, target_programs, workspace
from ..paged import check_paged_inputs, kv_scaled, paged_row_offsets
from ..params import ChunkGeometry


@dataclass(frozen=True)
class ProxyTileConfig:
    """Launch parameters of the two main passes.

    ``block_m`` strided queries x ``block_n`` strided keys per tile (powers of two >= 16);
    ``num_splits`` programs share a query tile's key range (None: chosen for occupancy).
    """

    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None


def default_proxy_tile_config(block_size: int, stride: int, on_cpu: bool) -> ProxyTileConfig:
    """64x64 tiles on the GPU (H100/H200 class), 16/32 under the CPU interpreter; shrunk if the
    strided block size needs it for the fast pooling path."""
    strided_block = block_size // stride
    tile = 32 if on_cpu else 64
    # Prefer a tile that nests with the strided block (fast pooling).
    while tile > 16 and not _nests(strided_block, tile):
        tile //= 2
    if on_cpu:
        return ProxyTileConfig(tile, tile, 4, 1)
    return ProxyTileConfig(tile, tile, 4, 3)


def _nests(strided_block: int, tile: int) -> bool:
    """A tile is inside one block, or holds whole blocks, at every aligned position."""
    return strided_block % tile == 0 or tile % strided_block == 0


# --------------------------------------------------------------------------------------------
# Proxy heads (mean over a group's heads) at strided positions.
# --------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["block_table_ptr", "base", "lo", "hi", "ctx"])
def _proxy_heads_kernel(
    src_ptr, block_table_ptr, out_ptr, scale_ptr,
    base, lo, hi, ctx,
    stride_src_page, stride_src_head, stride_src_tok,
    stride_out_group, stride_out_row,
    STRIDE: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """``out[g, r] = mean_h src[pos(base + r), g * HEADS + h]`` for strided index
    ``a = base + r`` in ``[lo, hi]`` (position ``a * STRIDE``), zero outside.

    ``PAGED``: ``src`` is the paged cache ``[pages, Hkv, page, 2D]`` (K half) and ``pos`` goes
    through the block table; otherwise ``src`` is ``q [q_len, Hq, D]`` and the token is
    ``pos - ctx`` (``stride_src_page`` unused). ``scale_ptr``: an FP8 cache's scale (the mean
    is of the dequantized keys), or None.
    """
    pid = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    a = base + rows
    valid = (a >= lo) & (a <= hi)
    pos = a * STRIDE
    if PAGED:
        row_off = paged_row_offsets(block_table_ptr, pos, valid, stride_src_page, stride_src_tok, PAGE_SIZE)
    else:
        row_off = (pos - ctx).to(tl.int64) * stride_src_tok
    ptrs = src_ptr + (g * HEADS).to(tl.int64) * stride_src_head + row_off[:, None] + offs_d[None, :]
    acc = tl.zeros([BLOCK_T, HEAD_DIM], tl.float32)
    # Unrolled: the heads' loads are independent, so they can all be in flight at once. Rolled,
    # with 32-row programs, the strided queries of an 8K chunk (32 heads) were 64 programs each
    # loading one head after another; the two launches were half the proxy scores' GPU time in
    # a 128K prompt's profile on the H200.
    for h in tl.static_range(HEADS):
        acc += tl.load(ptrs + h * stride_src_head, mask=valid[:, None], other=0.0).to(tl.float32)
    acc = kv_scaled(acc / HEADS, scale_ptr)
    out_ptrs = out_ptr + g.to(tl.int64) * stride_out_group + rows.to(tl.int64)[:, None] * stride_out_row + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# Pass 1: row log-sum-exp (log2 domain), split over the key range.
# --------------------------------------------------------------------------------------------


@triton.jit
def _pass_program(a0, a_last, a_base, tiles_per_split, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Where a program of either pass works: its query tile ``mt``, key split and group ``g``
    (the grid's three axes), the tile's first strided query ``tile_a``, its strided query
    indices ``a [BLOCK_M]`` (position ``a * stride``), its key tiles ``[t_lo, t_hi)`` (empty
    past the tile's last real query) and ``t_full``: tiles before it are seen entirely by every
    real query of the tile (no causal mask)."""
    mt = tl.program_id(0)
    split = tl.program_id(1)
    g = tl.program_id(2)
    tile_a = a_base + mt * BLOCK_M
    a = tile_a + tl.arange(0, BLOCK_M)
    a_lo = tl.maximum(tile_a, a0)
    a_hi = tl.minimum(tile_a + BLOCK_M - 1, a_last)
    t_lo = split * tiles_per_split
    t_hi = tl.minimum(t_lo + tiles_per_split, a_hi // BLOCK_N + 1)
    t_full = tl.minimum(t_hi, (a_lo + 1) // BLOCK_N)
    return mt, split, g, tile_a, a, t_lo, t_hi, t_full


@triton.jit
def _lse_tile(m_i, l_i, q, k_tile_ptrs, a, j, qk_scale, INPUT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    k = tl.load(k_tile_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    if MASKED:
        s = tl.where(j[None, :] <= a[:, None], s, float("-inf"))
    return lse_tile_update(m_i, l_i, s)


@triton.jit(do_not_specialize=["a0", "a_last", "a_base", "tiles_per_split"])
def _proxy_lse_kernel(
    pq_ptr, pk_ptr, lse_ptr,
    a0, a_last, a_base, tiles_per_split, qk_scale,
    stride_pq_group, stride_pq_row, stride_pk_group, stride_pk_row,
    stride_lse_group, stride_lse_split,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    mt, split, g, tile_a, a, t_lo, t_hi, t_full = _pass_program(a0, a_last, a_base, tiles_per_split, BLOCK_M, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    q_rows = (mt * BLOCK_M + offs_m).to(tl.int64)
    q = tl.load(pq_ptr + g.to(tl.int64) * stride_pq_group + q_rows[:, None] * stride_pq_row + offs_d[None, :])
    k_base = pk_ptr + g.to(tl.int64) * stride_pk_group + offs_n[:, None] * stride_pk_row + offs_d[None, :]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for t in range(t_lo, t_full):
        m_i, l_i = _lse_tile(m_i, l_i, q, k_base + (t * BLOCK_N) * stride_pk_row, a, t * BLOCK_N + offs_n,
                             qk_scale, INPUT_PRECISION, False)
    for t in range(tl.maximum(t_lo, t_full), t_hi):
        m_i, l_i = _lse_tile(m_i, l_i, q, k_base + (t * BLOCK_N) * stride_pk_row, a, t * BLOCK_N + offs_n,
                             qk_scale, INPUT_PRECISION, True)
    lse = tl.where(l_i > 0.0, m_i + tl.log2(l_i), float("-inf"))
    tl.store(lse_ptr + g * stride_lse_group + split * stride_lse_split + mt * BLOCK_M + offs_m, lse)


# --------------------------------------------------------------------------------------------
# Pass 2: normalised probabilities max-pooled into the block grid.
# --------------------------------------------------------------------------------------------


@triton.jit
def _pool_tile(
    scores_ptr, z, tile_a, tile_j, first_q_block, num_rows, num_k_blocks, stride_sc_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STRIDED_BLOCK: tl.constexpr,
    GROUP_M: tl.constexpr, GROUP_N: tl.constexpr, POOL_GENERIC: tl.constexpr,
    NUM_ROW_BLOCKS: tl.constexpr, NUM_COL_BLOCKS: tl.constexpr,
):
    """``atomic_max`` of ``exp2(max z)`` over each (query block, key block) cell of the tile."""
    if POOL_GENERIC:
        # Any strided block size: masked reductions per block touched by the tile.
        rb = (tile_a + tl.arange(0, BLOCK_M)) // STRIDED_BLOCK
        cb = (tile_j + tl.arange(0, BLOCK_N)) // STRIDED_BLOCK
        rb0 = tile_a // STRIDED_BLOCK
        cb0 = tile_j // STRIDED_BLOCK
        for c in tl.static_range(NUM_COL_BLOCKS):
            col_max = tl.max(tl.where(cb[None, :] == cb0 + c, z, float("-inf")), 1)  # [BLOCK_M]
            for r in tl.static_range(NUM_ROW_BLOCKS):
                v = tl.max(tl.where(rb == rb0 + r, col_max, float("-inf")), 0)
                row = rb0 + r - first_q_block
                ok = (v > float("-inf")) & (row >= 0) & (row < num_rows) & (cb0 + c < num_k_blocks)
                tl.atomic_max(scores_ptr + row * stride_sc_row + cb0 + c, tl.exp2(v), mask=ok, sem="relaxed")
    else:
        zr = tl.reshape(z, (BLOCK_M // GROUP_M, GROUP_M, BLOCK_N // GROUP_N, GROUP_N))
        pooled = tl.max(tl.max(zr, 3), 1)  # [BLOCK_M // GROUP_M, BLOCK_N // GROUP_N]
        row = (tile_a + tl.arange(0, BLOCK_M // GROUP_M) * GROUP_M) // STRIDED_BLOCK - first_q_block
        col = (tile_j + tl.arange(0, BLOCK_N // GROUP_N) * GROUP_N) // STRIDED_BLOCK
        ok = (pooled > float("-inf")) & ((row >= 0) & (row < num_rows))[:, None] & (col < num_k_blocks)[None, :]
        tl.atomic_max(scores_ptr + row[:, None] * stride_sc_row + col[None, :], tl.exp2(pooled), mask=ok,
                      sem="relaxed")


# Values and row strides that follow the chunk are not specialized: no compile per new chunk
# shape while serving (proxyattn_kernels/warmup.py compiles the rest at startup).
@triton.jit(do_not_specialize=["a0", "a_last", "a_base", "tiles_per_split", "num_splits",
                            "first_q_block", "num_rows", "num_k_blocks", "stride_sc_group", "stride_sc_row"])
def _proxy_pool_kernel(
    pq_ptr, pk_ptr, lse_ptr, scores_ptr,
    a0, a_last, a_base, tiles_per_split, num_splits, qk_scale,
    first_q_block, num_rows, num_k_blocks,
    stride_pq_group, stride_pq_row, stride_pk_group, stride_pk_row,
    stride_lse_group, stride_lse_split, stride_sc_group, stride_sc_row,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    STRIDED_BLOCK: tl.constexpr, GROUP_M: tl.constexpr, GROUP_N: tl.constexpr,
    POOL_GENERIC: tl.constexpr, NUM_ROW_BLOCKS: tl.constexpr, NUM_COL_BLOCKS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    mt, split, g, tile_a, a, t_lo, t_hi, t_full = _pass_program(a0, a_last, a_base, tiles_per_split, BLOCK_M, BLOCK_N)
    if t_lo >= t_hi:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)

    # Combine the row statistics of every split (log2 domain).
    lse_rows = lse_ptr + g * stride_lse_group + mt * BLOCK_M + offs_m
    m_r = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_r = tl.zeros([BLOCK_M], tl.float32)
    for sp in range(num_splits):
        m_r, l_r = lse_merge(m_r, l_r, tl.load(lse_rows + sp * stride_lse_split))
    q_valid = (a >= a0) & (a <= a_last)
    # Padding rows get +inf here and are masked out of every pooled cell below.
    lse = tl.where(q_valid, m_r + tl.log2(l_r), float("inf"))

    q_rows = (mt * BLOCK_M + offs_m).to(tl.int64)
    q = tl.load(pq_ptr + g.to(tl.int64) * stride_pq_group + q_rows[:, None] * stride_pq_row + offs_d[None, :])
    k_base = pk_ptr + g.to(tl.int64) * stride_pk_group + offs_n[:, None] * stride_pk_row + offs_d[None, :]
    sc_base = scores_ptr + g * stride_sc_group
    for t in range(t_lo, t_hi):
        k = tl.load(k_base + (t * BLOCK_N) * stride_pk_row)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
        z = s - lse[:, None]
        j = t * BLOCK_N + offs_n
        if t >= t_full:
            z = tl.where(j[None, :] <= a[:, None], z, float("-inf"))
        z = tl.where(q_valid[:, None], z, float("-inf"))
        _pool_tile(sc_base, z, tile_a, t * BLOCK_N, first_q_block, num_rows, num_k_blocks, stride_sc_row,
                   BLOCK_M, BLOCK_N, STRIDED_BLOCK, GROUP_M, GROUP_N, POOL_GENERIC,
                   NUM_ROW_BLOCKS, NUM_COL_BLOCKS)


# --------------------------------------------------------------------------------------------
# Public wrapper.
# --------------------------------------------------------------------------------------------


def proxy_block_scores_paged(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    *,
    ctx: int,
    scale: float,
    num_groups: int,
    stride: int,
    block_size: int,
    tile: ProxyTileConfig | None = None,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max-pooled strided proxy attention of one chunk, keys from the paged cache.

    Args:
        q: ``[q_len, Hq, D]`` post-RoPE queries at absolute positions ``[ctx, ctx + q_len)``
            (any strides with a contiguous last dim; fp16, bf16 or fp32).
        kv_cache: ``[num_pages, Hkv, page_size, 2 * D]`` vLLM-0.26 cache view (K in ``[..., :D]``),
            any strides with a contiguous last dim, same dtype as ``q`` or FP8 with ``k_scale``;
            holds keys ``[0, ctx + q_len)``.
        block_table: ``[max_pages]`` int32, the request's physical page per logical page.
        ctx: tokens before the chunk. scale: softmax scale.
        num_groups: proxy heads ``G``; divides ``Hkv``.
        stride: sampling stride; divides ``block_size``.
        block_size: selection block size (a multiple of 16).
        tile: launch parameters; default :func:`default_proxy_tile_config`.
        k_scale: an FP8 cache's 1-element float32 key scale (device tensor), else None.

    Returns:
        ``[G, num_q_blocks, num_k_blocks]`` float32, as ``proxy_scores.naive.proxy_block_scores``.
    """
    q_len = q.shape[0] if q.dim() == 3 else 0
    if q_len < 1 or ctx < 0:
        raise ValueError(f"need q_len >= 1 and ctx >= 0; got q {tuple(q.shape)}, ctx={ctx}")
    geo = ChunkGeometry(ctx, q_len, block_size)
    check_paged_inputs(q, kv_cache, block_table, geo.seq_len, k_scale)
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[1]
    if num_groups < 1 or num_kv_heads % num_groups:
        raise ValueError(f"num_groups={num_groups} must divide Hkv={num_kv_heads}")
    if block_size % 16 or stride < 1 or block_size % stride:
        raise ValueError(f"block_size={block_size} must be a multiple of 16 and of stride={stride}")
    device = q.device
    tile = tile or default_proxy_tile_config(block_size, stride, device.type == "cpu")
    bm, bn = tile.block_m, tile.block_n
    for v in (bm, bn):
        if v < 16 or v & (v - 1):
            raise ValueError(f"tile sizes must be powers of two >= 16; got {tile}")

    scores = torch.full((num_groups, geo.num_q_blocks, geo.num_k_blocks), float("-inf"),
                        dtype=torch.float32, device=device)
    a0 = -(-ctx // stride)  # first strided query (absolute strided index)
    a_last = (geo.seq_len - 1) // stride  # last strided query == last strided key
    if a0 > a_last:
        return scores  # no strided query in the chunk: no estimate anywhere

    a_base = (a0 // bm) * bm
    num_q_tiles = -(-(a_last + 1 - a_base) // bm)
    num_k_tiles = a_last // bn + 1
    nq_pad, nk_pad = num_q_tiles * bm, num_k_tiles * bn
    if tile.num_splits is not None:
        splits = tile.num_splits
    else:
        splits = target_programs(device) // (num_q_tiles * num_groups)
    splits, tiles_per_split = even_splits(num_k_tiles, splits)

    # 1. Proxy queries and keys (mean over the group's heads), zero padded.
    pq = workspace((num_groups, nq_pad, head_dim), device, q.dtype)
    pk = workspace((num_groups, nk_pad, head_dim), device, q.dtype)
    # The strided queries are few (2048 for an 8K chunk at stride 4): 8 rows per program always
    # (one compiled variant, whatever the chunk's length).
    _proxy_heads_kernel[(nq_pad // 8, num_groups)](
        q, block_table, pq, None, a_base, a0, a_last, ctx,
        0, q.stride(1), q.stride(0), pq.stride(0), pq.stride(1),
        STRIDE=stride, PAGE_SIZE=kv_cache.shape[2], PAGED=False,
        HEADS=num_q_heads // num_groups, HEAD_DIM=head_dim, BLOCK_T=8, num_warps=4,
    )
    k_rows_t = _heads_tile(nk_pad, num_groups, min(bm, bn), device)
    _proxy_heads_kernel[(nk_pad // k_rows_t, num_groups)](
        kv_cache, block_table, pk, k_scale, 0, 0, a_last, 0,
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), pk.stride(0), pk.stride(1),
        STRIDE=stride, PAGE_SIZE=kv_cache.shape[2], PAGED=True,
        HEADS=num_kv_heads // num_groups, HEAD_DIM=head_dim, BLOCK_T=k_rows_t, num_warps=4,
    )

    # 2. Row statistics.
    lse = workspace((num_groups, splits, nq_pad), device)
    qk_scale = scale * LOG2E
    grid = (num_q_tiles, splits, num_groups)
    precision = input_precision(q.dtype)
    _proxy_lse_kernel[grid](
        pq, pk, lse, a0, a_last, a_base, tiles_per_split, qk_scale,
        pq.stride(0), pq.stride(1), pk.stride(0), pk.stride(1), lse.stride(0), lse.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, INPUT_PRECISION=precision,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )

    # 3. Pooled probabilities.
    strided_block = block_size // stride
    generic = not (_nests(strided_block, bm) and _nests(strided_block, bn))
    _proxy_pool_kernel[grid](
        pq, pk, lse, scores, a0, a_last, a_base, tiles_per_split, splits, qk_scale,
        geo.first_q_block, geo.num_q_blocks, geo.num_k_blocks,
        pq.stride(0), pq.stride(1), pk.stride(0), pk.stride(1), lse.stride(0), lse.stride(1),
        scores.stride(0), scores.stride(1),
        HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, STRIDED_BLOCK=strided_block,
        GROUP_M=min(strided_block, bm), GROUP_N=min(strided_block, bn), POOL_GENERIC=generic,
        NUM_ROW_BLOCKS=-(-(bm - 1) // strided_block) + 1, NUM_COL_BLOCKS=-(-(bn - 1) // strided_block) + 1,
        INPUT_PRECISION=precision, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return scores


def _heads_tile(num_rows: int, num_groups: int, tile: int, device: torch.device) -> int:
    """Strided key rows per program of ``_proxy_heads_kernel``: 32 (at most ``tile``, a power of
    two that divides ``num_rows``), halved down to 8 while the launch has fewer programs than
    :func:`~proxyattn_kernels.common.target_programs`: up to 128K tokens of context, 32-row programs would not give each
    of an H200's SMs eight. Monotone in ``num_rows``, so the warm-up's chunks (context lengths
    doubling up to the longest prompt, ``proxyattn_kernels/warmup.py``) compile every variant used."""
    rows_t = min(32, tile)
    while rows_t > 8 and (num_rows // rows_t) * num_groups < target_programs(device):
        rows_t //= 2
    return rows_t


__all__ = ["ProxyTileConfig", "default_proxy_tile_config", "proxy_block_scores_paged"]
