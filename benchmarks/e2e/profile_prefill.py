"""Where one long prefill's GPU time goes inside the engine: one prompt under vLLM's torch
profiler, kernel time summed per category, and the GPU's idle time between kernels.

    python benchmarks/e2e/profile_prefill.py --model /tmp/dummy8b --dummy --prompt-len 262128 \\
        --backend proxyattn --proxyattn-overrides '{"max_density": 0.1, "sparse_kernel": "fa3"}' \\
        --out benchmarks/results/profile_prefill_h200.json

Run it once per backend (``--backend FLASH_ATTN`` for the dense reference; ``--append`` adds to the
same JSON). The kernel benchmark (kernels/bench_kernels.py ``chunk_costs``) times the attention path
alone. This script measures the path inside the engine: the model's other kernels, the other
layers, and the host between steps: a fit of the 256K TTFT put the engine's attention per chunk
10-14% above the sum of the kernel benchmark's parts, and this profile places the excess in the
FA3 calls (results/profile_prefill_h200.json).

The trace itself (tens of MB) stays in ``--trace-dir``; the JSON keeps the summary. Host-side
numbers under the profiler are inflated (CUPTI adds a few microseconds per launch). Kernel
durations are not, and neither is idle time while the GPU runs ahead of the host.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import gzip
import json
import os
import random
import re
import sys
import tempfile
import time

#: Kernel categories, first match wins (regular expressions on the demangled kernel name).
CATEGORIES = (
    ("proxy_scores", r"_proxy_(heads|lse|pool)_kernel"),
    ("budget", r"_block_(lse|mass|mass_from_lse)_kernel|_gamma_budget_kernel"),
    ("select", r"_select_kernel"),
    ("union_plan", r"_union_plan_kernel"),
    ("triton_sparse_attention", r"_block_sparse_attn_kernel|_head_lists_kernel"),
    # Before FlashAttention's: vLLM's cache write is "reshape_and_cache_flash_kernel".
    ("kv_cache_write", r"reshape_and_cache"),
    ("flash_attention", r"flash|Flash|fmha"),
    ("gemm", r"gemm|Gemm|nvjet|xmma|cublas|cutlass"),
)


def categorize(name: str) -> str:
    """The :data:`CATEGORIES` entry of a kernel name, or ``"other"`` (norms, activations, rotary
    embeddings, copies, sampling)."""
    for category, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other"


def summarize_trace(events: list[dict], top: int = 15) -> dict:
    """Kernel time per category, busy and idle GPU time of a chrome trace's ``traceEvents``.

    Busy time is the union of the kernels' intervals over every stream. Idle time is the span
    from the first kernel's start to the last one's end, minus busy time.
    """
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X" and "dur" in e]
    if not kernels:
        raise ValueError("the trace has no GPU kernels (was the profiler's CUDA activity on?)")
    by_category: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        category = categorize(e["name"])
        by_category[category] = by_category.get(category, 0.0) + e["dur"]
        entry = by_name.setdefault(e["name"], [0.0, 0])
        entry[0] += e["dur"]
        entry[1] += 1
    intervals = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    busy, (start, end) = 0.0, intervals[0]
    first = start
    for lo, hi in intervals[1:]:
        if lo > end:
            busy += end - start
            start, end = lo, hi
        else:
            end = max(end, hi)
    busy += end - start
    span = end - first  # the last merged interval ends with the last kernel
    top_kernels = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "kernels": len(kernels),
        "span_ms": span / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "gpu_idle_ms": (span - busy) / 1e3,
        "by_category_ms": {k: v / 1e3 for k, v in sorted(by_category.items(), key=lambda item: -item[1])},
        "top_kernels": [{"name": name[:200], "ms": total / 1e3, "count": count}
                        for name, (total, count) in top_kernels],
    }


def load_trace_events(trace_dir: str) -> list[dict]:
    """``traceEvents`` of the newest worker trace in ``trace_dir`` (``*.pt.trace.json[.gz]``)."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "*.pt.trace.json*")), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.pt.trace.json[.gz] under {trace_dir}: did the profiler write a trace?")
    opener = gzip.open if paths[-1].endswith(".gz") else open
    with opener(paths[-1], "rt") as f:
        return json.load(f)["traceEvents"]


def print_table(runs: list[dict]) -> None:
    categories = sorted({c for run in runs for c in run["profile"]["by_category_ms"]})
    header = f"{'ms':>24} | " + " | ".join(f"{run['backend'][:18]:>18}" for run in runs)
    print(header)
    for key in ("wall_s", "span_ms", "gpu_busy_ms", "gpu_idle_ms"):
        values = [run["wall_s"] * 1e3 if key == "wall_s" else run["profile"][key] for run in runs]
        print(f"{'wall_ms' if key == 'wall_s' else key:>24} | " + " | ".join(f"{v:18.1f}" for v in values))
    for category in categories:
        print(f"{category:>24} | " + " | ".join(f"{run['profile']['by_category_ms'].get(category, 0.0):18.1f}"
                                             for run in runs))


