"""The prefix-caching and preemption parts: greedy tokens of a run with a cache hit (or under
preemption) against the same requests without (with an ample KV cache), per config.

Configs (:data:`CONFIGS`): the dense control (``dense_fa``: vLLM's own backend, run first),
proxyattn at full density (with 128- and 256-token selection blocks) and the default sparse
config. The prompts are token ids, so that shared prefixes are exact. Judged by
benchmarks/robustness/greedy.py (full density and the control; sparse: INFO).
"""
from __future__ import annotations

import math
import statistics
import time

from benchmarks.robustness import gpu_backend_check as gbc
from benchmarks.robustness.engines import (
    CONTROL, PlanRecorder, PreemptionCounter, SchedulerRecorder, counter_delta, counters, engine_info,
    engine_kwargs, greedy, proxyattn_default, recording_both, token_prompts, with_engine)
from benchmarks.robustness.greedy import (
    ALLOWED_EXTRA_FRACTION, agreement, compare_rows, control_stats, greedy_verdict, margins_of, max_gap,
    runner_ups_of)
from benchmarks.robustness.prompts import load_essay_ids, prefix_layout, special_prefix, take_tokens
from benchmarks.robustness.report import fmt, log

FULL = dict(gbc.FULL_DENSITY["proxyattn"])  # gamma 1, no minimum budget, sparse from 1024
# Configs of the prefix and preemption parts: a proxyattn config ({} is the default, sparse
# one), or None for the dense control, vLLM's own backend (--dense-backend, FLASH_ATTN), which
# runs the same procedure first: how often bf16 alone flips a greedy token there.
CONFIGS = {
    CONTROL: None,
    "full": FULL,
    "full_block256": {**FULL, "block_size": 256},
    "sparse": {},
}
QUESTIONS = (
    "In one sentence, what is the main point of the text above?",
    "Which person is mentioned first in the text above?",
    "List three topics the text above discusses.",
    "What advice does the author give, in a few words?",
    "Is the tone of the text above optimistic or pessimistic? Explain briefly.",
    "Summarize the last paragraph above in one sentence.",
    "What question does the author try to answer?",
    "Name one example the author uses and what it illustrates.",
)
SUFFIX_TEMPLATE = "\n\nQuestion: {}\nAnswer:"
TIMING_SLICE_TOKENS = 24  # essay tokens that make each timing prompt's suffix unique


def proxyattn_config(args, name: str) -> dict | None:
    """The proxyattn config of ``name`` with --proxyattn-overrides; None for the dense control."""
    if CONFIGS[name] is None:
        return None
    return {**CONFIGS[name], **args.proxyattn_overrides}


def config_backend(args, name: str) -> str:
    return args.dense_backend if CONFIGS[name] is None else "proxyattn"


def default_block_size() -> int:
    """ProxyAttn's default selection block (tokens)."""
    return int(proxyattn_default("block_size", 128))


def identity_expected(config: dict | None) -> bool:
    """Full density (gamma 1, no minimum budget) must reproduce dense attention; so must the
    dense control (None) itself (both up to bf16 near-ties, see greedy_verdict)."""
    if config is None:
        return True
    return (config.get("gamma") == 1.0 and config.get("min_budget_tokens") == 0
            and not config.get("max_density"))


# ---------------------------------------------------------------------------------------------
# Prompts (token ids, so that shared prefixes are exact)


def build_prefix_prompts(tokenizer, essay_ids: list[int], prefix_tokens: int, questions,
                         timing_count: int, page: int) -> dict:
    """The prefix part's prompts: ``warm`` (the prefix alone), ``compare`` (prefix + each
    question) and ``timing`` (prefix + an essay slice of its own + the first question; the first
    one is an untimed warm-up), with what prefix caching should give them."""
    head = special_prefix(tokenizer)
    prefix = head + take_tokens(essay_ids, 0, prefix_tokens - len(head))
    suffixes = [tokenizer.encode(SUFFIX_TEMPLATE.format(q), add_special_tokens=False) for q in questions]
    compare = [prefix + s for s in suffixes]
    slices = [take_tokens(essay_ids, prefix_tokens + 997 * (j + 1), TIMING_SLICE_TOKENS)
              for j in range(timing_count)]
    timing = [prefix + piece + suffixes[0] for piece in slices]
    layout = prefix_layout(prefix, compare + timing, page)
    return {"warm": prefix, "compare": compare, "timing": timing, **layout}


