"""Block-sparse causal prefill attention over a vLLM-0.26 paged KV cache (Triton).

One program computes ``BLOCK_M`` queries of one query-block row for one query head. It first
attends to the row's diagonal block (the only block that needs the causal mask and the
sequence-end bound; ``ranking[:, row, 0]`` is always the diagonal, see select/naive.py), then
walks the rest of its head's selected blocks (its prefix of the group ranking, by default
re-ordered by position: :func:`head_block_lists`) without any masking. K and V are
gathered through the block table with the cache's own strides (K and V packed in the last
dimension), so any page size that is a multiple of 16 works. Pages that hold whole key tiles are
read tile by tile with TMA instead; on Hopper, smaller pages (vLLM's 16) are first copied into
contiguous 128-token pages for that (``copy_page``, :func:`default_copy_page`).

Semantics: exactly ``block_sparse_attn/naive.py``; fp32 accumulation, output in the query dtype.
An FP8 cache (``k_scale``/``v_scale``) is read as its dequantized values (``paged.py``): tiles
converted to the query dtype, ``k_scale`` folded into the logits' scale and ``v_scale`` applied
to the output once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..common import LOG2E, check_head_dim
from ..device import has_tma
from ..paged import FP8_KV_DTYPE, check_kv_scale, contiguous_pages, kv_scaled, load_paged_tile
from .head_lists import head_block_lists, head_lists_and_tile_rows, heaviest_first, ranked_tile_rows  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters. ``block_m`` and ``block_n`` must divide the selection block size."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    # Read the unmasked key tiles with TMA (tensor descriptors) when the cache is NHD and a page
    # holds whole key tiles; otherwise tiles are gathered row by row through the block table.
    use_tma: bool = True
    warp_specialize: bool = False
    # Visit each head's selected blocks by position (head_block_lists) instead of by score.
    position_order: bool = True
    # Benchmark baseline only: visit key blocks 0, 1, ... in order instead of through the
    # ranking (equal results at full density); measures the cost of the ranking indirection.
    sequential_keys: bool = False
    # Launch the programs heaviest first (head_lists.heaviest_first: by the blocks each computes)
    # instead of the heavy rows first and then head by head. Same result. Off: on an H100 it saved
    # 1.5-2.6% under a per-head density profile and cost 1.8-4.4% at a flat density of 0.1
    # (benchmarks/results/prefill_attention_heaviest_first_h100.json).
    launch_heaviest_first: bool = False


def default_tile_config(block_size: int, head_dim: int, on_cpu: bool, page_size: int = 16) -> TileConfig:
    """Tile sizes measured best on the H200 (benchmarks/kernels/bench_kernels.py --sweep);
    small tiles on CPU, where the Triton interpreter's cost grows with the tile."""
    if on_cpu:
        tile = min(block_size, 32)
        return TileConfig(tile, tile, 4, 1, use_tma=False)
    block_m = min(block_size, 128)
    if page_size % 64 == 0 and block_size % 64 == 0:
        # TMA path, one warpgroup per 128 queries (Llama-8B 128K case: 128x64 tiles 39.4 ms vs
        # 43.5 ms for 128x128 with 8 warps; D=64: 128x128 tiles 10.2 ms vs 11.2 ms).
        return TileConfig(block_m, 64 if head_dim > 64 else min(block_size, 128), 4, 4, use_tma=True)
    # Gather path (pages smaller than a key tile): 50.2 ms (D=128), 12.0 ms (D=64).
    return TileConfig(block_m, min(block_size, 128), 8 if head_dim > 64 else 4, 4, use_tma=False)


#: Pages of the contiguous copy :func:`block_sparse_attn` reads where the cache's pages are too
#: small for TMA key tiles (a multiple of every TMA tile's keys, see :func:`default_tile_config`).
COPY_PAGE_TOKENS = 128


def _reads_tiles_with_tma(tile: TileConfig, page_size: int) -> bool:
    """Whether the kernel takes its TMA path on an NHD cache with pages of ``page_size``."""
    return tile.use_tma and page_size % tile.block_n == 0


