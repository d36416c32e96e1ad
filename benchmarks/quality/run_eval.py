"""Quality of ProxyAttn against dense attention: synthetic long-context tasks and fidelity.

Offline (default): for every model, one in-process vLLM ``LLM`` per backend configuration
(dense FLASH_ATTN, or CPU_ATTN without CUDA; then ``proxyattn`` at each ``--gammas`` value), all
samples of one length in one ``generate`` call, greedy, a small ``max_tokens`` per task. The same
prompts (exact token lengths, ``tasks.py``) go to every configuration. Then, unless
``--fidelity-prompts 0``, each engine scores a few plain essay windows per length with prompt
logprobs (``fidelity.py``: top-1 agreement and approximate KL against dense) while
``proxyattn_vllm.stats`` records per-layer selection density and kept attention mass.

Endpoint (``--base-url``): the same prompts against any OpenAI-compatible ``/v1/completions``
server (token-id prompts by default, so lengths stay exact), labelled ``--endpoint-label``.

Output: a JSON file (``cells``: accuracy per model, task, length and configuration, with the
mean selection density measured on that length's prompts; ``fidelity``; ``layer_stats``;
the effective configuration), rewritten after every engine so a cut-short run keeps its
results; a PNG heat map (``--plot-only FILE.json`` redraws it); tables on stdout, accuracy last.

Example (H200, ~8 minutes; see the README of this folder)::

    python benchmarks/quality/run_eval.py \\
        --models qwen05b=/tmp/models/qwen05b,smollm2=/tmp/models/smollm2 \\
        --lengths qwen05b=4096,8192,16384,32768 --lengths smollm2=2048,4096,8192 \\
        --samples 50 --out results/quality.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The engine must run in this process: stats.configure() and the CPU test's patches apply here.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import vllm_engine  # noqa: E402
from benchmarks.quality import fidelity, tasks  # noqa: E402

DEFAULT_TASKS = "niah_multikey,niah_multivalue,variable_tracking,common_words"
DEFAULT_OUT = "benchmarks/results/quality_h200.json"


# --------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="name=path[,name=path...]: HF model folders (the tokenizer too)")
    p.add_argument("--lengths", action="append", default=None,
                   help="prompt lengths in tokens, 'L1,L2' for every model or 'name=L1,L2' for one "
                        "(repeatable; default 4096,8192). Lengths above a model's context minus "
                        "the answer budget are lowered to fit.")
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma list of {', '.join(tasks.TASKS)}")
    p.add_argument("--samples", type=int, default=50, help="samples per task and length")
    p.add_argument("--gammas", default="0.95,0.90", help="proxyattn gamma values (one engine each)")
    p.add_argument("--max-tokens", type=int, default=None, help="cap every task's answer budget")
    p.add_argument("--seed", type=int, default=0, help="seed of the task samples")
    p.add_argument("--haystack", choices=("essay", "noise"), default="essay", help="needle tasks' background")
    p.add_argument("--essay-dir", default=str(tasks.DEFAULT_ESSAY_DIR),
                   help="folder of .txt essays for the haystacks and fidelity windows (default: %(default)s)")
    p.add_argument("--prompt-format", choices=("auto", "chat", "plain"), default="auto",
                   help="auto: the chat template when the tokenizer has one")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results (the PNG goes next to it)")
    p.add_argument("--plot-only", metavar="JSON", help="only draw the heat map of an existing results file")
    p.add_argument("--no-plot", action="store_true", help="do not draw the heat map PNG")

    eng = p.add_argument_group("offline engines")
    eng.add_argument("--dense-backend", default="auto", help="auto: FLASH_ATTN with CUDA, else CPU_ATTN")
    eng.add_argument("--min-sparse-len", type=int, default=1024,
                     help="proxyattn min_sparse_len (the product default 8192 would leave 2K/4K dense)")
    eng.add_argument("--proxyattn-config", default="{}", help="extra proxyattn keys as JSON")
    eng.add_argument("--variant", action="append", default=[], metavar="LABEL=JSON",
                     help="one more proxyattn engine after the --gammas ones, with these keys on top of "
                          "--proxyattn-config (gamma: the first --gammas value unless given), e.g. "
                          "'dl0={\"dense_layers\": [0]}' (repeatable; labels must be unique)")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                     help="vLLM gpu_memory_utilization of each engine (default: %(default)s)")
    eng.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                     help="vLLM kv_cache_memory_bytes of each engine, instead of the utilization")
    eng.add_argument("--kv-cache-dtype", default="auto",
                     help="vLLM kv_cache_dtype of every engine, dense and proxyattn alike (e.g. fp8)")
    eng.add_argument("--no-dense", action="store_true",
                     help="skip the dense engine (its cells come from an earlier run of the same prompts: "
                          "join them with merge.py); fidelity rows then carry density and kept mass only")
    eng.add_argument("--keep-going", action="store_true",
                     help="run the other configurations when an engine fails to start (default: stop)")
    eng.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                     help="skip torch.compile and CUDA graphs (engine start in seconds; default on)")
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192,
                     help="vLLM chunk size, tokens per step (default: %(default)s)")
    eng.add_argument("--max-num-seqs", type=int, default=None, help="vLLM max_num_seqs (default: vLLM's)")
    eng.add_argument("--kv-block-size", type=int, default=128, help="vLLM page size")
    eng.add_argument("--dtype", default="auto", help="model dtype (default: the model's)")
    eng.add_argument("--fidelity-prompts", type=int, default=2, help="essay windows per length (0: off)")
    eng.add_argument("--fidelity-logprobs", type=int, default=20, help="top-K of the prompt logprobs")
    eng.add_argument("--stats-mass-heads", type=int, default=4, help="heads per layer for the kept mass")
    eng.add_argument("--stats-dir", default=None, help="keep the raw PROXYATTN_STATS JSONL files here")

    ep = p.add_argument_group("OpenAI-compatible endpoint instead of offline engines")
    ep.add_argument("--base-url", default=None, help="e.g. http://localhost:8000/v1")
    ep.add_argument("--endpoint-model", default=None, help="served model name (default: the first of /models)")
    ep.add_argument("--endpoint-label", default="endpoint", help="'backend' recorded for its cells")
    ep.add_argument("--endpoint-gamma", type=float, default=None, help="'gamma' recorded for its cells")
    ep.add_argument("--endpoint-text", action="store_true", help="send prompt text instead of token ids")
    ep.add_argument("--concurrency", type=int, default=32, help="requests in flight at once")
    args = p.parse_args(argv)
    if not args.plot_only and not args.models:
        p.error("--models is required (unless --plot-only)")
    return args


def parse_models(spec: str) -> dict[str, str]:
    models = {}
    for item in spec.split(","):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--models: expected name=path, got {item!r}")
        models[name.strip()] = path.strip()
    return models


def parse_lengths(specs: list[str] | None, models: dict[str, str]) -> dict[str, list[int]]:
    lengths = {name: [4096, 8192] for name in models}
    shared_seen = False
    for spec in specs or []:
        name, sep, values = spec.rpartition("=")
        parsed = sorted({int(v) for v in values.split(",") if v.strip()})
        if sep:
            if name not in models:
                raise SystemExit(f"--lengths: unknown model {name!r} (models: {', '.join(models)})")
            lengths[name] = parsed
        elif not shared_seen:
            shared_seen = True
            for model in models:
                lengths[model] = parsed
    return lengths


def model_context(path: str) -> int | None:
    """``max_position_embeddings`` of an HF model folder (None if unknown)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("max_position_embeddings") or config.get("text_config", {}).get("max_position_embeddings")


