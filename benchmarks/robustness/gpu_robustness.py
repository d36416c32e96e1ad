"""GPU robustness checks of the proxyattn backend (prefix caching, preemption, the sparse path, a soak), one command:

    python3 benchmarks/robustness/gpu_robustness.py --model /tmp/models/qwen05b --essays .essays \
        --out robustness.json [--parts prefix,preemption,sparse,soak] [--soak-s 120] \
        [--gpu-memory-utilization 0.12]

1. ``prefix``: a shared prefix of ``--prefix-tokens`` essay tokens (default 16589: not
   a multiple of the 128-token page, and 129 whole pages, so the cached part ends inside the
   prefix and, with 256-token selection blocks, in the middle of a selection block) followed by
   different questions. For each config (``dense_fa``: vLLM's FLASH_ATTN, the dense control, run
   first; proxyattn at full density; full density with 256-token selection blocks; the default
   sparse config) one engine with prefix caching off (the reference) and one with it on: a
   warming request with the prefix alone, then the suffixed requests, whose only prefill chunk
   then starts at ctx = the cached pages. Reported: greedy tokens vs the reference per prompt
   (first difference and both runs' top-1/top-2 logprob margins there: bf16 near-ties can flip a
   token; see the verdict below), the prefix-cache hits vLLM reports
   (``RequestOutput.num_cached_tokens`` and the ``vllm:prefix_cache_*`` counters), the (ctx,
   q_len) of the sparse chunks the backend planned, and the time to first token (wall time of a
   one-request ``generate`` with ``max_tokens=1``) with and without the cached prefix.
2. ``preemption``: ``--preempt-prompts`` concurrent prompts of ``--preempt-prompt-tokens``
   with greedy outputs, once with an ample KV cache and once with ``num_gpu_blocks_override`` =
   ``--preempt-cache-prompts`` prompts' worth of pages and admission on the first chunk
   (``scheduler_reserve_full_isl=False``: vLLM 0.26's default admits a request only when its
   whole prompt fits, so it queues instead of preempting). Prefix caching is off, so a preempted
   request recomputes its whole prompt. Reported: preemptions (counted at
   ``Scheduler._preempt_request`` and by the ``vllm:num_preemptions`` counter), prefill tokens
   computed vs prompt tokens (the recompute), KV cache tokens vs the prompts' sum, completion of
   every request and its tokens vs the ample run (configs as in the prefix part: ``dense_fa``,
   ``full``, ``sparse`` by default).

3. ``sparse_prefix``, ``sparse_preemption``, ``sparse_chunks``, ``sparse_mixed`` (only when
   listed; ``sparse`` lists all four): retrieval prompts (a needle's number asked at the end)
   through proxyattn's default config and the dense control, checked for completion, answers
   right wherever the control's are, no kernel compile inside a request, and each scenario's
   own condition; see benchmarks/robustness/sparse_scenarios.py.

4. ``soak`` (only when listed in ``--parts``): one ``vllm serve`` subprocess (loopback,
   port from the OS, default proxyattn config, CUDA graphs) under ``--soak-s`` seconds of mixed
   load in bounded rounds (benchmarks/e2e/loadtest.py): short prompts decoding 128 tokens next to
   8K-32K prefills. Reported: request counts, failures, latencies, and GPU memory and server RSS
   after the first round and at the end (and after every round).

Greedy tokens (both parts) are judged by ``greedy_verdict``, not by bitwise identity: a cache hit
or a recompute changes the chunks and batch shapes, so bf16 results change in the last bits (for
FLASH_ATTN too) and near-ties flip. At full density (and for the control): PASS when every first
divergence from the reference is a near-tie (top-1/top-2 logprob margin <= ``--near-tie-margin``,
0.25 nats, in both runs, the other run's token the reference's runner-up) and the config diverges
on at most max(1, ceil(n/4)) more requests than ``dense_fa``; FAIL on a divergence at a clear
margin (a real bug) or too many tie flips. Sparse: INFO. The JSON records per config the counts,
first differences with both margins, the control's numbers, the rule and the reason (the
threshold's justification: NEAR_TIE_MARGIN below).

Every engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as
benchmarks/robustness/gpu_backend_check.py) and is shut down before the next starts. Each part records
``{"status": "failed", "error": ...}`` on an exception and runs under a time guard (SIGALRM), so
later parts still run; the JSON is rewritten after every step, and a summary table is printed
last. ``--append`` keeps the parts of an existing ``--out`` that this run does not run (so the
parts can run as separate commands into one file). ``--engine-args`` / ``--proxyattn-overrides`` / ``--serve-cmd`` exist for the CPU tests
(tests/test_gpu_robustness.py), which run the prefix and preemption parts on a tiny model (the
control on ``--dense-backend CPU_ATTN``) and the soak part against a fake server.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

# gpu_backend_check sets VLLM_ENABLE_V1_MULTIPROCESSING=0 when imported; main() does that here,
# so that importing this module (the tests) changes nothing for other engines of the process.
_MULTIPROCESSING = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.common import vllm_engine  # noqa: E402
from benchmarks.e2e import loadtest, ttft_sweep  # noqa: E402
from benchmarks.robustness import gpu_backend_check as gbc  # noqa: E402
from benchmarks.robustness.engines import (  # noqa: E402,F401 - re-exported for the tests
    CONTROL, COUNTERS, PlanRecorder, PreemptionCounter, SchedulerRecorder, counter_delta, counters, engine_info,
    engine_kwargs, greedy, proxyattn_default, recording_both, token_prompts, with_engine)
from benchmarks.robustness.prompts import (  # noqa: E402,F401
    common_prefix_len, load_essay_ids, prefix_layout, special_prefix, take_tokens)
from benchmarks.robustness import sparse_scenarios  # noqa: E402
from benchmarks.robustness.report import fmt, log  # noqa: E402
if _MULTIPROCESSING is None:
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)

PARTS = ("prefix", "preemption", *sparse_scenarios.PARTS, "soak")
DEFAULT_PARTS = "prefix,preemption"
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
# Greedy-token verdict at full density (see greedy_verdict). NEAR_TIE_MARGIN: the largest
# top-1/top-2 logprob margin at which a first divergence counts as a bf16 near-tie. The logits
# are bf16 (lm_head output), so margins are multiples of a logit ulp: 0.0625 for logits in
# [8, 16), 0.125 in [16, 32); 0.25 is 2 ulps there. The H200 run (Qwen2.5-0.5B) found every
# full-density divergence at margins 0..0.125, and the same sampled tokens' logprobs differ by
# up to 0.1 between caching off and on, so a top-1/top-2 difference moves by up to ~0.2.
# ALLOWED_EXTRA_FRACTION: tie flips are chance events, so the control's count is itself +-1-2
# on 4-8 requests; a config may diverge on max(1, ceil(fraction * n)) more requests than it.
NEAR_TIE_MARGIN = 0.25
ALLOWED_EXTRA_FRACTION = 0.25
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
# Soak pass criteria (recorded in the JSON next to the numbers).
SOAK_MAX_GPU_GROWTH_MIB = 128
SOAK_MAX_RSS_GROWTH_FRACTION = 0.10


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_parts(text: str) -> list[str]:
    parts = sparse_scenarios.expand_parts([p.strip() for p in text.split(",") if p.strip()])
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"parts {text!r}: a comma list of {', '.join(PARTS)} ('sparse': "
                                         "the four sparse parts)")
    return [p for p in PARTS if p in parts]  # always in this order


def parse_configs(text: str) -> list[str]:
    """Config names, each once, the dense control first (the others are compared with it)."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in CONFIGS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"configs {text!r}: a comma list of {', '.join(CONFIGS)}")
    return sorted(names, key=lambda n: n != CONTROL)  # stable: the others keep their order


