"""The soak part: one ``vllm serve`` subprocess under mixed load, watched for failures and growth.

Rounds of long prefills and short decoding requests (benchmarks/e2e/loadtest.py) run until
``--soak-s`` has passed; GPU memory and the server's RSS are sampled after every round.
:func:`soak_verdict`: no failed request, a live server, and no growth past the criteria
between the end of round 1 and the end.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import time

from benchmarks.e2e import loadtest, ttft_sweep
from benchmarks.robustness.report import fmt, log

# Soak pass criteria (recorded in the JSON next to the numbers).
SOAK_MAX_GPU_GROWTH_MIB = 128
SOAK_MAX_RSS_GROWTH_FRACTION = 0.10


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