# --------------------------------------------------------------------------------------------
# Results file


class Results:
    """The JSON document, rewritten after every engine."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.doc = {
            "gpu": _device_name(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
            "models": {},
            "config": {},
            "cells": [],
            "fidelity": [],
            "layer_stats": [],
            "timings": [],
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1))
        tmp.replace(self.path)

    def timing(self, what: str, seconds: float) -> None:
        self.doc["timings"].append({"what": what, "seconds": round(seconds, 2)})
        print(f"[quality] {what}: {seconds:.1f} s", flush=True)


def _device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return f"cpu ({platform.machine()})"


# --------------------------------------------------------------------------------------------
# Offline engines


def engine_configs(args: argparse.Namespace, on_cuda: bool) -> list[dict]:
    """Dense first with CUDA. Without CUDA proxyattn runs first: vLLM's CPU_ATTN switches the
    process-wide KV-cache layout to HND, and proxyattn is meant to run on the default NHD."""
    dense_backend = args.dense_backend if args.dense_backend != "auto" else ("FLASH_ATTN" if on_cuda else "CPU_ATTN")
    extra = json.loads(args.proxyattn_config)
    dense = {"label": "dense", "backend": dense_backend, "gamma": None, "proxyattn": None}
    gammas = [float(x) for x in args.gammas.split(",") if x.strip()]
    sparse = [
        {
            "label": f"proxyattn-{g:g}", "backend": "proxyattn", "gamma": g,
            "proxyattn": {**extra, "gamma": g, "min_sparse_len": args.min_sparse_len},
        }
        for g in gammas
    ]
    for label, keys in parse_variants(args.variant):
        config = {**extra, "gamma": gammas[0] if gammas else 0.95, "min_sparse_len": args.min_sparse_len, **keys}
        sparse.append({"label": label, "backend": "proxyattn", "gamma": config["gamma"], "proxyattn": config})
    labels = [c["label"] for c in sparse]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--variant labels must differ from each other and from the gamma engines "
                         f"(proxyattn-<gamma>); got {labels}")
    if args.no_dense:
        if not sparse:
            raise SystemExit("--no-dense leaves nothing to run: give --gammas or --variant")
        return sparse
    return [dense] + sparse if on_cuda else sparse + [dense]


def parse_variants(specs: list[str]) -> list[tuple[str, dict]]:
    """``['label={"key": value}', ...]`` -> ``[(label, {key: value}), ...]`` with clear errors."""
    variants = []
    for spec in specs:
        label, sep, text = spec.partition("=")
        if not sep or not label.strip():
            raise SystemExit(f"--variant must be LABEL=JSON, e.g. 'dl0={{\"dense_layers\": [0]}}'; got {spec!r}")
        try:
            keys = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--variant {label}: the keys are not JSON ({exc}): {text!r}") from exc
        if not isinstance(keys, dict):
            raise SystemExit(f"--variant {label}: expected a JSON object of proxyattn keys; got {text!r}")
        variants.append((label.strip(), keys))
    return variants


def effective_proxyattn(config: dict) -> dict:
    """The resolved proxyattn configuration (defaults filled in) as recorded in the JSON."""
    from proxyattn_vllm import ProxyAttnConfig

    return ProxyAttnConfig.from_dict(config).to_dict()


def make_llm(path: str, cfg: dict, args: argparse.Namespace, max_model_len: int):
    from vllm import LLM

    kwargs = dict(
        model=path, tokenizer=path, dtype=args.dtype, max_model_len=max_model_len,
        enable_prefix_caching=False, enable_chunked_prefill=True,
        max_num_batched_tokens=args.max_num_batched_tokens,
        gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
        block_size=args.kv_block_size, seed=args.seed, attention_backend=cfg["backend"],
        distributed_executor_backend="uni", max_logprobs=max(20, args.fidelity_logprobs),
    )
    if cfg["proxyattn"] is not None:
        kwargs["additional_config"] = {"proxyattn": cfg["proxyattn"]}
    if args.kv_cache_memory_bytes:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_memory_bytes
    if args.kv_cache_dtype != "auto":
        kwargs["kv_cache_dtype"] = args.kv_cache_dtype
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    return LLM(**kwargs)


def wait_for_gpu_memory(fraction: float, timeout_s: float = 60.0, settle_s: float = 6.0) -> None:
    """Wait while an earlier engine or process is still releasing the GPU: until ``fraction`` of
    it is free (vLLM's start-up requirement), the free memory has not grown for ``settle_s``, or
    ``timeout_s``. On the H200 a shut-down in-process engine left ~70 GiB that only the next
    engine's start released, so waiting longer than the memory keeps moving buys nothing."""
    import torch

    if not torch.cuda.is_available():
        return
    t0 = time.time()
    free, total = torch.cuda.mem_get_info()
    last_growth = t0
    while free < fraction * total and time.time() - t0 < timeout_s and time.time() - last_growth < settle_s:
        time.sleep(1.0)
        now_free, total = torch.cuda.mem_get_info()
        if now_free > free + (1 << 28):  # 256 MiB
            last_growth = time.time()
        free = max(free, now_free)
    if free < fraction * total:
        print(f"[quality] {free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB free after {time.time() - t0:.0f} s "
              f"(not growing); starting anyway: vLLM fails with a clear error if it does not fit "
              f"(nvidia-smi shows what holds the GPU)", flush=True)


def free_engine(llm=None) -> None:
    """Shut ``llm`` down (if it started) and release what it held, so the next engine of this
    process fits (``benchmarks/common/vllm_engine.py``: deleting it is not enough)."""
    if llm is not None:
        vllm_engine.shut_down(llm)
    else:
        vllm_engine.release_memory()
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"[quality] GPU memory free after teardown: {free / 2**30:.1f} / {total / 2**30:.1f} GiB", flush=True)


