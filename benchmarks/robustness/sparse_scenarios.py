"""Sparse-path engine scenarios: retrieval prompts through proxyattn's DEFAULT config.

Parts of benchmarks/robustness/gpu_robustness.py (``--parts sparse`` runs all four). Each runs
the same requests twice, on the dense control (``--dense-backend``, vLLM's FLASH_ATTN) first and
then on proxyattn with its default config (only ``--proxyattn-overrides``, and ``min_sparse_len``
lowered to the scenario's shortest long prompt when that is below the default, so the sparse
path runs). Every prompt is a retrieval question about a needle (``The special magic number for
KEY is: NNNNNNN.``) in essay text (benchmarks/robustness/prompts.py), with greedy decoding.

* ``sparse_prefix``: one document of ``--sparse-prefix-tokens`` (default 16589: its whole
  128-token pages end at 16512, inside a 256-token selection block and inside an 8192-token
  chunk) holding ``--sparse-questions`` needles; an engine with prefix caching warms with the
  document alone, then asks one question per needle: each is a cache hit of the document's
  whole pages, computed from there.
* ``sparse_preemption``: ``--sparse-preempt-prompts`` prompts of ``--sparse-preempt-tokens``
  at once, on an engine with an ample KV cache and one with ``--sparse-preempt-cache-prompts``
  prompts' worth of pages (``num_gpu_blocks_override``, admission on the first chunk), where
  requests are preempted and recompute their prompts (prefix caching off).
* ``sparse_chunks``: ``--sparse-chunk-lengths`` prompts on one engine per
  ``--sparse-chunk-sizes`` value of ``max_num_batched_tokens`` (default 2048, 4096, 16384).
* ``sparse_mixed``: ``--sparse-mixed-short`` short prompts (``--sparse-mixed-short-range``
  tokens, ``--sparse-mixed-short-output`` tokens each) and one ``--sparse-mixed-long-tokens``
  prompt in one batch.

Checks (PASS/FAIL, in the JSON's ``checks`` and the summary table): every request of both
configs completes with all its tokens (``ignore_eos``); proxyattn's answer is right wherever
the control's is (the first number of the output is the needle's; INFO when the control
answers none: no evidence either way); no Triton kernel specialization and no torch.compile
frame is compiled during any request of the proxyattn engines (benchmarks/robustness/compiles.py;
the engine's start-up, where proxyattn compiles its kernels, is the warm-up); the sparse path
ran (proxyattn planned sparse chunks); and per scenario: the cache hits are the document's
whole pages and the first sparse chunk starts there; the pressured engine preempted; no
scheduled chunk exceeds ``max_num_batched_tokens``. Reported (INFO): the density the sparse
path used (selected / causal key blocks, ``proxyattn_vllm.stats``, overall and per layer),
per run.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time

from benchmarks.robustness import compiles as compile_counts
from benchmarks.robustness.engines import (
    CONTROL,
    PlanRecorder,
    PreemptionCounter,
    SchedulerRecorder,
    engine_info,
    engine_kwargs,
    greedy,
    proxyattn_default,
    recording_both,
    token_prompts,
    with_engine,
)
from benchmarks.robustness.report import fmt, log
from benchmarks.robustness.prompts import answer_correct, load_essay_ids, retrieval_prompts, shared_document_prompts

PARTS = ("sparse_prefix", "sparse_preemption", "sparse_chunks", "sparse_mixed")
SPARSE = "sparse"
SEED = 20260  # needle values and the short prompts' lengths


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of positive integers")
    return values


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("sparse scenarios (parts " + ", ".join(PARTS) + "; 'sparse' = all four)")
    g.add_argument("--sparse-part-timeout-s", type=float, default=900.0, help="time guard of each sparse part")
    g.add_argument("--sparse-output-tokens", type=int, default=24, help="greedy tokens per retrieval answer")
    g.add_argument("--sparse-prefix-tokens", type=int, default=16384 + 128 + 77,
                   help="sparse_prefix: the shared document (chat head included); not a page multiple")
    g.add_argument("--sparse-questions", type=int, default=4, help="sparse_prefix: needles, one question each")
    g.add_argument("--sparse-preempt-prompts", type=int, default=6, help="sparse_preemption: concurrent prompts")
    g.add_argument("--sparse-preempt-tokens", type=int, default=12000, help="sparse_preemption: tokens per prompt")
    g.add_argument("--sparse-preempt-cache-prompts", type=float, default=2.5,
                   help="sparse_preemption: KV cache of the pressured engine, in prompts")
    g.add_argument("--sparse-chunk-sizes", type=int_list, default=[2048, 4096, 16384],
                   help="sparse_chunks: max_num_batched_tokens of each engine")
    g.add_argument("--sparse-chunk-lengths", type=int_list, default=[16000, 23000, 30000],
                   help="sparse_chunks: prompt tokens")
    g.add_argument("--sparse-mixed-short", type=int, default=32, help="sparse_mixed: short requests")
    g.add_argument("--sparse-mixed-short-range", default="200:800", help="sparse_mixed: LO:HI short prompt tokens")
    g.add_argument("--sparse-mixed-short-output", type=int, default=32, help="sparse_mixed: tokens per short request")
    g.add_argument("--sparse-mixed-long-tokens", type=int, default=32000, help="sparse_mixed: the long prompt")


def expand_parts(names: list[str]) -> list[str]:
    """``sparse`` stands for the four sparse parts."""
    out = []
    for n in names:
        out += list(PARTS) if n == "sparse" else [n]
    return out


def check_args(ap: argparse.ArgumentParser, args) -> None:
    if not any(p in PARTS for p in args.parts):
        return
    try:
        lo, hi = (int(x) for x in args.sparse_mixed_short_range.split(":"))
    except ValueError:
        lo = hi = 0
    if not 0 < lo <= hi:
        ap.error(f"--sparse-mixed-short-range {args.sparse_mixed_short_range!r}: LO:HI with 0 < LO <= HI")
    args.sparse_mixed_short_range = (lo, hi)
    lengths = {"sparse_prefix": [args.sparse_prefix_tokens], "sparse_chunks": args.sparse_chunk_lengths,
               "sparse_mixed": [args.sparse_mixed_long_tokens]}
    longest = max((n for p in args.parts for n in lengths.get(p, [])), default=0)
    if longest + args.sparse_output_tokens > args.max_model_len:
        ap.error(f"sparse prompts of {longest} tokens + --sparse-output-tokens exceed --max-model-len")
    if min(args.sparse_questions, args.sparse_preempt_prompts, args.sparse_output_tokens) < 1 \
            or args.sparse_mixed_short < 0 or args.sparse_preempt_cache_prompts <= 0:
        ap.error("--sparse-questions, --sparse-preempt-prompts, --sparse-output-tokens, "
                 "--sparse-preempt-cache-prompts: positive (--sparse-mixed-short: not negative)")


def sparse_config(args, shortest_long_prompt: int) -> dict:
    """The default config with --proxyattn-overrides; ``min_sparse_len`` lowered to the
    scenario's shortest long prompt when the default would keep it dense."""
    cfg = dict(args.proxyattn_overrides)
    if "min_sparse_len" not in cfg and shortest_long_prompt < int(proxyattn_default("min_sparse_len", 8192)):
        cfg["min_sparse_len"] = shortest_long_prompt
    return cfg


