"""Streaming load test for OpenAI-compatible servers (vLLM): time to first token and friends.

    python benchmarks/e2e/loadtest.py --base-url http://127.0.0.1:8000 --random-input-len 8K,32K \
        --num-prompts 6 --random-output-len 16 --label dense --result-filename ttft.json
    proxyattn-loadtest ...                        # the same, installed as a console script
    proxyattn-loadtest --plot ttft.png dense.json proxyattn.json   # TTFT vs prompt length only

Options spelled as in `vllm bench serve` (`--random-input-len`, `--request-rate`,
`--max-concurrency`, `--num-warmups`, `--save-result`, ...) mean what they mean there; `--help`
lists where the defaults differ.

Why a client of our own: a TTFT benchmark must control exactly how much prefill the server
does. Every prompt has an exact token count and starts with a unique prefix (so prefix caching
can never turn a repeat into a cache hit), the decode length is fixed (`ignore_eos` +
`max_tokens`), and token counts come from the server's usage chunk. Aggregates carry the field
names of `vllm bench serve` JSON (`mean_ttft_ms`, `p99_itl_ms`, ...) so numbers line up with it.

Prompts are token ids (the completions API accepts a list of ints; ids 3..250 are ordinary
tokens of every tokenizer we use, including the byte-level one of dummy-weight models) unless
`--tokenizer` is given: then they are text with an exact token count under that tokenizer,
optionally cut from a directory of .txt files (`--text-dir`).

Needs only aiohttp (a vLLM dependency); transformers (for --tokenizer), tqdm (progress bar) and
matplotlib (for --plot) are optional. `run_benchmark(config)` is the programmatic entry point.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import datetime
import json
import math
import os
import random
import re
import secrets
import sys
import textwrap
import time
from dataclasses import dataclass, field

# Token ids that are ordinary (non-special) tokens in every tokenizer we serve; the byte-level
# tokenizer of benchmarks/common/dummy_llama.py has 3 special tokens, then 256 byte tokens.
SAFE_TOKEN_IDS = range(3, 251)
# Leading tokens that make each prompt unique: 4 for the run's nonce, 4 for the request index.
ID_PREFIX_DIGITS = 4
METRICS = ("ttft", "tpot", "itl", "e2el")
ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
ARRIVALS = ("sequential", "constant", "poisson")
# Ordinary words for text prompts when no --text-dir is given.
FILLER_WORDS = (
    "the quick river crosses a quiet valley where old stone bridges carry travellers between "
    "market towns and farms while clouds drift over hills covered with grass and scattered "
    "trees under a pale morning sky as merchants count coins and children read books about "
    "distant islands ships storms maps lanterns gardens mountains winters letters and songs"
).split()


class ServerUnreachable(RuntimeError):
    """The server did not answer GET /v1/models: nothing was benchmarked."""


@dataclass
class LoadTestConfig:
    """One load-test run. Lengths are in tokens, times in seconds, rates in requests/s."""

    base_url: str = "http://127.0.0.1:8000"
    endpoint: str = "completions"  # a key of ENDPOINTS
    model: str | None = None  # None: the first model the server lists
    prompt_lens: list[int] = field(default_factory=lambda: [1024])
    # Draw each length uniformly from [lo, hi] instead of taking it from prompt_lens.
    prompt_len_range: tuple[int, int] | None = None
    # As `vllm bench serve --random-range-ratio`: a request whose nominal length is n gets a
    # length drawn uniformly from [floor(n * (1 - r)), ceil(n * (1 + r))]; 0 keeps n exactly.
    input_range_ratio: float = 0.0
    output_range_ratio: float = 0.0  # the same around output_len (at least 1 token)
    length_order: str = "cycle"  # "cycle" through prompt_lens, or "random" choice from them
    num_prompts: int | None = None  # None: one request per entry of prompt_lens
    arrival: str = "sequential"  # one of ARRIVALS
    request_rate: float = math.inf  # for constant/poisson; inf sends everything at once
    max_concurrency: int | None = None
    warmup_requests: int = 1  # sent one at a time before the measured requests, not counted
    output_len: int = 16
    # Decode exactly max_tokens tokens (vLLM's ignore_eos); off, a request may stop at EOS.
    ignore_eos: bool = True
    seed: int = 0
    tokenizer: str | None = None
    text_dir: str | None = None
    label: str = ""
    api_key: str | None = None
    request_timeout_s: float = 3600.0
    # Leading value of every prompt's unique prefix; None draws a fresh one, so that two runs
    # with the same seed against one server still never share a cached prefix.
    prefix_nonce: int | None = None
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.endpoint not in ENDPOINTS:
            raise ValueError(f"endpoint {self.endpoint!r}: use one of {sorted(ENDPOINTS)}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival {self.arrival!r}: use one of {ARRIVALS}")
        if self.length_order not in ("cycle", "random"):
            raise ValueError(f"length_order {self.length_order!r}: use 'cycle' or 'random'")
        if self.arrival != "sequential" and not self.request_rate > 0:
            raise ValueError(f"request_rate {self.request_rate}: must be > 0 for {self.arrival}")
        if self.endpoint == "chat" and not self.tokenizer:
            raise ValueError("the chat endpoint takes text prompts: pass a tokenizer")
        if self.text_dir and not self.tokenizer:
            raise ValueError("text prompts from text_dir need a tokenizer to count tokens")
        for name in ("input_range_ratio", "output_range_ratio"):
            ratio = getattr(self, name)
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"{name} {ratio}: must be in [0, 1)")
        if self.prompt_len_range and self.input_range_ratio:
            raise ValueError("prompt_len_range and input_range_ratio both spread the prompt "
                             "lengths: give one of them")
        lengths = list(self.prompt_len_range or self.prompt_lens)
        minimum = 2 * ID_PREFIX_DIGITS + 1
        if not lengths or min(lengths) < minimum:
            raise ValueError(f"prompt lengths {lengths}: need at least one, each >= {minimum}")
        shortest = ratio_bounds(min(lengths), self.input_range_ratio)[0]
        if shortest < minimum:
            raise ValueError(f"input_range_ratio {self.input_range_ratio} draws prompts as short "
                             f"as {shortest} tokens: each must be >= {minimum}")
        if self.prompt_len_range and self.prompt_len_range[0] > self.prompt_len_range[1]:
            raise ValueError(f"prompt_len_range {self.prompt_len_range}: lo > hi")
        if self.output_len < 1:
            raise ValueError(f"output_len {self.output_len}: must be >= 1")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency {self.max_concurrency}: must be >= 1 (None: no cap)")


def ratio_bounds(length: int, ratio: float, minimum: int = 0) -> tuple[int, int]:
    """The inclusive range a length is drawn from under a range ratio, as for the random prompts
    of `vllm bench serve`: [floor(length * (1 - ratio)), ceil(length * (1 + ratio))]."""
    return max(minimum, math.floor(length * (1 - ratio))), math.ceil(length * (1 + ratio))


# ---------------------------------------------------------------------------------------------
# Prompts


def _digits(value: int, base: int, width: int) -> list[int]:
    """`value` as `width` base-`base` digits, most significant first (wraps above base**width)."""
    out = []
    for _ in range(width):
        value, digit = divmod(value, base)
        out.append(digit)
    return out[::-1]


class PromptFactory:
    """Prompts of exact token counts, each starting with a prefix unique to (nonce, index).

    A unique *first* token block is enough: vLLM's prefix cache hashes blocks as a chain, so no
    later block of a prompt can hit the cache either.
    """

    def __init__(self, config: LoadTestConfig, nonce: int):
        self.config = config
        self.nonce = nonce
        self.tokenizer = None
        if config.tokenizer:
            try:
                from transformers import AutoTokenizer
            except ImportError as exc:
                raise RuntimeError("--tokenizer needs the transformers package") from exc
            self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer)
            # Completions prompts are tokenized by the server with special tokens (e.g. BOS);
            # chat content sits inside a template, so only its own tokens are counted.
            with_specials = config.endpoint == "completions"
            self.num_special = len(self.tokenizer.encode("", add_special_tokens=with_specials))
            self.haystack = self.tokenizer.encode(self._haystack_text(), add_special_tokens=False)

    def _haystack_text(self) -> str:
        if self.config.text_dir:
            names = sorted(n for n in os.listdir(self.config.text_dir) if n.endswith(".txt"))
            if not names:
                raise RuntimeError(f"no .txt files in {self.config.text_dir}")
            parts = []
            for name in names:
                with open(os.path.join(self.config.text_dir, name), encoding="utf-8") as f:
                    parts.append(f.read())
            return "\n\n".join(parts)
        rng = random.Random(f"{self.config.seed}-filler")
        return " ".join(rng.choice(FILLER_WORDS) for _ in range(20000))

    def make(self, index: int, num_tokens: int) -> list[int] | str:
        rng = random.Random(f"{self.config.seed}-prompt-{index}")
        if self.tokenizer is None:
            base = len(SAFE_TOKEN_IDS)
            prefix = _digits(self.nonce, base, ID_PREFIX_DIGITS) + _digits(index, base, ID_PREFIX_DIGITS)
            prefix = [SAFE_TOKEN_IDS[d] for d in prefix]
            return prefix + rng.choices(SAFE_TOKEN_IDS, k=num_tokens - len(prefix))
        return self._make_text(rng, index, num_tokens)

    def _make_text(self, rng: random.Random, index: int, num_tokens: int) -> str:
        """Text that encodes to exactly num_tokens tokens (server-side counting).

        Decoding a token slice and encoding it again can merge or split tokens at the edges, so
        the length is corrected from the end until it is exact (a few rounds at most).
        """
        tok = self.tokenizer
        hay = self.haystack
        position = rng.randrange(len(hay))

        def take(count: int) -> str:
            nonlocal position
            ids = [hay[(position + i) % len(hay)] for i in range(max(count, 0))]
            position += len(ids)
            return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        text = f"{self.nonce:08x}-{index:06d}: "
        text += take(num_tokens - self.num_special - len(tok.encode(text, add_special_tokens=False)))
        for _ in range(16):
            ids = tok.encode(text, add_special_tokens=False)
            excess = len(ids) + self.num_special - num_tokens
            if excess == 0:
                return text
            if excess > 0:
                text = tok.decode(ids[:-excess], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)
            else:
                text += take(-excess)
        raise RuntimeError(f"could not make a text prompt of exactly {num_tokens} tokens")


@dataclass
class PlannedRequest:
    index: int
    prompt_len: int
    body: bytes  # the JSON request, serialized before timing starts
    send_at: float  # seconds after the start of the measured phase


def request_count(config: LoadTestConfig) -> int:
    return config.num_prompts if config.num_prompts is not None else len(config.prompt_lens)


def request_lengths(config: LoadTestConfig) -> list[int]:
    """Prompt lengths of the measured requests, in order (a function of the seed only)."""
    return plan_lengths(config, request_count(config), random.Random(f"{config.seed}-lengths"))


def warmup_lengths(config: LoadTestConfig) -> list[int]:
    """Warm-ups draw from the same lengths as the measured requests."""
    return plan_lengths(config, config.warmup_requests, random.Random(f"{config.seed}-warmup"))


def plan_lengths(config: LoadTestConfig, count: int, rng: random.Random) -> list[int]:
    if config.prompt_len_range:
        lo, hi = config.prompt_len_range
        return [rng.randint(lo, hi) for _ in range(count)]
    if config.length_order == "random":
        lengths = [rng.choice(config.prompt_lens) for _ in range(count)]
    else:
        lengths = [config.prompt_lens[i % len(config.prompt_lens)] for i in range(count)]
    if config.input_range_ratio:
        lengths = [rng.randint(*ratio_bounds(n, config.input_range_ratio)) for n in lengths]
    return lengths


def plan_output_lens(config: LoadTestConfig, count: int, rng: random.Random) -> list[int]:
    """max_tokens of each request: output_len, or drawn around it under output_range_ratio."""
    if not config.output_range_ratio:
        return [config.output_len] * count
    lo, hi = ratio_bounds(config.output_len, config.output_range_ratio, minimum=1)
    return [rng.randint(lo, hi) for _ in range(count)]


def plan_send_times(config: LoadTestConfig, count: int, rng: random.Random) -> list[float]:
    """Offsets (s) at which requests are sent; sequential runs ignore them."""
    if config.arrival == "sequential" or math.isinf(config.request_rate):
        return [0.0] * count
    if config.arrival == "constant":
        return [i / config.request_rate for i in range(count)]
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(config.request_rate)
    return times


def request_body(config: LoadTestConfig, model: str, prompt: list[int] | str,
                 max_tokens: int | None = None) -> bytes:
    """The streamed request; max_tokens defaults to config.output_len."""
    body = {
        "model": model,
        "max_tokens": config.output_len if max_tokens is None else max_tokens,
        "ignore_eos": config.ignore_eos,  # vLLM extension: decode exactly max_tokens tokens
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return json.dumps(body).encode()


# ---------------------------------------------------------------------------------------------
# Requests


def _error_message(what: str, text: str) -> str:
    """`what: message` in one line, the message taken from the server's JSON when it sent some."""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error", data)
        message = inner.get("message") if isinstance(inner, dict) else inner
        if message:
            text = str(message)
    return f"{what}: {' '.join(text.split())[:500]}"