def run_offline(args, models, lengths_by_model, results: Results) -> None:
    import torch
    from vllm import SamplingParams

    from proxyattn_vllm import stats

    on_cuda = torch.cuda.is_available()
    configs = engine_configs(args, on_cuda)
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    stats_dir = Path(args.stats_dir or tempfile.mkdtemp(prefix="proxyattn_quality_stats_"))
    stats_dir.mkdir(parents=True, exist_ok=True)
    results.doc["config"].update({
        "mode": "offline",
        "engine": {
            "enforce_eager": args.enforce_eager, "max_num_batched_tokens": args.max_num_batched_tokens,
            "enable_prefix_caching": False, "enable_chunked_prefill": True,
            "gpu_memory_utilization": args.gpu_memory_utilization, "block_size": args.kv_block_size,
            "dtype": args.dtype,
        },
        "backends": [
            {"label": c["label"], "backend": c["backend"], "gamma": c["gamma"],
             "proxyattn": None if c["proxyattn"] is None else effective_proxyattn(c["proxyattn"])}
            for c in configs
        ],
        "fidelity": {"prompts_per_length": args.fidelity_prompts, "top_k": args.fidelity_logprobs,
                     "stats_mass_heads": args.stats_mass_heads, "text": "essay windows, plain"},
    })

    # All prompts first (tokenizer work, before any engine holds the GPU).
    prepared = {}
    for name, path in models.items():
        prepared[name] = prepare_model(name, path, lengths_by_model[name], task_names, args, results)
    results.save()

    for name, path in models.items():
        samples, fid_prompts, max_model_len = prepared[name]
        lengths = sorted({s.length for s in samples})
        fid_logprobs: dict[str, list] = {}
        for cfg in configs:
            t0 = time.time()
            wait_for_gpu_memory(args.gpu_memory_utilization)
            try:
                llm = make_llm(path, cfg, args, max_model_len)
            except Exception as exc:
                record_error(results, name, cfg, "engine start", exc)
                free_engine()
                if not args.keep_going:  # without its dense twin a sparse cell compares to nothing
                    results.save()
                    raise SystemExit(f"[quality] stopped: {name} {cfg['label']} did not start "
                                     f"(--keep-going runs the other configurations anyway)") from exc
                continue
            results.timing(f"{name} {cfg['label']}: engine start", time.time() - t0)
            try:
                sparse = cfg["proxyattn"] is not None
                for length in lengths:
                    batch = [s for s in samples if s.length == length]
                    stats_path = stats_dir / f"{name}_{cfg['label']}_{length}_tasks.jsonl"
                    stats_path.unlink(missing_ok=True)
                    if sparse:
                        stats.configure(stats_path, mass_heads=0)
                    t0 = time.time()
                    outputs = llm.generate(
                        [{"prompt_token_ids": s.prompt_token_ids} for s in batch],
                        [SamplingParams(temperature=0.0, max_tokens=answer_budget(s.max_tokens, args)) for s in batch],
                    )
                    stats.configure(None)
                    results.timing(f"{name} {cfg['label']} {length}: {len(batch)} prompts", time.time() - t0)
                    density = stats.overall(stats.read_lines(stats_path))["density"] if sparse else None
                    add_cells(results, name, cfg, batch, [o.outputs[0].text for o in outputs], density)
                if fid_prompts:
                    t0 = time.time()
                    fid_logprobs[cfg["label"]] = run_fidelity(
                        llm, fid_prompts, args, stats_dir, name, cfg, results
                    )
                    results.timing(f"{name} {cfg['label']}: fidelity", time.time() - t0)
            except Exception as exc:
                record_error(results, name, cfg, "generate", exc)
            finally:
                stats.configure(None)
                t0 = time.time()
                free_engine(llm)
                del llm
                results.timing(f"{name} {cfg['label']}: engine teardown", time.time() - t0)
            if fid_prompts:
                add_fidelity(results, name, configs, fid_prompts, fid_logprobs)
            results.save()