# ---------------------------------------------------------------------------------------------
# Scenarios: prompts and engine runs


def request(prompt: dict, max_tokens: int) -> dict:
    return {**prompt, "max_tokens": max_tokens}


def run_spec(key: str, batches: list[tuple[str, list[dict]]], *, max_model_len: int, prefix_caching: bool = False,
             **extra) -> dict:
    return {"key": key, "batches": batches, "max_model_len": max_model_len, "prefix_caching": prefix_caching,
            "extra": extra}


def scenario_prefix(args, tokenizer, essay_ids) -> tuple[dict, list[dict], int]:
    doc = shared_document_prompts(tokenizer, essay_ids, args.sparse_prefix_tokens, args.sparse_questions,
                                  SEED, args.page_size)
    block = int(proxyattn_default("block_size", 128))
    expected = doc["expected_cached_tokens"]
    info = {"prefix_tokens": doc["prefix_tokens"], "expected_cached_tokens": expected,
            "longest_shared_run": doc["longest_shared_run"], "selection_block": block,
            "hit_ends_mid_selection_block": expected % block != 0, "hit_ends_mid_chunk": expected % args.chunk != 0}
    warm = {"ids": doc["warm"], "key": None, "answer": None}
    out = args.sparse_output_tokens
    runs = [run_spec("cached", [("warm", [request(warm, 1)]),
                                ("questions", [request(p, out) for p in doc["prompts"]])],
                     max_model_len=args.max_model_len, prefix_caching=True)]
    return info, runs, doc["prefix_tokens"]