def parse_json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: a JSON object")
    return value


def parse_range(text: str) -> tuple[int, int]:
    lo, hi = loadtest.parse_range(text)
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"range {text!r}: LO:HI with 0 < LO <= HI")
    return lo, hi


PARTS_HELP = """parts (--parts, in this order):
  prefix             prefix-cache hits mid page / mid selection block: greedy tokens vs caching off
                     (full density judged, sparse INFO), hits, TTFT
  preemption         a KV cache too small for the batch: preemptions, recompute, greedy tokens
  sparse_prefix      default sparse config, retrieval: one long document, one question per needle,
                     every question a prefix-cache hit ending mid selection block and mid chunk
  sparse_preemption  default sparse config, retrieval prompts preempted and recomputed
  sparse_chunks      default sparse config, retrieval prompts at max_num_batched_tokens 2048/4096/16384
  sparse_mixed       default sparse config: 32 short requests beside one ~32K retrieval prompt
  soak               a vllm serve subprocess under mixed load: failures, memory growth
  sparse             = sparse_prefix,sparse_preemption,sparse_chunks,sparse_mixed
Sparse parts check: every request completes; answers right wherever the dense control's
(--dense-backend) are; no Triton/torch.compile compile inside a request; the sparse path ran;
the density used is reported."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each option; the parts list keeps its layout."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=PARTS_HELP,
                                 formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="model folder (the soak may serve a weightless one)")
    ap.add_argument("--essays", required=True, help="directory of .txt files (prompt text)")
    ap.add_argument("--out", required=True, help="JSON report (rewritten after every step)")
    ap.add_argument("--logdir", help="server logs (default: the folder of --out)")
    ap.add_argument("--append", action="store_true",
                    help="keep the parts of an existing --out that this run does not run")
    ap.add_argument("--parts", type=parse_parts, default=parse_parts(DEFAULT_PARTS),
                    help=f"comma list of {', '.join(PARTS)}; 'sparse' = the four sparse parts")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.12,
                    help="per engine; low so that other work can share the GPU")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype of every engine")
    ap.add_argument("--max-model-len", type=int, default=32768, help="vLLM max_model_len of every engine")
    ap.add_argument("--page-size", type=int, default=128, help="vLLM --block-size")
    ap.add_argument("--chunk", type=int, default=8192, help="max_num_batched_tokens")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="prefix/preemption engines with CUDA graphs (default: enforce_eager)")
    ap.add_argument("--part-timeout-s", type=float, default=420.0,
                    help="time guard of the prefix and the preemption part each")
    ap.add_argument("--engine-args", type=parse_json_object, default={},
                    help="JSON object of extra vllm.LLM arguments (applied last)")
    ap.add_argument("--proxyattn-overrides", type=parse_json_object, default={},
                    help="JSON object merged into every proxyattn config (and the soak server's)")
    ap.add_argument("--dense-backend", default="FLASH_ATTN",
                    help=f"vLLM attention backend of the {CONTROL} control (CPU tests: CPU_ATTN)")
    ap.add_argument("--near-tie-margin", type=float, default=NEAR_TIE_MARGIN,
                    help="full density: a divergence starting at a top-1/top-2 logprob margin "
                    "up to this is a bf16 near-tie (nats)")
    # prefix
    ap.add_argument("--prefix-configs", type=parse_configs, default=list(CONFIGS),
                    help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--prefix-tokens", type=int, default=16384 + 128 + 77,
                    help="shared prefix length; not a multiple of --page-size")
    ap.add_argument("--prefix-prompts", type=int, default=4, help="suffixed prompts compared")
    ap.add_argument("--prefix-output-tokens", type=int, default=32, help="greedy tokens per suffixed prompt")
    ap.add_argument("--timing-repeats", type=int, default=3, help="timed requests per engine")
    # preemption
    ap.add_argument("--preempt-configs", type=parse_configs, default=[CONTROL, "full", "sparse"],
                    help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--preempt-prompts", type=int, default=8, help="concurrent prompts")
    ap.add_argument("--preempt-prompt-tokens", type=int, default=12000, help="tokens per prompt")
    ap.add_argument("--preempt-output-tokens", type=int, default=64, help="greedy tokens per prompt")
    ap.add_argument("--preempt-cache-prompts", type=float, default=2.5,
                    help="KV cache of the pressured engine, in prompts")
    # soak
    ap.add_argument("--soak-s", type=float, default=120.0, help="seconds of load")
    ap.add_argument("--soak-round-s", type=float, default=20.0, help="planned length of a round")
    ap.add_argument("--soak-long-rate", type=float, default=1.0, help="long prefills per second")
    ap.add_argument("--soak-short-rate", type=float, default=4.0, help="short requests per second")
    ap.add_argument("--soak-long-range", type=parse_range,
                    help="LO:HI long prompt tokens (default 8K:max_model_len-32)")
    ap.add_argument("--soak-long-output", type=int, default=16, help="output tokens of a long prefill")
    ap.add_argument("--soak-short-output", type=int, default=128, help="output tokens of a short request")
    ap.add_argument("--soak-token-ids", action="store_true",
                    help="long prompts as random token ids instead of essay text")
    ap.add_argument("--soak-eager", action="store_true", help="serve with --enforce-eager")
    ap.add_argument("--soak-serve-args", default="",
                    help="more vllm serve arguments, e.g. '--load-format dummy' for a weightless model")
    ap.add_argument("--health-timeout-s", type=float, default=420.0,
                    help="seconds the soak server may take to answer /health")
    sparse_scenarios.add_arguments(ap)
    ap.add_argument("--serve-cmd",
                    default=f"{shlex.quote(sys.executable)} -m vllm.entrypoints.cli.main serve",
                    help="the server command, before the model and its arguments")
    return ap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.prefix_prompts < 1 or args.prefix_prompts > len(QUESTIONS):
        ap.error(f"--prefix-prompts: 1..{len(QUESTIONS)}")
    if "prefix" in args.parts and not args.page_size < args.prefix_tokens < args.max_model_len:
        ap.error("--prefix-tokens: more than one page and less than --max-model-len")
    if args.timing_repeats < 1 or args.preempt_prompts < 1 or args.preempt_cache_prompts <= 0:
        ap.error("--timing-repeats, --preempt-prompts, --preempt-cache-prompts: positive")
    if args.near_tie_margin < 0:
        ap.error("--near-tie-margin: not negative")
    sparse_scenarios.check_args(ap, args)
    args.logdir = args.logdir or os.path.dirname(os.path.abspath(args.out))
    return args


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
# Comparing outputs


def margins_of(logprobs) -> list[float | None]:
    """Per step, top-1 minus top-2 logprob (None when only one candidate came back)."""
    gaps = []
    for step in logprobs or []:
        values = sorted((lp.logprob for lp in step.values()), reverse=True)
        gaps.append(values[0] - values[1] if len(values) > 1 else None)
    return gaps


def runner_ups_of(logprobs) -> list[int | None]:
    """Per step, the token with the second-highest logprob (None when only one came back)."""
    out = []
    for step in logprobs or []:
        ranked = sorted(step.items(), key=lambda kv: kv[1].logprob, reverse=True)
        out.append(ranked[1][0] if len(ranked) > 1 else None)
    return out


def compare_tokens(reference: list[int], other: list[int], margins: list | None = None) -> dict:
    """Identity, the first differing position (also a length difference) and the reference's
    top-1/top-2 margin there (small: a bf16 near-tie, not a wrong attention result)."""
    first = next((j for j, (x, y) in enumerate(zip(reference, other)) if x != y), None)
    if first is None and len(reference) != len(other):
        first = min(len(reference), len(other))
    margin = None
    if first is not None and margins and first < len(margins):
        margin = margins[first]
    return {"identical": first is None, "first_difference": first,
            "reference_margin_at_difference": margin,
            "matching_prefix": len(reference) if first is None else first}


def logprob_gap(reference: list[float], other: list[float], upto: int | None) -> float | None:
    """Largest |logprob difference| of the sampled tokens over the positions where both runs
    sampled the same tokens (before ``upto``, the first difference): how close the numbers
    are, apart from whether a near-tie flipped."""
    n = min(len(reference), len(other), len(reference) if upto is None else upto)
    gaps = [abs(a - b) for a, b in zip(reference[:n], other[:n]) if a is not None and b is not None]
    return max(gaps) if gaps else None


def at(values, index):
    return values[index] if values is not None and index is not None and index < len(values) else None


def compare_rows(reference_rows: list[dict], other_rows: list[dict]) -> list[dict]:
    """compare_tokens per prompt, with the logprob gap of the shared positions and, at the
    first difference, the other run's own top-1/top-2 margin and whether its token was the
    reference's runner-up (None where unknown: rows without them, a length difference)."""
    out = []
    for a, b in zip(reference_rows, other_rows):
        row = compare_tokens(a["tokens"], b["tokens"], a["margins"])
        row["max_abs_logprob_diff"] = logprob_gap(a.get("token_logprobs", []), b.get("token_logprobs", []),
                                                  row["first_difference"])
        first = row["first_difference"]
        row["other_margin_at_difference"] = at(b.get("margins"), first)
        runner_up, token = at(a.get("runner_ups"), first), at(b["tokens"], first)
        row["other_took_reference_runner_up"] = (
            None if runner_up is None or token is None or first >= len(a["tokens"]) else token == runner_up)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# The greedy-token verdict (pure functions of compare_rows rows)