def record_error(results, model, cfg, stage, exc) -> None:
    import traceback

    traceback.print_exc()
    results.doc.setdefault("errors", []).append(
        {"model": model, "label": cfg["label"], "stage": stage, "error": f"{type(exc).__name__}: {exc}"}
    )
    print(f"[quality] {model} {cfg['label']}: {stage} failed, continuing: {exc}", flush=True)


def answer_budget(max_tokens: int, args) -> int:
    return max_tokens if args.max_tokens is None else min(max_tokens, args.max_tokens)


def prepare_model(name, path, lengths, task_names, args, results):
    """Tokenizer, exact-length samples and fidelity prompts of one model."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long prompts exceed model_max_length on purpose
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(path)
    context = model_context(path)
    budget = max(answer_budget(tasks.TASKS[t].max_tokens, args) for t in task_names)
    if context:
        fitted = sorted({min(length, context - budget) for length in lengths})
        if fitted != sorted(lengths):
            print(f"[quality] {name}: lengths {lengths} -> {fitted} (context {context} - answer budget {budget})")
        lengths = fitted
    chat = {"auto": None, "chat": True, "plain": False}[args.prompt_format]
    haystack = tasks.Haystack(args.haystack, Path(args.essay_dir))
    samples = tasks.generate_samples(
        tokenizer, task_names, lengths, args.samples, seed=args.seed, haystack=haystack, chat=chat
    )
    fid = []
    if args.fidelity_prompts > 0 and args.base_url is None:
        fid = fidelity.fidelity_prompts(
            tokenizer, lengths, args.fidelity_prompts, seed=args.seed, essay_dir=args.essay_dir
        )
    max_model_len = max(lengths) + budget
    if context:
        max_model_len = min(max_model_len, context)
    results.doc["models"][name] = {
        "path": path, "lengths": lengths, "max_model_len": max_model_len,
        "prompt_format": tasks.PromptFormat(tokenizer, chat).name, "context": context,
    }
    results.doc["config"].update({
        "tasks": {t: {"max_tokens": answer_budget(tasks.TASKS[t].max_tokens, args), "about": tasks.TASKS[t].description} for t in task_names},
        "samples": args.samples, "seed": args.seed, "haystack": args.haystack,
        "scoring": "fraction of expected answers in the output, case-insensitive whole tokens",
        "decoding": "greedy (temperature 0)",
        "density": "mean over the sparse prefill chunks (all layers) of that length's prompts, all tasks together",
    })
    results.timing(f"{name}: {len(samples)} prompts + {len(fid)} fidelity prompts generated", time.time() - t0)
    return samples, fid, max_model_len


def add_cells(results, model, cfg, batch, texts, density) -> None:
    by_task: dict[str, list[float]] = {}
    for sample, text in zip(batch, texts, strict=True):
        by_task.setdefault(sample.task, []).append(tasks.score(text, sample.answers))
    for task, scores in by_task.items():
        results.doc["cells"].append({
            "model": model, "task": task, "length": batch[0].length, "backend": cfg["backend"],
            "label": cfg["label"], "gamma": cfg["gamma"], "accuracy": sum(scores) / len(scores),
            "n": len(scores), "density": density,
        })


def run_fidelity(llm, prompts, args, stats_dir, model, cfg, results) -> list:
    """Prompt logprobs of every fidelity prompt; per-layer stats for proxyattn engines."""
    from vllm import SamplingParams

    from proxyattn_vllm import stats

    params = SamplingParams(
        temperature=0.0, max_tokens=1, prompt_logprobs=args.fidelity_logprobs,
        flat_logprobs=True, detokenize=False,
    )
    converted = []
    for length in sorted({length for length, _ in prompts}):
        batch = [ids for l, ids in prompts if l == length]
        stats_path = stats_dir / f"{model}_{cfg['label']}_{length}_fidelity.jsonl"
        stats_path.unlink(missing_ok=True)
        if cfg["proxyattn"] is not None:
            stats.configure(stats_path, mass_heads=args.stats_mass_heads)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in batch], params, use_tqdm=False)
        stats.configure(None)
        converted.extend(
            fidelity.from_vllm(o.prompt_logprobs, ids, args.fidelity_logprobs) for o, ids in zip(outputs, batch)
        )
        for row in stats.summarize(stats.read_lines(stats_path)):
            results.doc["layer_stats"].append({
                "model": model, "label": cfg["label"], "gamma": cfg["gamma"], "length": length, **row,
            })
    return converted


def add_fidelity(results, model, configs, prompts, logprobs) -> None:
    """Fidelity rows of every proxyattn config measured so far, per length: agreement with dense
    (once dense ran; ``None`` under ``--no-dense``), density and kept mass."""
    done = {(r["model"], r["label"]) for r in results.doc["fidelity"]}
    dense = logprobs.get("dense")
    has_dense = any(cfg["proxyattn"] is None for cfg in configs)
    for cfg in configs:
        if cfg["proxyattn"] is None or cfg["label"] not in logprobs or (model, cfg["label"]) in done:
            continue
        if has_dense and dense is None:
            continue  # CPU order (sparse first): wait for the dense twin
        for length in sorted({length for length, _ in prompts}):
            idx = [i for i, (l, _) in enumerate(prompts) if l == length]
            if dense is None:
                row = dict.fromkeys(("top1_agreement", "mean_kl", "nll_dense", "nll_sparse"))
                row["positions"] = int(sum(len(logprobs[cfg["label"]][i].token_logprobs) for i in idx))
            else:
                row = fidelity.compare([dense[i] for i in idx], [logprobs[cfg["label"]][i] for i in idx])
            layer_rows = [r for r in results.doc["layer_stats"]
                          if r["model"] == model and r["label"] == cfg["label"] and r["length"] == length]
            results.doc["fidelity"].append({
                "model": model, "label": cfg["label"], "gamma": cfg["gamma"], "length": length,
                "prompts": len(idx), **row,
                "density": _mean([r["density"] for r in layer_rows]),
                "kept_mass": _mean([r["kept_mass"] for r in layer_rows if r["kept_mass"] is not None]),
            })


def _mean(values):
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint


def run_endpoint(args, models, lengths_by_model, results: Results) -> None:
    task_names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    base = args.base_url.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    served = args.endpoint_model or _get_json(f"{base}/models", headers)["data"][0]["id"]
    cfg = {"label": args.endpoint_label, "backend": args.endpoint_label, "gamma": args.endpoint_gamma}
    results.doc["config"].update({"mode": "endpoint", "base_url": base, "served_model": served,
                                  "prompt": "text" if args.endpoint_text else "token ids"})
    for name, path in models.items():
        samples, _, _ = prepare_model(name, path, lengths_by_model[name], task_names, args, results)

        def complete(sample):
            body = {
                "model": served, "max_tokens": answer_budget(sample.max_tokens, args), "temperature": 0.0,
                "prompt": sample.prompt if args.endpoint_text else sample.prompt_token_ids,
            }
            return _post_json(f"{base}/completions", body, headers)["choices"][0]["text"]

        t0 = time.time()
        with ThreadPoolExecutor(args.concurrency) as pool:
            texts = list(_progress(pool.map(complete, samples), len(samples), f"{name} @ {base}"))
        results.timing(f"{name} endpoint: {len(samples)} prompts", time.time() - t0)
        for length in sorted({s.length for s in samples}):
            idx = [i for i, s in enumerate(samples) if s.length == length]
            add_cells(results, name, cfg, [samples[i] for i in idx], [texts[i] for i in idx], None)
        results.save()


def _get_json(url, headers):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as r:
        return json.load(r)


def _post_json(url, body, headers):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=3600) as r:
        return json.load(r)


def _progress(iterable, total, desc):
    """tqdm if installed, else a line every 10%."""
    try:
        from tqdm import tqdm
    except ImportError:
        step = max(1, total // 10)
        for i, item in enumerate(iterable, 1):
            if i % step == 0 or i == total:
                print(f"[quality] {desc}: {i}/{total}", flush=True)
            yield item
        return
    yield from tqdm(iterable, total=total, desc=desc)


# --------------------------------------------------------------------------------------------
# Plot and tables


def plot(doc: dict, png_path: str | Path) -> None:
    """Heat map of accuracy: one panel per (model, configuration), tasks x lengths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(
            "matplotlib is needed for the heat map: pip install matplotlib, then "
            f"python benchmarks/quality/run_eval.py --plot-only <results.json> ({exc})"
        ) from exc
    cells = doc["cells"]
    if not cells:
        print(f"[quality] no accuracy cells to plot; {png_path} not written", flush=True)
        return
    models = list(dict.fromkeys(c["model"] for c in cells))
    labels = list(dict.fromkeys(c["label"] for c in cells))
    fig, axes = plt.subplots(
        len(models), len(labels), figsize=(3.2 * len(labels) + 1, 2.6 * len(models) + 0.6), squeeze=False
    )
    image = None
    for row, model in enumerate(models):
        task_names = list(dict.fromkeys(c["task"] for c in cells if c["model"] == model))
        lengths = sorted({c["length"] for c in cells if c["model"] == model})
        for col, label in enumerate(labels):
            ax = axes[row][col]
            grid = [[math.nan] * len(lengths) for _ in task_names]
            for c in cells:
                if c["model"] == model and c["label"] == label:
                    grid[task_names.index(c["task"])][lengths.index(c["length"])] = c["accuracy"]
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            for i, values in enumerate(grid):
                for j, value in enumerate(values):
                    if not math.isnan(value):
                        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if value < 0.6 else "black")
            ax.set_xticks(range(len(lengths)), [f"{length // 1024}K" if length >= 1024 else str(length) for length in lengths])
            ax.set_yticks(range(len(task_names)), task_names if col == 0 else [""] * len(task_names), fontsize=8)
            ax.set_title(f"{model} / {label}", fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(f"ProxyAttn vs dense: task accuracy ({doc.get('gpu', '')}, {doc.get('date', '')[:10]})", fontsize=10)
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"[quality] heat map: {png_path}")


