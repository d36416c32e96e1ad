"""Bad requests: ``vllm serve --attention-backend proxyattn`` on CPU answers malformed
requests with a 4xx and keeps serving.

One server for all cases (startup is the expensive part). It runs in a subprocess started through
vLLM's own CLI entry point. Every process of it (the API server and the engine core, which vLLM
starts with ``spawn`` on CPU) first runs a ``sitecustomize`` that applies the same CPU test setup
as ``conftest.py`` plus the TEST-ONLY platform patch of ``tests/_vllm_cpu.py``, so the CPU
platform really selects proxyattn.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests._vllm_cpu import skip_unless_vllm_on_cpu

skip_unless_vllm_on_cpu()

REPO = Path(__file__).resolve().parent.parent
MAX_MODEL_LEN = 128
STARTUP_TIMEOUT_S = 240
# Runs at the start of every server process: the CPU test setup (importing conftest applies it).
SITECUSTOMIZE = """
import tests.conftest
from tests._vllm_cpu import honour_custom_backend_on_cpu

honour_custom_backend_on_cpu()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(base: str, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _serve_args(model_dir, port: int, proxyattn: dict) -> list[str]:
    return [
        str(model_dir), "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port),
        "--attention-backend", "proxyattn", "--additional-config", json.dumps({"proxyattn": proxyattn}),
        "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--block-size", "16",
        "--max-num-seqs", "2", "--max-num-batched-tokens", "64", "--enforce-eager",
        "--kv-cache-memory-bytes", str(16 << 20), "--no-enable-prefix-caching",
    ]


def _start_server(args: list[str], site_dir: Path, log_path: Path) -> subprocess.Popen:
    """``vllm serve ARGS`` through vLLM's CLI entry point, every process set up for the CPU."""
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.pathsep.join([str(site_dir), str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *args], cwd=REPO, env=env,
            stdout=log, stderr=subprocess.STDOUT,
        )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from proxyattn_vllm.testing import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    """Base URL of a running server on the tiny Llama with proxyattn; its log on failure."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    proxyattn = {"gamma": 1.0, "min_budget_tokens": 0, "min_sparse_len": 32, "block_size": 16}
    proc = _start_server(
        _serve_args(tiny_model_dir, port, proxyattn), tmp_path_factory.mktemp("site"), log_path
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        assert "ProxyAttn config:" in log_path.read_text(), log_path.read_text()[-6000:]
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _completion(prompt, **params) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0.0, **params}


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    from proxyattn_vllm.testing import prompt_words

    long_prompt = prompt_words(0, 60)  # sparse: >= min_sparse_len, prefilled in one chunk
    cases = {  # name: (request, the parameter vLLM's 400 names)
        "prompt longer than max_model_len": (_completion(prompt_words(0, MAX_MODEL_LEN + 10)), "input_text"),
        "empty prompt": (_completion(""), "prompt"),
        "temperature -1": (_completion(long_prompt, temperature=-1), "temperature"),
        "max_tokens 0": (_completion(long_prompt, max_tokens=0), "max_tokens"),
        "max_tokens -5": (_completion(long_prompt, max_tokens=-5), "max_tokens"),
        "top_p 2": (_completion(long_prompt, top_p=2), "top_p"),
    }
    for name, (body, param) in cases.items():
        status, answer = _post(server, "/v1/completions", body)
        assert status == 400 and answer["error"]["param"] == param, (name, status, answer)
    # Prompt plus max_tokens over max_model_len: vLLM 0.26 answers 400 (input_text); 0.32 lowers
    # max_tokens to what fits and serves it. Either is a clean answer.
    status, answer = _post(server, "/v1/completions", _completion(long_prompt, max_tokens=MAX_MODEL_LEN))
    if status == 400:
        assert answer["error"]["param"] == "input_text", answer
    else:
        assert status == 200, answer
        usage = answer["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= MAX_MODEL_LEN, answer

    # The same engine still serves: a long (sparse) prompt and a chat request.
    status, body = _post(server, "/v1/completions", _completion(long_prompt))
    assert status == 200 and body["usage"]["completion_tokens"] == 4, body
    status, body = _post(
        server, "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2},
    )
    # The word-level test tokenizer has no chat template: a 400 that says so is a clean answer.
    assert status in (200, 400), body
    status, body = _post(server, "/v1/completions", _completion(prompt_words(5, 10)))
    assert status == 200 and len(body["choices"][0]["text"].split()) >= 1, body


def test_a_bad_config_stops_serve_and_its_first_error_line_says_why(tmp_path_factory, tiny_model_dir):
    """vLLM prints an engine that fails to start as a long traceback; the line a user reads
    first must be ours: the key, the value, what is accepted and the fix."""
    log_path = tmp_path_factory.mktemp("serve_bad") / "server.log"
    proc = _start_server(
        _serve_args(tiny_model_dir, _free_port(), {"gamma": 2}), tmp_path_factory.mktemp("site"), log_path
    )
    try:
        proc.wait(timeout=STARTUP_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text()
    assert proc.returncode != 0, log[-4000:]
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert errors, log[-4000:]
    first = errors[0]
    assert "proxyattn config: gamma=2 is invalid; accepted: a number in (0, 1]" in first, log[-4000:]
    assert "--additional-config" in first