def scenario_preemption(args, tokenizer, essay_ids) -> tuple[dict, list[dict], int]:
    n, tokens, out = args.sparse_preempt_prompts, args.sparse_preempt_tokens, args.sparse_output_tokens
    prompts = [request(p, out) for p in retrieval_prompts(tokenizer, essay_ids, [tokens] * n, SEED)]
    pages = math.ceil((tokens + out) / args.page_size)
    blocks = max(math.ceil(args.sparse_preempt_cache_prompts * pages), pages + 1)
    max_len = pages * args.page_size
    info = {"pressured_num_gpu_blocks": blocks, "pressured_kv_tokens": blocks * args.page_size,
            "prompt_tokens_sum": n * tokens, "max_model_len": max_len}
    runs = [run_spec("ample", [("all", prompts)], max_model_len=max_len),
            run_spec("pressured", [("all", prompts)], max_model_len=max_len, num_gpu_blocks_override=blocks,
                     scheduler_reserve_full_isl=False)]
    return info, runs, tokens


def scenario_chunks(args, tokenizer, essay_ids) -> tuple[dict, list[dict], int]:
    lengths = args.sparse_chunk_lengths
    prompts = [request(p, args.sparse_output_tokens)
               for p in retrieval_prompts(tokenizer, essay_ids, lengths, SEED, first_index=16)]
    runs = [run_spec(f"chunk{c}", [("all", prompts)], max_model_len=args.max_model_len, max_num_batched_tokens=c)
            for c in args.sparse_chunk_sizes]
    return {"chunk_sizes": args.sparse_chunk_sizes}, runs, min(lengths)


def scenario_mixed(args, tokenizer, essay_ids) -> tuple[dict, list[dict], int]:
    lo, hi = args.sparse_mixed_short_range
    rng = random.Random(SEED)
    short_lengths = [rng.randint(lo, hi) for _ in range(args.sparse_mixed_short)]
    shorts = [request(p, args.sparse_mixed_short_output)
              for p in retrieval_prompts(tokenizer, essay_ids, short_lengths, SEED, first_index=24)]
    long = request(retrieval_prompts(tokenizer, essay_ids, [args.sparse_mixed_long_tokens], SEED,
                                     first_index=23)[0], args.sparse_output_tokens)
    half = len(shorts) // 2
    batch = shorts[:half] + [long] + shorts[half:]  # short requests scheduled before and beside it
    info = {"short_prompt_tokens": short_lengths, "long_prompt_tokens": args.sparse_mixed_long_tokens,
            "long_request_index": half}
    return info, [run_spec("mixed", [("all", batch)], max_model_len=args.max_model_len)], args.sparse_mixed_long_tokens


SCENARIOS = {"sparse_prefix": scenario_prefix, "sparse_preemption": scenario_preemption,
             "sparse_chunks": scenario_chunks, "sparse_mixed": scenario_mixed}


# ---------------------------------------------------------------------------------------------
# Running one engine


class Instruments:
    """The recorders every run of a part shares (entered once per part)."""

    def __enter__(self):
        self.plan, self.scheduled = PlanRecorder().__enter__(), SchedulerRecorder().__enter__()
        self.preempted, self.compiles = PreemptionCounter().__enter__(), compile_counts.CompileCounter().__enter__()
        return self

    def __exit__(self, *exc):
        for inst in (self.compiles, self.preempted, self.scheduled, self.plan):
            inst.__exit__(*exc)


def density_of(lines: list[dict]) -> dict:
    """Selected / causal key blocks of the run's sparse chunks, overall and per layer."""
    from proxyattn_vllm import stats

    overall = stats.overall(lines)
    return {"chunks": overall["chunks"], "density": overall["density"],
            "per_layer": [round(x["density"], 4) for x in stats.summarize(lines)]}


def generate_batch(llm, prompts: list[dict]) -> list[dict]:
    outs = llm.generate(token_prompts([p["ids"] for p in prompts]), [greedy(p["max_tokens"]) for p in prompts],
                        use_tqdm=False)
    rows = []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        rows.append({"prompt_tokens": len(p["ids"]), "max_tokens": p["max_tokens"], "output_tokens": len(c.token_ids),
                     "finish_reason": c.finish_reason, "text": c.text, "key": p.get("key"),
                     "answer": p.get("answer"), "num_cached_tokens": o.num_cached_tokens or 0,
                     "correct": answer_correct(c.text, p["answer"]) if p.get("answer") else None})
    return rows


