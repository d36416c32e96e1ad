"""Kernel benchmark: ProxyAttn selection + Triton block-sparse attention vs FA3 dense (H200).

One command on a CUDA host (vLLM importable for FA3; without it the FA3 columns stay empty):

    python benchmarks/kernels/bench_kernels.py [--sweep] [--out benchmarks/results/kernels_h200.json]

Order: a correctness gate first (Triton vs the torch spec in bf16 on mid-size chunks, and
Triton at full density vs FA3 dense on the benchmark shape); no timing runs if it fails.
Then each case: the last ``q_len``-query chunk of a ``ctx + q_len`` prompt over a paged cache,
timed with CUDA events (median of ``triton.testing.do_bench``), FA3 (vLLM's
``flash_attn_varlen_func`` with a block table on the same cache) in the same run.
Union kernels (one pseudo-request per query block over the union of its heads' blocks):
``fa3-union`` (vLLM's FA3) and, when flashinfer-python 0.6.14 imports, ``flashinfer-union``
(FlashInfer "fa2": planned once per chunk, per-layer cost timed) and ``flashinfer-fa3-union``
(FlashInfer "fa3": a device-to-host sync and a plan every layer, both inside the time). Their
gate compares against the naive union reference; a FlashInfer failure only drops its rows.
FlashInfer compiles each kernel variant at its first call: that time is logged and recorded
(``flashinfer_first_call_s``); set FLASHINFER_WORKSPACE_BASE to keep compiled kernels.
Writes JSON (GPU, date, versions, command, cases) and prints the table last.
"""
from __future__ import annotations

import argparse
import itertools
import datetime
import functools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace

import torch
import triton

from proxyattn_kernels import ChunkGeometry, ProxyAttnParams
from proxyattn_kernels.block_sparse_attn import flashinfer_plan, flashinfer_release  # neither imports flashinfer
from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention, selection_block_mask
from proxyattn_kernels.block_sparse_attn.triton import (
    TileConfig, block_sparse_attn, default_copy_page, default_tile_config,
)
from proxyattn_kernels.block_sparse_attn.union_pages import (
    tail_first_calls, union_block_mask, union_call_num_splits, union_page_plan,
)
from proxyattn_kernels.device import has_tma, sm_count
from proxyattn_kernels.paged import contiguous_pages
from proxyattn_kernels.reference import gather_paged_kv
from proxyattn_kernels.select.naive import select_blocks
from proxyattn_vllm.config import ProxyAttnConfig  # num_proxy_groups "auto"; imports no vLLM

SHAPES = {"llama3.1-8b": (32, 8, 128), "qwen2.5-0.5b": (14, 2, 64)}
TAIL_TOKENS = 128  # the default dense_tail_tokens
SPREAD = 0.5  # head budgets from 0.5x to 1.5x the mean (the spread cases)


def log(msg: str) -> None:
    print(msg, flush=True)


