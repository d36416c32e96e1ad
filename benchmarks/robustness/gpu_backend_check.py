"""GPU checks of the vLLM backend, one engine per backend, in-process.

    python benchmarks/robustness/gpu_backend_check.py --model /tmp/models/smollm2 --essays DIR \
        [--dummy-8b DIR] [--serve] --out results.json

1. Full-density equivalence: greedy tokens of proxyattn (gamma 1, every block kept, sparse path
   forced from 1024 tokens, 2048-token chunks so later chunks have ctx > 0) vs FLASH_ATTN, for
   essay prompts of 2K..8K tokens, next to two dense-vs-dense comparisons (FLASH_ATTN with another
   chunk size, TRITON_ATTN) that show how often bf16 summation order alone flips a greedy token,
   and teacher-forced logprob differences on the reference's own tokens.
2. CUDA graphs: with graphs on, the number of Python ``ProxyAttnImpl.forward`` calls must not grow
   with the number of decode steps (pure-decode batches replay captured FULL graphs).
3. ``--dummy-8b``: a random-weight Llama-3.1-8B-shaped model completes a 128K-token prompt on the
   sparse path (``max_density`` 0.1 unless ``--dummy-max-density`` says otherwise: random weights
   make gamma budgets dense), with the time to the first token.
4. ``--serve``: ``vllm serve --attention-backend proxyattn`` answers /v1/completions and
   /v1/chat/completions, streamed and not, through the ``openai`` client, and a ~6K-token passkey
   prompt that runs sparse (``min_sparse_len`` 1024 on the server; its selection statistics say
   how many chunks ran sparse and at what density).

Tensor and pipeline parallelism (needs N x M GPUs): ``--tensor-parallel 2 --model
/tmp/models/qwen05b --skip cudagraphs --dummy-8b DIR`` compares TP=2 with one GPU instead
(FLASH_ATTN TP=2 vs one GPU is the noise floor: the all-reduce changes the summation order), for
FLASH_ATTN and proxyattn at full density and at gamma 0.95 (each against its own one-GPU run too),
and runs the 128K prompt at TP=2; ``--pipeline-parallel 2`` the same with the layers split over
two ranks (``--tensor-parallel 1 --pipeline-parallel 2`` against ``--tensor-parallel 2``: the
two layouts of two GPUs).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import NamedTuple

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: count impl calls

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks.common import vllm_engine  # noqa: E402
from benchmarks.e2e.ttft_sweep import gpu_name, versions  # noqa: E402


def log(msg):
    print(msg, flush=True)


def essay_prompts(tokenizer, essays_dir, lengths):
    text = "\n\n".join(
        open(os.path.join(essays_dir, f), encoding="utf-8").read()
        for f in sorted(os.listdir(essays_dir)) if f.endswith(".txt")
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompts = []
    for i, n in enumerate(lengths):
        start = (i * 7919) % max(1, len(ids) - n)
        body = tokenizer.decode(ids[start:start + n - 40])
        prompts.append(body + "\n\nQuestion: In one sentence, what is the main point of the text above?\nAnswer:")
    return prompts


FULL_DENSITY = {"proxyattn": {"gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 1024}}
#: The default config (gamma 0.95), sparse from 1024 tokens so that every prompt here runs sparse.
DEFAULT_SPARSE = {"proxyattn": {"min_sparse_len": 1024}}
EQUIVALENCE_LENGTHS = [2048, 2500, 3000, 3500, 4096, 5000, 6000, 7000, 7600, 8100]
EQUIVALENCE_TOKENS = 32


class Engine(NamedTuple):
    """One engine of the equivalence check. ``twin``: the label of the one-GPU engine of the
    same backend and config that a multi-GPU engine is compared with as well."""

    label: str
    backend: str
    chunk: int
    extra: dict | None
    tp: int = 1
    pp: int = 1
    twin: str | None = None


# Engines compared with the reference (FLASH_ATTN, 2048-token chunks). The two dense variants
# measure how identical dense bf16 attention is to itself when only the summation order changes
# (a different chunking, a different kernel): the noise floor for "identical greedy tokens".
EQUIVALENCE_ENGINES = [
    Engine("FLASH_ATTN chunk 2048 (reference)", "FLASH_ATTN", 2048, None),
    Engine("FLASH_ATTN chunk 8192", "FLASH_ATTN", 8192, None),
    Engine("TRITON_ATTN chunk 2048", "TRITON_ATTN", 2048, None),
    Engine("proxyattn full density chunk 2048", "proxyattn", 2048, FULL_DENSITY),
]


def no_multicast_kwargs(tp: int) -> dict:
    """Engine arguments that keep a TP>1 engine off NVLink multicast. vLLM 0.26 fuses the
    all-reduce with the RMSNorm under torch.compile at TP>1 through FlashInfer's "mnnvl" backend,
    which creates multicast memory: on a two-GPU H200 host where multicast is disabled, a TP=2
    engine of the 8B shape died in its profile run right after that workspace was set up
    (illegal memory access, then CUBLAS_STATUS_INTERNAL_ERROR at the first GEMM;
    results/backend_tp2_h200.log)."""
    return {"compilation_config": {"pass_config": {"fuse_allreduce_rms": False}}} if tp > 1 else {}


def parallel_engines(tp: int, pp: int) -> list[Engine]:
    """``--tensor-parallel N --pipeline-parallel M``: each engine on one GPU and on TP=N x PP=M:
    FLASH_ATTN (the noise floor: the all-reduce, or the stage split, sums in another order),
    proxyattn at full density (must agree as FLASH_ATTN does) and at the default gamma 0.95
    (compared with its own one-GPU run: the same selection on every rank's heads and layers)."""
    layout = f"TP{tp}xPP{pp}"
    configs = [("FLASH_ATTN", "FLASH_ATTN", None), ("proxyattn full density", "proxyattn", FULL_DENSITY),
               ("proxyattn gamma 0.95", "proxyattn", DEFAULT_SPARSE)]
    engines = []
    for name, backend, extra in configs:
        single = f"{name} 1 GPU" + (" (reference)" if not engines else "")
        engines += [Engine(single, backend, 2048, extra),
                    Engine(f"{name} {layout}", backend, 2048, extra, tp, pp, twin=single)]
    return engines


def _greedy_with_margins(llm, prompts, max_tokens):
    """Greedy tokens and, per step, the gap between the top-1 and top-2 logprobs."""
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=2))
    tokens, margins = [], []
    for o in outs:
        tokens.append(list(o.outputs[0].token_ids))
        gaps = []
        for step in o.outputs[0].logprobs:
            lps = sorted((lp.logprob for lp in step.values()), reverse=True)
            gaps.append(lps[0] - lps[1] if len(lps) > 1 else float("inf"))
        margins.append(gaps)
    return tokens, margins, [len(o.prompt_token_ids) for o in outs]