def run_engine(llm, spec: dict, inst: Instruments, stats_path: str | None) -> dict:
    """Every batch of ``spec`` in order; compiles, plan and scheduled chunks per batch."""
    from proxyattn_vllm import stats

    result = {"engine": engine_info(llm), "batches": []}
    preempted_before = inst.preempted.count
    if stats_path:
        if os.path.exists(stats_path):
            os.remove(stats_path)
        stats.configure(stats_path, mass_heads=0)
    try:
        for label, prompts in spec["batches"]:
            with recording_both(inst.plan, inst.scheduled), inst.compiles.measuring():
                t0 = time.perf_counter()
                rows = generate_batch(llm, prompts)
                seconds = time.perf_counter() - t0
            result["batches"].append({
                "label": label, "seconds": seconds, "rows": rows, "compiles": inst.compiles.summary(),
                "plan": inst.plan.summary(), "scheduled": inst.scheduled.summary(),
                "max_scheduled_q_len": max((q for _, q in inst.scheduled.chunks), default=None)})
    finally:
        if stats_path:
            stats.configure(None)
    result["preemptions"] = inst.preempted.count - preempted_before if inst.preempted.available else None
    result["compiles"] = compile_counts.merge([b["compiles"] for b in result["batches"]])
    result["density"] = density_of(stats.read_lines(stats_path)) if stats_path else None
    return result


def run_scenario(name: str, args, part: dict, write) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    essay_ids = load_essay_ids(tokenizer, args.essays)
    info, runs, shortest = SCENARIOS[name](args, tokenizer, essay_ids)
    configs = {CONTROL: (args.dense_backend, None), SPARSE: ("proxyattn", sparse_config(args, shortest))}
    part.update({**info, "page_size": args.page_size, "max_num_batched_tokens": args.chunk,
                 "requests": {spec["key"]: [len(p["ids"]) for _, ps in spec["batches"] for p in ps] for spec in runs},
                 "configs": {}})
    log(f"{name}: runs {[s['key'] for s in runs]}, proxyattn config {configs[SPARSE][1]}")
    with Instruments() as inst:
        for cfg_name, (backend, cfg) in configs.items():
            res = part["configs"][cfg_name] = {"backend": backend, "proxyattn": cfg, "runs": {}}
            for spec in runs:
                kwargs = engine_kwargs(args, proxyattn=cfg, backend=backend, prefix_caching=spec["prefix_caching"],
                                       max_model_len=spec["max_model_len"], **spec["extra"])
                stats_path = (os.path.join(args.logdir, f"robustness_{name}_{spec['key']}_stats.jsonl")
                              if cfg is not None else None)
                t0 = time.perf_counter()
                run = res["runs"][spec["key"]] = with_engine(kwargs, lambda llm: run_engine(llm, spec, inst, stats_path))
                run["engine_seconds"] = time.perf_counter() - t0
                rows = [r for b in run["batches"] for r in b["rows"]]
                log(f"{name} [{cfg_name}] {spec['key']}: {sum(r['correct'] is True for r in rows)}/"
                    f"{sum(r['answer'] is not None for r in rows)} answers right, compiles "
                    f"{run['compiles']['total']}, preemptions {run['preemptions']}, density "
                    f"{(run['density'] or {}).get('density')} ({run['engine_seconds']:.0f} s)")
                write()
    part["checks"] = judge(name, part)
    write()


# ---------------------------------------------------------------------------------------------
# Verdicts (pure functions of the part's JSON)


def all_rows(run: dict) -> list[dict]:
    return [r for b in run["batches"] for r in b["rows"]]


def completion_check(configs: dict) -> tuple[str, str, str]:
    """Every request of every run (both configs) returned ``max_tokens`` tokens."""
    short = []
    for cfg, res in configs.items():
        for key, run in res["runs"].items():
            rows = all_rows(run)
            bad = sum(r["output_tokens"] != r["max_tokens"] for r in rows)
            if bad:
                short.append(f"{cfg}/{key}: {bad} of {len(rows)}")
    n = sum(len(all_rows(run)) for res in configs.values() for run in res["runs"].values())
    return ("all complete", "FAIL" if short else "PASS",
            f"requests short of their tokens: {'; '.join(short)}" if short else f"{n} requests, all tokens")


def answer_check(control: dict, sparse: dict) -> tuple[str, str, str]:
    """proxyattn right wherever the control is (same run, same request)."""
    right_c = right_s = missed = asked = 0
    misses = []
    for key, run in sparse["runs"].items():
        for i, (c, s) in enumerate(zip(all_rows(control["runs"][key]), all_rows(run))):
            if c["answer"] is None:
                continue
            asked += 1
            right_c += bool(c["correct"])
            right_s += bool(s["correct"])
            if c["correct"] and not s["correct"]:
                missed += 1
                misses.append(f"{key}#{i} {s['key']}={s['answer']} got {s['text'][:30]!r}")
    detail = f"{SPARSE} {right_s}/{asked} right, {CONTROL} {right_c}/{asked}"
    if missed:
        return "answers", "FAIL", f"{detail}; wrong where {CONTROL} is right: {'; '.join(misses[:4])}"
    if right_c == 0:
        return "answers", "INFO", f"{detail}: the control answers none, no evidence either way"
    return "answers", "PASS", detail


