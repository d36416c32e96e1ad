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
    assert started == ["gpu_tests", "kernels", "ttft_dense", "ttft_sparse", "ttft_page16"]
    assert "skip" not in result.stdout and (bg / "chain.done").exists()
    calls = (bg / "calls.log").read_text()
    assert "benchmarks/bench_kernels.py" in calls
    # Dense alone, then the sparse kernels appended to the same JSON; the page-16 pair in its own.
    dense, sparse = [line for line in calls.splitlines() if "ttft_h200.json" in line]
    assert "--backends FLASH_ATTN " in dense
    assert "--append" in sparse and "--backends proxyattn:fa3 " in sparse and "--time-budget-s 240" in sparse
    page16 = next(line for line in calls.splitlines() if "ttft_page16_h200.json" in line)
    assert "--backends FLASH_ATTN,proxyattn:triton " in page16 and "--serve-args=--block-size 16 " in page16
    assert not result.stderr.strip(), result.stderr  # e.g. an unbound variable under set -u


def test_chain_on_two_gpus_runs_two_lanes(stubbed, tmp_path):
    """With two GPUs: the GPU tests and the kernels alone first; then GPU 1 runs the page-16 TTFT
    while GPU 0 runs the TTFT. Each lane kills only its own GPU's processes between steps."""
    env, bg, _ = stubbed
    two_gpus(tmp_path)
    result = run("chain.sh", 100000, env=env)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr
    started = re.findall(r"\[chain\] (\w+): start", result.stdout)
    assert sorted(started) == sorted(["gpu_tests", "kernels", "ttft_page16", "ttft_dense", "ttft_sparse"])
    assert started[:2] == ["gpu_tests", "kernels"]  # alone: nothing else runs on the host while it times
    gpu_of = gpu_of_steps(bg, ("bench_kernels", "ttft_page16_h200", "--backends FLASH_ATTN "))
    assert gpu_of == {"bench_kernels": "gpu=0", "ttft_page16_h200": "gpu=1", "--backends FLASH_ATTN ": "gpu=0"}
    assert_lanes_write_their_own_json(bg, lane="ttft_page16_h200")
    kills = [line for line in (bg / "calls.log").read_text().splitlines() if "query-compute-apps" in line]
    assert any("-i 0" in k for k in kills) and any("-i 1" in k for k in kills)
    assert (bg / "chain.done").exists()


def assert_lanes_write_their_own_json(bg, lane="--density-only"):
    """A sweep on GPU 1 (its argument vector holds ``lane``) runs while the TTFT sweep on GPU 0
    appends to its JSON: both writing one file would keep only the last writer's results
    (session 11 lost its density pass that way)."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    outs = {}
    for line in (bg / "argv.log").read_text().splitlines():
        args = shlex.split(line)
        if args and args[0] == "benchmarks/ttft_sweep.py":
            kind = "lane" if any(lane in arg for arg in args) else "ttft"
            outs.setdefault(kind, set()).add(parser.parse_known_args(args[1:])[0].out)
    assert len(outs["lane"]) == 1 and not outs["lane"] & outs["ttft"], outs


def two_gpus(tmp_path):
    """Stubs for a two-GPU host whose python3 records the GPU each command saw."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.write_text(STUB + 'case "$*" in *-L*) echo "GPU 0: NVIDIA H200"; echo "GPU 1: NVIDIA H200";; esac\n')
    py = tmp_path / "bin" / "python3"
    py.write_text(STUB.replace('echo "stub', 'echo "gpu=${CUDA_VISIBLE_DEVICES-all} stub'))


def gpu_of_steps(bg, keys):
    calls = [line for line in (bg / "calls.log").read_text().splitlines() if "python3" in line]
    return {key: next(line.split()[0] for line in calls if key in line) for key in keys}


def run_plan(stubbed, tmp_path, plan, gpus):
    """Run the chain with ``plan`` on a stubbed host of ``gpus`` GPUs: the steps it started."""
    env, _, _ = stubbed
    if gpus == 2:
        two_gpus(tmp_path)
    result = run("chain.sh", 100000, env={**env, "PROXYATTN_CHAIN_PLAN": plan})
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    return re.findall(r"\[chain\] (\w+): start", result.stdout)


@pytest.mark.parametrize("gpus", [1, 2])
def test_chain_plan_diagnose(stubbed, tmp_path, gpus):
    """The first chain of a split session: the engine profile ("fa3" only), the kernels (alone on
    the host) and, with two GPUs, the TP=2 prompt; no TTFT."""
    bg = stubbed[1]
    started = run_plan(stubbed, tmp_path, "diagnose", gpus)
    if gpus == 1:
        assert started == ["gpu_tests", "kernels", "profile_sparse"]
        return
    assert sorted(started[:2]) == ["gpu_tests", "profile_sparse"] and started[2:] == ["tp2_128k", "kernels"]
    assert gpu_of_steps(bg, ("bench_kernels", "profile_prefill", "-m gpu", "--tensor-parallel 2")) == {
        "bench_kernels": "gpu=0", "profile_prefill": "gpu=1", "-m gpu": "gpu=0", "--tensor-parallel 2": "gpu=all"}
    profile = next(line for line in (bg / "calls.log").read_text().splitlines() if "profile_prefill" in line)
    assert "--backend proxyattn" in profile and "--append" not in profile and "sparse_kernel" in profile
    assert (bg / "chain.done").exists()