async def send_request(session, url: str, planned: PlannedRequest, headers: dict,
                       timeout_s: float, start_ref: float) -> dict:
    """Send one streamed request; return its record (times in ms, never raises)."""
    import aiohttp

    record = {"index": planned.index, "prompt_len": planned.prompt_len, "success": False,
              "error": "", "prompt_tokens": None, "output_tokens": None, "ttft_ms": None,
              "tpot_ms": None, "e2el_ms": None, "itl_ms": [], "usage_from_server": False}
    first = last = None
    chunks = 0
    usage = None
    start = time.perf_counter()
    record["start_s"] = round(start - start_ref, 6)
    try:
        async with session.post(url, data=planned.body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status >= 400:
                record["error"] = _error_message(f"HTTP {resp.status}", await resp.text())
                return record
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and SSE comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):  # vLLM reports mid-stream failures as an error event
                    record["error"] = _error_message("error in stream", json.dumps(chunk))
                    return record
                now = time.perf_counter()
                if chunk.get("choices"):
                    if first is None:
                        first = now
                    else:
                        record["itl_ms"].append((now - last) * 1e3)
                    last = now
                    chunks += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        return record
    end = time.perf_counter()
    if first is None:
        record["error"] = "stream ended without any token"
        return record
    record["ttft_ms"] = (first - start) * 1e3
    record["e2el_ms"] = (end - start) * 1e3
    if usage:
        record["usage_from_server"] = True
        record["prompt_tokens"] = usage.get("prompt_tokens")
        record["output_tokens"] = usage.get("completion_tokens")
    else:  # server without usage support: one token per streamed chunk is the best guess
        record["output_tokens"] = chunks
    if record["output_tokens"] and record["output_tokens"] > 1:
        record["tpot_ms"] = (record["e2el_ms"] - record["ttft_ms"]) / (record["output_tokens"] - 1)
    record["success"] = True
    return record


