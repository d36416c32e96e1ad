"""GPU checks of the vLLM backend (issue #4, part 5), one engine per backend, in-process.

    python benchmarks/gpu_backend_check.py --model /tmp/models/smollm2 --essays DIR \
        [--dummy-8b DIR] [--serve] --out results.json

1. Full-density equivalence: greedy tokens of proxyattn (gamma 1, every block kept, sparse path
   forced from 1024 tokens, 2048-token chunks so later chunks have ctx > 0) vs FLASH_ATTN, for
   essay prompts of 2K..8K tokens.
2. CUDA graphs: with graphs on, the number of Python ``ProxyAttnImpl.forward`` calls must not grow
   with the number of decode steps (pure-decode batches replay captured FULL graphs).
3. ``--dummy-8b``: a random-weight Llama-3.1-8B-shaped model completes a 128K-token prompt at the
   default config (sparse path on), with the time to the first token.
4. ``--serve``: ``vllm serve --attention-backend proxyattn`` answers /v1/completions and
   /v1/chat/completions, streamed and not.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import urllib.request

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: count impl calls


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


def run_llm(model, backend, prompts, max_tokens, additional_config=None, **kw):
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, attention_backend=backend, dtype="bfloat16", seed=0,
              additional_config=additional_config or {}, **kw)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens))
    elapsed = time.perf_counter() - t0
    result = [list(o.outputs[0].token_ids) for o in outs], elapsed, [len(o.prompt_token_ids) for o in outs]
    del llm
    cleanup()
    return result


def cleanup():
    import torch
    from vllm.distributed import destroy_distributed_environment, destroy_model_parallel

    destroy_model_parallel()
    destroy_distributed_environment()
    gc.collect()
    torch.cuda.empty_cache()


FULL_DENSITY = {"proxyattn": {"gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 1024}}


def check_equivalence(args, report):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = essay_prompts(tok, args.essays, [2048, 3000, 4096, 6000, 8100])
    common = dict(enforce_eager=True, max_model_len=8192, enable_prefix_caching=False,
                  max_num_batched_tokens=2048, gpu_memory_utilization=0.25)
    dense, t_dense, lens = run_llm(args.model, "FLASH_ATTN", prompts, 24, **common)
    sparse, t_sparse, _ = run_llm(args.model, "proxyattn", prompts, 24, FULL_DENSITY, **common)
    rows = []
    for n, a, b in zip(lens, dense, sparse):
        same = a == b
        first_diff = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        rows.append({"prompt_tokens": n, "identical": same, "first_difference": first_diff})
        log(f"equivalence {n:5d} tokens: {'identical' if same else f'differs at {first_diff}'}")
    report["equivalence"] = {"model": args.model, "config": FULL_DENSITY, "max_num_batched_tokens": 2048,
                             "rows": rows, "all_identical": all(r["identical"] for r in rows),
                             "seconds": {"FLASH_ATTN": t_dense, "proxyattn": t_sparse}}


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
        del llm
        cleanup()
    finally:
        impl_mod.ProxyAttnImpl.forward = forward
    replay = counts[64] == counts[8]
    log(f"cudagraphs: python forward calls for 8 vs 64 decode tokens: {counts[8]} vs {counts[64]} "
        f"-> {'decode replays graphs' if replay else 'decode runs eagerly'}")
    report["cudagraphs"] = {"forward_calls": counts, "decode_replays_full_graphs": replay}


def check_dummy_128k(args, report):
    import random

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    n = 131072 - 64
    llm = LLM(model=args.dummy_8b, load_format="dummy", attention_backend="proxyattn", dtype="bfloat16",
              max_model_len=131072, enable_prefix_caching=False, max_num_batched_tokens=8192,
              gpu_memory_utilization=0.45, enforce_eager=args.eager)
    rng = random.Random(0)
    prompt = TokensPrompt(prompt_token_ids=[rng.randrange(3, 250) for _ in range(n)])
    llm.generate([TokensPrompt(prompt_token_ids=[5] * 32)], SamplingParams(max_tokens=2))
    t0 = time.perf_counter()
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1))
    ttft = time.perf_counter() - t0
    ok = len(out[0].outputs[0].token_ids) == 1
    log(f"dummy 8B: {n} prompt tokens -> {'completed' if ok else 'FAILED'} in {ttft:.2f} s (1 output token)")
    report["dummy_8b_128k"] = {"prompt_tokens": n, "completed": ok, "seconds_to_first_token": ttft,
                               "config": "default", "enforce_eager": args.eager}
    del llm
    cleanup()


def check_serve(args, report):
    port = 8765
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", args.model,
         "--attention-backend", "proxyattn", "--port", str(port), "--max-model-len", "4096",
         "--enforce-eager", "--gpu-memory-utilization", "0.4"],
        stdout=open(os.path.join(args.logdir, "serve.log"), "w"), stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
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
        results = {}
        for endpoint, body in [
            ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}),
        ]:
            for stream in (False, True):
                req = urllib.request.Request(
                    base + endpoint, data=json.dumps({**body, "model": args.model, "stream": stream}).encode(),
                    headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    raw = resp.read().decode()
                chunks = [line for line in raw.splitlines() if line.startswith("data: ")] if stream else []
                ok = (len(chunks) > 1 and chunks[-1] == "data: [DONE]") if stream else '"choices"' in raw
                results[f"{endpoint} stream={stream}"] = ok
                log(f"serve {endpoint} stream={stream}: {'ok' if ok else 'FAIL'} ({raw[:120]!r})")
        report["serve"] = results
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--essays", required=True)
    ap.add_argument("--dummy-8b")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--serve", action="store_true")
    ap.add_argument("--skip", default="", help="comma list of: equivalence,cudagraphs")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    args.logdir = os.path.dirname(args.out) or "."
    report = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)}
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