def summarize(doc: dict) -> list[dict]:
    """Per model and sparse configuration, the quality-target numbers: mean accuracy over the task x
    length cells that both it and dense have (points, 0-100), the worst cell's drop, the mean
    density over those cells and the mean kept dense attention mass of the fidelity rows that
    ran sparse (a length below ``min_budget_tokens`` computes every block and keeps all mass)."""
    rows = []
    for model in dict.fromkeys(c["model"] for c in doc["cells"]):
        dense = {(c["task"], c["length"]): c["accuracy"] for c in doc["cells"]
                 if c["model"] == model and c["gamma"] is None}
        for label in dict.fromkeys(c["label"] for c in doc["cells"] if c["model"] == model and c["gamma"] is not None):
            cells = [c for c in doc["cells"] if c["model"] == model and c["label"] == label
                     and (c["task"], c["length"]) in dense]
            if not cells:
                continue
            drops = [100 * (dense[(c["task"], c["length"])] - c["accuracy"]) for c in cells]
            worst = max(range(len(cells)), key=lambda i: drops[i])
            kept = [f["kept_mass"] for f in doc.get("fidelity", [])
                    if f["model"] == model and f["label"] == label and f.get("kept_mass") is not None
                    and (f.get("density") is None or f["density"] < 0.999)]
            rows.append({
                "model": model, "label": label, "gamma": cells[0]["gamma"], "cells": len(cells),
                "dense_mean": 100 * _mean([dense[(c["task"], c["length"])] for c in cells]),
                "sparse_mean": 100 * _mean([c["accuracy"] for c in cells]),
                "mean_drop": _mean(drops),
                "worst_drop": drops[worst], "worst_cell": f"{cells[worst]['task']} @ {cells[worst]['length']}",
                "density": _mean([c["density"] for c in cells if c["density"] is not None]),
                "kept_mass": _mean(kept),
            })
    return rows