async def list_models(session, base_url: str, headers: dict) -> list[str]:
    """Model ids the server serves; ServerUnreachable (one line, what to do) when it does not answer."""
    import aiohttp

    url = base_url.rstrip("/") + "/v1/models"
    try:
        async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as resp:
            if resp.status != 200:
                raise ServerUnreachable(
                    f"{url} answered {_error_message(f'HTTP {resp.status}', await resp.text())}; "
                    "is this an OpenAI-compatible server (vllm serve)?")
            data = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise ServerUnreachable(
            f"cannot reach a server at {base_url} ({type(exc).__name__}: {exc}); start one "
            "(vllm serve MODEL ...) or pass the right --base-url") from None
    return [m["id"] for m in data.get("data", [])]


class _Progress:
    """tqdm when installed, else a carriage-return line on stderr."""

    def __init__(self, total: int, label: str, enabled: bool):
        self.total, self.label, self.done, self.failed = total, label, 0, 0
        self.bar = None
        self.enabled = enabled and total > 0
        if self.enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc=label or "requests", file=sys.stderr)

    def update(self, record: dict) -> None:
        self.done += 1
        self.failed += not record["success"]
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(failed=self.failed)
        else:
            print(f"\r[{self.label or 'requests'}] {self.done}/{self.total} done, "
                  f"{self.failed} failed", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Metrics


def percentile(values: list[float], q: float) -> float:
    """q-th percentile with linear interpolation between order statistics (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def describe(values: list[float]) -> dict:
    """mean/median/std (population, as numpy)/p90/p99 of values; None for each when empty."""
    if not values:
        return dict.fromkeys(("mean", "median", "std", "p90", "p99"))
    mean = sum(values) / len(values)
    return {"mean": mean, "median": percentile(values, 50),
            "std": math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)),
            "p90": percentile(values, 90), "p99": percentile(values, 99)}


def summarize(records: list[dict], duration_s: float) -> dict:
    """Aggregates named like `vllm bench serve` JSON (completed, mean_ttft_ms, p99_e2el_ms ...)."""
    done = [r for r in records if r["success"]]
    total_in = sum(r["prompt_tokens"] if r["prompt_tokens"] is not None else r["prompt_len"]
                   for r in done)
    total_out = sum(r["output_tokens"] or 0 for r in done)
    per_second = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: None)
    out = {
        "completed": len(done), "failed": len(records) - len(done), "duration": duration_s,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": per_second(len(done)), "output_throughput": per_second(total_out),
        "total_token_throughput": per_second(total_in + total_out),
    }
    samples = {
        "ttft": [r["ttft_ms"] for r in done],
        "tpot": [r["tpot_ms"] for r in done if r["tpot_ms"] is not None],
        "itl": [gap for r in done for gap in r["itl_ms"]],
        "e2el": [r["e2el_ms"] for r in done],
    }
    for metric in METRICS:
        for stat, value in describe(samples[metric]).items():
            out[f"{stat}_{metric}_ms"] = value
    errors: dict[str, int] = {}
    for r in records:
        if not r["success"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    out["errors"] = [{"error": e, "count": n} for e, n in sorted(errors.items(), key=lambda x: -x[1])]
    return out


def summarize_by_prompt_len(records: list[dict]) -> dict:
    """Per target prompt length: aggregates over that length's requests (span = first send to
    last completion of those requests)."""
    groups: dict[int, list[dict]] = {}
    for r in records:
        groups.setdefault(r["prompt_len"], []).append(r)
    out = {}
    for length in sorted(groups):
        group = groups[length]
        ends = [r["start_s"] + (r["e2el_ms"] or 0) / 1e3 for r in group]
        out[str(length)] = summarize(group, max(ends) - min(r["start_s"] for r in group))
    return out


# ---------------------------------------------------------------------------------------------
# The run


async def run_benchmark(config: LoadTestConfig) -> dict:
    """Run one load test; return the result dict (what --save-result writes).

    Raises ServerUnreachable before sending anything when the server does not answer, and
    ValueError for a bad config. Failed requests never raise: they are counted in `failed`.
    """
    import aiohttp

    config.validate()
    base_url = config.base_url.rstrip("/")
    headers = {"Content-Type": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    nonce = config.prefix_nonce if config.prefix_nonce is not None else secrets.randbits(32)
    # The connector's default cap of 100 connections would queue requests client-side and
    # inflate their TTFT; the only cap is max_concurrency.
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or 0)
    async with aiohttp.ClientSession(connector=connector) as session:
        models = await list_models(session, base_url, headers)
        model = config.model or (models[0] if models else None)
        if not model:
            raise ServerUnreachable(f"{base_url}/v1/models lists no model; pass a model name")
        factory = PromptFactory(config, nonce)
        lengths = request_lengths(config)
        send_times = plan_send_times(config, len(lengths), random.Random(f"{config.seed}-arrivals"))
        outputs = plan_output_lens(config, len(lengths), random.Random(f"{config.seed}-outputs"))
        warmup_lens = warmup_lengths(config)
        warmup_outputs = plan_output_lens(config, len(warmup_lens),
                                          random.Random(f"{config.seed}-warmup-outputs"))
        # Warm-ups take the first indices so that every prompt of the run has its own prefix.
        warmups = [PlannedRequest(i, n, request_body(config, model, factory.make(i, n), out), 0.0)
                   for i, (n, out) in enumerate(zip(warmup_lens, warmup_outputs))]
        planned = [PlannedRequest(len(warmups) + i, n, request_body(
                       config, model, factory.make(len(warmups) + i, n), out), t)
                   for i, (n, t, out) in enumerate(zip(lengths, send_times, outputs))]
        url = base_url + ENDPOINTS[config.endpoint]
        warmup_records = []
        for request in warmups:
            warmup_records.append(await send_request(session, url, request, headers,
                                                     config.request_timeout_s, time.perf_counter()))
        progress = _Progress(len(planned), config.label, config.progress)
        start = time.perf_counter()
        semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None

        async def send(request: PlannedRequest) -> dict:
            if semaphore is None:
                record = await send_request(session, url, request, headers,
                                            config.request_timeout_s, start)
            else:
                async with semaphore:
                    record = await send_request(session, url, request, headers,
                                                config.request_timeout_s, start)
            progress.update(record)
            return record

        if config.arrival == "sequential":
            records = [await send(request) for request in planned]
        else:
            tasks = []
            for request in planned:
                delay = start + request.send_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(request)))
            records = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        progress.close()
    result = {
        "label": config.label,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "base_url": base_url,
        "endpoint": ENDPOINTS[config.endpoint],
        "model": model,
        # The key authenticates against the server: a result file must not carry it.
        "config": {**dataclasses.asdict(config), "api_key": "<redacted>" if config.api_key else None},
        "prefix_nonce": nonce,
        **summarize(records, duration),
        "warmup_failed": sum(not r["success"] for r in warmup_records),
        "warmup_errors": sorted({r["error"] for r in warmup_records if not r["success"]}),
        "by_prompt_len": summarize_by_prompt_len(records),
        "requests": records,
    }
    return result


# Engine-side latency histograms of vLLM's GET /metrics (Prometheus text). Their timestamps come
# from the engine core, so they measure decode steps without the HTTP streaming and client-side
# delays that a client's TPOT includes.
SERVER_HISTOGRAMS = {"itl": "vllm:inter_token_latency_seconds",
                     "tpot": "vllm:request_time_per_output_token_seconds"}


def parse_prometheus(text: str, names) -> dict[str, float]:
    """The values of the metrics ``names`` in a Prometheus text exposition, each summed over its
    label sets (engines, models); a name that is not exposed is absent, an unparsable line skipped."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            try:
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return totals


