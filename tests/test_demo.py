"""``proxyattn-demo`` (``proxyattn_vllm/demo.py``) on CPU: a real in-process vLLM engine with the
proxyattn backend on the tiny random Llama, then the dense CPU_ATTN reference.

Checks that what it prints is real: the sparse path ran on chunked prefills with ctx > 0 and
computed fewer than all key blocks (density < 1), the per-layer numbers are those of the
selection-statistics file it wrote, and the exit status says whether the sparse path ran.
The demo runs in this process (conftest.py has applied the same CPU set-up it applies itself).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._vllm_cpu import skip_unless_vllm_on_cpu

skip_unless_vllm_on_cpu()

REPO = Path(__file__).resolve().parent.parent
LAYER_LINE = re.compile(
    r"layer (\d+): (\d+) sparse chunks \((\d+) with ctx > 0, (\d+) computing fewer than all blocks\), "
    r"density ([0-9.]+)"
)


def test_help_documents_every_flag():
    from proxyattn_vllm.demo import build_parser

    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "kernels"),
                                                       os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "proxyattn_vllm.demo", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--prompt-tokens", "--max-tokens", "--gamma", "--max-density", "--seed"):
        assert flag in out.stdout


def test_demo_runs_the_sparse_path_and_compares_with_dense(tmp_path, capfd):
    from proxyattn_vllm import stats
    from proxyattn_vllm.demo import main

    stats_file = tmp_path / "stats.jsonl"
    # The default prompt and selection settings (what `proxyattn-demo` runs), fewer tokens.
    status = main(["--max-tokens", "4", "--stats-file", str(stats_file)])
    captured = capfd.readouterr()
    out = captured.out
    print(out)
    print(captured.err, file=sys.stderr)
    assert status == 0
    assert "[5/5] results" in out and "RANDOM weights" in out

    layers = {int(m[1]): m for m in LAYER_LINE.finditer(out)}
    assert sorted(layers) == [0, 1], out
    lines = stats.read_lines(stats_file)
    for layer, m in layers.items():
        chunks, with_ctx, fewer, density = int(m[2]), int(m[3]), int(m[4]), float(m[5])
        assert chunks > 0 and with_ctx > 0 and fewer > 0
        assert 0.0 < density < 1.0
        # The printed numbers are the statistics the backend recorded.
        recorded = [line for line in lines if line["layer"] == layer]
        assert len(recorded) == chunks
        assert sum(line["ctx"] > 0 for line in recorded) == with_ctx
        assert stats.summarize(recorded)[0]["density"] == pytest.approx(density, abs=5e-4)

    tokens = dict(re.findall(r"^\s+(proxyattn|CPU_ATTN)\s*: (\[[0-9, ]+\])", out, re.M))
    assert set(tokens) == {"proxyattn", "CPU_ATTN"}, out
    sparse, dense = json.loads(tokens["proxyattn"]), json.loads(tokens["CPU_ATTN"])
    assert len(sparse) == len(dense) == 4
    if sparse == dense:
        assert "identical: all 4 generated tokens are the same" in out
    else:
        assert "not identical:" in out and "they differ from generated token" in out


def test_exit_status_says_the_sparse_path_did_not_run(capfd):
    from proxyattn_vllm.demo import EXIT_NO_SPARSE, main

    # Every request is shorter than min_sparse_len: the engine runs, all dense.
    status = main(["--prompt-tokens", "32", "--max-tokens", "1", "--min-sparse-len", "1000", "--no-dense"])
    captured = capfd.readouterr()
    assert status == EXIT_NO_SPARSE
    assert "no prefill chunk went through the sparse path" in captured.out
    assert "no prefill chunk went through the sparse path" in captured.err