def allowed_extra(n: int, fraction: float = ALLOWED_EXTRA_FRACTION) -> int:
    """How many more diverging requests than the dense control a config may have."""
    return max(1, math.ceil(fraction * n))


def divergence(row: dict, tol: float) -> dict | None:
    """None for an identical request, else its first difference, classed as a near-tie when
    both runs are within ``tol`` of a tie there and the other run took the reference's
    runner-up (where known): a bf16 flip. Anything else (a clear margin, a token outside the
    reference's top 2, a length difference, no margin) is ``clear``: not explained by bf16."""
    if row["identical"]:
        return None
    ref, other = row.get("reference_margin_at_difference"), row.get("other_margin_at_difference")
    took = row.get("other_took_reference_runner_up")
    if ref is None:
        why = "no reference margin (a length difference or no logprobs)"
    elif ref > tol:
        why = f"reference margin {ref:.3g} > {tol:g}"
    elif other is not None and other > tol:
        why = f"other run's margin {other:.3g} > {tol:g}"
    elif took is False:
        why = "other token outside the reference's top 2"
    else:
        why = None
    return {"position": row["first_difference"], "reference_margin": ref, "other_margin": other,
            "other_took_reference_runner_up": took, "near_tie": why is None, "why_not_near_tie": why}


def control_stats(summary: dict | None, name: str = CONTROL) -> dict | None:
    """What the other configs' verdicts compare with: the dense control's counts."""
    if not summary or "rows" not in summary:
        return None
    n = len(summary["rows"])
    identical = sum(r["identical"] for r in summary["rows"])
    greedy = summary.get("greedy") or {}
    return {"config": name, "backend": summary.get("backend"), "identical": identical, "n": n,
            "diverging": n - identical, "max_abs_logprob_diff": summary.get("max_abs_logprob_diff"),
            "verdict": greedy.get("verdict")}