def fetch_metrics_text(base_url: str, timeout_s: float = 10.0) -> str | None:
    """The body of ``GET base_url/metrics``; None when the server does not answer or has none."""
    import urllib.request

    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as resp:
            return resp.read().decode("utf-8", "replace")
    except OSError:  # URLError and HTTPError included
        return None


def parse_server_histograms(text: str) -> dict[str, float]:
    """``{"itl_sum": s, "itl_count": n, "tpot_sum": ..., "tpot_count": ...}`` from a Prometheus
    text exposition, summed over label sets (engines, models); keys absent when not exposed."""
    wanted = {f"{name}_{part}": f"{key}_{part}" for key, name in SERVER_HISTOGRAMS.items()
              for part in ("sum", "count")}
    return {wanted[name]: value for name, value in parse_prometheus(text, wanted).items()}


def fetch_server_histograms(base_url: str, timeout_s: float = 10.0) -> dict[str, float] | None:
    """:func:`parse_server_histograms` of ``GET base_url/metrics``; None when the server has no
    metrics endpoint or does not answer (the caller then reports client-side numbers only)."""
    text = fetch_metrics_text(base_url, timeout_s)
    return None if text is None else parse_server_histograms(text)


def server_latency_ms(before: dict | None, after: dict | None) -> dict:
    """Engine-side means over the requests between two :func:`fetch_server_histograms` snapshots:
    ``server_mean_itl_ms`` (per token) and ``server_mean_tpot_ms`` (per request, then averaged);
    None where a snapshot is missing or no request finished in between."""
    out = {}
    for key in SERVER_HISTOGRAMS:
        mean = None
        if before is not None and after is not None and f"{key}_count" in after:
            count = after[f"{key}_count"] - before.get(f"{key}_count", 0.0)
            if count > 0:
                mean = (after[f"{key}_sum"] - before.get(f"{key}_sum", 0.0)) / count * 1e3
        out[f"server_mean_{key}_ms"] = mean
    return out


