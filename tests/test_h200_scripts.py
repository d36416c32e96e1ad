"""benchmarks/h200/chain.sh and poll.sh, the GPU session's background chain, with every command
stubbed: the steps run in order while the estimate fits, are skipped (and say so) when it does
not, and poll.sh packs what the chain wrote into one archive. A shell error here would cost a
session's device time, which is why it is tested on CPU."""
from __future__ import annotations

import os
import re
import subprocess
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUB = ('#!/bin/bash\necho "stub $(basename "$0") $*" >> "$PROXYATTN_BG/calls.log"\n'
        # the exact argument vector too, shell-quoted, to check it with the scripts' own parsers
        'printf "%q " "$@" >> "$PROXYATTN_BG/argv.log"; echo >> "$PROXYATTN_BG/argv.log"\n')


@pytest.fixture
def stubbed(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python3", "nvidia-smi"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    bg = tmp_path / "bg"
    bg.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PROXYATTN_BG": str(bg),
           "OUT": str(tmp_path / "out"), "PROXYATTN_KILL_WAIT_S": "0"}
    (tmp_path / "out").mkdir()
    return env, bg, tmp_path / "out"


def run(script, *args, env):
    return subprocess.run(["bash", f"benchmarks/h200/{script}", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)


def test_chain_runs_every_step_in_order_when_time_allows(stubbed):
    env, bg, _ = stubbed
    result = run("chain.sh", 100000, env=env)
    assert result.returncode == 0, result.stderr
    started = re.findall(r"\[chain\] (\w+): start", result.stdout)
    assert started == ["kernels", "gpu_tests", "ttft_dense", "ttft_sparse", "ttft_density", "soak", "ttft_qwen"]
    assert "skip" not in result.stdout and (bg / "chain.done").exists()
    calls = (bg / "calls.log").read_text()
    assert "benchmarks/bench_kernels.py" in calls
    # Dense alone first, then the sparse kernels appended to the same JSON.
    dense, sparse, density = [line for line in calls.splitlines() if "ttft_h200.json" in line]
    assert "--backends FLASH_ATTN " in dense and "--append" not in dense
    assert "--append" in sparse and "--backends proxyattn:fa3 " in sparse and "--time-budget-s 240" in sparse
    assert "--append" in density and "--density-only" in density
    soak = next(line for line in calls.splitlines() if "--parts soak" in line)
    assert "--soak-s 600" in soak and "--load-format dummy" in soak
    assert not result.stderr.strip(), result.stderr  # e.g. an unbound variable under set -u


def test_chain_commands_pass_the_scripts_own_argument_checks(stubbed, monkeypatch):
    """Every benchmark command of the chain, parsed and checked by its script as on the GPU host
    (a rejected combination would lose that step's device time)."""
    import shlex

    from benchmarks import gpu_robustness, ttft_sweep

    env, bg, _ = stubbed
    assert run("chain.sh", 100000, env=env).returncode == 0
    monkeypatch.chdir(REPO)
    checked = []
    for line in (bg / "argv.log").read_text().splitlines():
        argv = shlex.split(line)
        if not argv or not argv[0].startswith("benchmarks/"):
            continue
        script, args = argv[0], argv[1:]
        if script == "benchmarks/ttft_sweep.py":
            ttft_sweep.parse_args(args)
        elif script == "benchmarks/gpu_robustness.py":
            gpu_robustness.parse_args(args)
        checked.append(script)
    assert checked.count("benchmarks/ttft_sweep.py") == 4 and "benchmarks/gpu_robustness.py" in checked


def test_chain_skips_what_does_not_fit_and_says_so(stubbed):
    env, bg, _ = stubbed
    result = run("chain.sh", 100, env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[chain\] skip ttft_dense: \d+ s left, needs ~330 s", result.stdout)
    assert "bench_kernels.py" not in (bg / "calls.log").read_text()  # 150 s do not fit in 100
    assert (bg / "chain.done").exists()


def test_chain_does_not_time_the_sparse_path_after_a_failing_gpu_test(stubbed, tmp_path):
    env, bg, _ = stubbed
    failing = tmp_path / "bin" / "python3"  # the stub, failing for the GPU tests only
    failing.write_text('#!/bin/bash\necho "stub $(basename "$0") $*" >> "$PROXYATTN_BG/calls.log"\n'
                       'case "$*" in *"-m gpu"*) exit 1;; esac\n')
    result = run("chain.sh", 100000, env=env)
    assert result.returncode == 0, result.stderr
    assert "[chain] gpu_tests: rc 1" in result.stdout and "sparse TTFT not timed" in result.stdout
    calls = (bg / "calls.log").read_text()
    assert "--backends FLASH_ATTN " in calls and "--append" not in calls


def test_poll_packs_the_results_into_one_archive(stubbed):
    env, bg, out = stubbed
    (bg / "res" / "ttft_logs").mkdir(parents=True)
    (bg / "res" / "ttft_h200.json").write_text("{}")
    (bg / "res" / "ttft_logs" / "server.log").write_text("log")
    (bg / "chain.log").write_text("[chain] ttft: rc 0 after 1 s\n")
    (bg / "chain.done").touch()
    result = run("poll.sh", 5, env=env)
    assert result.returncode == 0, result.stderr
    assert "chain: done" in result.stdout and "[chain] ttft: rc 0" in result.stdout
    with tarfile.open(out / "res.tgz") as tar:
        names = set(tar.getnames())
    assert {"res/ttft_h200.json", "res/ttft_logs/server.log", "chain.log"} <= names
    assert sorted(p.name for p in out.iterdir()) == ["chain.log", "res.tgz"]  # well under 8 files
