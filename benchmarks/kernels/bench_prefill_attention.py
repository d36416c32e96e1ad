"""Attention alone over a whole chunked prefill: ProxyAttn (selection + sparse kernel) vs FA3.

The paper's attention speedup, measured as the backend computes it: a prompt of ``L`` tokens
prefilled in 8192-token chunks over a paged cache (pages of 128), Llama-3.1-8B shape (32
layers, 32 query / 8 KV heads, head dim 128, bf16). Per chunk and layer the sparse path is the
backend's own (``proxyattn_vllm.sparse``): the dense tail by FA3 first (its LSE to the budget),
then the selection and the block-sparse kernel ("triton"), the union through FA3 ("fa3"), or one
FA3 call per KV head, with each head over its own blocks ("fa3-heads") or each KV head's query
heads over their union ("fa3-kvheads"), two candidates.
Each head's budget comes from a density profile (``budget_profile``, per layer and head at the
chunk's length, ``benchmarks/profiles/profiles.json``) or from a flat cap (``densityX``:
``max_density`` X, every head the same, the best case). Dense is FA3 over the same chunks; its
cost does not depend on the layer, so one layer's chunks are timed and multiplied by the layer
count (the sparse side times every layer, or every ``--layer-stride``-th, scaled back).

Order: a correctness gate (full density equals FA3 dense to bf16 tolerance, per kernel); then
per length and variant the selection alone (its share of the sparse path's time) and the timed
sums (CUDA events, ``--repeats`` passes, median and range), and an untimed pass that counts the
blocks actually computed (density). Writes JSON and prints
the table last::

    python benchmarks/kernels/bench_prefill_attention.py --lengths 128K,256K \\
        --variants paper-llama8b-gamma0.95,measured-qwen05b-gamma0.95,density0.1 \\
        --out benchmarks/results/prefill_attention_llama8b_h100.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys

import torch
import triton

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, REPO)

from benchmarks.kernels.bench_kernels import (  # noqa: E402
    SHAPES, fa3_dense, fa3_per_head, fa3_per_kv_head, fa3_union, kv_head_union_density, load_fa3, make_cache,
    tail_lse_rows, union_density,
)
from benchmarks.profiles.density_profiles import PROFILES_JSON  # noqa: E402
from proxyattn_kernels import ChunkGeometry, ProxyAttnParams  # noqa: E402
from proxyattn_kernels.block_sparse_attn.triton import default_tile_config  # noqa: E402
from proxyattn_kernels.selection import select_blocks_paged  # noqa: E402

NUM_LAYERS = 32
PAGE = 128
#: "triton-heaviest-first": the Triton kernel launching its programs heaviest first
#: (``TileConfig.launch_heaviest_first``), an A/B of the launch order under unequal budgets.
#: "fa3-heads": FA3 with each head over exactly its own blocks, one call per KV head
#: (``bench_kernels.fa3_per_head``), a candidate against the per-block cost of Triton and the
#: union's extra blocks. "fa3-kvheads": FA3, one call per KV head over the union of its query
#: heads' blocks (``bench_kernels.fa3_per_kv_head``): fewer extra blocks than the all-heads union,
#: key tiles read once per GQA group.
KERNELS = ("triton", "fa3", "triton-heaviest-first", "fa3-heads", "fa3-kvheads")
#: Kernels that compute each head's own blocks (the others, its row's union over heads).
EXACT_KERNELS = ("triton", "triton-heaviest-first", "fa3-heads")
PAPER = {"attention_speedup_up_to": 10.3, "prefill_speedup_up_to": 2.4,
         "source": "ProxyAttn (ICLR 2026), Llama-3.1-8B, abstract and speed figures"}


def log(msg: str) -> None:
    print(msg, flush=True)


def parse_tokens(text: str) -> int:
    text = text.strip().upper()
    return int(float(text[:-1]) * 1024) if text.endswith("K") else int(text)


class Variant:
    """How the heads' budgets are set: a profile's per-layer, per-head fractions, or a flat cap."""

    def __init__(self, name: str, device: str, params: ProxyAttnParams):
        self.name = name
        self.profile = None
        if name.startswith("density"):
            self.params = dataclasses.replace(params, max_density=float(name[len("density"):]))
        else:
            from proxyattn_vllm.budget_profile import BudgetProfile

            self.profile = BudgetProfile.load(str(PROFILES_JSON), name)
            self.params = params
            self.layers = [self.profile.for_layer(layer, 0, self.profile.num_heads, device)
                           for layer in range(NUM_LAYERS)]

    def fraction(self, layer: int, seq_len: int) -> torch.Tensor | None:
        return None if self.profile is None else self.layers[layer].fractions(seq_len)


def sparse_chunk(kernel, fa3, q, kv, table, ctx, scale, params, out, fraction):
    """One layer's attention of one chunk as the backend runs it (tail by FA3 first)."""
    from proxyattn_vllm.sparse.triton import sparse_prefill

    block = params.block_size
    lse = tail_lse_rows(fa3, q, kv, table, ctx, block, scale, out)
    if kernel.startswith("triton"):
        tile = None
        if kernel == "triton-heaviest-first":
            tile = dataclasses.replace(default_tile_config(block, q.shape[-1], False, kv.shape[2]),
                                       launch_heaviest_first=True)
        sparse_prefill(q, kv, table, out, ctx, scale, params, tail_done=True, row_lse=lse, budget_fraction=fraction,
                       tile=tile)
    else:
        sel = select_blocks_paged(q, kv, table, ctx=ctx, scale=scale, params=params, row_lse=lse,
                                  budget_fraction=fraction)
        if kernel == "fa3-heads":
            fa3_per_head(fa3, q, kv, table, sel.ranking, sel.counts, ctx, block, scale, out, params.dense_tail_tokens)
        elif kernel == "fa3-kvheads":
            fa3_per_kv_head(fa3, q, kv, table, sel.ranking, sel.counts, ctx, block, scale, out,
                            params.dense_tail_tokens)
        else:
            fa3_union(fa3, q, kv, table, sel.ranking, sel.counts, ctx, block, scale, out,
                      params.dense_tail_tokens, skip_tail=True)