def run(config: LoadTestConfig) -> dict:
    """Synchronous wrapper of run_benchmark for callers without an event loop."""
    return asyncio.run(run_benchmark(config))


# ---------------------------------------------------------------------------------------------
# Output


def _ms(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_summary(result: dict) -> str:
    """A readable summary: totals, then one row per prompt length, then error messages."""
    title = f" {result.get('label') or 'load test'}: {result['model']} {result['endpoint']} "
    rate = result["request_throughput"]
    lines = [
        f"{title:=^100}",
        f"completed {result['completed']}  failed {result['failed']}  "
        f"duration {result['duration']:.2f} s  "
        f"requests/s {'-' if rate is None else f'{rate:.3f}'}  "
        f"input tokens {result['total_input_tokens']}  output tokens {result['total_output_tokens']}",
        f"{'prompt_len':>10} {'ok':>4} {'failed':>6} {'mean TTFT ms':>13} {'p50 TTFT':>10} "
        f"{'p99 TTFT':>10} {'mean TPOT ms':>13} {'mean ITL ms':>12} {'mean E2E ms':>12}",
    ]
    for length, s in result["by_prompt_len"].items():
        lines.append(
            f"{length:>10} {s['completed']:>4} {s['failed']:>6} {_ms(s['mean_ttft_ms']):>13} "
            f"{_ms(s['median_ttft_ms']):>10} {_ms(s['p99_ttft_ms']):>10} "
            f"{_ms(s['mean_tpot_ms']):>13} {_ms(s['mean_itl_ms']):>12} {_ms(s['mean_e2el_ms']):>12}")
    lines.append(
        f"{'all':>10} {result['completed']:>4} {result['failed']:>6} "
        f"{_ms(result['mean_ttft_ms']):>13} {_ms(result['median_ttft_ms']):>10} "
        f"{_ms(result['p99_ttft_ms']):>10} {_ms(result['mean_tpot_ms']):>13} "
        f"{_ms(result['mean_itl_ms']):>12} {_ms(result['mean_e2el_ms']):>12}")
    for err in result["errors"]:
        lines.append(f"failed x{err['count']}: {err['error']}")
    return "\n".join(lines)


def ttft_series(data: dict, default_label: str) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, [(prompt_len, mean TTFT ms)]) lines from a load-test result or a ttft_sweep result."""
    if "runs" in data:  # ttft_sweep.py output: one line per backend
        by_backend: dict[str, list[tuple[int, float]]] = {}
        for run_ in data["runs"]:
            if run_.get("mean_ttft_ms") is not None:
                by_backend.setdefault(run_["backend"], []).append((run_["prompt_len"], run_["mean_ttft_ms"]))
        return [(name, sorted(points)) for name, points in by_backend.items()]
    points = [(int(n), s["mean_ttft_ms"]) for n, s in data.get("by_prompt_len", {}).items()
              if s.get("mean_ttft_ms") is not None]
    return [(data.get("label") or default_label, sorted(points))]


def length_label(tokens: int) -> str:
    """Axis label of a prompt length: "32K" for 32768, "~256K" for 262128 (within 0.1%: a sweep
    trims its longest prompt to leave room for the output), the plain number otherwise."""
    kib = round(tokens / 1024)
    if tokens == kib * 1024:
        return f"{kib}K"
    return f"~{kib}K" if kib and abs(tokens - kib * 1024) <= tokens / 1000 else str(tokens)


def plot_ttft(result_paths: list[str], out_png: str) -> None:
    """TTFT vs prompt length, one line per result (or per backend of a sweep result)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = set()
    for path in result_paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for label, points in ttft_series(data, os.path.splitext(os.path.basename(path))[0]):
            if points:
                xs, ys = zip(*points)
                lengths.update(xs)
                ax.plot(xs, [y / 1e3 for y in ys], marker="o", label=label)
    if not lengths:
        raise RuntimeError(f"no TTFT data in {', '.join(result_paths)}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sorted(lengths))
    ax.set_xticklabels([length_label(n) for n in sorted(lengths)])
    ax.minorticks_off()
    # Labelled 1-2-5 steps: TTFTs span a few decades, plain powers of ten leave too few labels.
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("mean TTFT (s)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line


def parse_tokens(text: str) -> int:
    """'8192', '8K' (8192) or '1M' (1048576) -> tokens."""
    text = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def parse_token_list(text: str) -> list[int]:
    return [parse_tokens(part) for part in text.split(",") if part.strip()]


def parse_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return parse_tokens(lo), parse_tokens(hi)


def parse_range_ratio(text: str) -> tuple[float, float]:
    """`--random-range-ratio` as `vllm bench serve` reads it: one number for input and output
    lengths, or a JSON object '{"input": 0.3, "output": 0.5}' -> (input ratio, output ratio)."""
    try:
        ratio = float(text)
        return ratio, ratio
    except ValueError:
        pass
    try:
        data = json.loads(text)
        return float(data["input"]), float(data["output"])
    except (ValueError, TypeError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number, or a JSON object with the "
                                         "keys \"input\" and \"output\"") from None


def parse_endpoint(text: str) -> str:
    """An API path (`/v1/completions`, `/v1/chat/completions`) or short name -> ENDPOINTS key."""
    for key, path in ENDPOINTS.items():
        if text.rstrip("/") in (key, path):
            return key
    raise argparse.ArgumentTypeError(f"{text!r}: use {' or '.join(ENDPOINTS.values())}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown where there is one to show (not None, not an off switch); the option names
    in an action's `hidden_aliases` (older spellings, still accepted) left out of --help."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text, width):
        # Never break an option name such as --random-input-len at its hyphens.
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _format_action_invocation(self, action):
        hidden = getattr(action, "hidden_aliases", ())
        if hidden:
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in hidden]
        return super()._format_action_invocation(action)


def _option(group, *names: str, hidden: tuple[str, ...] = (), **kwargs) -> argparse.Action:
    """add_argument with older spellings that parse the same but do not appear in --help."""
    action = group.add_argument(*names, *hidden, **kwargs)
    action.hidden_aliases = frozenset(hidden)
    return action


DESCRIPTION = """\
Streaming load test for OpenAI-compatible servers (vllm serve): time to first
token, time per output token, inter-token and end-to-end latency, per prompt
length. Every prompt has an exact token count and a unique prefix (no
prefix-cache hits), and decodes exactly the tokens asked for.

  proxyattn-loadtest --random-input-len 8K,32K --num-prompts 6 --save-result
  proxyattn-loadtest --plot ttft.png dense.json proxyattn.json   (plot only)"""

EPILOG = """\
Options spelled as in `vllm bench serve` mean the same here. Differences:
  - lengths accept K and M (8K = 8192); --random-input-len takes a comma list
    of lengths, and results are also reported per length;
  - without --request-rate or --arrival, requests go one at a time, each after
    the previous one completed (vllm bench serve sends all at once);
    --request-rate alone gives Poisson arrivals at that rate, as there;
  - --ignore-eos is on unless --no-ignore-eos (vllm bench serve forces it on
    for its random prompts too);
  - the defaults of --num-prompts, --random-output-len and --num-warmups suit
    TTFT measurements;
  - --result-dir or --result-filename alone also save the result; the JSON
    holds every request's record and a per-length breakdown next to the
    aggregate fields of vllm bench serve (mean_ttft_ms, p99_itl_ms, ...).
Exit status: 0 done (failed requests are reported, not fatal), 1 every
request failed, 2 bad arguments or an unreachable server."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="proxyattn-loadtest", description=DESCRIPTION,
                                 epilog=EPILOG, formatter_class=_HelpFormatter)
    ap.add_argument("results", nargs="*", metavar="RESULT_JSON",
                    help="with --plot: result files to plot instead of running a load test")

    server = ap.add_argument_group("server")
    server.add_argument("--base-url", metavar="URL",
                        help="server URL, e.g. http://10.0.0.5:8000 (default: http://HOST:PORT)")
    server.add_argument("--host", default="127.0.0.1", help="server host, when no --base-url")
    server.add_argument("--port", type=int, default=8000, help="server port, when no --base-url")
    server.add_argument("--endpoint", type=parse_endpoint, default=ENDPOINTS["completions"],
                        metavar="PATH", help="API path: /v1/completions (token-id or text "
                        "prompts) or /v1/chat/completions (text only: needs --tokenizer)")
    server.add_argument("--model", help="model name sent with the requests "
                        "(default: the first model the server lists at /v1/models)")
    server.add_argument("--api-key", metavar="KEY", help="bearer token for the server "
                        "(default: $OPENAI_API_KEY, if set)")
    server.add_argument("--request-timeout-s", type=float, default=3600.0, metavar="SECONDS",
                        help="a request that has not finished after this long fails")

    prompts = ap.add_argument_group("prompts")
    _option(prompts, "--random-input-len", "--input-len", hidden=("--prompt-lens",),
            dest="prompt_lens", type=parse_token_list, default="1024", metavar="LENS",
            help="prompt length in tokens, counted as the server counts them; a comma list "
            "(8K,32K) sends requests of each length in turn (see --length-order)")
    _option(prompts, "--random-output-len", "--output-len", dest="output_len",
            type=parse_tokens, default=16, metavar="N",
            help="tokens decoded per request (the request's max_tokens)")
    prompts.add_argument("--random-range-ratio", type=parse_range_ratio, default="0.0",
                         metavar="R", help="draw each prompt length uniformly from "
                         "[len * (1 - R), len * (1 + R)], and the output length likewise; "
                         "R in [0, 1), or a JSON object '{\"input\": R1, \"output\": R2}' for "
                         "separate ratios")
    _option(prompts, "--input-len-range", hidden=("--prompt-len-range",), dest="prompt_len_range",
            type=parse_range, metavar="LO:HI",
            help="draw each prompt length uniformly from [LO, HI] instead of --random-input-len")
    prompts.add_argument("--length-order", choices=("cycle", "random"), default="cycle",
                         help="how requests take their lengths from a --random-input-len list: "
                         "in turn, or each a random choice")
    prompts.add_argument("--tokenizer", metavar="NAME_OR_PATH",
                         help="send text prompts of exact token counts under this tokenizer "
                         "(needs transformers) instead of token ids")
    prompts.add_argument("--text-dir", metavar="DIR", help="with --tokenizer: cut the text prompts "
                         "from the .txt files of this directory (default: generated filler words)")
    prompts.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                         help="ask the server to decode all --random-output-len tokens even past "
                         "an end-of-sequence token")
    prompts.add_argument("--seed", type=int, default=0,
                         help="seeds prompt contents, drawn lengths and arrival times")

    load = ap.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, metavar="N",
                      help="measured requests (default: one per --random-input-len length)")
    load.add_argument("--request-rate", type=float, metavar="RATE",
                      help="requests per second for --arrival poisson or constant; inf sends "
                      "all requests at once. Given alone it means --arrival poisson "
                      "(default: none, requests go one at a time)")
    load.add_argument("--arrival", choices=ARRIVALS,
                      help="sequential: each request after the previous one completed; constant: "
                      "evenly spaced at --request-rate; poisson: exponential gaps at "
                      "--request-rate (default: poisson with --request-rate, else sequential)")
    load.add_argument("--max-concurrency", type=int, metavar="N",
                      help="at most this many requests in flight; later ones wait for a free "
                      "slot (default: no cap)")
    _option(load, "--num-warmups", hidden=("--warmup-requests",), dest="warmup_requests",
            type=int, default=1, metavar="N",
            help="requests sent one at a time before the measured ones and not counted in the "
            "results (their failures are reported)")

    output = ap.add_argument_group("output")
    output.add_argument("--label", default="", help="name of this run in the summary, plots "
                        "and default result file name (default: none; 'loadtest' in file names)")
    output.add_argument("--save-result", action="store_true",
                        help="write the full result (aggregates, per length, per request) as JSON")
    output.add_argument("--result-dir", metavar="DIR",
                        help="directory for the result file (default: the current directory); "
                        "implies --save-result")
    _option(output, "--result-filename", hidden=("--output-json",), dest="result_filename",
            metavar="NAME", help="result file name, inside --result-dir if given (default: "
            "LABEL-MODEL-YYYYmmdd-HHMMSS.json); implies --save-result")
    _option(output, "--disable-tqdm", hidden=("--no-progress",), dest="disable_tqdm",
            action="store_true", help="turn off the progress bar (tqdm, or a status line on "
            "stderr without tqdm)")
    output.add_argument("--plot", metavar="PNG", help="plot mean TTFT against prompt length: "
                        "of the RESULT_JSON files given (no load test), else of this run's saved "
                        "result")
    return ap


def build_config(args: argparse.Namespace) -> LoadTestConfig:
    """The LoadTestConfig that parsed command-line arguments describe (not yet validated)."""
    arrival = args.arrival or ("poisson" if args.request_rate is not None else "sequential")
    input_ratio, output_ratio = args.random_range_ratio
    return LoadTestConfig(
        base_url=args.base_url or f"http://{args.host}:{args.port}",
        endpoint=args.endpoint, model=args.model,
        prompt_lens=args.prompt_lens, prompt_len_range=args.prompt_len_range,
        input_range_ratio=input_ratio, output_range_ratio=output_ratio,
        length_order=args.length_order, num_prompts=args.num_prompts, arrival=arrival,
        request_rate=math.inf if args.request_rate is None else args.request_rate,
        max_concurrency=args.max_concurrency, warmup_requests=args.warmup_requests,
        output_len=args.output_len, ignore_eos=args.ignore_eos, seed=args.seed,
        tokenizer=args.tokenizer, text_dir=args.text_dir, label=args.label,
        api_key=args.api_key or os.environ.get("OPENAI_API_KEY") or None,
        request_timeout_s=args.request_timeout_s, progress=not args.disable_tqdm)


def saves_result(args: argparse.Namespace) -> bool:
    return bool(args.save_result or args.result_dir or args.result_filename)


def result_path(args: argparse.Namespace, model: str, now: datetime.datetime | None = None) -> str:
    """Where --save-result writes: --result-filename, or LABEL-MODEL-DATETIME.json (the model's
    last path component), inside --result-dir when given."""
    name = args.result_filename
    if not name:
        stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
        stem = f"{args.label or 'loadtest'}-{model.rstrip('/').split('/')[-1]}-{stamp}"
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem) + ".json"
    return os.path.join(args.result_dir, name) if args.result_dir else name


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done (failed requests are reported, not fatal), 1 every request failed,
    2 bad arguments or an unreachable server (nothing was measured)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.results and not args.plot:
        ap.error("result JSONs are only read with --plot")
    if args.plot and not args.results and not saves_result(args):
        ap.error("--plot of this run needs --save-result")
    if args.arrival == "sequential" and args.request_rate is not None:
        ap.error("--request-rate needs --arrival poisson or constant (sequential sends each "
                 "request when the previous one completed)")
    try:
        if args.plot and args.results:
            plot_ttft(args.results, args.plot)
            print(f"wrote {args.plot}")
            return 0
        config = build_config(args)
        config.validate()
        result = run(config)
        if saves_result(args):
            path = result_path(args, result["model"])
            if args.result_dir:
                os.makedirs(args.result_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)
            print(f"result written to {path}", file=sys.stderr)
            if args.plot:
                plot_ttft([path], args.plot)
    except (ServerUnreachable, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 1 if result["completed"] == 0 and result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
