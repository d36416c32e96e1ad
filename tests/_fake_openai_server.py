"""A fake OpenAI-compatible streaming server with known timings, for the load-test tests.

In-process: `FakeServer(options).start()` runs it on 127.0.0.1 (random port) in a thread.
As a process it stands in for `vllm serve` in the sweep tests: it accepts (and ignores)
vLLM's serve arguments, so `python tests/_fake_openai_server.py MODEL --config X --port P
--attention-backend B ...` behaves like a server (or, with `--exit-at-start`, one that fails).

Timing model (what the tests check the client's metrics against): the first token is sent
`ttft_s + ttft_per_token_s * prompt_tokens` after the request arrives, each further token
`itl_s` after the previous one, then a usage chunk. Prompts longer than `max_model_len` get a
400 with a vLLM-style error body; with `stream_error_after`, an error event ends the stream after
that many tokens. GET /metrics serves vLLM's inter-token-latency and time-per-output-token
histogram sums and counts of the finished requests, from the scheduled (not the sent) token
times. With PROXYATTN_STATS set, every request appends stats lines as
proxyattn_vllm.stats would: one per layer per `chunk` tokens of prefill, density 1.0 in the
first chunk and `density` in later ones.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class FakeOptions:
    model: str = "fake-model"
    ttft_s: float = 0.02
    ttft_per_token_s: float = 0.0
    itl_s: float = 0.01
    max_model_len: int = 1 << 20
    chunk: int = 100
    layers: int = 2
    density: float = 0.25
    send_usage: bool = True
    stream_error_after: int | None = None  # tokens sent before a mid-stream error event
    stats_path: str | None = None
    prompts: list = field(default_factory=list)  # every prompt received, in order
    # Engine-side histogram totals served at GET /metrics, as vLLM names them (see make_app).
    histograms: dict = field(default_factory=dict)
    # Text of a non-streaming completion, from the request body (None: "x" per max_tokens).
    answer: Callable[[dict], str] | None = None


def prompt_tokens(body: dict) -> int:
    """Token ids count as themselves; text counts one token per byte (a byte-level tokenizer)."""
    if "messages" in body:
        return sum(len(m["content"].encode()) for m in body["messages"])
    prompt = body["prompt"]
    return len(prompt) if isinstance(prompt, list) else len(prompt.encode())


def write_stats(path: str, options: FakeOptions, num_tokens: int) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for ctx in range(0, num_tokens, options.chunk):
            q_len = min(options.chunk, num_tokens - ctx)
            for layer in range(options.layers):
                density = 1.0 if ctx == 0 else options.density
                f.write(json.dumps({"layer": layer, "ctx": ctx, "q_len": q_len,
                                    "density": density}) + "\n")


def make_app(options: FakeOptions):
    from aiohttp import web

    async def health(request):
        return web.Response(text="")

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": options.model, "object": "model"}]})

    async def generate(request):
        arrived = time.perf_counter()
        body = await request.json()
        n_prompt = prompt_tokens(body)
        options.prompts.append(body.get("prompt", body.get("messages")))
        if n_prompt > options.max_model_len:
            return web.json_response(
                {"error": {"message": f"This model's maximum context length is "
                           f"{options.max_model_len} tokens. However, you requested {n_prompt}.",
                           "type": "BadRequestError", "code": 400}}, status=400)
        if options.stats_path:
            write_stats(options.stats_path, options, n_prompt)
        chat = request.path.endswith("/chat/completions")
        if not body.get("stream"):
            await asyncio.sleep(options.ttft_s + options.ttft_per_token_s * n_prompt)
            text = options.answer(body) if options.answer else "x" * body["max_tokens"]
            choice = {"index": 0, "message": {"role": "assistant", "content": text}} if chat else {"index": 0, "text": text}
            usage = {"prompt_tokens": n_prompt, "completion_tokens": body["max_tokens"],
                     "total_tokens": n_prompt + body["max_tokens"]}
            return web.json_response({"choices": [choice], "usage": usage})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        n_out = body["max_tokens"]
        due = arrived + options.ttft_s + options.ttft_per_token_s * n_prompt
        for i in range(n_out):
            if i == options.stream_error_after:  # how vLLM reports a failure after the headers
                error = {"error": {"message": "engine core died", "type": "InternalServerError"}}
                await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
                return response
            # Sleep to absolute deadlines so delays do not accumulate scheduling overhead.
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            choice = ({"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"})
            await response.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
            due += options.itl_s
        if options.send_usage and body.get("stream_options", {}).get("include_usage"):
            usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                     "total_tokens": n_prompt + n_out}
            await response.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        if n_out > 1:  # what vLLM's engine-side histograms would add for this request
            for name, total, count in (("vllm:inter_token_latency_seconds", options.itl_s * (n_out - 1), n_out - 1),
                                       ("vllm:request_time_per_output_token_seconds", options.itl_s, 1)):
                old_total, old_count = options.histograms.get(name, (0.0, 0))
                options.histograms[name] = (old_total + total, old_count + count)
        return response

    async def metrics(request):
        lines = []
        for name, (total, count) in options.histograms.items():
            labels = f'{{engine="0",model_name="{options.model}"}}'
            lines += [f"# TYPE {name} histogram", f"{name}_sum{labels} {total}", f"{name}_count{labels} {count}.0"]
        return web.Response(text="\n".join(lines) + "\n")

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/completions", generate)
    app.router.add_post("/v1/chat/completions", generate)
    return app


class FakeServer:
    """The fake server on its own event loop in a daemon thread (the client owns the main one)."""

    def __init__(self, options: FakeOptions):
        self.options = options
        self.loop = asyncio.new_event_loop()
        self.runner = None
        self.port = None

    def start(self) -> "FakeServer":
        from aiohttp import web

        async def setup():
            self.runner = web.AppRunner(make_app(self.options))
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            self.port = self.runner.addresses[0][1]

        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(setup(), self.loop).result(timeout=10)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    from aiohttp import web

    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default="fake-model")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--exit-at-start", type=int, help="print an error and exit with this code")
    ap.add_argument("--ttft-s", type=float, default=0.02)
    ap.add_argument("--ttft-per-token-s", type=float, default=0.0)
    ap.add_argument("--itl-s", type=float, default=0.005)
    ap.add_argument("--max-model-len", type=int, default=1 << 20)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--density", type=float, default=0.25)
    args, ignored = ap.parse_known_args()  # vLLM's serve arguments (--config, ...)
    print(f"fake server: model {args.model}, ignoring {ignored}", flush=True)
    if args.exit_at_start is not None:
        print("RuntimeError: fake engine failed to start", flush=True)
        sys.exit(args.exit_at_start)
    options = FakeOptions(model=args.model, ttft_s=args.ttft_s, ttft_per_token_s=args.ttft_per_token_s,
                          itl_s=args.itl_s, max_model_len=args.max_model_len, chunk=args.chunk,
                          density=args.density, stats_path=os.environ.get("PROXYATTN_STATS"))
    # Stop within a second on SIGTERM even with a request in flight (aiohttp waits 60 s).
    web.run_app(make_app(options), host=args.host, port=args.port, print=None, shutdown_timeout=1.0)


if __name__ == "__main__":
    main()