def default_copy_page(page_size: int, block_size: int, head_dim: int, has_tma: bool) -> int:
    """The page size of the contiguous copy :func:`block_sparse_attn` takes by default: 0 (it
    reads the cache as it is) unless the device has TMA (``has_tma``) and the cache's pages do
    not hold whole key tiles while ``lcm(page_size, COPY_PAGE_TOKENS)``-token pages do.

    Why (H200, Llama-3.1-8B shape, last 8K chunk of 128K, 16-token pages; benchmarks/results/
    kernels_h200.json, 2026-11-29): the gather path takes 49.8 ms at full density and
    5.32 at density 0.1; with the copy (0.29 ms, included) 36.2 and 4.15, i.e. 1.22x and 0.14x of
    FA3 dense (29.7 ms) instead of 1.68x and 0.18x."""
    if not has_tma:
        return 0
    if _reads_tiles_with_tma(default_tile_config(block_size, head_dim, False, page_size), page_size):
        return 0
    copy_page = math.lcm(page_size, COPY_PAGE_TOKENS)
    tile = default_tile_config(block_size, head_dim, False, copy_page)
    return copy_page if _reads_tiles_with_tma(tile, copy_page) else 0


def copy_bytes(seq_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, copy_page: int) -> int:
    """Bytes the contiguous copy of a ``seq_len``-token request takes (0 without a copy): one
    layer's keys and values of the request, rounded up to whole copy pages."""
    if not copy_page:
        return 0
    tokens = -(-seq_len // copy_page) * copy_page
    return tokens * num_kv_heads * 2 * head_dim * dtype.itemsize


@triton.jit
def _online_softmax_update(acc, m_i, l_i, qk, v):
    """Fold one tile of log2-domain logits ``qk [BLOCK_M, BLOCK_N]`` and values ``v`` into the
    running max ``m_i``, denominator ``l_i`` and unnormalised output ``acc``."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, key_start, kv_base, block_table_ptr, offs_n, offs_d, q_pos,
    seq_len, qk_scale,
    stride_kv_page, stride_kv_tok,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr,
):
    """Online-softmax update with the ``BLOCK_N`` keys starting at absolute ``key_start``."""
    k_pos = key_start + offs_n
    in_seq = k_pos < seq_len if MASKED else None
    k, v = load_paged_tile(kv_base, block_table_ptr, k_pos, in_seq, offs_d, stride_kv_page, stride_kv_tok,
                           PAGE_SIZE, HEAD_DIM)
    k, v = k.to(q.dtype), v.to(q.dtype)  # FP8 -> the query dtype (exact); no-op otherwise
    qk = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N], log2 domain
    if MASKED:
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    return _online_softmax_update(acc, m_i, l_i, qk, v)


@triton.jit
def _attend_tile_tma(
    acc, m_i, l_i, q, row, kv_desc, kv_col, qk_scale, HEAD_DIM: tl.constexpr,
):
    """Unmasked online-softmax update with the key tile at physical cache row ``row``, read by
    TMA from the cache viewed as ``[pages * page_size, Hkv * 2D]``."""
    k = kv_desc.load([row, kv_col]).to(q.dtype)
    v = kv_desc.load([row, kv_col + HEAD_DIM]).to(q.dtype)
    return _online_softmax_update(acc, m_i, l_i, tl.dot(q, tl.trans(k)) * qk_scale, v)


# Chunk positions change with every chunk: specializing on them (divisibility by 16) would
# JIT-compile new variants while serving.
# Values and row strides that follow the chunk, and the request's block-table row (16-byte
# aligned or not depending on the request's slot in vLLM's table), are not specialized: no
# compile per new chunk shape while serving (proxyattn_kernels/warmup.py compiles the rest at startup).
@triton.jit(do_not_specialize=["block_table_ptr", "ctx", "seq_len", "first_q_block", "num_rows", "heavy_rows",
                               "skip_rows", "stride_rank_group", "stride_rank_row", "stride_count_head"])
def _block_sparse_attn_kernel(
    q_ptr, kv_ptr, kv_desc, block_table_ptr, ranking_ptr, tile_rows_ptr, counts_ptr, out_ptr, order_ptr,
    k_scale_ptr, v_scale_ptr, ctx, seq_len, first_q_block, num_rows, heavy_rows, skip_rows, qk_scale,
    stride_q_tok, stride_q_head,
    stride_kv_page, stride_kv_head, stride_kv_tok,
    stride_rank_group, stride_rank_row,
    stride_count_head,
    stride_o_tok, stride_o_head,
    NUM_Q_HEADS: tl.constexpr, HEADS_PER_KV: tl.constexpr, HEADS_PER_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    SEQUENTIAL_KEYS: tl.constexpr, HEAVIEST_FIRST: tl.constexpr,
):
    SUB_M: tl.constexpr = BLOCK_SIZE // BLOCK_M  # query tiles per query block
    SUB_N: tl.constexpr = BLOCK_SIZE // BLOCK_N  # key tiles per key block
    # Launch order (programs start roughly in id order): the query tiles of the chunk's last
    # ``heavy_rows`` rows, all heads, last tile first; then every other tile, head by head (rows
    # of one head side by side share their key tiles in L2). A heavy row (a dense tail row
    # computes every causal block, ~1/density times the others' work) left at its natural place
    # would start when the GPU is nearly done and run alone; first, it overlaps with the rest.
    # The chunk's last ``skip_rows`` rows get no program at all (a dense kernel computes them).
    # HEAVIEST_FIRST: the order comes from ``order_ptr`` (head_lists.heaviest_first) instead.
    pid = tl.program_id(0)
    tiles_per_head = (num_rows - skip_rows) * SUB_M
    heavy_tiles = heavy_rows * SUB_M
    num_heavy = heavy_tiles * NUM_Q_HEADS
    if HEAVIEST_FIRST:
        program = tl.load(order_ptr + pid)
        head = program // tiles_per_head
        tile = program % tiles_per_head
    elif pid < num_heavy:
        head = pid % NUM_Q_HEADS
        tile = tiles_per_head - 1 - pid // NUM_Q_HEADS
    else:
        light_tiles = tl.maximum(tiles_per_head - heavy_tiles, 1)
        head = (pid - num_heavy) // light_tiles
        tile = (pid - num_heavy) % light_tiles
    row = tile // SUB_M
    q_block = first_q_block + row
    tile_start = q_block * BLOCK_SIZE + (tile % SUB_M) * BLOCK_M
    # A tile entirely before the chunk (first row) or past its end (last row) has no queries.
    if tile_start + BLOCK_M <= ctx or tile_start >= seq_len:
        return
    tile_end = tl.minimum(tile_start + BLOCK_M, seq_len)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_pos = tile_start + offs_m
    q_valid = (q_pos >= ctx) & (q_pos < seq_len)
    q_tok = (q_pos - ctx).to(tl.int64)
    q = tl.load(
        q_ptr + q_tok[:, None] * stride_q_tok + head * stride_q_head + offs_d[None, :],
        mask=q_valid[:, None], other=0.0,
    )
    kv_base = kv_ptr + (head // HEADS_PER_KV).to(tl.int64) * stride_kv_head
    qk_scale = kv_scaled(qk_scale, k_scale_ptr)  # FP8: q . (k * k_scale) = (q . k) * k_scale

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Diagonal block: causal mask and sequence end; only the key tiles up to the tile's last query.
    diag_start = q_block * BLOCK_SIZE
    for j in range(0, tl.cdiv(tile_end - diag_start, BLOCK_N)):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, diag_start + j * BLOCK_N, kv_base, block_table_ptr, offs_n, offs_d,
            q_pos, seq_len, qk_scale, stride_kv_page, stride_kv_tok,
            HEAD_DIM, PAGE_SIZE, True,
        )

    # Every other selected block lies entirely before the diagonal: no masks.
    rank_offset = (head // HEADS_PER_GROUP) * stride_rank_group + row * stride_rank_row
    rank_row = ranking_ptr + rank_offset
    count = tl.load(counts_ptr + head * stride_count_head + row)
    kv_col = (head // HEADS_PER_KV) * 2 * HEAD_DIM
    rows_row = tile_rows_ptr + rank_offset * SUB_N  # tile_rows is [G, R, Kb * SUB_N], contiguous
    for t in tl.range(SUB_N, count * SUB_N, warp_specialize=WARP_SPECIALIZE):
        if USE_TMA:
            # One load per tile: chaining ranking -> block table here stalls the pipeline.
            if SEQUENTIAL_KEYS:
                key_start = (t - SUB_N) * BLOCK_N
                row = tl.load(block_table_ptr + key_start // PAGE_SIZE) * PAGE_SIZE + key_start % PAGE_SIZE
            else:
                row = tl.load(rows_row + t)
            acc, m_i, l_i = _attend_tile_tma(acc, m_i, l_i, q, row, kv_desc, kv_col, qk_scale, HEAD_DIM)
        else:
            if SEQUENTIAL_KEYS:
                key_block = t // SUB_N - 1
            else:
                key_block = tl.load(rank_row + t // SUB_N)
            key_start = key_block * BLOCK_SIZE + (t % SUB_N) * BLOCK_N
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, key_start, kv_base, block_table_ptr, offs_n, offs_d, q_pos,
                seq_len, qk_scale, stride_kv_page, stride_kv_tok, HEAD_DIM, PAGE_SIZE, False,
            )

    out = kv_scaled(acc, v_scale_ptr) / l_i[:, None]  # FP8: p . (v * v_scale) = (p . v) * v_scale
    tl.store(
        out_ptr + q_tok[:, None] * stride_o_tok + head * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=q_valid[:, None],
    )


def _nhd_descriptor(kv_cache: torch.Tensor, tile: TileConfig) -> TensorDescriptor | None:
    """A TMA descriptor over the physical NHD cache as ``[pages * page_size, Hkv * 2D]``, or None
    when the cache is not NHD-packed or a page does not hold whole key tiles."""
    num_pages, num_kv_heads, page_size, packed_dim = kv_cache.shape
    token_stride = num_kv_heads * packed_dim
    nhd = kv_cache.stride() == (page_size * token_stride, packed_dim, token_stride, 1)
    if not nhd or page_size % tile.block_n:
        return None
    head_dim = packed_dim // 2
    return TensorDescriptor(
        kv_cache, shape=[num_pages * page_size, token_stride], strides=[token_stride, 1],
        block_shape=[tile.block_n, head_dim],
    )


def block_sparse_attn(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    ranking: torch.Tensor,
    counts: torch.Tensor,
    out: torch.Tensor,
    *,
    ctx: int,
    scale: float,
    block_size: int,
    tile: TileConfig | None = None,
    heavy_rows: int = 0,
    skip_rows: int = 0,
    copy_page: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention of one prefill chunk, written into ``out``.

    Args:
        q: ``[q_len, Hq, D]`` queries at absolute positions ``[ctx, ctx + q_len)`` (last dim
            contiguous; fp16 or bf16, or fp32).
        kv_cache: ``[num_pages, Hkv, page_size, 2 * D]`` vLLM-0.26 paged cache view, K in
            ``[..., :D]`` and V in ``[..., D:]``, any strides with a contiguous last dim;
            must hold keys ``[0, ctx + q_len)``. Same dtype as ``q``, or FP8
            (``paged.FP8_KV_DTYPE``) with ``k_scale`` and ``v_scale``.
        block_table: ``[max_pages]`` int32, the request's physical page per logical page.
        ranking: ``[G, R, Kb]`` int32 selection ranking, the diagonal block first in each row.
        counts: ``[Hq, R]`` int32 number of ranking entries each head computes per row.
        out: ``[q_len, Hq, D]`` output (same dtype as ``q``), written in place.
        ctx: tokens before the chunk.
        scale: softmax scale.
        block_size: selection block size (a multiple of 16).
        tile: launch parameters; defaults to :func:`default_tile_config`.
        heavy_rows: the chunk's last ``heavy_rows`` query-block rows are launched before the
            others (rows that compute far more blocks, e.g. the dense tail of
            ``dense_tail_tokens``: ``num_rows - geometry.first_tail_row(...)``). Only the order
            of the programs changes, not the result. Not used with ``tile.launch_heaviest_first``,
            whose order puts those rows first anyway.
        skip_rows: the chunk's last ``skip_rows`` query-block rows are not computed: their
            tokens in ``out`` are left as they are (for a caller that runs the dense tail with a
            dense split-KV kernel). Not combined with ``heavy_rows``.
        copy_page: read keys and values from a copy of the request's ``[0, ctx + q_len)`` in
            contiguous pages of this many tokens (``paged.contiguous_pages``; a multiple of the
            cache's page size) instead of the cache: on pages too small for whole key tiles the
            kernel gathers rows one by one, on the copy it reads tiles with TMA. Allocates
            :func:`copy_bytes` for the call. None: :func:`default_copy_page` (a copy into
            128-token pages for vLLM's 16-token pages on Hopper, none on larger pages or on
            CPU); 0: never copy. ``tile`` defaults to the copy's page size.
        k_scale, v_scale: an FP8 cache's 1-element float32 dequantization scales (device
            tensors, read by the kernel: no host sync); None for a cache in the query dtype.

    Returns:
        ``out``.
    """
    q_len, num_q_heads, head_dim = q.shape
    num_pages, num_kv_heads, page_size, packed_dim = kv_cache.shape
    num_groups, num_rows, num_k_blocks = ranking.shape
    seq_len = ctx + q_len
    first_q_block = ctx // block_size
    if packed_dim != 2 * head_dim:
        raise ValueError(f"kv_cache last dim {packed_dim} != 2 * head_dim {2 * head_dim}")
    check_head_dim(head_dim)
    if num_q_heads % num_kv_heads or num_kv_heads % num_groups:
        raise ValueError(f"heads must nest: Hq={num_q_heads}, Hkv={num_kv_heads}, groups={num_groups}")
    if page_size % 16 or block_size % 16:
        raise ValueError(f"page_size={page_size} and block_size={block_size} must be multiples of 16")
    if kv_cache.dtype not in (q.dtype, FP8_KV_DTYPE) or out.dtype != q.dtype or out.shape != q.shape:
        raise ValueError(f"dtype/shape mismatch: q {q.dtype}{tuple(q.shape)}, kv_cache {kv_cache.dtype}, "
                         f"out {out.dtype}{tuple(out.shape)}")
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("q, kv_cache and out need a contiguous last dimension")
    check_kv_scale(kv_cache, k_scale, "k_scale")
    check_kv_scale(kv_cache, v_scale, "v_scale")
    if num_rows != (seq_len - 1) // block_size - first_q_block + 1 or num_k_blocks != -(-seq_len // block_size):
        raise ValueError(f"ranking shape {tuple(ranking.shape)} does not match ctx={ctx}, q_len={q_len}, "
                         f"block_size={block_size}")
    if counts.shape != (num_q_heads, num_rows) or counts.stride(-1) != 1 or ranking.stride(-1) != 1:
        raise ValueError(f"counts shape {tuple(counts.shape)} != {(num_q_heads, num_rows)} or not contiguous")
    if not 0 <= heavy_rows <= num_rows:
        raise ValueError(f"heavy_rows={heavy_rows} must be in [0, {num_rows}] (the chunk's query-block rows)")
    if not 0 <= skip_rows <= num_rows or (skip_rows and heavy_rows):
        raise ValueError(f"skip_rows={skip_rows} must be in [0, {num_rows}], with heavy_rows 0 (got {heavy_rows})")
    if block_table.numel() * page_size < seq_len:
        raise ValueError(f"block_table covers {block_table.numel() * page_size} tokens < seq_len={seq_len}")
    if copy_page is None:
        copy_page = default_copy_page(page_size, block_size, head_dim, has_tma(q.device))
    if copy_page < 0 or copy_page % page_size:
        raise ValueError(f"copy_page={copy_page} must be 0 (no copy) or a multiple of the cache's page size {page_size}")
    if copy_page:
        kv_cache, block_table = contiguous_pages(kv_cache, block_table, seq_len, copy_page)
        page_size = copy_page
    tile = tile or default_tile_config(block_size, head_dim, q.device.type == "cpu", page_size)
    if block_size % tile.block_m or block_size % tile.block_n:
        raise ValueError(f"tile {tile} must divide block_size={block_size}")

    kv_desc = _nhd_descriptor(kv_cache, tile) if tile.use_tma else None
    if kv_desc is not None and not ranking.is_contiguous():
        raise ValueError("ranking must be contiguous")
    if tile.position_order:
        ranking, tile_rows = head_lists_and_tile_rows(ranking, counts, block_table, block_size, tile.block_n,
                                                      page_size, kv_desc is not None)
        heads_per_group = 1
    else:
        heads_per_group = num_q_heads // num_groups
        tile_rows = (ranked_tile_rows(ranking, block_table, block_size, tile.block_n, page_size)
                     if kv_desc is not None else None)
    tile_rows = ranking if tile_rows is None else tile_rows  # unused by the gather path
    grid = ((num_rows - skip_rows) * (block_size // tile.block_m) * num_q_heads,)
    if grid[0] == 0:
        return out
    # The programs' order, or any int32 tensor as an unread placeholder.
    order = (heaviest_first(counts, num_rows - skip_rows, block_size // tile.block_m)
             if tile.launch_heaviest_first else counts)
    _block_sparse_attn_kernel[grid](
        q, kv_cache, kv_desc, block_table, ranking, tile_rows, counts, out, order, k_scale, v_scale,
        ctx, seq_len, first_q_block, num_rows, heavy_rows, skip_rows, scale * LOG2E,
        q.stride(0), q.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2),
        ranking.stride(0), ranking.stride(1),
        counts.stride(0),
        out.stride(0), out.stride(1),
        NUM_Q_HEADS=num_q_heads, HEADS_PER_KV=num_q_heads // num_kv_heads,
        HEADS_PER_GROUP=heads_per_group,
        HEAD_DIM=head_dim, PAGE_SIZE=page_size, BLOCK_SIZE=block_size,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        USE_TMA=kv_desc is not None, WARP_SPECIALIZE=tile.warp_specialize,
        SEQUENTIAL_KEYS=tile.sequential_keys, HEAVIEST_FIRST=tile.launch_heaviest_first,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )
    return out