def _teacher_forced_logprobs(llm, prompt_ids, forced_tokens):
    """Logprob of each forced token (the reference's greedy output) given the reference prefix."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p + f) for p, f in zip(prompt_ids, forced_tokens)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1))
    result = []
    for o, forced in zip(outs, forced_tokens):
        tail = o.prompt_logprobs[-len(forced):]
        result.append([step[tok].logprob for step, tok in zip(tail, forced)])
    return result


def check_equivalence(args, report):
    """Greedy-token identity with FLASH_ATTN at full density, against dense-vs-dense noise.

    Identity of greedy tokens is only as strict as bf16 allows: a different summation order
    flips near-ties. So besides the token comparison, each engine scores the reference's own
    output tokens (teacher forcing) and the report gives the largest logprob difference, and at
    each first divergence the reference's top-1/top-2 margin.
    """
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.inputs import TokensPrompt

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = essay_prompts(tok, args.essays, EQUIVALENCE_LENGTHS)
    prompt_ids = [tok.encode(p) for p in prompts]
    token_prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    results, reference, tokens_of = {}, None, {}
    multi_gpu = args.tensor_parallel > 1 or args.pipeline_parallel > 1
    engines = parallel_engines(args.tensor_parallel, args.pipeline_parallel) if multi_gpu else EQUIVALENCE_ENGINES
    for label, backend, chunk, extra, tp, pp, twin in engines:
        llm = LLM(model=args.model, attention_backend=backend, dtype="bfloat16", seed=0,
                  additional_config=extra or {}, enforce_eager=True, max_model_len=8192,
                  enable_prefix_caching=False, max_num_batched_tokens=chunk,
                  gpu_memory_utilization=0.2, tensor_parallel_size=tp, pipeline_parallel_size=pp,
                  **no_multicast_kwargs(tp))
        t0 = time.perf_counter()
        tokens, margins, lens = _greedy_with_margins(llm, token_prompts, EQUIVALENCE_TOKENS)
        seconds = time.perf_counter() - t0
        if reference is None:
            reference = {"tokens": tokens, "margins": margins}
        forced = _teacher_forced_logprobs(llm, prompt_ids, reference["tokens"])
        if "forced" not in reference:
            reference["forced"] = forced
        vllm_engine.shut_down(llm)
        del llm
        rows = []
        for i, n in enumerate(lens):
            a, b = reference["tokens"][i], tokens[i]
            first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None)
            diffs = [abs(x - y) for x, y in zip(reference["forced"][i], forced[i])]
            rows.append({
                "prompt_tokens": n, "identical": a == b, "first_difference": first,
                "reference_margin_at_difference": None if first is None else reference["margins"][i][first],
                "teacher_forced_max_abs_logprob_diff": max(diffs),
                "teacher_forced_mean_abs_logprob_diff": sum(diffs) / len(diffs),
            })
        identical = sum(r["identical"] for r in rows)
        worst = max(r["teacher_forced_max_abs_logprob_diff"] for r in rows)
        tokens_of[label] = tokens
        twin_identical = None if twin is None else sum(a == b for a, b in zip(tokens_of[twin], tokens))
        log(f"equivalence {label}: {identical}/{len(rows)} identical to the reference"
            + ("" if twin is None else f", {twin_identical}/{len(rows)} to {twin}") + "; "
            f"first differences {[r['first_difference'] for r in rows if not r['identical']]}; "
            f"margins there {[round(r['reference_margin_at_difference'], 4) for r in rows if not r['identical']]}; "
            f"teacher-forced max |d logprob| {worst:.4f} ({seconds:.1f} s)")
        results[label] = {"backend": backend, "max_num_batched_tokens": chunk, "additional_config": extra,
                          "tensor_parallel_size": tp, "pipeline_parallel_size": pp, "identical": identical,
                          "n": len(rows), "rows": rows, "generate_seconds": seconds,
                          **({} if twin is None else {"one_gpu_twin": twin, "identical_to_twin": twin_identical})}
    report["equivalence"] = {"model": args.model, "output_tokens": EQUIVALENCE_TOKENS,
                             "reference": engines[0].label, "engines": results}


def check_cudagraphs(args, report):
    from proxyattn_vllm import impl as impl_mod

    calls = {"n": 0}
    forward = impl_mod.ProxyAttnImpl.forward

    def counting_forward(self, *a, **k):
        calls["n"] += 1
        return forward(self, *a, **k)

    impl_mod.ProxyAttnImpl.forward = counting_forward
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model, attention_backend="proxyattn", dtype="bfloat16", max_model_len=4096,
                  enable_prefix_caching=False, gpu_memory_utilization=0.5)
        sp = lambda n: SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)  # noqa: E731
        llm.generate(["warm up"], sp(4))
        counts = {}
        for n in (8, 64):
            calls["n"] = 0
            llm.generate(["The capital of France is"], sp(n))
            counts[n] = calls["n"]
        vllm_engine.shut_down(llm)
        del llm
    finally:
        impl_mod.ProxyAttnImpl.forward = forward
    replay = counts[64] == counts[8]
    log(f"cudagraphs: python forward calls for 8 vs 64 decode tokens: {counts[8]} vs {counts[64]} "
        f"-> {'decode replays graphs' if replay else 'decode runs eagerly'}")
    report["cudagraphs"] = {"forward_calls": counts, "decode_replays_full_graphs": replay}


def check_dummy_128k(args, report):
    """A 128K prompt of the dummy 8B (random weights) through proxyattn, at ``--tensor-parallel``.
    Random weights give flat attention, where gamma budgets select every block, so the run caps
    the density (``--dummy-max-density``, 0.1 by default) to make the prompt really sparse."""
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    n = 131072 - 64
    overrides = {"max_density": args.dummy_max_density} if args.dummy_max_density else {}
    llm = LLM(model=args.dummy_8b, load_format="dummy", attention_backend="proxyattn", dtype="bfloat16",
              max_model_len=131072, enable_prefix_caching=False, max_num_batched_tokens=8192,
              gpu_memory_utilization=0.45, enforce_eager=args.eager,
              additional_config={"proxyattn": overrides}, tensor_parallel_size=args.tensor_parallel,
              pipeline_parallel_size=args.pipeline_parallel, **no_multicast_kwargs(args.tensor_parallel))
    rng = random.Random(0)
    prompt = TokensPrompt(prompt_token_ids=[rng.randrange(3, 250) for _ in range(n)])
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 32)], SamplingParams(max_tokens=2))
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    ttft = time.perf_counter() - t0
    ok = len(out[0].outputs[0].token_ids) == 1
    log(f"dummy 8B: {n} prompt tokens -> {'completed' if ok else 'FAILED'} in {ttft:.2f} s (1 output token, "
        f"TP={args.tensor_parallel} x PP={args.pipeline_parallel}, proxyattn {overrides or 'defaults'})")
    report["dummy_8b_128k"] = {"prompt_tokens": n, "completed": ok, "seconds_to_first_token": ttft,
                               "config": overrides or "default", "enforce_eager": args.eager,
                               "tensor_parallel_size": args.tensor_parallel,
                               "pipeline_parallel_size": args.pipeline_parallel}
    vllm_engine.shut_down(llm)
    del llm


#: The served passkey: a long prompt must take the sparse path (``min_sparse_len`` lowered to
#: 1024 on the server) and still find it.
PASSKEY = "68417"
PASSKEY_REPEATS = 3
SERVE_SPARSE_CONFIG = {"proxyattn": {"min_sparse_len": 1024}}


def passkey_prompt(tokenizer, essays_dir, tokens: int) -> str:
    """About ``tokens`` tokens of essay text with the passkey sentence in the middle, then the
    question; the answer is :data:`PASSKEY`."""
    (body,) = essay_prompts(tokenizer, essays_dir, [tokens])
    body = body.rsplit("\n\nQuestion:", 1)[0]
    half = len(body) // 2
    needle = f" The pass key is {PASSKEY}. Remember it. {PASSKEY} is the pass key. "
    return body[:half] + needle + body[half:] + "\n\nWhat is the pass key? The pass key is"


def _openai_requests(base: str, model: str, long_prompt: str) -> dict:
    """Completions and chat completions, streamed and not, through the official ``openai``
    client (what users run), and the passkey prompt; each entry is True when it answered."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="EMPTY", timeout=120)
    results = {}
    for stream in (False, True):
        out = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                        temperature=0, stream=stream)
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        results[f"/v1/completions stream={stream}"] = bool(text)
        log(f"serve /v1/completions stream={stream}: {text!r}")
        out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hello."}],
                                             max_tokens=8, stream=stream)
        text = ("".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream
                else out.choices[0].message.content)
        results[f"/v1/chat/completions stream={stream}"] = bool(text)
        log(f"serve /v1/chat/completions stream={stream}: {text!r}")
    # Asked PASSKEY_REPEATS times: the server's statistics reach their file every 64 lines
    # (stats.FLUSH_EVERY), and one prompt of a small model writes fewer.
    answers = []
    for _ in range(PASSKEY_REPEATS):
        out = client.completions.create(model=model, prompt=long_prompt, max_tokens=8, temperature=0)
        answers.append(out.choices[0].text)
    results["passkey prompt_tokens"] = out.usage.prompt_tokens
    results["passkey answers"] = answers
    results["passkey found"] = all(PASSKEY in a for a in answers)
    log(f"serve passkey ({out.usage.prompt_tokens} tokens) x{PASSKEY_REPEATS}: {answers!r}")
    return results