def greedy_verdict(rows: list[dict], *, identity_expected: bool, tol: float = NEAR_TIE_MARGIN,
                   control: dict | None = None, is_control: bool = False,
                   fraction: float = ALLOWED_EXTRA_FRACTION) -> dict:
    """PASS / FAIL / INFO of greedy tokens vs the reference (caching off, ample KV cache).

    Bitwise identity is not the test: a prefix-cache hit or a recompute changes the chunks and
    batch shapes, so bf16 sums change in the last bits (for vLLM's own FLASH_ATTN too) and a
    near-tie can flip. Where identity is expected (full density, the dense control): FAIL when
    any divergence is ``clear`` (see :func:`divergence`: a real bug); FAIL when the config
    diverges on more than ``allowed_extra(n)`` requests more than the dense ``control``
    (ties only, but more often than dense attention flips them); else PASS. Sparse: INFO."""
    n = len(rows)
    diffs = [dict(d, prompt=i) for i, r in enumerate(rows) if (d := divergence(r, tol)) is not None]
    clear = [d for d in diffs if not d["near_tie"]]
    allowance = allowed_extra(n, fraction)
    out = {"identical": n - len(diffs), "n": n, "diverging": len(diffs),
           "near_tie_divergences": len(diffs) - len(clear), "clear_divergences": len(clear),
           "first_differences": diffs, "near_tie_margin": tol, "control": control,
           "allowed_extra_diverging": None if is_control else allowance}
    comparable = control is not None and control.get("n") == n and not is_control
    if not identity_expected:
        verdict = "INFO"
        reason = (f"sparse, may differ: {len(diffs)} diverging, {len(clear)} of them not near-ties "
                  f"(margin <= {tol:g})")
    elif clear:
        d = clear[0]
        verdict = "FAIL"
        reason = (f"{len(clear)} divergence(s) not a near-tie: prompt {d['prompt']} at {d['position']}, "
                  f"{d['why_not_near_tie']}")
    elif comparable and len(diffs) > control["diverging"] + allowance:
        verdict = "FAIL"
        reason = (f"near-ties only, but {len(diffs)} diverging vs {control['diverging']} for "
                  f"{control['config']} (+{allowance} allowed)")
    else:
        verdict = "PASS"
        reason = "identical" if not diffs else f"{len(diffs)} divergence(s), all near-ties (margin <= {tol:g})"
        if is_control:
            reason += " (the dense control)"
        elif comparable:
            reason += (f"; {len(diffs)} diverging vs {control['diverging']} for {control['config']} "
                       f"(+{allowance} allowed)")
        else:
            reason += f"; no {CONTROL} control to compare with"
    out["verdict"], out["reason"] = verdict, reason
    return out