def build_long_prompts(tokenizer, essay_ids: list[int], count: int, tokens: int) -> list[list[int]]:
    """``count`` different prompts of exactly ``tokens`` tokens: an essay slice and a question."""
    head = special_prefix(tokenizer)
    tail = tokenizer.encode(SUFFIX_TEMPLATE.format(QUESTIONS[0]), add_special_tokens=False)
    body = tokens - len(head) - len(tail)
    if body < 1:
        raise ValueError(f"prompts of {tokens} tokens are too short for the question")
    return [head + take_tokens(essay_ids, (i * 7919) % len(essay_ids), body) + tail for i in range(count)]


# ---------------------------------------------------------------------------------------------
# Greedy rows of a batch


def generate_rows(llm, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    outs = llm.generate(token_prompts(prompts), greedy(max_tokens, logprobs=2), use_tqdm=False)
    return [{"tokens": list(o.outputs[0].token_ids), "margins": margins_of(o.outputs[0].logprobs),
             "runner_ups": runner_ups_of(o.outputs[0].logprobs),
             "token_logprobs": sampled_logprobs(o.outputs[0].token_ids, o.outputs[0].logprobs),
             "finish_reason": o.outputs[0].finish_reason, "prompt_tokens": len(o.prompt_token_ids),
             "num_cached_tokens": o.num_cached_tokens or 0} for o in outs]


def sampled_logprobs(token_ids, logprobs) -> list[float | None]:
    return [step[t].logprob if t in step else None for t, step in zip(token_ids, logprobs or [])]


def time_first_token(llm, prompt: list[int]) -> tuple[float, int]:
    """Wall time of a one-request generate with max_tokens=1, and its cached tokens."""
    t0 = time.perf_counter()
    out = llm.generate(token_prompts([prompt]), greedy(1), use_tqdm=False)[0]
    return time.perf_counter() - t0, out.num_cached_tokens or 0


# ---------------------------------------------------------------------------------------------
# Part 1: prefix caching


def run_prefix_engine(llm, prompts: dict, args, recorder: PlanRecorder,
                      scheduled: SchedulerRecorder | None = None) -> dict:
    """Warm with the prefix alone, compare on the suffixed prompts, then time single requests."""
    result = {"engine": engine_info(llm)}
    t, cached = time_first_token(llm, prompts["warm"])
    result["warm"] = {"seconds": t, "num_cached_tokens": cached}
    before = counters(llm)
    with recording_both(recorder, scheduled):
        t0 = time.perf_counter()
        rows = generate_rows(llm, prompts["compare"], args.prefix_output_tokens)
        result["compare_seconds"] = time.perf_counter() - t0
    result["counters"] = counter_delta(before, counters(llm)) if before else {}
    result["plan"] = recorder.summary()
    result["scheduled"] = scheduled.summary() if scheduled else {"available": False}
    result["rows"] = rows
    time_first_token(llm, prompts["timing"][0])  # untimed: the first single request of its kind
    timed = [time_first_token(llm, p) for p in prompts["timing"][1:]]
    result["ttft"] = {"seconds": [s for s, _ in timed], "median_s": statistics.median(s for s, _ in timed),
                      "num_cached_tokens": [c for _, c in timed]}
    return result


def summarize_prefix_config(res: dict, expected_cached: int, block_size: int | None) -> dict:
    """Outputs vs the reference, hits, first-chunk ctx and the TTFT ratio of one config.
    ``block_size`` None: the dense control (no selection blocks, no sparse chunks: the first
    chunk's ctx is the scheduler's)."""
    ref, hit = res["uncached"], res["cached"]
    rows = compare_rows(ref["rows"], hit["rows"])
    length = len(ref["rows"][0]["tokens"]) if ref["rows"] else 0
    cached = [r["num_cached_tokens"] for r in hit["rows"]]
    scheduled_ctx = hit.get("scheduled", {}).get("min_prefill_ctx")
    min_ctx = hit["plan"].get("min_sparse_ctx") if block_size is not None else scheduled_ctx
    uncached_s, cached_s = ref["ttft"]["median_s"], hit["ttft"]["median_s"]
    out = {
        "rows": rows, **agreement(rows, length), "max_abs_logprob_diff": max_gap(rows),
        "num_cached_tokens": cached,
        "hits_as_expected": all(c == expected_cached for c in cached)
        and all(c == expected_cached for c in hit["ttft"]["num_cached_tokens"]),
        "reference_had_no_hits": all(r["num_cached_tokens"] == 0 for r in ref["rows"]),
        "first_chunk_ctx": min_ctx, "first_chunk_ctx_scheduled": scheduled_ctx,
        "first_chunk_ctx_is_cached_prefix": min_ctx == expected_cached if min_ctx is not None else None,
        "cached_part_ends_mid_selection_block": expected_cached % block_size != 0 if block_size else None,
        "ttft_uncached_s": uncached_s, "ttft_cached_s": cached_s,
        "ttft_speedup": uncached_s / cached_s if cached_s else None,
    }
    return out


def run_prefix(args, part: dict, write) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    essay_ids = load_essay_ids(tokenizer, args.essays)
    prompts = build_prefix_prompts(tokenizer, essay_ids, args.prefix_tokens,
                                   QUESTIONS[:args.prefix_prompts],
                                   args.timing_repeats + 1, args.page_size)
    expected = prompts["expected_cached_tokens"]
    part.update({k: prompts[k] for k in ("prefix_tokens", "expected_cached_tokens",
                                         "prefix_ends_mid_page", "longest_shared_run", "prompt_tokens")})
    part.update({"page_size": args.page_size, "max_num_batched_tokens": args.chunk,
                 "output_tokens": args.prefix_output_tokens, "configs": {}})
    part["greedy_rule"] = greedy_rule(args)
    log(f"prefix: {prompts['prefix_tokens']} shared tokens, {len(prompts['compare'])} questions, "
        f"expected cache hit {expected} tokens; configs {args.prefix_configs}")
    with PlanRecorder() as recorder, SchedulerRecorder() as scheduled:
        for name in args.prefix_configs:
            res = part["configs"][name] = new_config_result(args, name)
            cfg, backend = res["proxyattn"], res["backend"]
            for caching in (False, True):
                key = "cached" if caching else "uncached"
                t0 = time.perf_counter()
                kwargs = engine_kwargs(args, proxyattn=cfg, backend=backend, prefix_caching=caching,
                                       max_model_len=args.max_model_len)
                res[key] = with_engine(kwargs, lambda llm: run_prefix_engine(llm, prompts, args, recorder,
                                                                             scheduled))
                res[key]["engine_seconds"] = time.perf_counter() - t0
                log(f"prefix [{name}] caching {'on' if caching else 'off'}: ttft median "
                    f"{res[key]['ttft']['median_s'] * 1e3:.1f} ms, cached tokens "
                    f"{[r['num_cached_tokens'] for r in res[key]['rows']]}, first sparse ctx "
                    f"{res[key]['plan'].get('min_sparse_ctx')}, first scheduled prefill ctx "
                    f"{res[key]['scheduled'].get('min_prefill_ctx')} ({res[key]['engine_seconds']:.0f} s)")
                write()
            block = None if cfg is None else int(cfg.get("block_size", default_block_size()))
            res["summary"] = summarize_prefix_config(res, expected, block)
            s = judge_greedy(args, part, name, res)
            log(f"prefix [{name}]: {s['identical']}/{s['n']} identical to caching off: "
                f"{s['greedy']['verdict']} ({s['greedy']['reason']}); first differences (position, "
                f"margin ref/other) {diff_list(s['greedy'])}; hits as expected "
                f"{s['hits_as_expected']}; TTFT {s['ttft_uncached_s'] * 1e3:.1f} -> "
                f"{s['ttft_cached_s'] * 1e3:.1f} ms ({fmt(s['ttft_speedup'], '.1f')}x)")
            write()


def greedy_rule(args) -> dict:
    """The greedy-token rule, recorded next to the verdicts."""
    return {"control": CONTROL, "control_backend": args.dense_backend,
            "near_tie_margin": args.near_tie_margin, "allowed_extra_fraction": ALLOWED_EXTRA_FRACTION,
            "rule": "full density and the control: PASS when every first divergence from the reference "
                    "is a near-tie (top-1/top-2 logprob margin <= near_tie_margin in both runs, the "
                    "other run's token the reference's runner-up) and the config diverges on at most "
                    "max(1, ceil(allowed_extra_fraction * n)) more requests than the control; FAIL "
                    "otherwise. Sparse: INFO."}


def new_config_result(args, name: str) -> dict:
    cfg = proxyattn_config(args, name)
    return {"backend": config_backend(args, name), "proxyattn": cfg, "identity_expected": identity_expected(cfg)}


def judge_greedy(args, part: dict, name: str, res: dict) -> dict:
    """Adds the greedy-token verdict (against the control run earlier in this part) to
    ``res["summary"]`` and returns the summary."""
    s = res["summary"]
    s["backend"] = res.get("backend")
    control = None if name == CONTROL else control_stats(part["configs"].get(CONTROL, {}).get("summary"))
    s["greedy"] = greedy_verdict(s["rows"], identity_expected=res["identity_expected"],
                                 tol=args.near_tie_margin, control=control, is_control=name == CONTROL)
    return s


def diff_list(greedy: dict) -> list[tuple]:
    return [(d["position"], d["reference_margin"], d["other_margin"]) for d in greedy["first_differences"]]


# ---------------------------------------------------------------------------------------------
# Part 2: preemption and recompute


def run_batch(llm, prompts: list[list[int]], max_tokens: int, recorder: PlanRecorder,
              preempted: PreemptionCounter, scheduled: SchedulerRecorder | None = None,
              proxyattn: bool = True) -> dict:
    """Prefill tokens computed: the scheduler's count (every backend), else proxyattn's plan."""
    before, start_count = counters(llm), preempted.count
    with recording_both(recorder, scheduled):
        t0 = time.perf_counter()
        rows = generate_rows(llm, prompts, max_tokens)
        seconds = time.perf_counter() - t0
    delta = counter_delta(before, counters(llm)) if before else {}
    planned = recorder.prefill_tokens if recorder.available and proxyattn else None
    counted = scheduled.prefill_tokens if scheduled is not None and scheduled.available else None
    return {"engine": engine_info(llm), "seconds": seconds, "rows": rows,
            "preemptions": preempted.count - start_count if preempted.available else None,
            "preemptions_metric": delta.get("vllm:num_preemptions"),
            "prefill_tokens_computed": counted if counted is not None else planned,
            "prefill_tokens_planned": planned,
            "plan": recorder.summary(), "scheduled": scheduled.summary() if scheduled else {"available": False}}


def summarize_preemption_config(res: dict, max_tokens: int) -> dict:
    ample, pressured = res["ample"], res["pressured"]
    rows = compare_rows(ample["rows"], pressured["rows"])
    prompt_sum = sum(r["prompt_tokens"] for r in pressured["rows"])
    complete = lambda run: sum(len(r["tokens"]) == max_tokens for r in run["rows"])  # noqa: E731
    kv = pressured["engine"].get("kv_cache_tokens")
    computed = pressured["prefill_tokens_computed"]
    return {
        "rows": rows, **agreement(rows, max_tokens), "max_abs_logprob_diff": max_gap(rows),
        "completed_pressured": complete(pressured), "completed_ample": complete(ample), "n": len(rows),
        "preemptions": pressured["preemptions"], "preemptions_metric": pressured["preemptions_metric"],
        "preemptions_ample": ample["preemptions"],
        "prompt_tokens_sum": prompt_sum, "kv_cache_tokens": kv,
        "cache_smaller_than_prompts": kv < prompt_sum if kv else None,
        "prefill_tokens_computed": computed,
        "recomputed_tokens": computed - prompt_sum if computed is not None else None,
    }


def run_preemption(args, part: dict, write) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    prompts = build_long_prompts(tokenizer, load_essay_ids(tokenizer, args.essays),
                                 args.preempt_prompts, args.preempt_prompt_tokens)
    out_tokens = args.preempt_output_tokens
    page = args.page_size
    pages_per_request = math.ceil((args.preempt_prompt_tokens + out_tokens) / page)
    max_model_len = pages_per_request * page
    blocks = max(math.ceil(args.preempt_cache_prompts * pages_per_request), pages_per_request + 1)
    part.update({"prompts": len(prompts), "prompt_tokens": args.preempt_prompt_tokens,
                 "output_tokens": out_tokens, "page_size": page, "max_model_len": max_model_len,
                 "max_num_batched_tokens": args.chunk, "pressured_num_gpu_blocks": blocks,
                 "pressured_admission": "first chunk (scheduler_reserve_full_isl=False)",
                 "prefix_caching": False, "configs": {}})
    part["greedy_rule"] = greedy_rule(args)
    log(f"preemption: {len(prompts)} x {args.preempt_prompt_tokens} tokens, pressured cache "
        f"{blocks} pages of {page} ({blocks * page} tokens); configs {args.preempt_configs}")
    with PlanRecorder() as recorder, PreemptionCounter() as preempted, SchedulerRecorder() as scheduled:
        for name in args.preempt_configs:
            res = part["configs"][name] = new_config_result(args, name)
            cfg, backend = res["proxyattn"], res["backend"]
            runs = (("ample", {}),
                    ("pressured", {"num_gpu_blocks_override": blocks, "scheduler_reserve_full_isl": False}))
            for key, extra in runs:
                t0 = time.perf_counter()
                kwargs = engine_kwargs(args, proxyattn=cfg, backend=backend, prefix_caching=False,
                                       max_model_len=max_model_len, **extra)
                res[key] = with_engine(kwargs, lambda llm: run_batch(llm, prompts, out_tokens, recorder,
                                                                     preempted, scheduled, cfg is not None))
                res[key]["engine_seconds"] = time.perf_counter() - t0
                log(f"preemption [{name}] {key}: {res[key]['seconds']:.1f} s, preemptions "
                    f"{res[key]['preemptions']} (metric {res[key]['preemptions_metric']}), prefill "
                    f"tokens computed {res[key]['prefill_tokens_computed']}, KV cache "
                    f"{res[key]['engine'].get('kv_cache_tokens')} tokens")
                write()
            res["summary"] = summarize_preemption_config(res, out_tokens)
            s = judge_greedy(args, part, name, res)
            log(f"preemption [{name}]: {s['completed_pressured']}/{s['n']} completed under pressure, "
                f"{s['identical']}/{s['n']} identical to the ample run: {s['greedy']['verdict']} "
                f"({s['greedy']['reason']}); first differences (position, margin ref/other) "
                f"{diff_list(s['greedy'])}; {s['preemptions']} preemptions, "
                f"{s['recomputed_tokens']} tokens recomputed")
            write()