def check_serve(args, report):
    """``vllm serve --attention-backend proxyattn`` of the real model, asked through the
    ``openai`` client; the server's selection statistics show whether the long prompt ran sparse."""
    from transformers import AutoTokenizer

    from proxyattn_vllm import stats

    port = 8765
    stats_path = os.path.join(args.logdir, "serve_stats.jsonl")
    if os.path.exists(stats_path):
        os.remove(stats_path)
    long_prompt = passkey_prompt(AutoTokenizer.from_pretrained(args.model), args.essays, 6000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model,
         "--attention-backend", "proxyattn", "--port", str(port), "--max-model-len", "8192",
         "--enforce-eager", "--gpu-memory-utilization", "0.4",
         "--additional-config", json.dumps(SERVE_SPARSE_CONFIG)],
        stdout=open(os.path.join(args.logdir, "serve.log"), "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "PROXYATTN_STATS": stats_path,
             "PROXYATTN_STATS_MASS_HEADS": "0"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None:
                    raise RuntimeError("server exited; see serve.log")
                time.sleep(2)
        results = _openai_requests(base, args.model, long_prompt)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    lines = stats.read_lines(stats_path) if os.path.exists(stats_path) else []
    results["sparse chunks"] = len(lines)
    results["sparse density"] = stats.overall(lines)["density"] if lines else None
    report["serve"] = results


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv``: the arguments, default ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="small real model folder for the equivalence check (e.g. SmolLM2-135M)")
    ap.add_argument("--essays", required=True, help="folder of .txt essays, the prompts' text")
    ap.add_argument("--dummy-8b", help="folder of dummy_llama.py's Llama-3.1-8B shape: also run the 128K prompt")
    ap.add_argument("--dummy-max-density", type=float, default=0.1,
                    help="proxyattn max_density of the dummy 8B's 128K prompt (0: the default config, "
                         "which goes dense on random weights)")
    ap.add_argument("--eager", action="store_true", help="the dummy 8B without CUDA graphs or torch.compile")
    ap.add_argument("--serve", action="store_true",
                    help="also start `vllm serve --attention-backend proxyattn` and query its OpenAI endpoints")
    ap.add_argument("--skip", default="", help="comma list of: equivalence,cudagraphs")
    ap.add_argument("--tensor-parallel", type=int, default=1,
                    help="N > 1: the equivalence check compares TP=N (times --pipeline-parallel) with one "
                         "GPU (FLASH_ATTN, proxyattn at full density and at gamma 0.95; the model's KV heads "
                         "must divide by N, e.g. Qwen2.5-0.5B for N=2), and the dummy 8B runs at TP=N")
    ap.add_argument("--pipeline-parallel", type=int, default=1,
                    help="M > 1: the same with pipeline parallelism, each rank running its share of the "
                         "layers (TP=N x PP=M uses N*M GPUs)")
    ap.add_argument("--out", required=True, help="JSON file of the results (rewritten after every check)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.logdir = os.path.dirname(args.out) or "."
    report = {"gpu": gpu_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": versions(), "command": " ".join(sys.argv)}
    skip = set(filter(None, args.skip.split(",")))
    steps = [("equivalence", check_equivalence), ("cudagraphs", check_cudagraphs)]
    if args.dummy_8b:
        steps.append(("dummy_8b", check_dummy_128k))
    if args.serve:
        steps.append(("serve", check_serve))
    for name, step in steps:
        if name in skip:
            continue
        try:
            step(args, report)
        except Exception as exc:  # noqa: BLE001 - record and continue with the other checks
            import traceback

            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        json.dump(report, open(args.out, "w"), indent=2)
    log(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