def max_gap(rows: list[dict]) -> float | None:
    gaps = [r["max_abs_logprob_diff"] for r in rows if r.get("max_abs_logprob_diff") is not None]
    return max(gaps) if gaps else None


def agreement(rows: list[dict], length: int) -> dict:
    """Counts over compare_tokens rows: identical prompts and the mean matching prefix."""
    n = len(rows)
    return {"identical": sum(r["identical"] for r in rows), "n": n,
            "mean_matching_prefix_fraction": (sum(r["matching_prefix"] for r in rows) / (n * length))
            if n and length else None}


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


# ---------------------------------------------------------------------------------------------
# Part 3: soak


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(name))
        except (OSError, IndexError, ValueError):
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def rss_mib(pids: list[int]) -> float | None:
    total, found = 0, False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        found = True
        except OSError:
            continue
    return total / 1024 if found else None


def gpu_memory(pids: list[int]) -> dict:
    """Device memory in use (MiB) and the part used by ``pids`` (None where nvidia-smi cannot
    tell, e.g. PIDs of another namespace)."""
    out = {"device_used_mib": None, "processes_mib": None}
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0]
    index = index if index.isdigit() else "0"
    try:
        q = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=memory.used",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        if q.returncode == 0 and q.stdout.strip():
            out["device_used_mib"] = float(q.stdout.split()[0])
        q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                            "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        if q.returncode == 0:
            used = {}
            for line in q.stdout.strip().splitlines():
                pid, _, mib = line.partition(",")
                if pid.strip().isdigit() and mib.strip().replace(".", "", 1).isdigit():
                    used[int(pid)] = float(mib)
            mine = [used[p] for p in pids if p in used]
            out["processes_mib"] = sum(mine) if mine else None
    except (OSError, subprocess.TimeoutExpired, ValueError):
        pass
    if out["device_used_mib"] is None and os.path.exists("/dev/nvidiactl"):  # no nvidia-smi
        try:
            import torch

            if torch.cuda.is_available():
                free, total = torch.cuda.mem_get_info()
                out["device_used_mib"] = (total - free) / 2**20
        except Exception:  # noqa: BLE001 - memory is reported, not required
            pass
    return out


def scrape_metrics(base_url: str) -> dict:
    """A few counters and gauges of the server's /metrics (summed over labels)."""
    wanted = ("vllm:num_preemptions_total", "vllm:request_success_total", "vllm:prompt_tokens_total",
              "vllm:generation_tokens_total", "vllm:kv_cache_usage_perc", "vllm:num_requests_running",
              "vllm:num_requests_waiting", "vllm:prefix_cache_hits_total")
    text = loadtest.fetch_metrics_text(base_url)
    return {} if text is None else loadtest.parse_prometheus(text, wanted)


def memory_sample(server, label: str, started: float) -> dict:
    pids = process_tree(server.proc.pid) if server.alive() else []
    return {"label": label, "t_s": round(time.monotonic() - started, 1), "server_alive": server.alive(),
            "server_rss_mib": rss_mib(pids), "client_rss_mib": rss_mib([os.getpid()]),
            **gpu_memory(pids)}