def profile_one(args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    trace_dir = os.path.abspath(args.trace_dir or tempfile.mkdtemp(prefix="proxyattn_profile_"))
    os.makedirs(trace_dir, exist_ok=True)
    kwargs = {"additional_config": {"proxyattn": args.overrides}} if args.backend == "proxyattn" else {}
    llm = LLM(model=args.model, load_format="dummy" if args.dummy else "auto", attention_backend=args.backend,
              dtype="bfloat16", max_model_len=args.max_model_len or args.prompt_len + 64,
              max_num_batched_tokens=args.chunk, block_size=args.block_size, enable_prefix_caching=False,
              gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.eager,
              # No stacks and no key_averages table at stop (slow on a long trace): the summary
              # below reads the kernels from the trace file.
              profiler_config={"profiler": "torch", "torch_profiler_dir": trace_dir,
                               "torch_profiler_with_stack": False, "torch_profiler_dump_cuda_time_total": False,
                               "ignore_frontend": True},
              **kwargs)
    rng = random.Random(0)
    vocab = llm.get_tokenizer().vocab_size if not args.dummy else 250

    def prompt():
        return TokensPrompt(prompt_token_ids=[rng.randrange(3, min(vocab, 30000)) for _ in range(args.prompt_len)])

    params = SamplingParams(temperature=0.0, max_tokens=1)
    llm.generate([prompt()], params, use_tqdm=False)  # warm-up: same length, compiled and cached
    t0 = time.perf_counter()
    llm.generate([prompt()], params, use_tqdm=False)
    unprofiled = time.perf_counter() - t0
    llm.start_profile()
    t0 = time.perf_counter()
    llm.generate([prompt()], params, use_tqdm=False)
    wall = time.perf_counter() - t0
    llm.stop_profile()
    del llm
    summary = summarize_trace(load_trace_events(trace_dir))
    print(f"[{args.backend}] {args.prompt_len} tokens: {unprofiled:.3f} s unprofiled, {wall:.3f} s profiled; "
          f"GPU busy {summary['gpu_busy_ms']:.1f} ms, idle {summary['gpu_idle_ms']:.1f} ms", flush=True)
    return {"backend": args.backend, "prompt_len": args.prompt_len, "overrides": kwargs.get("additional_config"),
            "ttft_unprofiled_s": unprofiled, "wall_s": wall, "trace_dir": trace_dir, "profile": summary}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (a bad ``--proxyattn-overrides`` stops here, not after startup)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="model folder (e.g. one written by dummy_llama.py)")
    ap.add_argument("--dummy", action="store_true", help="random weights (load_format dummy), random token ids")
    ap.add_argument("--backend", default="proxyattn", help="proxyattn or a vLLM backend name, e.g. FLASH_ATTN")
    ap.add_argument("--proxyattn-overrides", default="{}", help="JSON of proxyattn settings")
    ap.add_argument("--prompt-len", type=int, default=131072, help="prompt tokens (default: %(default)s)")
    ap.add_argument("--max-model-len", type=int, default=0, help="default: the prompt length + 64")
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--block-size", type=int, default=128, help="KV page size (the TTFT benchmark's 128)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                    help="vLLM's gpu_memory_utilization (default: %(default)s)")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs or torch.compile (enforce_eager)")
    ap.add_argument("--trace-dir", help="where the profiler writes (default: a new temporary directory)")
    ap.add_argument("--out", required=True, help="JSON file of the summary")
    ap.add_argument("--append", action="store_true", help="add this run to --out's runs")
    args = ap.parse_args(argv)
    try:
        overrides = json.loads(args.proxyattn_overrides)
    except json.JSONDecodeError as exc:
        ap.error(f"--proxyattn-overrides is not JSON ({exc}): {args.proxyattn_overrides!r}")
    if not isinstance(overrides, dict):
        ap.error(f"--proxyattn-overrides must be a JSON object, got {args.proxyattn_overrides!r}")
    args.overrides = overrides
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    report = {"runs": []}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            report = json.load(f)
    import torch

    from benchmarks.e2e.ttft_sweep import versions  # the same version record as the TTFT JSON

    report.update({"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   "versions": versions()})
    report.setdefault("commands", []).append(" ".join(["python"] + sys.argv))
    report["runs"].append(profile_one(args))
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print_table(report["runs"])
    return 0


if __name__ == "__main__":
    # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main())
