"""Host (CPU) cost of launching the sparse path's per-layer work, on a CUDA GPU.

The engine launches every layer's selection, union plan and attention from Python; on a host
with a slow CPU those launches, not the GPU, bound the short-context chunks (two H200 hosts of
2026-11-29: the "fa3" path took 1.34 ms of host time per call on one and 0.69 ms on the other,
with the same GPU time). This probe splits that host time: a bare Triton launch with few and with many
arguments, a small torch op, and the selection and the union plan as the backend calls them,
each as host milliseconds per call without waiting for the GPU (``bench_kernels.host_launch_ms``);
then a cProfile of the selection's Python, to show where the host time goes.

    python benchmarks/kernels/host_launch_probe.py --out benchmarks/results/host_launch_h200.json

Needs torch and triton only (no vLLM). Prints a table last.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import platform
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.kernels.bench_kernels import host_launch_ms, make_cache, synthetic_selection  # noqa: E402
from proxyattn_kernels import ProxyAttnParams  # noqa: E402
from proxyattn_kernels.block_sparse_attn.triton import head_lists_and_tile_rows  # noqa: E402
from proxyattn_kernels.block_sparse_attn.union_pages import union_page_plan  # noqa: E402
from proxyattn_kernels.selection import select_blocks_paged  # noqa: E402


@triton.jit
def _empty_kernel_4(a, b, n, m, BLOCK: tl.constexpr):
    pass


@triton.jit
def _empty_kernel_24(a0, a1, a2, a3, a4, a5, a6, a7, n0, n1, n2, n3, n4, n5, n6, n7, s0, s1, s2, s3, s4, s5, s6,
                     s7, BLOCK: tl.constexpr, OTHER: tl.constexpr):
    pass


def probes(device: str, ctx: int, q_len: int, page: int) -> dict[str, callable]:
    """The callables to time (each one layer's worth of one kind of launch), Llama-3.1-8B shape."""
    hq, hkv, d, block = 32, 8, 128, 128
    q = torch.randn(q_len, hq, d, device=device, dtype=torch.bfloat16)
    kv, table = make_cache(ctx + q_len, hkv, d, page, torch.bfloat16, device)
    params = ProxyAttnParams(num_groups=1, max_density=0.1)
    row_lse = torch.zeros(hq, min(q_len, block), device=device)
    ranking, counts, _ = synthetic_selection(hq, 1, ctx, q_len, block, 0.1, device)
    bufs = [torch.empty(16, device=device) for _ in range(8)]
    ints = list(range(1, 17))
    return {
        "triton empty kernel, 4 args": lambda: _empty_kernel_4[(1,)](bufs[0], bufs[1], 7, 9, BLOCK=16),
        "triton empty kernel, 24 args": lambda: _empty_kernel_24[(1,)](*bufs, *ints, BLOCK=16, OTHER=2),
        "torch.full (small)": lambda: torch.full((4, 4), float("-inf"), device=device),
        "torch sub (small)": lambda: bufs[0] - bufs[1],
        "selection (select_blocks_paged, row_lse)": lambda: select_blocks_paged(
            q, kv, table, ctx=ctx, scale=d**-0.5, params=params, row_lse=row_lse),
        "union page plan": lambda: union_page_plan(ranking, counts, table, ctx=ctx, q_len=q_len, block_size=block,
                                                   page_size=page),
        "head lists + tile rows": lambda: head_lists_and_tile_rows(ranking, counts, table, block, 64, page, True),
    }


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv``: the arguments, default ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/host_launch_h200.json",
                    help="JSON file of the results (default: %(default)s)")
    ap.add_argument("--calls", type=int, default=200,
                    help="calls timed per probe, in repeats of 20 (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("host_launch_probe: needs a CUDA GPU (the launch path differs under the interpreter)")
        return 2
    rows = []
    for ctx, q_len, page in ((122880, 8192, 128), (0, 8192, 128)):
        for name, fn in probes("cuda", ctx, q_len, page).items():
            fn()  # compile
            torch.cuda.synchronize()
            ms = sorted(host_launch_ms(fn, calls=20) for _ in range(max(1, args.calls // 20)))
            rows.append({"probe": name, "ctx": ctx, "q_len": q_len, "page_size": page,
                         "host_ms_median": ms[len(ms) // 2], "host_ms_min": ms[0], "host_ms_max": ms[-1]})
            print(f"{name:45s} ctx={ctx:6d}: {rows[-1]['host_ms_median'] * 1e3:8.1f} us per call")
    select = probes("cuda", 122880, 8192, 128)["selection (select_blocks_paged, row_lse)"]
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(100):
        select()
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
    result = {
        "gpu": torch.cuda.get_device_name(), "cpu": platform.processor() or platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv),
        "method": "host_launch_ms: 20 calls without waiting for the GPU, device drained before and after; "
                  "median / min / max over repeats",
        "rows": rows,
        "selection_cprofile_100_calls_by_tottime": text.getvalue(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(text.getvalue())
    print(f"{'probe':45s} {'ctx':>6s} {'host us':>8s}")
    for row in rows:
        print(f"{row['probe']:45s} {row['ctx']:6d} {row['host_ms_median'] * 1e3:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