def soak_serve_cmd(args, port: int) -> list[str]:
    cmd = shlex.split(args.serve_cmd) + [
        args.model, "--host", "127.0.0.1", "--port", str(port), "--attention-backend", "proxyattn",
        "--max-model-len", str(args.max_model_len), "--max-num-batched-tokens", str(args.chunk),
        "--block-size", str(args.page_size), "--gpu-memory-utilization", str(args.gpu_memory_utilization),
        "--dtype", args.dtype, "--seed", "0"]
    if args.soak_eager:
        cmd.append("--enforce-eager")
    cmd += shlex.split(args.soak_serve_args)
    if args.proxyattn_overrides:
        cmd += ["--additional-config", json.dumps({"proxyattn": args.proxyattn_overrides})]
    return cmd


def soak_round_configs(args, base_url: str, r: int) -> tuple:
    lo, hi = args.soak_long_range or (min(8192, args.max_model_len // 4),
                                       args.max_model_len - args.soak_long_output - 16)
    text = not args.soak_token_ids
    common = dict(base_url=base_url, arrival="poisson", warmup_requests=0, progress=False,
                  request_timeout_s=300.0)
    long_cfg = loadtest.LoadTestConfig(
        **common, prompt_len_range=(lo, hi),
        num_prompts=max(1, round(args.soak_round_s * args.soak_long_rate)),
        request_rate=args.soak_long_rate, max_concurrency=4, output_len=args.soak_long_output,
        seed=1000 + r, tokenizer=args.model if text else None, text_dir=args.essays if text else None,
        label=f"soak-long-{r}")
    short_cfg = loadtest.LoadTestConfig(
        **common, prompt_len_range=(64, 512),
        num_prompts=max(1, round(args.soak_round_s * args.soak_short_rate)),
        request_rate=args.soak_short_rate, max_concurrency=16, output_len=args.soak_short_output,
        seed=2000 + r, label=f"soak-short-{r}")
    return long_cfg, short_cfg


def soak_verdict(part: dict) -> dict:
    """Zero failed requests, a live server, and no memory growth between the first sample after
    warm-up (end of round 1) and the last one."""
    samples = part.get("memory", [])
    first, last = (samples[1] if len(samples) > 1 else None), (samples[-1] if samples else None)

    def growth(key):
        if not first or not last or first.get(key) is None or last.get(key) is None:
            return None
        return last[key] - first[key]

    gpu_key = "processes_mib" if first and first.get("processes_mib") is not None else "device_used_mib"
    gpu, rss = growth(gpu_key), growth("server_rss_mib")
    out = {
        "failed": part["long"]["failed"] + part["short"]["failed"],
        "completed": part["long"]["completed"] + part["short"]["completed"],
        "server_alive_at_end": bool(last and last["server_alive"]),
        "gpu_memory_key": gpu_key, "gpu_growth_mib": gpu, "server_rss_growth_mib": rss,
        "criteria": {"max_gpu_growth_mib": SOAK_MAX_GPU_GROWTH_MIB,
                     "max_rss_growth_fraction": SOAK_MAX_RSS_GROWTH_FRACTION},
    }
    rss_ok = rss is None or rss <= SOAK_MAX_RSS_GROWTH_FRACTION * first["server_rss_mib"]
    gpu_ok = gpu is None or gpu <= SOAK_MAX_GPU_GROWTH_MIB
    out["memory_ok"] = rss_ok and gpu_ok
    out["passed"] = (out["failed"] == 0 and out["completed"] > 0 and out["server_alive_at_end"]
                     and out["memory_ok"])
    return out


def run_soak(args, part: dict, write) -> None:
    port = ttft_sweep.free_port()
    cmd = soak_serve_cmd(args, port)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    log_path = os.path.join(args.logdir, "robustness_soak_serve.log")
    server = ttft_sweep.ServerProcess(cmd, log_path, env, port)
    part.update({"cmd": shlex.join(cmd), "log": log_path, "soak_s": args.soak_s, "rounds": [],
                 "memory": [], "note": "prefills up to the model's context (128K prompts need a model of "
                 "that context length); prefix caching on (vLLM default), every prompt unique"})
    log(f"soak: starting {shlex.join(cmd)}")
    server.start()
    try:
        part["startup_s"] = server.wait_healthy(args.health_timeout_s)
        log(f"soak: server healthy after {part['startup_s']:.0f} s")
        started = time.monotonic()
        end = started + args.soak_s
        part["memory"].append(memory_sample(server, "before load", started))
        part["metrics_start"] = scrape_metrics(server.base_url)
        records = {"long": [], "short": []}
        r, last_round_s = 0, 0.0
        # Rounds start until the soak time is up, so the load lasts at least --soak-s (at most
        # one round longer): stopping when the next round would overrun it left 562 of 600 s.
        while r == 0 or (time.monotonic() < end and server.alive()):
            long_cfg, short_cfg = soak_round_configs(args, server.base_url, r)
            t0 = time.monotonic()

            async def both():
                return await asyncio.gather(loadtest.run_benchmark(long_cfg),
                                            loadtest.run_benchmark(short_cfg))

            long_res, short_res = asyncio.run(both())
            last_round_s = time.monotonic() - t0
            records["long"] += long_res["requests"]
            records["short"] += short_res["requests"]
            part["memory"].append(memory_sample(server, f"after round {r + 1}", started))
            errors = long_res["errors"] + short_res["errors"]
            part["rounds"].append({
                "round": r + 1, "seconds": last_round_s,
                "long": {k: long_res[k] for k in ("completed", "failed", "mean_ttft_ms",
                                                  "total_input_tokens")},
                "short": {k: short_res[k] for k in ("completed", "failed", "mean_tpot_ms", "mean_e2el_ms")},
                "errors": errors[:5]})
            m = part["memory"][-1]
            gpu_now = m["processes_mib"] if m["processes_mib"] is not None else m["device_used_mib"]
            log(f"soak round {r + 1} ({last_round_s:.0f} s): long {long_res['completed']} ok "
                f"{long_res['failed']} failed, short {short_res['completed']} ok {short_res['failed']} "
                f"failed; server RSS {fmt(m['server_rss_mib'], '.0f')} MiB, GPU "
                f"{fmt(gpu_now, '.0f')} MiB")
            write()
            r += 1
        duration = time.monotonic() - started
        part["duration_s"] = duration
        part["metrics_end"] = scrape_metrics(server.base_url)
        strip = lambda s: {k: v for k, v in s.items() if k != "requests"}  # noqa: E731
        part["long"] = strip(loadtest.summarize(records["long"], duration))
        part["short"] = strip(loadtest.summarize(records["short"], duration))
        part["verdict"] = soak_verdict(part)
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# Running parts, the report, the summary


class PartTimeout(BaseException):
    """A part ran past its time guard (a BaseException, so no ``except Exception`` in vLLM
    swallows it)."""


@contextlib.contextmanager
def time_guard(seconds: float | None):
    """Raise PartTimeout in the main thread after ``seconds`` (SIGALRM; no-op elsewhere)."""
    usable = seconds and seconds > 0 and threading.current_thread() is threading.main_thread() \
        and hasattr(signal, "setitimer")
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise PartTimeout(f"ran past its time guard of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def part_timeout(args, name: str) -> float:
    if name == "soak":
        return args.soak_s + args.health_timeout_s + 180
    if name in sparse_scenarios.PARTS:
        return args.sparse_part_timeout_s
    return args.part_timeout_s


def run_part(name: str, func, args, report: dict, write) -> None:
    part = report["parts"][name] = {"status": "running", "date": report["date"], "command": report["command"]}
    write()
    t0 = time.perf_counter()
    try:
        with time_guard(part_timeout(args, name)):
            func(args, part, write)
        part["status"] = "ok"
    except (Exception, PartTimeout) as exc:  # noqa: BLE001 - record it; the next part still runs
        import traceback

        traceback.print_exc()
        part["status"] = "timeout" if isinstance(exc, PartTimeout) else "failed"
        part["error"] = f"{type(exc).__name__}: {exc}"[:4000]
    part["seconds"] = time.perf_counter() - t0
    write()
    if part["status"] != "ok" and name != "soak":  # free what a failed in-process engine left
        try:
            vllm_engine.release_memory()
        except Exception:  # noqa: BLE001
            pass


def greedy_of(name: str, res: dict, part: dict) -> dict:
    """The stored greedy verdict, or (a report from before it existed) the same rule now."""
    s = res["summary"]
    if s.get("greedy"):
        return s["greedy"]
    control = None if name == CONTROL else control_stats(part.get("configs", {}).get(CONTROL, {}).get("summary"))
    tol = part.get("greedy_rule", {}).get("near_tie_margin", NEAR_TIE_MARGIN)
    return greedy_verdict(s["rows"], identity_expected=res["identity_expected"], tol=tol,
                          control=control, is_control=name == CONTROL)


def tokens_row(label: str, res: dict, against: str, name: str = "", part: dict | None = None
               ) -> tuple[str, str, str, str]:
    """The greedy-token row: PASS/FAIL where identity is expected (full density, the dense
    control), INFO elsewhere; see greedy_verdict."""
    s, g = res["summary"], greedy_of(name, res, part or {})
    detail = f"{g['identical']}/{g['n']} identical to {against}"
    control = g.get("control")
    if control:
        detail += f" ({control['config']}: {control['identical']}/{control['n']})"
    if g["first_differences"]:
        detail += "; first diffs (pos: margin ref/other) " + ", ".join(
            f"{d['position']}: {fmt(d['reference_margin'], '.3g')}/{fmt(d['other_margin'], '.3g')}"
            + ("" if d["near_tie"] else " !") for d in g["first_differences"])
    if s.get("max_abs_logprob_diff") is not None:
        detail += f"; max |d logprob| {s['max_abs_logprob_diff']:.3g}"
        if control and control.get("max_abs_logprob_diff") is not None:
            detail += f" ({control['config']} {control['max_abs_logprob_diff']:.3g})"
    return label, "greedy tokens", g["verdict"], f"{detail}. {g['reason']}"


def pass_fail(ok) -> str:
    return "PASS" if ok else "FAIL"


def summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(part, check, verdict, detail) rows; verdict PASS / FAIL / INFO."""
    rows = []
    for name, part in report.get("parts", {}).items():
        if part.get("status") != "ok":
            rows.append((name, "ran", "FAIL", f"{part.get('status')}: {part.get('error', '')[:100]}"))
            continue
        configs = [(cfg, res) for cfg, res in part.get("configs", {}).items() if res.get("summary")]
        if name == "prefix":
            for cfg, res in configs:
                s, label = res["summary"], f"prefix {cfg}"
                rows.append(tokens_row(label, res, "caching off", cfg, part))
                mid = " (mid selection block)" if s["cached_part_ends_mid_selection_block"] else ""
                which = "first chunk ctx" if res.get("proxyattn", {}) is None else "first sparse chunk ctx"
                rows.append((label, "cache hits", pass_fail(s["hits_as_expected"]),
                             f"cached tokens {sorted(set(s['num_cached_tokens']))} (expected "
                             f"{part['expected_cached_tokens']}); {which} {fmt(s['first_chunk_ctx'])}{mid}"))
                speedup = s["ttft_speedup"]
                rows.append((label, "TTFT", pass_fail(speedup is not None and speedup > 1),
                             f"{s['ttft_uncached_s'] * 1e3:.1f} ms uncached -> "
                             f"{s['ttft_cached_s'] * 1e3:.1f} ms cached ({fmt(speedup, '.1f')}x)"))
        elif name == "preemption":
            for cfg, res in configs:
                s, label = res["summary"], f"preemption {cfg}"
                ok = s["completed_pressured"] == s["n"] and s["completed_ample"] == s["n"]
                rows.append((label, "all complete", pass_fail(ok),
                             f"{s['completed_pressured']}/{s['n']} under pressure; KV cache "
                             f"{fmt(s['kv_cache_tokens'])} tokens for {s['prompt_tokens_sum']} "
                             "prompt tokens"))
                rows.append((label, "preempted", pass_fail(s["preemptions"] or s["preemptions_metric"]),
                             f"{fmt(s['preemptions'])} preemptions (metric {fmt(s['preemptions_metric'])}), "
                             f"{fmt(s['recomputed_tokens'])} prefill tokens recomputed"))
                rows.append(tokens_row(label, res, "the ample run", cfg, part))
        elif name in sparse_scenarios.PARTS:
            rows += [(name, check, verdict, detail) for check, verdict, detail in part.get("checks", [])]
        elif name == "soak" and part.get("verdict"):
            v = part["verdict"]
            rows.append(("soak", "requests", pass_fail(v["failed"] == 0 and v["completed"]),
                         f"{v['completed']} completed, {v['failed']} failed in {part['duration_s']:.0f} s; "
                         f"long mean TTFT {fmt(part['long']['mean_ttft_ms'], '.0f')} ms, short mean TPOT "
                         f"{fmt(part['short']['mean_tpot_ms'], '.1f')} ms"))
            rows.append(("soak", "memory", pass_fail(v["memory_ok"] and v["server_alive_at_end"]),
                         f"GPU ({v['gpu_memory_key']}) {fmt(v['gpu_growth_mib'], '+.0f')} MiB, server RSS "
                         f"{fmt(v['server_rss_growth_mib'], '+.0f')} MiB after round 1; server alive "
                         f"{v['server_alive_at_end']}"))
    return rows


def format_summary(report: dict) -> str:
    rows = summary_rows(report)
    if not rows:
        return "(no checks to report)"
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'part':<{w0}}  {'check':<{w1}}  verdict  detail"]
    lines += [f"{a:<{w0}}  {b:<{w1}}  {c:<7}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def jsonable(value):
    """inf/nan (margins, ratios) as None: the report stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def new_report(args, argv: list[str]) -> dict:
    return {
        "gpu": ttft_sweep.gpu_name(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": ttft_sweep.versions(),
        "command": shlex.join([os.path.relpath(__file__) if __file__ else "gpu_robustness.py", *argv]),
        "args": {k: v for k, v in vars(args).items()},
        "parts": {},
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # In-process engines: the scheduler and the attention metadata builder run in this process,
    # where PreemptionCounter and PlanRecorder see them (the soak server sets "1" for itself).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    os.makedirs(args.logdir, exist_ok=True)
    report = new_report(args, argv)
    if args.append and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as f:
            previous = json.load(f)
        report["parts"] = dict(previous.get("parts", {}))
        report["earlier_commands"] = previous.get("earlier_commands", []) + [previous.get("command")]

    def write():
        tmp = args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(jsonable(report), f, indent=1)
        os.replace(tmp, args.out)

    funcs = {"prefix": run_prefix, "preemption": run_preemption, "soak": run_soak,
             **{name: sparse_scenarios.runner(name) for name in sparse_scenarios.PARTS}}
    for name in args.parts:
        log(f"=== {name} ===")
        run_part(name, funcs[name], args, report, write)
    log(format_summary(report))
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