def compile_check(control: dict, sparse: dict) -> tuple[str, str, str]:
    """No compile during any request of the proxyattn engines."""
    runs = sparse["runs"].values()
    total = compile_counts.merge([r["compiles"] for r in runs])
    ctrl = compile_counts.merge([r["compiles"] for r in control["runs"].values()])
    detail = (f"{fmt(total['triton_compiles'])} Triton specializations, {fmt(total['dynamo_frames'])} Dynamo "
              f"frames in the requests ({CONTROL}: {fmt(ctrl['total'])})")
    if total["triton_kernels"]:
        detail += "; kernels " + ", ".join(total["triton_kernels"][:6])
    if not total["triton_available"]:
        return "no compiles", "FAIL", detail + "; Triton's compile hook was not available"
    return "no compiles", "PASS" if total["total"] == 0 else "FAIL", detail


def sparse_ran_check(sparse: dict) -> tuple[str, str, str]:
    chunks = {key: sum(b["plan"].get("sparse_chunks") or 0 for b in run["batches"])
              for key, run in sparse["runs"].items()}
    ok = all(chunks.values()) and bool(chunks)
    return ("sparse path ran", "PASS" if ok else "FAIL",
            "sparse chunks planned per run " + ", ".join(f"{k} {v}" for k, v in chunks.items()))


def density_check(sparse: dict) -> tuple[str, str, str]:
    parts = []
    for key, run in sparse["runs"].items():
        d = run.get("density") or {}
        parts.append(f"{key} {fmt(d.get('density'), '.3f')} over {fmt(d.get('chunks'))} chunk-layers")
    return "density", "INFO", "selected / causal key blocks: " + "; ".join(parts)


def scenario_checks(name: str, part: dict) -> list[tuple[str, str, str]]:
    control, sparse = part["configs"][CONTROL], part["configs"][SPARSE]
    out = []
    if name == "sparse_prefix":
        expected = part["expected_cached_tokens"]
        for cfg, res in ((CONTROL, control), (SPARSE, sparse)):
            q = next(b for b in res["runs"]["cached"]["batches"] if b["label"] == "questions")
            hits = sorted({r["num_cached_tokens"] for r in q["rows"]})
            ok = hits == [expected]
            detail = f"{cfg}: cached tokens {hits} (expected {expected})"
            if cfg == SPARSE:
                first = q["plan"].get("min_sparse_ctx")
                ok = ok and first == expected
                detail += (f"; first sparse chunk ctx {fmt(first)} (mid selection block "
                           f"{part['hit_ends_mid_selection_block']}, mid chunk {part['hit_ends_mid_chunk']})")
            out.append((f"cache hits {cfg}", "PASS" if ok else "FAIL", detail))
    elif name == "sparse_preemption":
        for cfg, res in ((CONTROL, control), (SPARSE, sparse)):
            n = res["runs"]["pressured"]["preemptions"]
            out.append((f"preempted {cfg}", "PASS" if n else "FAIL",
                        f"{fmt(n)} preemptions with a KV cache of {part['pressured_kv_tokens']} tokens for "
                        f"{part['prompt_tokens_sum']} prompt tokens"))
    elif name == "sparse_chunks":
        bad = [f"{cfg}/{key}: {b['max_scheduled_q_len']}" for cfg, res in part["configs"].items()
               for key, run in res["runs"].items() for b in run["batches"]
               if b["max_scheduled_q_len"] is None or b["max_scheduled_q_len"] > int(key[len("chunk"):])]
        out.append(("chunk sizes", "FAIL" if bad else "PASS",
                    f"largest scheduled chunk above max_num_batched_tokens: {bad}" if bad else
                    "every scheduled chunk within its engine's max_num_batched_tokens"))
    return out


def judge(name: str, part: dict) -> list[list[str]]:
    """[check, verdict, detail] rows of a sparse part."""
    control, sparse = part["configs"][CONTROL], part["configs"][SPARSE]
    rows = [completion_check(part["configs"]), answer_check(control, sparse), compile_check(control, sparse),
            sparse_ran_check(sparse), *scenario_checks(name, part), density_check(sparse)]
    return [list(r) for r in rows]


def runner(name: str):
    """The part function gpu_robustness runs for ``name``."""
    return lambda args, part, write: run_scenario(name, args, part, write)