@pytest.mark.parametrize("gpus", [1, 2])
def test_chain_plan_measure(stubbed, tmp_path, gpus):
    """The second chain of a split session: the GPU tests, then the TTFT (dense, then "fa3"), the
    Qwen TTFT and the density pass; with two GPUs the last two on GPU 1 meanwhile."""
    bg = stubbed[1]
    started = run_plan(stubbed, tmp_path, "measure", gpus)
    assert sorted(started) == sorted(["gpu_tests", "ttft_dense", "ttft_sparse", "ttft_qwen", "ttft_density"])
    assert started[0] == "gpu_tests" and started.index("ttft_dense") < started.index("ttft_sparse")
    assert started.index("ttft_qwen") < started.index("ttft_density")
    if gpus == 2:
        assert gpu_of_steps(bg, ("--backends FLASH_ATTN ", "--backends proxyattn:fa3", "qwen2.5-coder",
                                 "--density-only")) == {
            "--backends FLASH_ATTN ": "gpu=0", "--backends proxyattn:fa3": "gpu=0", "qwen2.5-coder": "gpu=1",
            "--density-only": "gpu=1"}
        assert_lanes_write_their_own_json(bg)
    assert (bg / "chain.done").exists()


def test_chain_rejects_an_unknown_plan(stubbed):
    env, bg, _ = stubbed
    result = run("chain.sh", 100000, env={**env, "PROXYATTN_CHAIN_PLAN": "everything"})
    assert result.returncode == 2
    assert "unknown plan 'everything' (accepted: full, diagnose, measure)" in result.stdout
    assert not (bg / "calls.log").exists() and (bg / "chain.done").exists()


@pytest.mark.parametrize("plan,ttft,profile", [("full", 3, 0), ("diagnose", 0, 1), ("measure", 4, 0)])
def test_chain_commands_pass_the_scripts_own_argument_checks(stubbed, monkeypatch, plan, ttft, profile):
    """Every benchmark command of each plan, parsed and checked by its script as on the GPU host
    (a rejected combination would lose that step's device time)."""
    import shlex

    from benchmarks import profile_prefill, ttft_sweep

    env, bg, _ = stubbed
    assert run("chain.sh", 100000, env={**env, "PROXYATTN_CHAIN_PLAN": plan}).returncode == 0
    monkeypatch.chdir(REPO)
    checked = []
    for line in (bg / "argv.log").read_text().splitlines():
        argv = shlex.split(line)
        if not argv or not argv[0].startswith("benchmarks/"):
            continue
        script, args = argv[0], argv[1:]
        if script == "benchmarks/ttft_sweep.py":
            ttft_sweep.parse_args(args)
        elif script == "benchmarks/profile_prefill.py":
            profile_prefill.parse_args(args)
        checked.append(script)
    assert checked.count("benchmarks/ttft_sweep.py") == ttft and checked.count("benchmarks/profile_prefill.py") == profile


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
    assert "--backends FLASH_ATTN " in calls and "--backends proxyattn" not in calls and ",proxyattn" not in calls


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


def test_tp_engines_stay_off_nvlink_multicast(monkeypatch):
    """TP>1 engines of the GPU check turn vLLM's fused all-reduce off (its FlashInfer "mnnvl"
    backend creates multicast memory, which the shared two-GPU host must not see), with a key
    vLLM 0.26's CompilationConfig accepts; TP=1 engines keep vLLM's defaults."""
    pytest.importorskip("vllm")
    # The module sets this default at import; keep the test process's environment as it was.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    from vllm.config import CompilationConfig

    from benchmarks import gpu_backend_check

    assert gpu_backend_check.no_multicast_kwargs(1) == {}
    kwargs = gpu_backend_check.no_multicast_kwargs(2)
    assert CompilationConfig(**kwargs["compilation_config"]).pass_config.fuse_allreduce_rms is False
    env = (REPO / "benchmarks/h200/common.sh").read_text()
    assert "VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm" in env and "NCCL_NVLS_ENABLE=0" in env


def test_dummy_128k_runs_sparse_at_the_requested_tp(monkeypatch):
    """The 128K check of the dummy 8B caps the density (random weights make gamma budgets dense,
    so without a cap the "sparse" prompt would compute every block), runs at the requested TP
    with multicast off, and reports what it ran; ``--dummy-max-density 0`` keeps the defaults."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    import types

    import vllm

    from benchmarks import gpu_backend_check

    engines = []

    class FakeLLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

        def generate(self, prompts, params):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[7])]) for _ in prompts]

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(gpu_backend_check.vllm_engine, "shut_down", lambda llm: None)
    for density, expected in ((0.1, {"max_density": 0.1}), (0.0, {})):
        args = types.SimpleNamespace(dummy_8b="/m", eager=False, tensor_parallel=2, dummy_max_density=density)
        report = {}
        gpu_backend_check.check_dummy_128k(args, report)
        kwargs = engines[-1]
        assert kwargs["additional_config"] == {"proxyattn": expected}
        assert kwargs["tensor_parallel_size"] == 2 and kwargs["attention_backend"] == "proxyattn"
        assert kwargs["compilation_config"]["pass_config"]["fuse_allreduce_rms"] is False
        assert report["dummy_8b_128k"]["completed"] is True
        assert report["dummy_8b_128k"]["config"] == (expected or "default")
        assert report["dummy_8b_128k"]["tensor_parallel_size"] == 2