def make_cache(seq_len, hkv, d, page, dtype, device, shuffled=True):
    """Random NHD paged cache (vLLM layout) with a shuffled block table (``shuffled`` False: pages
    in order, as a fresh engine gives a request); logical view returned."""
    n = -(-seq_len // page)
    physical = torch.randn(n + 8, page, hkv, 2 * d, device=device, dtype=dtype)
    order = torch.randperm(n + 8, device=device) if shuffled else torch.arange(n + 8, device=device)
    return physical.permute(0, 2, 1, 3), order[:n].to(torch.int32)


def synthetic_selection(hq, groups, ctx, q_len, block, density, device, tail_tokens=0, spread=0.0, recent=False):
    """A selection with the real structure (diagonal + sink first, then a random ranking) and a
    per-head budget of ``ceil(density * Kb)`` blocks: random weights give flat proxy scores,
    so benchmarks control density explicitly and report the density actually used.
    ``spread`` > 0: head ``h``'s budget is scaled by ``1 - spread + 2 * spread * h / (Hq - 1)``
    (same mean, unequal heads, as gamma budgets are; a union kernel computes the largest).
    ``recent``: every row ranks its most recent blocks first (a sliding window of the same
    size), so neighbouring rows share almost all their blocks: the best case for cache reuse."""
    num_rows = (ctx + q_len - 1) // block - ctx // block + 1
    num_k_blocks = -(-(ctx + q_len) // block)
    if recent:
        scores = torch.arange(num_k_blocks, device=device, dtype=torch.float32).expand(groups, num_rows, -1)
    else:
        scores = torch.rand(groups, num_rows, num_k_blocks, device=device)
    scale = 1 - spread + 2 * spread * torch.arange(hq, device=device) / max(hq - 1, 1)
    budget = (density * num_k_blocks * scale).ceil().clamp(min=1).to(torch.int32)
    ranking, counts, _ = select_blocks(scores, budget, ctx, q_len, block, 1, 1, tail_tokens)
    extents = ctx // block + 1 + torch.arange(num_rows, device=device)
    used = float(counts.sum() / (extents.sum() * hq))
    return ranking, counts, used


def sweep_configs(page):
    """Tile configs to sweep: TMA where a page holds whole 64-key tiles, gather otherwise; plus
    the sequential-key baseline of the default config (cost of the ranking indirection)."""
    use_tma = page % 64 == 0
    configs = [TileConfig(bm, bn, warps, stages, use_tma=use_tma)
               for bm, bn, warps, stages in itertools.product((128,), (64, 128), (4, 8), (3, 4))]
    default = default_tile_config(128, 128, on_cpu=False, page_size=page)
    configs.append(TileConfig(**{**asdict(default), "sequential_keys": True}))
    return configs


def load_fa3():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as exc:  # noqa: BLE001 - report why FA3 is missing and go on without it
        log(f"FA3 unavailable ({type(exc).__name__}: {exc}); fa3 columns will be empty")
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=64)
def _one_sequence_lengths(q_len: int, seq_len: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``cu_seqlens_q [0, q_len]`` and ``seqused_k [seq_len]`` on ``device``, made once: built
    per call, their blocking host-to-device copies would drain the GPU inside every timed call
    (the backend gets them from its metadata builder, once per step)."""
    return (torch.tensor([0, q_len], dtype=torch.int32, device=device),
            torch.tensor([seq_len], dtype=torch.int32, device=device))


def fa3_dense(fa3, q, kv, table, seq_len, scale, out, return_lse=False):
    """Causal FA3 of ``q`` (the request's last ``q.shape[0]`` queries) into ``out``; with
    ``return_lse``, returns their ``[Hq, q_len]`` LSE (as the backend's dense-tail call)."""
    d = q.shape[-1]
    k_cache, v_cache = kv.transpose(1, 2).split(d, dim=-1)
    cu_seqlens_q, seqused_k = _one_sequence_lengths(q.shape[0], seq_len, str(q.device))
    result = fa3(
        q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=q.shape[0],
        seqused_k=seqused_k, max_seqlen_k=seq_len,
        softmax_scale=scale, causal=True, block_table=table[None], fa_version=3, return_softmax_lse=return_lse,
    )
    return result[1] if return_lse else result


def tail_lse_rows(fa3, q, kv, table, ctx, block, scale, out, tail_tokens=None):
    """The backend's dense tail through FA3 first: attends the chunk's tail rows into ``out``
    and returns the budget rows' LSE (``[Hq, min(q_len, block)]``, ``proxyattn_vllm.sparse.base.budget_rows_lse``).
    ``tail_tokens``: the tail's tokens (default: the rows of ``TAIL_TOKENS``)."""
    q_len = q.shape[0]
    if tail_tokens is None:
        geo = ChunkGeometry(ctx, q_len, block)
        tail_tokens = q_len - geo.row_token_start(geo.first_tail_row(TAIL_TOKENS))
    lse = fa3_dense(fa3, q[q_len - tail_tokens:], kv, table, ctx + q_len, scale, out[q_len - tail_tokens:],
                    return_lse=True)
    n_last = min(q_len, block)
    return lse[:, lse.shape[1] - n_last:]


def fa3_union_call(fa3, q, kv, plan, scale, out, num_splits=0):
    """One FA3 varlen call over a plan's pseudo-requests (``q``/``out``: their tokens, in the
    plan's row order). ``num_splits`` 0 leaves the split count to FA3's heuristic."""
    k_cache, v_cache = kv.transpose(1, 2).split(q.shape[-1], dim=-1)
    fa3(
        q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=plan.cu_seqlens_q,
        max_seqlen_q=plan.max_seqlen_q, seqused_k=plan.seqused_k, max_seqlen_k=plan.max_seqlen_k,
        softmax_scale=scale, causal=True, block_table=plan.block_table, fa_version=3,
        **({"num_splits": num_splits} if num_splits else {}),
    )
    return out


def fa3_union(fa3, q, kv, table, ranking, counts, ctx, block, scale, out, tail_tokens=0, skip_tail=False):
    """The selection through FA3: one pseudo-request per query block over the union of its
    heads' selected blocks (proxyattn_kernels/block_sparse_attn/union_pages.py; plan included in the time).
    ``tail_tokens`` > 0: the dense tail rows in a call of their own, first; ``skip_tail``: not at
    all (attended already, :func:`tail_lse_rows`), as the backend does with FlashAttention."""
    plan = union_page_plan(ranking, counts, table, ctx=ctx, q_len=q.shape[0], block_size=block,
                           page_size=kv.shape[2])
    geo = ChunkGeometry(ctx, q.shape[0], block)
    for tokens, rows in tail_first_calls(plan, geo, geo.first_tail_row(tail_tokens), skip_tail):
        splits = union_call_num_splits(rows.seqused_k.shape[0], q.shape[1], sm_count(q.device))  # as the backend
        fa3_union_call(fa3, q[tokens], kv, rows, scale, out[tokens], splits)
    return out


def kv_head_groups(kv_head: int, per_kv: int, per_group: int) -> tuple[slice, slice]:
    """``(query heads, ranking group)`` of one KV head as slices: its GQA query heads and the one
    proxy group that ranks them (proxy groups divide the KV heads, ``resolve_num_groups``)."""
    group = kv_head * per_kv // per_group
    return slice(kv_head * per_kv, (kv_head + 1) * per_kv), slice(group, group + 1)


def kv_head_shares(num_q_heads: int, num_kv_heads: int, num_groups: int) -> tuple[int, int]:
    """``(query heads per KV head, query heads per proxy group)``."""
    return num_q_heads // num_kv_heads, num_q_heads // num_groups


def before_tail(ctx: int, q_len: int, block: int, tail_tokens: int) -> tuple[ChunkGeometry, int, int]:
    """``(geometry, first dense-tail row, chunk tokens before that row)`` of a chunk."""
    geo = ChunkGeometry(ctx, q_len, block)
    first_tail_row = geo.first_tail_row(tail_tokens)
    return geo, first_tail_row, geo.row_token_start(first_tail_row)


def rows_before_tail(ranking, counts, table, kv, geo, first_tail_row):
    """The :func:`union_page_plan` of these heads (their union) over the rows before the dense
    tail (attended already, :func:`tail_lse_rows`)."""
    plan = union_page_plan(ranking, counts, table, ctx=geo.ctx, q_len=geo.q_len, block_size=geo.block_size,
                           page_size=kv.shape[2])
    [(_, rows)] = tail_first_calls(plan, geo, first_tail_row, tail_done=True)
    return rows


def fa3_per_head(fa3, q, kv, table, ranking, counts, ctx, block, scale, out, tail_tokens=TAIL_TOKENS):
    """The selection through FA3 with every query head over exactly its own blocks (no union):
    one FA3 varlen call per KV head, whose pseudo-requests are the (query head of its group, row)
    pairs, each with that head's own page list (:func:`union_page_plan` of the head alone). The
    rows of ``tail_tokens`` are left out: the backend's dense tail attends them first.

    A pseudo-request's queries must be contiguous, so each group's queries go through a head-major
    copy and its outputs back. Benchmark only: the plans are one launch per head (a backend path
    would plan all heads in one)."""
    head_dim = q.shape[-1]
    per_kv, per_group = kv_head_shares(q.shape[1], kv.shape[1], ranking.shape[0])
    geo, first_tail_row, tokens = before_tail(ctx, q.shape[0], block, tail_tokens)
    if first_tail_row == 0:
        return out
    plans = [rows_before_tail(ranking[h // per_group : h // per_group + 1], counts[h : h + 1], table, kv, geo,
                              first_tail_row) for h in range(q.shape[1])]
    splits = union_call_num_splits(per_kv * first_tail_row, 1, sm_count(q.device))
    for kv_head in range(kv.shape[1]):
        heads, _ = kv_head_groups(kv_head, per_kv, per_group)
        group = plans[heads]
        cu = torch.cat([p.cu_seqlens_q[:-1] + i * tokens for i, p in enumerate(group)]
                       + [group[-1].cu_seqlens_q[-1:] + (per_kv - 1) * tokens])
        call = group[0]._replace(cu_seqlens_q=cu, seqused_k=torch.cat([p.seqused_k for p in group]),
                                 block_table=torch.cat([p.block_table for p in group]))
        q_heads = q[:tokens, heads].transpose(0, 1).reshape(per_kv * tokens, 1, head_dim)
        out_heads = torch.empty_like(q_heads)
        fa3_union_call(fa3, q_heads, kv[:, kv_head : kv_head + 1], call, scale, out_heads, splits)
        out[:tokens, heads] = out_heads.view(per_kv, tokens, head_dim).transpose(0, 1)
    return out


def fa3_per_kv_head(fa3, q, kv, table, ranking, counts, ctx, block, scale, out, tail_tokens=TAIL_TOKENS):
    """The selection through FA3 with each KV head's query heads over their own union: one FA3
    varlen call per KV head, a pseudo-request per row over the blocks any of its query heads
    chose (:func:`union_page_plan` of those heads). Between the all-heads union (:func:`fa3_union`)
    and each head's own blocks (:func:`fa3_per_head`): a GQA group reads its key tiles once for
    all its query heads, and a row computes what its group chose, not what all heads chose.
    The rows of ``tail_tokens`` are left out, as in :func:`fa3_per_head`. Benchmark only (one plan
    launch per KV head)."""
    per_kv, per_group = kv_head_shares(q.shape[1], kv.shape[1], ranking.shape[0])
    geo, first_tail_row, tokens = before_tail(ctx, q.shape[0], block, tail_tokens)
    if first_tail_row == 0:
        return out
    splits = union_call_num_splits(first_tail_row, per_kv, sm_count(q.device))
    for kv_head in range(kv.shape[1]):
        heads, groups = kv_head_groups(kv_head, per_kv, per_group)
        rows = rows_before_tail(ranking[groups], counts[heads], table, kv, geo, first_tail_row)
        q_heads = q[:tokens, heads].contiguous()
        out_heads = torch.empty_like(q_heads)
        fa3_union_call(fa3, q_heads, kv[:, kv_head : kv_head + 1], rows, scale, out_heads, splits)
        out[:tokens, heads] = out_heads
    return out


def reversed_rows(plan):
    """``(plan, token order)``: the plan's pseudo-requests in reverse order, and the chunk's token
    indices in that order (queries ``q[order]``; outputs back with ``out[order] = ...``). A probe of
    whether FA3's scheduling order over the rows matters. Bench setup only (host loop)."""
    cu = plan.cu_seqlens_q.tolist()
    order = torch.cat([torch.arange(cu[r], cu[r + 1]) for r in reversed(range(len(cu) - 1))])
    lengths = plan.cu_seqlens_q.diff().flip(0)
    cu_reversed = torch.zeros_like(plan.cu_seqlens_q)
    cu_reversed[1:] = lengths.cumsum(0)
    return plan._replace(cu_seqlens_q=cu_reversed, seqused_k=plan.seqused_k.flip(0).contiguous(),
                         block_table=plan.block_table.flip(0).contiguous()), order.to(plan.cu_seqlens_q.device)


def union_call_probes(fa3, q, kv, table, ctx, block, scale, out, density=0.1):
    """``{label: (ranking, counts, timing fn)}``: the union call alone (plan made beforehand) at
    ``density``, and three probes of its per-block cost against dense (the union call costs
    more per computed block than FA3 dense): FA3's split count forced to 1, the rows in reverse order, and a selection of each
    row's most recent blocks (neighbouring rows share their pages)."""
    q_len = q.shape[0]
    ranking, counts, _ = synthetic_selection(q.shape[1], 1, ctx, q_len, block, density, q.device)
    recent_ranking, recent_counts, _ = synthetic_selection(q.shape[1], 1, ctx, q_len, block, density, q.device,
                                                           recent=True)
    plans = {key: union_page_plan(r, c, table, ctx=ctx, q_len=q_len, block_size=block, page_size=kv.shape[2])
             for key, (r, c) in {"random": (ranking, counts), "recent": (recent_ranking, recent_counts)}.items()}
    back, order = reversed_rows(plans["random"])
    q_back, out_back = q[order], out[order]
    return {
        "call": (ranking, counts, lambda: fa3_union_call(fa3, q, kv, plans["random"], scale, out)),
        "call splits1": (ranking, counts, lambda: fa3_union_call(fa3, q, kv, plans["random"], scale, out, 1)),
        "call reversed": (ranking, counts, lambda: fa3_union_call(fa3, q_back, kv, back, scale, out_back)),
        "call recent": (recent_ranking, recent_counts,
                        lambda: fa3_union_call(fa3, q, kv, plans["recent"], scale, out)),
    }


def union_density(ranking, counts, ctx, q_len, block):
    """Density a union kernel computes: its rows' union of selected blocks, for every head."""
    union = union_block_mask(ranking, counts, ranking.shape[-1])
    num_rows = union.shape[0]
    extents = ctx // block + 1 + torch.arange(num_rows, device=union.device)
    return float(union.sum() / extents.sum())


def kv_head_union_density(ranking, counts, ctx, q_len, block, num_kv_heads):
    """Density :func:`fa3_per_kv_head` computes: each KV head's union over its query heads,
    averaged over the KV heads."""
    per_kv, per_group = kv_head_shares(counts.shape[0], num_kv_heads, ranking.shape[0])
    total = 0.0
    for kv_head in range(num_kv_heads):
        heads, groups = kv_head_groups(kv_head, per_kv, per_group)
        total += union_density(ranking[groups], counts[heads], ctx, q_len, block)
    return total / num_kv_heads


class FlashInferBench:
    """FlashInfer's sparse path, if it imports; any failure disables it, never the other rows.

    ``variants``: bench kernel name -> FlashInfer backend. ``first_call_s``: wall time of each
    (backend, head_dim) variant's first call, i.e. its JIT compile (+ one plan and run)."""

    variants = {"flashinfer-union": "fa2", "flashinfer-fa3-union": "fa3"}

    def __init__(self):
        self.fi = None
        self.first_call_s: dict[str, float] = {}
        self.skipped: str | None = None  # why the flashinfer rows are missing
        try:
            from proxyattn_kernels.block_sparse_attn import flashinfer as fi

            flashinfer_release.import_flashinfer()
        except Exception as exc:  # noqa: BLE001 - report why and go on without it
            self.skipped = f"unavailable: {type(exc).__name__}: {exc}"
            log(f"FlashInfer {self.skipped}; flashinfer rows skipped")
            return
        self.fi = fi

    def disable(self, why: str) -> None:
        log(f"FlashInfer disabled: {why}; flashinfer rows skipped")
        self.fi, self.skipped = None, why

    def run(self, backend, q, kv, table, ranking, counts, ctx, block, scale, out):
        """One layer's work: the union plan, the device buffers (+ sync and plan for "fa3"), the kernel."""
        self.fi.block_sparse_attn_flashinfer(q, kv, table, ranking, counts, out, ctx=ctx, scale=scale,
                                             block_size=block, backend=backend)

    def first_call(self, backend, q, *args) -> None:
        """Run once; the first call of a (backend, head_dim) variant is timed as its compile."""
        key = f"{backend} D{q.shape[-1]} {str(q.dtype).removeprefix('torch.')}"
        if key in self.first_call_s:
            return self.run(backend, q, *args)
        torch.cuda.synchronize()
        start = time.perf_counter()
        self.run(backend, q, *args)
        torch.cuda.synchronize()
        self.first_call_s[key] = time.perf_counter() - start
        log(f"flashinfer first call (JIT compile + plan + run) {key}: {self.first_call_s[key]:.1f} s")

    def prep(self, backend, q, kv, table, ranking, counts, ctx, block, scale, out):
        """The per-layer work before the kernel: union plan and device buffers ("fa3": + the
        device-to-host copy of the lengths, a sync, and a plan)."""
        union = union_page_plan(ranking, counts, table, ctx=ctx, q_len=q.shape[0], block_size=block,
                                page_size=kv.shape[2])
        plan = flashinfer_plan.chunk_plan(q, kv, ctx=ctx, scale=scale, block_size=block, backend=backend)
        plan.write_pages(union)
        if backend == "fa3":
            plan.plan_from_device()

    def plan_ms(self, backend, q, kv, ctx, block, scale) -> float:
        """Host time of one ``plan()`` of this chunk (once per chunk and step for "fa2")."""
        plan = flashinfer_plan.chunk_plan(q, kv, ctx=ctx, scale=scale, block_size=block, backend=backend)
        torch.cuda.synchronize()
        start = time.perf_counter()
        plan.plan_upper_bound()
        elapsed = time.perf_counter() - start
        torch.cuda.synchronize()
        return elapsed * 1e3


def make_case(name, kernel, tile, *, shape, ctx, q_len, page, block, density, used, counts, t, sel_ms, fa3_ms):
    """One row of the JSON's ``cases``; ``t``, ``sel_ms``, ``fa3_ms``: :func:`timed` results."""
    model_shape, hq, hkv, d = shape
    flops = 4.0 * d * float(counts.sum()) * block * block  # counts sum over heads; full tiles
    return {
        "name": name, "model_shape": model_shape, "hq": hq, "hkv": hkv, "head_dim": d, "ctx": ctx,
        "q_len": q_len, "page_size": page, "block_size": block, "kernel": kernel, "tile": tile,
        "density_target": density, "density": used,
        "proxyattn_ms": t["median"] + (sel_ms["median"] if sel_ms else 0.0),
        "attn_ms": t["median"], "attn_ms_p10": t["p10"], "attn_ms_p90": t["p90"],
        "selection_ms": sel_ms["median"] if sel_ms else None,
        "selection_stages_ms": sel_ms.get("stages_ms") if sel_ms else None,
        "selection_host_ms": sel_ms.get("host_ms") if sel_ms else None,
        "fa3_dense_ms": fa3_ms["median"] if fa3_ms else None,
        "fa3_dense_ms_p10": fa3_ms["p10"] if fa3_ms else None,
        "fa3_dense_ms_p90": fa3_ms["p90"] if fa3_ms else None,
        "attn_tflops": flops / t["median"] / 1e9,
    }


def timed(fn):
    ms = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.1, 0.9])
    return {"median": ms[0], "p10": ms[1], "p90": ms[2]}


def gate_compare(label: str, out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    """``(ok, max_abs_err)`` of a gate output against its reference (bf16 tolerance; a NaN left
    in ``out`` fails), logged as one line."""
    err = (out.float() - ref.float()).abs().max().item()
    ok = not out.isnan().any().item() and err < 2e-2
    log(f"gate {label}: max_abs_err={err:.2e} {'ok' if ok else 'FAIL'}")
    return ok, err


def triton_fa3_tail(fa3, q, kv, table, ranking, counts, ctx, block, scale, out, tail_rows, tile=None):
    """The backend's Triton path where FlashAttention exists: the chunk's last ``tail_rows``
    query-block rows (the dense tail) in an FA3 call first (its two small host-to-device copies
    included), then the block-sparse kernel over the other rows."""
    split = ChunkGeometry(ctx, q.shape[0], block).row_token_start(ranking.shape[1] - tail_rows)
    fa3_dense(fa3, q[split:], kv, table, ctx + q.shape[0], scale, out[split:])
    block_sparse_attn(q, kv, table, ranking, counts, out, ctx=ctx, scale=scale, block_size=block, tile=tile,
                      skip_rows=tail_rows)


def gather_call(q, kv, table, ranking, counts, ctx, block, scale, out):
    """The Triton kernel reading the cache as it is (``copy_page=0``; its default tile then
    follows the cache's page size): on pages smaller than a key tile it gathers rows one by one.
    The baseline of the default, which first copies such pages (``default_copy_page``)."""
    block_sparse_attn(q, kv, table, ranking, counts, out, ctx=ctx, scale=scale, block_size=block, copy_page=0)


def correctness_gate(fa3, device, fib: FlashInferBench | None = None) -> list[str]:
    """Returns failures; empty means the kernels may be timed. FlashInfer failures disable
    ``fib`` (logged) instead: they must not stop the Triton and FA3 rows."""
    failures = []
    for name, (hq, hkv, d) in SHAPES.items():
        for page in (16, 128):
            for density in (1.0, 0.2):
                ctx, q_len, block = 8192 + 37, 2048 + 5, 128
                torch.manual_seed(hash((name, page, density)) & 0xFFFF)
                q = torch.randn(q_len, hq, d, device=device, dtype=torch.bfloat16)
                kv, table = make_cache(ctx + q_len, hkv, d, page, torch.bfloat16, device)
                ranking, counts, _ = synthetic_selection(hq, 1, ctx, q_len, block, density, device)
                out = torch.full_like(q, float("nan"))
                block_sparse_attn(q, kv, table, ranking, counts, out, ctx=ctx, scale=d**-0.5, block_size=block)
                k, v = gather_paged_kv(kv, table, ctx + q_len)
                mask = selection_block_mask(ranking, counts, -(-(ctx + q_len) // block))
                ref = block_sparse_attention(q, k, v, ctx, mask, d**-0.5, block)
                where = f"{name:13s} page={page:3d} density={density}"
                ok, err = gate_compare(f"naive     {where}", out, ref)
                if not ok:
                    failures.append(f"naive {name} page {page} density {density}: {err}")
                if default_copy_page(page, block, d, has_tma(q.device)):  # the default copied: the gather path too
                    gather_out = torch.full_like(q, float("nan"))
                    gather_call(q, kv, table, ranking, counts, ctx, block, d**-0.5, gather_out)
                    ok, err = gate_compare(f"gather    {where}", gather_out, ref)
                    if not ok:
                        failures.append(f"gather {name} page {page} density {density}: {err}")
                if fa3 is not None:  # equal budgets, one group: the union is each head's selection
                    union_out = torch.full_like(q, float("nan"))
                    fa3_union(fa3, q, kv, table, ranking, counts, ctx, block, d**-0.5, union_out)
                    ok, err = gate_compare(f"fa3-union {where}", union_out, ref)
                    if not ok:
                        failures.append(f"fa3-union {name} page {page} density {density}: {err}")
                if fib is not None and fib.fi is not None:
                    union = union_block_mask(ranking, counts, ranking.shape[-1]).expand(hq, -1, -1)
                    union_ref = block_sparse_attention(q, k, v, ctx, union, d**-0.5, block)
                    for kernel, backend in FlashInferBench.variants.items():
                        fi_out = torch.full_like(q, float("nan"))
                        try:
                            fib.first_call(backend, q, kv, table, ranking, counts, ctx, block, d**-0.5, fi_out)
                        except Exception as exc:  # noqa: BLE001 - compile or launch failure
                            fib.disable(f"{kernel} {name} page {page}: {type(exc).__name__}: {exc}")
                            break
                        ok, err = gate_compare(f"{kernel} {where}", fi_out, union_ref)
                        if not ok:
                            fib.disable(f"gate {kernel} {name} page {page} density {density}: {err}")
                            break
                if fa3 is not None and density == 1.0:  # the budget's mass from FA3's LSE of the tail
                    from proxyattn_kernels.budget.triton import last_block_mass_paged

                    lse = tail_lse_rows(fa3, q, kv, table, ctx, block, d**-0.5, torch.empty_like(q))
                    two_pass = last_block_mass_paged(q, kv, table, ctx=ctx, scale=d**-0.5, block_size=block)
                    from_lse = last_block_mass_paged(q, kv, table, ctx=ctx, scale=d**-0.5, block_size=block,
                                                     row_lse=lse)
                    err = float((from_lse - two_pass).abs().max())
                    row_sums = float((from_lse.sum(-1) - 1).abs().max())
                    log(f"gate budget-lse {where}: max |mass - two-pass| {err:.2e}, |row sum - 1| {row_sums:.2e}")
                    if not err <= 1e-4 or not row_sums <= 1e-3:
                        failures.append(f"budget-lse {name} page {page}: mass off by {err:.2e}, rows {row_sums:.2e}")
                if fa3 is not None and density == 0.2:  # the dense tail through FA3, the rest Triton
                    t_ranking, t_counts, _ = synthetic_selection(hq, 1, ctx, q_len, block, density, device,
                                                                 TAIL_TOKENS)
                    tail_rows = ChunkGeometry(ctx, q_len, block).num_tail_rows(TAIL_TOKENS)
                    tail_out = torch.full_like(q, float("nan"))
                    triton_fa3_tail(fa3, q, kv, table, t_ranking, t_counts, ctx, block, d**-0.5, tail_out, tail_rows)
                    t_mask = selection_block_mask(t_ranking, t_counts, -(-(ctx + q_len) // block))
                    ok, err = gate_compare(f"fa3-tail  {where}", tail_out,
                                           block_sparse_attention(q, k, v, ctx, t_mask, d**-0.5, block))
                    if not ok:
                        failures.append(f"fa3-tail {name} page {page}: {err}")
                if fa3 is not None and density == 1.0:
                    dense = torch.empty_like(q)
                    fa3_dense(fa3, q, kv, table, ctx + q_len, d**-0.5, dense)
                    ok, err = gate_compare(f"fa3 dense {where}", out, dense)
                    if not ok:
                        failures.append(f"fa3 {name} page {page}: {err}")
    return failures


def try_selection(q, kv, table, ctx, hq, hkv, block, device, row_lse=None):
    """Time the Triton selection (proxy scores + budgets + select) if it is available; with
    ``row_lse`` (the budget rows' LSE from the dense tail's FA3 call, :func:`tail_lse_rows`), also
    the selection and budget stage that take it (as the backend runs them when FlashAttention
    attends the tail first)."""
    try:
        from proxyattn_kernels.selection import select_blocks_paged
    except ImportError as exc:
        log(f"selection kernels unavailable ({exc}); selection_ms left empty")
        return None
    from proxyattn_kernels.budget.triton import head_budgets_paged
    from proxyattn_kernels.proxy_scores.triton import proxy_block_scores_paged
    from proxyattn_kernels.select.triton import select_blocks as select_blocks_triton

    params = ProxyAttnParams(block_size=block, num_groups=ProxyAttnConfig().resolve_num_groups(hq, hkv), min_sparse_len=0,
                             dense_tail_tokens=TAIL_TOKENS)
    scale = q.shape[-1] ** -0.5
    total = timed(lambda: select_blocks_paged(q, kv, table, ctx=ctx, scale=scale, params=params))
    # The three stages alone (where the selection's time goes), each on the same inputs.
    scores = proxy_block_scores_paged(q, kv, table, ctx=ctx, scale=scale, num_groups=params.num_groups,
                                      stride=params.stride, block_size=block)
    budget, _ = head_budgets_paged(q, kv, table, ctx=ctx, scale=scale, block_size=block, gamma=params.gamma,
                                   min_budget_blocks=params.min_budget_blocks, max_blocks=None)
    total["stages_ms"] = {
        "proxy_scores": timed(lambda: proxy_block_scores_paged(
            q, kv, table, ctx=ctx, scale=scale, num_groups=params.num_groups, stride=params.stride,
            block_size=block))["median"],
        "budgets": timed(lambda: head_budgets_paged(
            q, kv, table, ctx=ctx, scale=scale, block_size=block, gamma=params.gamma,
            min_budget_blocks=params.min_budget_blocks, max_blocks=None))["median"],
        "select": timed(lambda: select_blocks_triton(
            scores, budget, ctx, q.shape[0], block, params.sink_blocks, params.local_blocks,
            params.dense_tail_tokens))["median"],
    }
    if row_lse is not None:
        total["stages_ms"]["budgets_from_lse"] = timed(lambda: head_budgets_paged(
            q, kv, table, ctx=ctx, scale=scale, block_size=block, gamma=params.gamma,
            min_budget_blocks=params.min_budget_blocks, max_blocks=None, row_lse=row_lse))["median"]
        total["from_lse_median"] = timed(lambda: select_blocks_paged(
            q, kv, table, ctx=ctx, scale=scale, params=params, row_lse=row_lse))["median"]
    # Host time per call with the GPU left running: when it exceeds the stages' sum, the
    # timed selection waited for its launches (host-bound), which an engine that runs ahead
    # of the GPU would hide.
    total["host_ms"] = host_launch_ms(lambda: select_blocks_paged(q, kv, table, ctx=ctx, scale=scale, params=params))
    log(f"selection {total['median']:.3f} ms (host {total['host_ms']:.3f} ms per call"
        + (f"; {total['from_lse_median']:.3f} with the tail's LSE" if "from_lse_median" in total else "")
        + "): " + ", ".join(f"{k} {v:.3f}" for k, v in total["stages_ms"].items()))
    return total


# budget_tile_sweep: (block_m, block_n, num_warps, num_stages) of the budget's block-LSE pass and
# of the one-pass mass from the tail's LSE, the two-pass default first. The pass is ~60% of the
# selection on the H200 (kernels_h200.json: 0.49 of 0.67 ms for the Llama shape). The defaults
# (BudgetTileConfig) are the sweep's best by the rule: >10% faster at both page sizes.
BUDGET_TILES = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                (128, 128, 4, 2), (128, 128, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3))


def budget_tile_sweep(q, kv, table, ctx, block, tiles=BUDGET_TILES, row_lse=None) -> list[dict]:
    """The per-head block mass (the budget's expensive part) under each tile config of
    ``tiles``, each checked against the first (default) config's mass: a config that computes
    something else is reported, not timed. With ``row_lse`` (the budget rows' LSE from the
    dense tail), each tile's one-pass mass from it too (``from_lse_ms``), checked the same way."""
    from proxyattn_kernels.budget.triton import BudgetTileConfig, last_block_mass_paged

    scale = q.shape[-1] ** -0.5
    rows, reference = [], None
    for bm, bn, warps, stages in tiles:
        tile = BudgetTileConfig(bm, bn, warps, stages)
        row = {"tile": asdict(tile)}
        for key, lse in (("ms", None),) + ((("from_lse_ms", row_lse),) if row_lse is not None else ()):
            def mass_fn(lse=lse, tile=tile):
                return last_block_mass_paged(q, kv, table, ctx=ctx, scale=scale, block_size=block, tile=tile,
                                             row_lse=lse)
            try:
                mass = mass_fn()
                reference = mass if reference is None else reference
                diff = float((mass - reference).abs().max())
                row["max_mass_diff"] = max(row.get("max_mass_diff", 0.0), diff)
                if not diff <= 1e-4:  # a NaN mass is a difference too
                    row[key.replace("ms", "error")] = "mass differs from the default tile's"
                else:
                    row[key] = timed(mass_fn)["median"]
            except Exception as exc:  # noqa: BLE001 - out of resources etc.: report, go on
                row[key.replace("ms", "error")] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        log(f"budget tile {bm}x{bn} w{warps} s{stages}: "
            + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) and k.endswith("ms") else f"{k}: {v}"
                        for k, v in row.items() if k.endswith("ms") or k.endswith("error")))
    return rows


# proxy_tile_sweep: (block_m, block_n, num_warps, num_stages) of the proxy scores' two passes (strided
# queries x strided keys), the default first; the proxy scores are ~0.16 ms of the Llama shape's
# ~0.67 ms selection at 120K of context on the H200 (kernels_h200.json).
PROXY_TILES = ((64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
               (64, 64, 8, 3), (64, 64, 4, 4), (32, 64, 4, 3))


def proxy_tile_sweep(q, kv, table, ctx, block, num_groups, stride, tiles=PROXY_TILES) -> list[dict]:
    """The proxy scores under each tile config of ``tiles``, each checked against the first
    (default) config's scores: a config that computes something else is reported, not timed."""
    from proxyattn_kernels.proxy_scores.triton import ProxyTileConfig, proxy_block_scores_paged

    scale = q.shape[-1] ** -0.5
    rows, reference = [], None
    for bm, bn, warps, stages in tiles:
        tile = ProxyTileConfig(bm, bn, warps, stages)
        row = {"tile": asdict(tile)}

        def scores_fn(tile=tile):
            return proxy_block_scores_paged(q, kv, table, ctx=ctx, scale=scale, num_groups=num_groups,
                                            stride=stride, block_size=block, tile=tile)
        try:
            scores = scores_fn()
            reference = scores if reference is None else reference
            # -inf (blocks past the causal edge) equals -inf; a NaN or a one-sided inf is a difference.
            diff = torch.where(scores == reference, 0.0, (scores - reference).abs())
            row["max_score_diff"] = float(diff.max())
            if not bool((diff <= 1e-4).all()):
                row["error"] = "scores differ from the default tile's"
            else:
                row["ms"] = timed(scores_fn)["median"]
        except Exception as exc:  # noqa: BLE001 - out of resources, a tile that does not nest: report, go on
            row["error"] = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        log(f"proxy tile {bm}x{bn} w{warps} s{stages}: " + (f"{row['ms']:.3f} ms" if "ms" in row else row["error"]))
    return rows


CHUNK_CTXS = (0, 8192, 32768, 122880)  # chunk_costs: where the chunk starts


def with_kv_descale(fa3, num_kv_heads: int, device):
    """``fa3`` called as the backend calls it: with ``k_descale`` / ``v_descale``, the layer's
    scale (1.0) expanded to ``[sequences, Hkv]`` (vLLM's FlashAttentionImpl does the same)."""
    one = torch.ones((), dtype=torch.float32, device=device)

    def call(**kwargs):
        shape = (kwargs["seqused_k"].shape[0], num_kv_heads)
        return fa3(**kwargs, k_descale=one.expand(shape), v_descale=one.expand(shape))
    return call


def chunk_costs(fa3, device, *, shape=SHAPES["llama3.1-8b"], q_len: int = 8192, page: int = 128, block: int = 128,
                ctxs=CHUNK_CTXS, dtype=torch.bfloat16) -> list[dict]:
    """The whole per-layer cost of one sparse chunk at several context lengths, as the backend
    runs it with ``sparse_kernel: "fa3"`` and the TTFT sweep's settings (``max_density`` 0.1,
    the default dense tail): selection, then the union page plan, then the FA3 calls (tail
    first), next to FA3 dense at the same context; and the Triton path's whole cost (selection,
    the tail by FA3, the block-sparse kernel). Llama-3.1-8B shape by default.

    End to end, a fit of the sparse TTFT over 32K-256K has a per-token term ~5% above dense's:
    a cost paid per chunk and layer whatever the context. The rows at small ``ctx`` show it
    (``path_ms`` minus a density-0.1 share of ``fa3_dense_ms``)."""
    from proxyattn_kernels.selection import select_blocks_paged

    hq, hkv, d = shape
    scale = d**-0.5
    params = ProxyAttnParams(block_size=block, num_groups=1, max_density=0.1, dense_tail_tokens=TAIL_TOKENS)
    rows = []
    for ctx in ctxs:
        seq_len = ctx + q_len
        torch.manual_seed(0)
        q = torch.randn(q_len, hq, d, device=device, dtype=dtype)
        kv, table = make_cache(seq_len, hkv, d, page, dtype, device)
        out = torch.empty_like(q)

        def select():
            return select_blocks_paged(q, kv, table, ctx=ctx, scale=scale, params=params)

        def select_and_plan():
            sel = select()
            return union_page_plan(sel.ranking, sel.counts, table, ctx=ctx, q_len=q_len, block_size=block,
                                   page_size=page)

        tail_rows = ChunkGeometry(ctx, q_len, block).num_tail_rows(TAIL_TOKENS)

        def path(q=q, kv=kv, table=table, fa=fa3):  # as the backend: the tail by FA3 first, its LSE
            lse = tail_lse_rows(fa, q, kv, table, ctx, block, scale, out)  # for the budget, the union of the rest
            sel = select_blocks_paged(q, kv, table, ctx=ctx, scale=scale, params=params, row_lse=lse)
            return fa3_union(fa, q, kv, table, sel.ranking, sel.counts, ctx, block, scale, out, TAIL_TOKENS,
                             skip_tail=True)

        # The engine's FA3 calls took ~10% more than this path's at the same contexts (the 128K
        # profile_prefill_h200.json against these rows). What the engine does differently, one at a time:
        # queries as a strided view of the fused QKV output, k/v descale tensors, pages in order.
        qkv = torch.randn(q_len, hq + 2 * hkv, d, device=device, dtype=dtype)
        qkv[:, :hq] = q
        kv_in_order, table_in_order = make_cache(seq_len, hkv, d, page, dtype, device, shuffled=False)
        engine_like = {
            "strided_q": lambda: path(q=qkv[:, :hq]),
            "kv_descale": lambda: path(fa=with_kv_descale(fa3, hkv, device)),
            "pages_in_order": lambda: path(kv=kv_in_order, table=table_in_order),
        }

        def path_before():  # before the one-pass budget: the two-pass mass, the tail from the union plan
            sel = select()
            return fa3_union(fa3, q, kv, table, sel.ranking, sel.counts, ctx, block, scale, out, TAIL_TOKENS)

        def triton_path():  # the default kernel's path: tail rows by FA3 (its LSE to the budget), the rest block-sparse
            lse = tail_lse_rows(fa3, q, kv, table, ctx, block, scale, out)
            sel = select_blocks_paged(q, kv, table, ctx=ctx, scale=scale, params=params, row_lse=lse)
            block_sparse_attn(q, kv, table, sel.ranking, sel.counts, out, ctx=ctx, scale=scale, block_size=block,
                              skip_rows=tail_rows)

        sel = select()
        row = {
            "ctx": ctx, "q_len": q_len, "page_size": page, "hq": hq, "hkv": hkv, "head_dim": d,
            "density": union_density(sel.ranking, sel.counts, ctx, q_len, block),
            "fa3_dense_ms": timed(lambda: fa3_dense(fa3, q, kv, table, seq_len, scale, out))["median"],
            "selection_ms": timed(select)["median"],
            "selection_plan_ms": timed(select_and_plan)["median"],
            "path_ms": timed(path)["median"],
            "path_before_ms": timed(path_before)["median"],
            "path_host_ms": host_launch_ms(path),
            "path_graph_ms": graph_ms(path) if q.is_cuda else None,
            "selection_graph_ms": graph_ms(select) if q.is_cuda else None,
            "triton_path_ms": timed(triton_path)["median"],
            # CUDA-graph replays of path() with one engine difference each (None off CUDA).
            "engine_like_graph_ms": {name: graph_ms(fn) if q.is_cuda else (fn(), None)[1]
                                     for name, fn in engine_like.items()},
        }
        rows.append(row)
        log(f"chunk ctx={ctx:6d}: density {row['density']:.3f}, fa3 dense {row['fa3_dense_ms']:.3f} ms, "
            f"selection {row['selection_ms']:.3f}, +plan {row['selection_plan_ms']:.3f}, whole fa3 path "
            f"{row['path_ms']:.3f} (host {row['path_host_ms']:.3f}, graph replay "
            f"{'-' if row['path_graph_ms'] is None else format(row['path_graph_ms'], '.3f')}; "
            f"before the one-pass budget {row['path_before_ms']:.3f}), "
            f"Triton path {row['triton_path_ms']:.3f}; engine-like graph replays "
            + ", ".join(f"{k} {'-' if v is None else format(v, '.3f')}" for k, v in row["engine_like_graph_ms"].items()))
        del q, kv, out, qkv, kv_in_order
    return rows


def graph_ms(fn) -> float | None:
    """GPU time of ``fn`` without its host launch cost: captured once into a CUDA graph, then the
    replays timed. An engine that runs ahead of the GPU hides host time the same way, so this is
    the per-chunk cost the TTFT sees, where the eager timing of a short, host-bound chunk is
    only an upper bound. None off CUDA, or when ``fn`` cannot be captured (logged)."""
    if not torch.cuda.is_available():
        return None
    try:
        side = torch.cuda.Stream()  # warm-up off the default stream, as capture requires
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay)["median"]
    except Exception as exc:  # noqa: BLE001 - report and keep the eager timings
        log(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); graph timing left empty")
        return None


def host_launch_ms(fn, calls: int = 20) -> float:
    """Host milliseconds per call of ``fn`` without waiting for the device (its launch cost);
    the device is drained before and after, and ``calls`` stays far below the launch queue's
    depth so that no call blocks on a full queue."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls * 1e3
    sync()
    return host


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv``: the arguments, default ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kernels_h200.json",
                    help="JSON file of the results (default: %(default)s)")
    ap.add_argument("--ctx", type=int, default=122880,
                    help="context before the timed chunk, in tokens (default: %(default)s, the last chunk of 128K)")
    ap.add_argument("--q-len", type=int, default=8192, help="queries in the timed chunk (default: %(default)s)")
    ap.add_argument("--sweep", action="store_true", help="also sweep tile configs on the Llama shape")
    ap.add_argument("--only-sweep", action="store_true", help="sweep tile configs, skip the cases and the JSON")
    ap.add_argument("--skip-gate", action="store_true", help="debug only: time without the correctness gate")
    ap.add_argument("--auto-table", metavar="OUT",
                    help="also write the table of sparse_kernel \"auto\" (the format of "
                         "proxyattn_vllm/sparse/auto_table.json) from the density-0.1 cases; needs --union-ratio")
    ap.add_argument("--union-ratio", type=float, metavar="R",
                    help="blocks the union computes over the blocks the heads selected, for one proxy group "
                         "at the target prompt length (benchmarks' union_density): a union kernel is chosen "
                         "where it is more than R times faster than Triton")
    args = ap.parse_args(argv)
    if args.auto_table and not (args.union_ratio and args.union_ratio >= 1.0):
        ap.error(f"--auto-table needs --union-ratio R >= 1 (got {args.union_ratio}): the union/exact block ratio "
                 "of the target model, e.g. 1.18 for one proxy group at 8K tokens")
    return args


#: The kernels of the auto table and the case label (after "SHAPE pageN density0.1") timing each.
AUTO_TABLE_CASES = {"triton": "", "fa3": " fa3-union", "flashinfer": " flashinfer-union"}


def auto_table(cases: list[dict], *, gpu: str, date: str, source: str, union_ratio: float) -> dict:
    """The ``sparse_kernel: "auto"`` table (``proxyattn_vllm/sparse/auto_table.json``) of one
    run's ``cases``: per model shape and page size, the density-0.1 attention times of each
    kernel, and the fastest union kernel where it beats Triton by more than ``union_ratio``
    (the union computes that many more blocks than the heads selected), else "triton"."""
    shapes = []
    by_name = {c["name"]: c for c in cases}
    for c in cases:
        prefix = f"{c['model_shape']} page{c['page_size']} density0.1"
        if c["name"] != prefix:
            continue
        ms = {k: round(by_name[prefix + label]["attn_ms"], 2)
              for k, label in AUTO_TABLE_CASES.items() if prefix + label in by_name}
        unions = {k: v for k, v in ms.items() if k != "triton"}
        best = min(unions, key=unions.get, default=None)
        kernel = best if best is not None and ms["triton"] / unions[best] > union_ratio else "triton"
        shapes.append({"model": c["model_shape"], "head_dim": c["head_dim"], "page_size": c["page_size"],
                       "q_per_kv": c["hq"] // c["hkv"], "kernel": kernel,
                       "why": f"triton / fastest union {ms['triton'] / unions[best]:.2f} vs union ratio {union_ratio}"
                              if best is not None else "no union kernel timed",
                       "attn_ms": ms})
    return {"about": f"sparse_kernel \"auto\": written by benchmarks/bench_kernels.py --auto-table from {source}",
            "gpu": gpu, "date": date[:10], "source": source, "default": "triton", "several_proxy_groups": "triton",
            "union_over_exact": {"one_group": {"given": union_ratio}}, "shapes": shapes}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = "cuda"
    fa3 = load_fa3()
    fib = FlashInferBench()
    if not args.skip_gate:
        failures = correctness_gate(fa3, device, fib)
        if failures:
            log("CORRECTNESS GATE FAILED, no timings: " + "; ".join(failures))
            return 1

    chunk_rows = []
    if not args.only_sweep and fa3 is not None:
        try:
            chunk_rows = chunk_costs(fa3, device)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: never lose the cases to it
            log(f"chunk_costs failed ({type(exc).__name__}: {exc}); the cases follow")
    ctx, q_len, block = args.ctx, args.q_len, 128
    seq_len = ctx + q_len
    cases = []
    sweep = []
    budget_sweep = []
    proxy_sweep = []
    copy_only = []  # the contiguous copy alone, per shape and small page
    for name, (hq, hkv, d) in SHAPES.items():
        for page in (16, 128):
            torch.manual_seed(0)
            q = torch.randn(q_len, hq, d, device=device, dtype=torch.bfloat16)
            kv, table = make_cache(seq_len, hkv, d, page, torch.bfloat16, device)
            scale = d**-0.5
            out = torch.empty_like(q)
            fa3_ms = None
            if fa3 is not None and not args.only_sweep:
                fa3_ms = timed(lambda: fa3_dense(fa3, q, kv, table, seq_len, scale, out))
            # The budget rows' LSE as the backend's dense-tail call returns it, for both below.
            tail_lse = (None if fa3 is None or args.only_sweep else
                        tail_lse_rows(fa3, q, kv, table, ctx, block, scale, torch.empty_like(q)))
            sel_ms = None if args.only_sweep else try_selection(q, kv, table, ctx, hq, hkv, block, device, tail_lse)
            if not args.only_sweep:
                budget_sweep.append({"shape": name, "page_size": page,
                                     "rows": budget_tile_sweep(q, kv, table, ctx, block, row_lse=tail_lse)})
                groups = ProxyAttnConfig().resolve_num_groups(hq, hkv)
                proxy_sweep.append({"shape": name, "page_size": page, "num_groups": groups,
                                    "rows": proxy_tile_sweep(q, kv, table, ctx, block, groups, ProxyAttnParams().stride)})
            # On pages too small for TMA key tiles the kernel reads a contiguous copy by default
            # (block_sparse_attn's copy_page): its rows include the copy; "gather" rows do not copy.
            copy_page = default_copy_page(page, block, d, has_tma(device))
            tile = default_tile_config(block, d, on_cpu=False, page_size=copy_page or page)
            if not args.only_sweep:
                log(f"{name} page{page}: fa3 dense {fa3_ms and fa3_ms['median']}, selection {sel_ms and sel_ms['median']}")

            def add_case(label, kernel, case_tile, density, used, counts, t):
                """One timed case of this shape and page (name prefix, geometry, FA3 and selection)."""
                cases.append(make_case(f"{name} page{page} {label}", kernel, case_tile, shape=(name, hq, hkv, d),
                                       ctx=ctx, q_len=q_len, page=page, block=block, density=density, used=used,
                                       counts=counts, t=t, sel_ms=sel_ms, fa3_ms=fa3_ms))
                # The Triton kernel's contiguous copy (copy_page tokens a page; 0: none), in its time.
                cases[-1]["copy_page"] = copy_page if kernel in ("triton", "triton+fa3-tail") else 0
                log(f"{cases[-1]['name']}: attn {t['median']:.3f} ms")

            def triton_t(ranking, counts, variant, heavy_rows=0):
                return timed(lambda: block_sparse_attn(q, kv, table, ranking, counts, out, ctx=ctx, scale=scale,
                                                       block_size=block, tile=variant, heavy_rows=heavy_rows))

            def triton_fa3_tail_t(ranking, counts, variant, tail_rows):
                return timed(lambda: triton_fa3_tail(fa3, q, kv, table, ranking, counts, ctx, block, scale, out,
                                                     tail_rows, variant))

            def union_t(ranking, counts, tail_tokens=0):
                return timed(lambda: fa3_union(fa3, q, kv, table, ranking, counts, ctx, block, scale, out,
                                               tail_tokens))

            # Default: each head visits its blocks by position; "score-order" is the previous
            # visiting order (by proxy score), kept as an A/B in the same run.
            variants = [(tile, ""), (replace(tile, position_order=False), " score-order")]
            for density, (variant, suffix) in itertools.product(() if args.only_sweep else (1.0, 0.1), variants):
                ranking, counts, used = synthetic_selection(hq, 1, ctx, q_len, block, density, device)
                add_case(f"density{density}{suffix}", "triton", asdict(variant), density, used, counts,
                         triton_t(ranking, counts, variant))
            # Where the default copies: the kernel without the copy (gathering rows from the small
            # pages), and the copy alone.
            for density in () if args.only_sweep or not copy_page else (1.0, 0.1):
                ranking, counts, used = synthetic_selection(hq, 1, ctx, q_len, block, density, device)
                gather_tile = default_tile_config(block, d, on_cpu=False, page_size=page)
                add_case(f"density{density} gather", "triton-gather", asdict(gather_tile), density, used, counts,
                         timed(lambda r=ranking, c=counts: gather_call(q, kv, table, r, c, ctx, block, scale, out)))
                if density == 1.0:
                    copy_only.append({"shape": name, "page_size": page, "copy_page_size": copy_page, "seq_len": seq_len,
                                      "ms": timed(lambda: contiguous_pages(kv, table, seq_len, copy_page))["median"]})
                    log(f"{name} page{page}: contiguous copy alone {copy_only[-1]['ms']:.3f} ms")
            # The dense tail (the default dense_tail_tokens rows compute every causal block): its
            # rows launched first (default) vs in their natural place (last); FA3 in two calls
            # (the tail first, as the backend does) vs one.
            ranking, counts, used = synthetic_selection(hq, 1, ctx, q_len, block, 0.1, device, TAIL_TOKENS)
            heavy = ChunkGeometry(ctx, q_len, block).num_tail_rows(TAIL_TOKENS)
            for heavy_rows, suffix in (() if args.only_sweep else ((heavy, ""), (0, " launched-last"))):
                add_case(f"density0.1 tail{TAIL_TOKENS}{suffix}", "triton", asdict(tile), 0.1, used, counts,
                         triton_t(ranking, counts, tile, heavy_rows))
            if not args.only_sweep and fa3 is not None:
                add_case(f"density0.1 tail{TAIL_TOKENS} fa3-tail", "triton+fa3-tail", asdict(tile), 0.1, used,
                         counts, triton_fa3_tail_t(ranking, counts, tile, heavy))
            for tail, suffix in (() if args.only_sweep or fa3 is None else ((TAIL_TOKENS, ""), (0, " one-call"))):
                add_case(f"density0.1 tail{TAIL_TOKENS} fa3-union{suffix}", "fa3-union", None, 0.1,
                         union_density(ranking, counts, ctx, q_len, block), counts, union_t(ranking, counts, tail))
            # Unequal head budgets (as gamma gives): the union kernel computes the largest head's.
            ranking, counts, used = synthetic_selection(hq, 1, ctx, q_len, block, 0.1, device, spread=SPREAD)
            if not args.only_sweep:
                add_case(f"density0.1 spread{SPREAD}", "triton", asdict(tile), 0.1, used, counts,
                         triton_t(ranking, counts, tile))
            if not args.only_sweep and fa3 is not None:
                add_case(f"density0.1 spread{SPREAD} fa3-union", "fa3-union", None, 0.1,
                         union_density(ranking, counts, ctx, q_len, block), counts, union_t(ranking, counts))
            for density in () if args.only_sweep or fa3 is None else (1.0, 0.1):
                ranking, counts, _ = synthetic_selection(hq, 1, ctx, q_len, block, density, device)
                add_case(f"density{density} fa3-union", "fa3-union", None, density,
                         union_density(ranking, counts, ctx, q_len, block), counts, union_t(ranking, counts))
            # Probes of the union call's per-block cost at density 0.1 (the call alone; see
            # union_call_probes).
            probes = {} if args.only_sweep or fa3 is None else union_call_probes(
                fa3, q, kv, table, ctx, block, scale, out)
            for label, (ranking, counts, fn) in probes.items():
                add_case(f"density0.1 fa3-union {label}", "fa3-union-probe", None, 0.1,
                         union_density(ranking, counts, ctx, q_len, block), counts, timed(fn))
            for (kernel, backend), density in itertools.product(
                () if args.only_sweep else FlashInferBench.variants.items(), (1.0, 0.1)
            ):
                if fib.fi is None:
                    break
                ranking, counts, _ = synthetic_selection(hq, 1, ctx, q_len, block, density, device)
                used = union_density(ranking, counts, ctx, q_len, block)
                args_ = (q, kv, table, ranking, counts, ctx, block, scale, out)
                try:
                    fib.first_call(backend, *args_)
                    t = timed(lambda: fib.run(backend, *args_))
                    prep = timed(lambda: fib.prep(backend, *args_))
                    plan_ms = fib.plan_ms(backend, q, kv, ctx, block, scale)
                except Exception as exc:  # noqa: BLE001 - keep the other rows
                    fib.disable(f"{kernel} {name} page {page}: {type(exc).__name__}: {exc}")
                    break
                case = make_case(f"{name} page{page} density{density} {kernel}", kernel, None,
                                 shape=(name, hq, hkv, d), ctx=ctx, q_len=q_len, page=page, block=block,
                                 density=density, used=used, counts=counts, t=t, sel_ms=sel_ms, fa3_ms=fa3_ms)
                # plan_ms: host time of one plan(). "fa2" pays it once per chunk and step (all layers
                # share it), outside attn_ms; "fa3" pays a sync + a plan inside every layer's attn_ms.
                # prep_ms: the per-layer part of attn_ms before the kernel (GPU timeline, so the
                # "fa3" sync's idle gap is in it): attn_ms - prep_ms is about the kernel alone.
                case.update(flashinfer_backend=backend, plan_ms=plan_ms, plan_per_layer=backend == "fa3",
                            prep_ms=prep["median"])
                cases.append(case)
                log(f"{case['name']}: attn {t['median']:.3f} ms (per-layer prep {prep['median']:.3f} ms"
                    f"{', incl. sync + plan' if backend == 'fa3' else ''}), plan {plan_ms:.3f} ms (host)")
            if args.sweep or args.only_sweep:
                ranking, counts, used = synthetic_selection(hq, 1, ctx, q_len, block, 1.0, device)
                for cfg in sweep_configs(page):
                    try:
                        t = timed(lambda: block_sparse_attn(q, kv, table, ranking, counts, out, ctx=ctx,
                                                            scale=scale, block_size=block, tile=cfg, copy_page=0))
                    except Exception as exc:  # noqa: BLE001 - out of resources etc.
                        log(f"sweep {cfg}: failed ({type(exc).__name__})")
                        continue
                    sweep.append({"shape": name, "page_size": page, "tile": asdict(cfg), "ms": t["median"]})
                    log(f"sweep {name} page={page} {cfg}: {t['median']:.3f} ms")
            del kv, q, out
            torch.cuda.empty_cache()

    if args.only_sweep:
        best = sorted(sweep, key=lambda r: (r["shape"], r["page_size"], r["ms"]))
        for r in best:
            log(f"{r['shape']:13s} page={r['page_size']:3d} {r['ms']:8.3f} ms  {r['tile']}")
        return 0
    try:
        import vllm
        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001
        vllm_version = None
    result = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "vllm": vllm_version,
                     "flashinfer": flashinfer_release.installed_flashinfer_version() if fib.fi is not None else None,
                     "python": platform.python_version(), "cuda": torch.version.cuda},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "timing": "triton.testing.do_bench median (warmup 50 ms, rep 300 ms), CUDA events; p10/p90 spread",
        "density_note": "selected causal blocks / causal blocks over heads and rows (synthetic ranking, "
                        "diagonal+sink forced, per-head budget ceil(density*Kb))",
        "cases": cases,
        "tile_sweep": sweep,
        "budget_tile_sweep": budget_sweep,
        "proxy_tile_sweep": proxy_sweep,
        "contiguous_copy": copy_only,
        "chunk_costs": chunk_rows,
        "flashinfer_first_call_s": fib.first_call_s,
        "flashinfer_skipped": fib.skipped,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    log(f"\nwrote {args.out}  ({result['gpu']}, {result['date']})")
    if args.auto_table:
        table = auto_table(cases, gpu=result["gpu"], date=result["date"], source=args.out, union_ratio=args.union_ratio)
        with open(args.auto_table, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
        log(f"wrote {args.auto_table}: " + ", ".join(f"{e['model']} page{e['page_size']} {e['kernel']}"
                                                     for e in table["shapes"]))
    if fib.first_call_s:
        log("flashinfer first calls (JIT compile): " + ", ".join(f"{k} {v:.1f} s" for k, v in fib.first_call_s.items()))
    header = f"{'case':54s} {'density':>7s} {'attn ms':>8s} {'sel ms':>7s} {'fa3 ms':>8s} {'attn/fa3':>8s} {'TFLOP/s':>8s}"
    log(header)
    for c in cases:
        ratio = c["attn_ms"] / c["fa3_dense_ms"] if c["fa3_dense_ms"] else float("nan")
        sel = f"{c['selection_ms']:.3f}" if c["selection_ms"] is not None else "-"
        fa = f"{c['fa3_dense_ms']:.3f}" if c["fa3_dense_ms"] is not None else "-"
        log(f"{c['name']:54s} {c['density']:7.3f} {c['attn_ms']:8.3f} {sel:>7s} {fa:>8s} {ratio:8.3f} {c['attn_tflops']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
