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
threshold's justification: NEAR_TIE_MARGIN in benchmarks/robustness/greedy.py).

The parts live in benchmarks/robustness/cache_parts.py (prefix, preemption),
sparse_scenarios.py and soak.py; this file parses the arguments, runs the parts and writes the
report. Every engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as
benchmarks/robustness/gpu_backend_check.py) and is shut down before the next starts. Each part records
``{"status": "failed", "error": ...}`` on an exception and runs under a time guard (SIGALRM), so
later parts still run; the JSON is rewritten after every step, and a summary table is printed
last. ``--append`` keeps the parts of an existing ``--out`` that this run does not run (so the
parts can run as separate commands into one file). ``--engine-args`` / ``--proxyattn-overrides`` / ``--serve-cmd`` exist for the CPU tests
(tests/test_gpu_robustness.py), which run the prefix, preemption and sparse parts on a tiny model
(the control on ``--dense-backend CPU_ATTN``) and the soak part against a fake server.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
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
from benchmarks.robustness.cache_parts import (  # noqa: E402,F401 - the prefix and preemption parts
    CONFIGS, FULL, QUESTIONS, SUFFIX_TEMPLATE, TIMING_SLICE_TOKENS, build_long_prompts, build_prefix_prompts,
    config_backend, default_block_size, diff_list, engine_kwargs, generate_rows, greedy_rule, identity_expected,
    judge_greedy, new_config_result, proxyattn_config, run_batch, run_preemption, run_prefix, run_prefix_engine,
    summarize_preemption_config, summarize_prefix_config, time_first_token, with_engine)
from benchmarks.robustness.engines import (  # noqa: E402,F401 - re-exported for the tests
    CONTROL, PlanRecorder, PreemptionCounter, SchedulerRecorder)
from benchmarks.robustness.prompts import (  # noqa: E402,F401
    common_prefix_len, load_essay_ids, prefix_layout, special_prefix, take_tokens)
from benchmarks.robustness import sparse_scenarios  # noqa: E402
from benchmarks.robustness.greedy import (  # noqa: E402,F401
    ALLOWED_EXTRA_FRACTION, NEAR_TIE_MARGIN, agreement, allowed_extra, at, compare_rows, compare_tokens,
    control_stats, divergence, greedy_verdict, logprob_gap, margins_of, max_gap, runner_ups_of)
from benchmarks.robustness.soak import (  # noqa: E402,F401
    SOAK_MAX_GPU_GROWTH_MIB, SOAK_MAX_RSS_GROWTH_FRACTION, gpu_memory, memory_sample, process_tree, rss_mib,
    run_soak, scrape_metrics, soak_round_configs, soak_serve_cmd, soak_verdict)
from benchmarks.robustness.report import fmt, log  # noqa: E402
if _MULTIPROCESSING is None:
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)

PARTS = ("prefix", "preemption", *sparse_scenarios.PARTS, "soak")
DEFAULT_PARTS = "prefix,preemption"
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