def chunks(length: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(chunk, length - start)) for start in range(0, length, chunk)]


def time_passes(fn, repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` (one warm-up call first), CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def summary(times: list[float], scale: float = 1.0) -> dict:
    return {"median_ms": round(statistics.median(times) * scale, 2), "min_ms": round(min(times) * scale, 2),
            "max_ms": round(max(times) * scale, 2), "n": len(times)}


def correctness_gate(fa3, device, params) -> list[str]:
    """At full density (every fraction 1) each kernel's chunk equals FA3 dense."""
    hq, hkv, d = SHAPES["llama3.1-8b"]
    ctx, q_len, scale = 3 * 8192 + 200, 8192, d**-0.5
    torch.manual_seed(1)
    q = torch.randn(q_len, hq, d, device=device, dtype=torch.bfloat16)
    kv, table = make_cache(ctx + q_len, hkv, d, PAGE, torch.bfloat16, device)
    ref = fa3_dense(fa3, q, kv, table, ctx + q_len, scale, torch.empty_like(q))
    failures = []
    for kernel in KERNELS:
        out = torch.full_like(q, float("nan"))
        sparse_chunk(kernel, fa3, q, kv, table, ctx, scale, params, out, torch.ones(hq, device=device))
        err = float((out.float() - ref.float()).abs().max())
        log(f"gate {kernel}: max |sparse at full density - FA3 dense| = {err:.4f}")
        if not err < 2e-2:
            failures.append(f"{kernel}: max error {err}")
    return failures


def measure(variant: Variant, length: int, kernel: str, fa3, q, kv, table, scale, args) -> dict:
    """Timed sums over the prompt's chunks and the layers, and the density actually computed."""
    params = variant.params
    layers = range(0, NUM_LAYERS, args.layer_stride)
    out = torch.empty_like(q)

    def whole_prompt():
        for ctx, q_len in chunks(length, args.chunk):
            for layer in layers:
                sparse_chunk(kernel, fa3, q[:q_len], kv, table, ctx, scale, params, out[:q_len],
                             variant.fraction(layer, ctx + q_len))

    times = time_passes(whole_prompt, args.repeats)
    selected = causal = 0.0
    for ctx, q_len in chunks(length, args.chunk):  # untimed: what the kernel computed
        geo = ChunkGeometry(ctx, q_len, params.block_size)
        for layer in layers:
            sel = select_blocks_paged(q[:q_len], kv, table, ctx=ctx, scale=scale, params=params,
                                      budget_fraction=variant.fraction(layer, ctx + q_len))
            rows_causal = float((geo.first_q_block + 1 + torch.arange(geo.num_q_blocks)).sum())
            if kernel in EXACT_KERNELS:
                selected += float(sel.counts.sum()) / sel.counts.shape[0]
            elif kernel == "fa3-kvheads":
                selected += kv_head_union_density(sel.ranking, sel.counts, ctx, q_len, params.block_size,
                                                  kv.shape[1]) * rows_causal
            else:
                selected += union_density(sel.ranking, sel.counts, ctx, q_len, params.block_size) * rows_causal
            causal += rows_causal
    return {**summary(times, args.layer_stride), "density": round(selected / causal, 4)}


def measure_selection(variant: Variant, length: int, fa3, q, kv, table, scale, args) -> dict:
    """The selection alone (proxy scores, budgets and ranking: ``select_blocks_paged`` as the
    backend calls it, with the dense tail's LSE), summed over the prompt's chunks and the layers
    and timed like :func:`measure`: the part of the sparse path that is not attention."""
    params = variant.params
    layers = range(0, NUM_LAYERS, args.layer_stride)
    out = torch.empty_like(q)
    # The tail's LSE depends on the chunk only (every layer reads the same cache here): once, untimed.
    lse = {ctx: tail_lse_rows(fa3, q[:q_len], kv, table, ctx, params.block_size, scale, out[:q_len])
           for ctx, q_len in chunks(length, args.chunk)}

    def whole_prompt():
        for ctx, q_len in chunks(length, args.chunk):
            for layer in layers:
                select_blocks_paged(q[:q_len], kv, table, ctx=ctx, scale=scale, params=params, row_lse=lse[ctx],
                                    budget_fraction=variant.fraction(layer, ctx + q_len))

    return summary(time_passes(whole_prompt, args.repeats), args.layer_stride)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--lengths", default="128K,256K", help="prompt lengths (default: %(default)s)")
    ap.add_argument("--variants", default="paper-llama8b-gamma0.95,measured-qwen05b-gamma0.95,density0.1",
                    help="profile names of profiles.json and/or densityX caps (default: %(default)s)")
    ap.add_argument("--kernels", default=",".join(KERNELS), help="sparse kernels (default: %(default)s)")
    ap.add_argument("--chunk", type=int, default=8192, help="prefill chunk, vLLM's max_num_batched_tokens")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per cell (default: %(default)s)")
    ap.add_argument("--layer-stride", type=int, default=1,
                    help="time every N-th layer and scale by N (default 1: all layers)")
    ap.add_argument("--out", default="benchmarks/results/prefill_attention_llama8b.json")
    args = ap.parse_args(argv)
    device = "cuda"
    fa3 = load_fa3()
    if fa3 is None:
        log("FA3 (vLLM's flash_attn_varlen_func) is needed: run where vLLM is installed")
        return 1
    hq, hkv, d = SHAPES["llama3.1-8b"]
    scale = d**-0.5
    params = ProxyAttnParams(block_size=128, num_groups=1, min_budget_blocks=16, dense_tail_tokens=128)
    failures = correctness_gate(fa3, device, params)
    if failures:
        log("CORRECTNESS GATE FAILED, no timings: " + "; ".join(failures))
        return 1
    lengths = [parse_tokens(x) for x in args.lengths.split(",")]
    variants = [Variant(name, device, params) for name in args.variants.split(",")]
    kernels = args.kernels.split(",")
    result = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "vllm": _vllm_version()},
        "command": shlex.join(["python", "benchmarks/kernels/bench_prefill_attention.py", *(argv or sys.argv[1:])]),
        "shape": {"name": "Llama-3.1-8B", "layers": NUM_LAYERS, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
                  "page_size": PAGE, "chunk": args.chunk, "dtype": "bfloat16"},
        "params": params.__dict__, "layer_stride": args.layer_stride, "paper": PAPER, "rows": [],
    }
    for length in lengths:
        torch.manual_seed(0)
        q = torch.randn(args.chunk, hq, d, device=device, dtype=torch.bfloat16)
        kv, table = make_cache(length, hkv, d, PAGE, torch.bfloat16, device)
        out = torch.empty_like(q)

        def dense_prompt():  # one layer: every chunk against its context
            for ctx, q_len in chunks(length, args.chunk):
                fa3_dense(fa3, q[:q_len], kv, table, ctx + q_len, scale, out[:q_len])

        dense = summary(time_passes(dense_prompt, args.repeats), NUM_LAYERS)
        log(f"{length // 1024}K FA3 dense, {NUM_LAYERS} layers: {dense['median_ms']:.1f} ms")
        for variant in variants:
            selection = measure_selection(variant, length, fa3, q, kv, table, scale, args)
            log(f"{length // 1024}K {variant.name} selection alone: {selection['median_ms']:.1f} ms")
            for kernel in kernels:
                row = measure(variant, length, kernel, fa3, q, kv, table, scale, args)
                row.update(length=length, variant=variant.name, kernel=kernel, fa3_dense=dense,
                           speedup=round(dense["median_ms"] / row["median_ms"], 2), selection=selection,
                           selection_share=round(selection["median_ms"] / row["median_ms"], 3))
                result["rows"].append(row)
                log(f"{length // 1024}K {variant.name} {kernel}: {row['median_ms']:.1f} ms, density "
                    f"{row['density']:.3f}, {row['speedup']:.2f}x FA3")
                _write(args.out, result)
        del q, kv, table, out
        torch.cuda.empty_cache()
    log(format_table(result))
    return 0


def _vllm_version() -> str | None:
    try:
        import vllm
    except ImportError:
        return None
    return vllm.__version__


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


def format_table(result: dict) -> str:
    """One row per length, variant and kernel: summed attention time, the selection's share of
    it, density, speedup."""
    kw = max([len("kernel")] + [len(r["kernel"]) for r in result["rows"]])
    head = (f"{'length':>7} | {'variant':<28} | {'kernel':<{kw}} | {'sparse ms':>9} | {'select %':>8} | "
            f"{'FA3 ms':>9} | {'density':>7} | {'speedup':>7}")
    lines = [f" Attention over a chunked prefill, all layers, {result['gpu']} ".center(len(head), "="), head]
    for r in result["rows"]:
        share = "-" if r.get("selection_share") is None else f"{100 * r['selection_share']:.1f}"
        lines.append(f"{r['length'] // 1024:>6}K | {r['variant']:<28} | {r['kernel']:<{kw}} | {r['median_ms']:>9.1f} | "
                     f"{share:>8} | {r['fa3_dense']['median_ms']:>9.1f} | {r['density']:>7.3f} | {r['speedup']:>6.2f}x")
    lines.append(f"paper: up to {PAPER['attention_speedup_up_to']}x attention, {PAPER['prefill_speedup_up_to']}x prefill")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