def print_summary(rows: list[dict]) -> None:
    print("\nSummary (points; targets at gamma 0.95: mean drop <= 1.0, worst cell <= 5, kept >= 0.95)")
    print(f"{'model':<10} {'config':<16} {'dense':>6} {'sparse':>6} {'drop':>6} {'worst':>6}  {'worst cell':<26} {'density':>7} {'kept':>6}")
    for r in rows:
        print(f"{r['model']:<10} {r['label']:<16} {r['dense_mean']:>6.2f} {r['sparse_mean']:>6.2f} {r['mean_drop']:>6.2f} "
              f"{r['worst_drop']:>6.1f}  {r['worst_cell']:<26} {_fmt(r['density']):>7} {_fmt(r['kept_mass']):>6}")


def print_tables(doc: dict) -> None:
    if doc["fidelity"]:
        print("\nFidelity vs dense (essay windows; KL on the top-K support, see fidelity.py)")
        print(f"{'model':<10} {'config':<16} {'length':>6} {'top1':>6} {'KL':>8} {'nll d/s':>13} {'density':>8} {'kept':>6}")
        for r in doc["fidelity"]:
            nll = f"{_fmt(r.get('nll_dense'))}/{_fmt(r.get('nll_sparse'))}"
            print(f"{r['model']:<10} {r['label']:<16} {r['length']:>6} {_fmt(r.get('top1_agreement')):>6} "
                  f"{_fmt(r.get('mean_kl'), 4):>8} {nll:>13} {_fmt(r.get('density')):>8} {_fmt(r.get('kept_mass')):>6}")
    labels = list(dict.fromkeys(c["label"] for c in doc["cells"]))
    print("\nAccuracy (density of the sparse configs in brackets)")
    print(f"{'model':<10} {'task':<18} {'length':>6} " + " ".join(f"{label:>20}" for label in labels))
    keys = list(dict.fromkeys((c["model"], c["task"], c["length"]) for c in doc["cells"]))
    for model, task, length in sorted(keys, key=lambda k: (k[0], k[2], k[1])):
        row = []
        for label in labels:
            cell = next((c for c in doc["cells"] if (c["model"], c["task"], c["length"], c["label"]) == (model, task, length, label)), None)
            if cell is None:
                row.append(f"{'-':>20}")
            else:
                extra = f" [{cell['density']:.2f}]" if cell["density"] is not None else ""
                row.append(f"{cell['accuracy']:.3f} (n={cell['n']}){extra}".rjust(20))
        print(f"{model:<10} {task:<18} {length:>6} " + " ".join(row))
    print_summary(summarize(doc))


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())
        plot(doc, Path(args.plot_only).with_suffix(".png"))
        print_tables(doc)
        return doc
    models = parse_models(args.models)
    lengths = parse_lengths(args.lengths, models)
    results = Results(args.out)
    t0 = time.time()
    if args.base_url:
        run_endpoint(args, models, lengths, results)
    else:
        run_offline(args, models, lengths, results)
    results.timing("total", time.time() - t0)
    results.save()
    print(f"[quality] results: {results.path}")
    if not args.no_plot:
        try:
            plot(results.doc, results.path.with_suffix(".png"))
        except SystemExit as exc:  # no matplotlib: the JSON is saved, draw it later
            print(f"[quality] {exc}")
    print_tables(results.doc)
    return results.doc


if __name__ == "__main__":
    main()
