"""benchmarks/run_gpu_suite.sh without a GPU: its argument checks, the commands each plan step
expands to (``--dry-run``, each checked by the benchmark script's own argument parser), and runs
with a stub interpreter (step order, logs and results under --out, the GPU tests gating the
sparse timings, the time limit, the two-GPU step, the offline bundle). A shell error would cost a
GPU host's time, which is why the script is tested here."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_gpu_suite.sh"
ALL_STEPS = ["tests", "kernels", "host_launch", "ttft", "density", "ttft_page16", "profile", "ttft_qwen",
             "backend", "tp2", "pp2", "robustness", "soak", "quality"]
#: The commands of --plan all, in the order they run (steps with two commands have two names).
ALL_COMMANDS = ["tests", "kernels", "host_launch", "dummy_model", "ttft_dense", "ttft_sparse", "density",
                "ttft_page16", "profile_dense", "profile_sparse", "ttft_qwen", "backend", "tp2", "pp2", "robustness",
                "soak", "quality"]


def suite(*args, env=None, cwd=REPO):
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=cwd, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def dirs(tmp_path):
    """Model and essay folders (empty: nothing reads them in these tests)."""
    paths = {name: tmp_path / name for name in ("qwen", "smollm", "essays")}
    for path in paths.values():
        path.mkdir()
    return paths


def model_args(dirs):
    return ["--qwen-model", dirs["qwen"], "--smollm-model", dirs["smollm"], "--essays", dirs["essays"]]


def dry_run(*args):
    """``(exports, commands)`` of a dry run: ``{NAME: value}`` and ``[(step, argv)]`` in order."""
    result = suite(*args, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr
    exports, commands = {}, []
    for line in result.stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line[len("export "):].partition("=")
            exports[name] = shlex.split(value)[0]
        elif match := re.fullmatch(r"\[(\w+)\] (.*)", line):
            commands.append((match[1], shlex.split(match[2])))
        else:
            assert line.startswith("# plan: "), line
    return exports, commands


def command(commands, step):
    (argv,) = [argv for name, argv in commands if name == step]
    return argv


def option(argv, name):
    return argv[argv.index(name) + 1]


# ---- arguments -------------------------------------------------------------------------------

def test_help_explains_every_option_and_step():
    result = suite("--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: benchmarks/run_gpu_suite.sh --out DIR")
    parser = SCRIPT.read_text().split("while [ $# -gt 0 ]; do", 1)[1].split("\ndone\n", 1)[0]
    options = set(re.findall(r"--[a-z0-9][a-z0-9-]+", parser)) | {"-h"}
    assert len(options) >= 15
    for opt in options:
        assert re.search(rf"^\s+(-h, )?{re.escape(opt)}\b", result.stdout, re.M), f"{opt} is not explained in --help"
    for step in ALL_STEPS:
        assert re.search(rf"^\s+{step}\s", result.stdout, re.M), f"step {step} is not explained in --help"
    assert suite("-h").stdout == result.stdout


@pytest.mark.parametrize("args,message", [
    ([], "--out DIR is required"),
    (["--out"], "--out needs a value"),
    (["--out="], "--out needs a non-empty value"),
    (["--out", "{out}", "--bogus"], "unknown argument '--bogus'"),
    (["--out", "{out}", "--plan", "tests,everything"], "unknown step 'everything' in --plan (accepted: all, tests, kernels,"),
    (["--out", "{out}", "--plan", "tests,,kernels"], "unknown step ''"),
    (["--out", "{out}", "--plan", "ttft_qwen", "--essays", "{essays}"], "step 'ttft_qwen' needs --qwen-model DIR"),
    (["--out", "{out}", "--plan", "quality", "--qwen-model", "{qwen}", "--essays", "{essays}"],
     "step 'quality' needs --smollm-model DIR"),
    (["--out", "{out}", "--plan", "soak"], "step 'soak' needs --essays DIR"),
    (["--out", "{out}", "--plan", "robustness", "--qwen-model", "{out}/none", "--essays", "{essays}"],
     "--qwen-model: '{out}/none' is not a directory"),
    (["--out", "{out}", "--time-limit-s", "ten"], "--time-limit-s must be a positive whole number"),
    (["--out", "{out}", "--time-limit-s", "0"], "--time-limit-s must be a positive whole number"),
    (["--out", "{out}", "--tag", "a/b"], "--tag may hold"),
    (["--out", "{out}", "--sparse-backends", "FLASH_ATTN"], "--sparse-backends: a comma list of proxyattn"),
    (["--out", "{out}", "--python", "no-such-python-here"], "--python: 'no-such-python-here' is not a command"),
    (["--out", "{out}", "--dummy-8b", "{essays}"], "holds no config.json"),
    (["--out", "{out}", "--bundle", "{out}/none"], "--bundle: '{out}/none' is not a directory"),
    (["--out", "{out}", "--bundle", "{essays}"], "is empty (expected wheels or an installed site-packages folder)"),
    (["--out", "{out}", "--dry-run=yes"], "--dry-run takes no value"),
])
def test_bad_arguments_stop_before_anything_runs(tmp_path, dirs, args, message):
    fill = {"out": tmp_path / "out", **dirs}
    result = suite(*[a.format(**fill) for a in args])
    assert result.returncode == 2, result
    assert message.format(**fill) in result.stderr and "--help" in result.stderr
    assert not result.stdout and not (tmp_path / "out").exists()


def test_the_default_plan_and_a_dry_run_create_nothing(tmp_path):
    exports, commands = dry_run("--out", tmp_path / "out")
    assert [name for name, _ in commands] == ["tests", "kernels", "dummy_model", "ttft_dense", "ttft_sparse"]
    assert exports == {"PYTHONUNBUFFERED": "1"}
    assert not (tmp_path / "out").exists()


def test_steps_run_in_a_fixed_order_whatever_the_plan_says(tmp_path, dirs):
    _, commands = dry_run("--out", tmp_path, "--plan", "quality,soak,tests", *model_args(dirs))
    assert [name for name, _ in commands] == ["tests", "dummy_model", "soak", "quality"]
    _, commands = dry_run("--out", tmp_path, "--plan", "all", *model_args(dirs))
    assert [name for name, _ in commands] == ALL_COMMANDS


def test_each_step_expands_to_its_commands(tmp_path, dirs):
    out = tmp_path / "res"
    _, commands = dry_run("--out", out, "--plan", "all", "--tag", "h200", *model_args(dirs))
    py = "python3"
    assert command(commands, "tests") == [py, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider", "-rs"]
    assert command(commands, "kernels") == [py, "benchmarks/kernels/bench_kernels.py", "--out", f"{out}/kernels_h200.json"]
    assert command(commands, "host_launch") == [py, "benchmarks/kernels/host_launch_probe.py", "--out", f"{out}/host_launch_h200.json"]
    dummy = f"{out}/dummy8b"
    assert command(commands, "dummy_model") == [py, "benchmarks/common/dummy_llama.py", dummy]
    # TTFT: dense alone, then the sparse backends and the density pass appended to the same JSON.
    ttft = {step: command(commands, step) for step in ("ttft_dense", "ttft_sparse", "density")}
    for argv in ttft.values():
        assert argv[:2] == [py, "benchmarks/e2e/ttft_sweep.py"] and "--append" in argv
        assert option(argv, "--model") == dummy and option(argv, "--out") == f"{out}/ttft_llama8b_dummy_h200.json"
        assert option(argv, "--lengths") == "32K,64K,128K,256K" and "--time-budget-s" not in argv
    assert option(ttft["ttft_dense"], "--backends") == "FLASH_ATTN"
    assert option(ttft["ttft_sparse"], "--backends") == "proxyattn:fa3"
    assert option(ttft["density"], "--backends") == "proxyattn" and "--density-only" in ttft["density"]
    page16 = command(commands, "ttft_page16")
    assert "--serve-args=--block-size 16" in page16 and option(page16, "--backends") == "FLASH_ATTN,proxyattn:triton"
    assert option(page16, "--out") == f"{out}/ttft_page16_llama8b_dummy_h200.json"
    dense, sparse = command(commands, "profile_dense"), command(commands, "profile_sparse")
    assert option(dense, "--backend") == "FLASH_ATTN" and "--append" not in dense
    assert option(sparse, "--backend") == "proxyattn" and "--append" in sparse
    assert json.loads(option(sparse, "--proxyattn-overrides")) == {"max_density": 0.1, "sparse_kernel": "fa3"}
    assert option(dense, "--out") == option(sparse, "--out") == f"{out}/profile_prefill_h200.json"
    qwen = command(commands, "ttft_qwen")
    assert option(qwen, "--model") == option(qwen, "--tokenizer") == str(dirs["qwen"])
    assert option(qwen, "--text-dir") == str(dirs["essays"]) and "--density-pass" in qwen
    backend = command(commands, "backend")
    assert option(backend, "--model") == str(dirs["smollm"]) and "--serve" in backend
    assert option(backend, "--dummy-8b") == dummy and option(backend, "--out") == f"{out}/backend_h200.json"
    tp2, pp2 = command(commands, "tp2"), command(commands, "pp2")
    assert option(tp2, "--tensor-parallel") == "2" and option(tp2, "--pipeline-parallel") == "1"
    assert option(pp2, "--tensor-parallel") == "1" and option(pp2, "--pipeline-parallel") == "2"
    assert option(tp2, "--model") == option(pp2, "--model") == str(dirs["qwen"])
    assert (option(tp2, "--out"), option(pp2, "--out")) == (f"{out}/backend_tp2_h200.json", f"{out}/backend_pp2_h200.json")
    robustness, soak = command(commands, "robustness"), command(commands, "soak")
    assert option(robustness, "--parts") == "prefix,preemption" and option(soak, "--parts") == "soak"
    assert option(robustness, "--out") == option(soak, "--out") == f"{out}/robustness_h200.json"
    assert "--append" in robustness and "--append" in soak and option(soak, "--model") == dummy
    quality = command(commands, "quality")
    assert option(quality, "--models") == f"smollm2={dirs['smollm']},qwen05b={dirs['qwen']}"
    assert option(quality, "--out") == f"{out}/quality_h200.json"


def test_options_reach_the_commands(tmp_path, dirs):
    model = tmp_path / "m8b"
    model.mkdir()
    (model / "config.json").write_text("{}")
    _, commands = dry_run("--out", "rel", "--plan", "ttft,ttft_qwen", "--dummy-8b", model, "--python", "python3",
                          "--sparse-backends", "proxyattn,proxyattn:fa3", "--time-limit-s", "3600",
                          *model_args(dirs))
    assert [name for name, _ in commands] == ["ttft_dense", "ttft_sparse", "ttft_qwen"]  # no model to write
    sparse = command(commands, "ttft_sparse")
    assert option(sparse, "--backends") == "proxyattn,proxyattn:fa3" and option(sparse, "--model") == str(model)
    assert option(sparse, "--out") == f"{REPO}/rel/ttft_llama8b_dummy.json"  # relative to the caller, absolute
    for name, argv in commands:
        assert 3000 < int(option(argv, "--time-budget-s")) <= 3590, name


def test_every_benchmark_command_passes_its_scripts_own_argument_checks(tmp_path, dirs, monkeypatch):
    """Each command of --plan all, parsed by its script as on the GPU host: a rejected
    combination would lose that step's GPU time."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    from benchmarks.common import dummy_llama
    from benchmarks.e2e import profile_prefill, ttft_sweep
    from benchmarks.kernels import bench_kernels, host_launch_probe
    from benchmarks.robustness import gpu_backend_check, gpu_robustness
    from benchmarks.quality import run_eval

    parsers = {
        "benchmarks/kernels/bench_kernels.py": bench_kernels.parse_args,
        "benchmarks/kernels/host_launch_probe.py": host_launch_probe.parse_args,
        "benchmarks/common/dummy_llama.py": dummy_llama.parse_args,
        "benchmarks/e2e/ttft_sweep.py": ttft_sweep.parse_args,
        "benchmarks/e2e/profile_prefill.py": profile_prefill.parse_args,
        "benchmarks/robustness/gpu_backend_check.py": gpu_backend_check.parse_args,
        "benchmarks/robustness/gpu_robustness.py": gpu_robustness.parse_args,
        "benchmarks/quality/run_eval.py": run_eval.parse_args,
    }
    _, commands = dry_run("--out", tmp_path, "--plan", "all", *model_args(dirs))
    monkeypatch.chdir(REPO)
    checked = []
    for name, argv in commands:
        if name == "tests":
            continue
        assert argv[0] == "python3", name
        parsers[argv[1]](argv[2:])  # exits (status 2) on a rejected command line
        checked.append(argv[1])
    assert set(checked) == set(parsers) and len(checked) == len(ALL_COMMANDS) - 1


def test_no_multicast_keeps_every_library_off_nvlink_multicast(tmp_path):
    exports, _ = dry_run("--out", tmp_path, "--no-multicast")
    assert exports == {"PYTHONUNBUFFERED": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1", "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
                       "VLLM_FLASHINFER_ALLREDUCE_BACKEND": "trtllm"}


def test_a_wheel_bundle_is_installed_offline_with_the_checkout(tmp_path):
    bundle = tmp_path / "wheels"
    bundle.mkdir()
    for wheel in ("vllm-0.26.0-py3-none-any.whl", "torch-2.11.0-py3-none-any.whl"):
        (bundle / wheel).touch()
    out = tmp_path / "out"
    result = suite("--out", out, "--plan", "tests", "--bundle", bundle, "--dry-run", env={"PYTHONPATH": "/old"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    installs = [shlex.split(line[len("[install] "):]) for line in lines if line.startswith("[install] ")]
    assert installs == [
        ["python3", "-m", "pip", "install", "--quiet", "--upgrade", "--no-index", "--find-links", str(bundle),
         "--target", f"{out}/site", str(bundle / "torch-2.11.0-py3-none-any.whl"),
         str(bundle / "vllm-0.26.0-py3-none-any.whl")],
        ["python3", "-m", "pip", "install", "--quiet", "--upgrade", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", f"{out}/site", str(REPO)],
    ]
    assert f"export PYTHONPATH={out}/site:/old" in lines
    assert lines.index(f"export PYTHONPATH={out}/site:/old") < next(i for i, l in enumerate(lines) if "--no-deps" in l)


def test_a_site_dir_bundle_goes_on_the_python_path(tmp_path):
    site = tmp_path / "site-packages"
    (site / "vllm").mkdir(parents=True)
    out = tmp_path / "out"
    result = suite("--out", out, "--plan", "kernels", "--bundle", site, "--dry-run", env={"PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert f"export PYTHONPATH={out}/site:{site}" in result.stdout.splitlines()
    installs = [line for line in result.stdout.splitlines() if line.startswith("[install] ")]
    assert len(installs) == 1 and "--no-deps" in installs[0]  # only the checkout


# ---- runs with a stub interpreter ------------------------------------------------------------

STUB = r"""#!/bin/bash
# Records every call (the environment it saw, then its arguments), answers the suite's probes.
{ printf 'PYTHONPATH=%s|' "${PYTHONPATH:-}"; printf '%q ' "$@"; echo; } >> "$STUB_LOG"
case "$*" in
  *"import proxyattn_vllm"*) exit "${STUB_IMPORT_RC:-0}";;
  *device_count*) echo "${STUB_GPUS:-1}"; exit 0;;
  *"-m pytest"*) echo "pytest output"; exit "${STUB_TESTS_RC:-0}";;
esac
if [ -n "${STUB_FAIL:-}" ] && [[ "$*" == *"$STUB_FAIL"* ]]; then echo "stub failure of $STUB_FAIL"; exit 3; fi
echo "ran $2"
"""


@pytest.fixture
def stub(tmp_path):
    """``(python, env, calls)``: a stub interpreter, its environment, and a reader of its calls
    (``[(pythonpath, argv)]``)."""
    python = tmp_path / "bin" / "python-stub"
    python.parent.mkdir()
    python.write_text(STUB)
    python.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"STUB_LOG": str(log), "PYTHONPATH": ""}

    def calls():
        rows = []
        for line in log.read_text().splitlines() if log.exists() else []:
            path, _, argv = line.partition("|")
            rows.append((path[len("PYTHONPATH="):], shlex.split(argv)))
        return rows
    return python, env, calls


def scripts_run(calls):
    """The benchmark scripts (or pytest) the stub ran, in order, without the suite's probes."""
    names = []
    for _, argv in calls():
        if argv[:2] == ["-m", "pytest"]:
            names.append("pytest")
        elif argv and argv[0].startswith("benchmarks/"):
            backends = f" {argv[argv.index('--backends') + 1]}" if "--backends" in argv else ""
            names.append(Path(argv[0]).stem + backends)
    return names


def test_a_run_writes_logs_and_results_under_out_in_order(tmp_path, stub):
    python, env, calls = stub
    out = tmp_path / "out"
    result = suite("--out", out, "--python", python, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert scripts_run(calls) == ["pytest", "bench_kernels", "dummy_llama", "ttft_sweep FLASH_ATTN",
                                  "ttft_sweep proxyattn:fa3"]
    for step in ("tests", "kernels", "dummy_model", "ttft_dense", "ttft_sparse"):
        assert re.search(rf"^\[suite\] {step}: rc 0 after \d+ s \(log: {out}/logs/{step}\.log\)$", result.stdout, re.M)
        assert (out / "logs" / f"{step}.log").read_text().strip()
    assert (out / "logs" / "tests.log").read_text() == "pytest output\n"
    summary = (out / "suite.log").read_text()
    assert "plan tests kernels ttft on 1 GPU(s)" in summary and summary.rstrip().endswith("every step that ran succeeded")
    assert not result.stderr.strip(), result.stderr  # e.g. an unbound variable under set -u


def test_failing_gpu_tests_stop_the_sparse_timings_only(tmp_path, stub, dirs):
    python, env, calls = stub
    plan = "tests,kernels,ttft,density,ttft_page16,profile,ttft_qwen,robustness"
    args = ("--out", tmp_path / "out", "--python", python, "--plan", plan, *model_args(dirs))
    result = suite(*args, env={**env, "STUB_TESTS_RC": "1"})
    assert result.returncode == 1
    for step in ("ttft_sparse", "density", "ttft_page16", "profile", "ttft_qwen"):
        assert f"[suite] skip {step}: the GPU tests failed" in result.stdout
    # The kernel bench has its own correctness gate; dense timings and the robustness checks still run.
    assert scripts_run(calls) == ["pytest", "bench_kernels", "dummy_llama", "ttft_sweep FLASH_ATTN", "gpu_robustness"]
    assert "pytest output" in result.stdout  # the failing log's tail
    (tmp_path / "calls.log").unlink()
    result = suite(*args, "--ignore-test-failures", env={**env, "STUB_TESTS_RC": "1"})
    assert result.returncode == 1 and "skip" not in result.stdout
    assert "ttft_sweep proxyattn:fa3" in scripts_run(calls) and "profile_prefill" in scripts_run(calls)


def test_a_failing_step_does_not_stop_the_others(tmp_path, stub):
    python, env, calls = stub
    result = suite("--out", tmp_path / "out", "--python", python, env={**env, "STUB_FAIL": "bench_kernels"})
    assert result.returncode == 1
    assert "[suite] kernels: rc 3" in result.stdout and "stub failure of bench_kernels" in result.stdout
    assert scripts_run(calls)[-1] == "ttft_sweep proxyattn:fa3"
    assert (tmp_path / "out" / "suite.log").read_text().rstrip().endswith("a step failed")


def test_the_time_limit_skips_what_does_not_fit_and_says_so(tmp_path, stub):
    python, env, calls = stub
    result = suite("--out", tmp_path / "out", "--python", python, "--time-limit-s", "250", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^\[suite\] skip kernels: \d+ s left, needs ~300 s$", result.stdout, re.M)
    assert re.search(r"^\[suite\] skip ttft_dense: \d+ s left, needs ~330 s$", result.stdout, re.M)
    assert scripts_run(calls) == ["pytest", "dummy_llama", "ttft_sweep proxyattn:fa3"]  # ~240 s fit
    assert 200 < int(option(calls()[-1][1], "--time-budget-s")) <= 240
    # GPU tests that did not fit gate the sparse timings too.
    (tmp_path / "calls.log").unlink()
    result = suite("--out", tmp_path / "out", "--python", python, "--time-limit-s", "100", env=env)
    assert "[suite] skip tests:" in result.stdout and "[suite] skip ttft_sparse: the GPU tests did not run" in result.stdout
    assert scripts_run(calls) == ["dummy_llama"]


@pytest.mark.parametrize("gpus", [1, 2])
def test_two_gpu_steps_run_only_with_two_gpus(tmp_path, stub, dirs, gpus):
    python, env, calls = stub
    result = suite("--out", tmp_path / "out", "--python", python, "--plan", "tp2,pp2", *model_args(dirs),
                   env={**env, "STUB_GPUS": str(gpus)})
    assert result.returncode == 0, result.stdout + result.stderr
    if gpus == 1:
        assert "[suite] skip tp2: needs 2 GPUs, 1 visible" in result.stdout
        assert "[suite] skip pp2: needs 2 GPUs, 1 visible" in result.stdout
        assert scripts_run(calls) == ["dummy_llama"]
    else:
        assert scripts_run(calls) == ["dummy_llama", "gpu_backend_check", "gpu_backend_check"]
        layouts = [(option(argv, "--tensor-parallel"), option(argv, "--pipeline-parallel")) for _, argv in calls()[-2:]]
        assert layouts == [("2", "1"), ("1", "2")]


@pytest.mark.parametrize("stub_env,message", [
    ({"STUB_GPUS": "0"}, "no CUDA GPU visible to"),
    ({"STUB_IMPORT_RC": "1"}, "cannot import proxyattn_vllm: install the project"),
])
def test_no_gpu_or_no_project_stops_the_run(tmp_path, stub, stub_env, message):
    python, env, calls = stub
    result = suite("--out", tmp_path / "out", "--python", python, env={**env, **stub_env})
    assert result.returncode == 1 and message in result.stderr
    assert scripts_run(calls) == []


def test_the_bundle_is_installed_before_the_steps_and_on_their_path(tmp_path, stub):
    python, env, calls = stub
    bundle = tmp_path / "wheels"
    bundle.mkdir()
    (bundle / "vllm-0.26.0-py3-none-any.whl").touch()
    out = tmp_path / "out"
    result = suite("--out", out, "--python", python, "--plan", "kernels", "--bundle", bundle, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = calls()
    pips = [argv for _, argv in rows if argv[:2] == ["-m", "pip"]]
    assert len(pips) == 2 and "--find-links" in pips[0] and pips[1][-1] == str(REPO)
    assert rows.index((f"{out}/site", pips[1])) < len(rows) - 1  # the checkout's install, then the step
    assert rows[-1] == (f"{out}/site", ["benchmarks/kernels/bench_kernels.py", "--out", f"{out}/kernels.json"])


# ---- gpu_backend_check.py's engine arguments ---------------------------------------------------

def test_tp_engines_stay_off_nvlink_multicast(monkeypatch):
    """TP>1 engines of the GPU check turn vLLM's fused all-reduce off (its FlashInfer "mnnvl"
    backend creates multicast memory, which hosts with multicast disabled must not see), with a
    key vLLM 0.26's CompilationConfig accepts; TP=1 engines keep vLLM's defaults."""
    pytest.importorskip("vllm")
    # The module sets this default at import; keep the test process's environment as it was.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    from vllm.config import CompilationConfig

    from benchmarks.robustness import gpu_backend_check

    assert gpu_backend_check.no_multicast_kwargs(1) == {}
    kwargs = gpu_backend_check.no_multicast_kwargs(2)
    assert CompilationConfig(**kwargs["compilation_config"]).pass_config.fuse_allreduce_rms is False


def test_parallel_engines_pair_every_config_with_its_one_gpu_run(monkeypatch):
    """TP x PP engines: FLASH_ATTN (the reference on one GPU), proxyattn at full density and at
    the default gamma, each on one GPU and on the requested layout, the latter compared with its
    one-GPU twin; every engine starts with the layout it names."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    from benchmarks.robustness import gpu_backend_check

    engines = gpu_backend_check.parallel_engines(1, 2)
    assert [e.label for e in engines] == [
        "FLASH_ATTN 1 GPU (reference)", "FLASH_ATTN TP1xPP2", "proxyattn full density 1 GPU",
        "proxyattn full density TP1xPP2", "proxyattn gamma 0.95 1 GPU", "proxyattn gamma 0.95 TP1xPP2"]
    assert [(e.tp, e.pp) for e in engines] == [(1, 1), (1, 2)] * 3
    assert [e.twin for e in engines[1::2]] == [e.label for e in engines[::2]]
    assert all(e.twin is None for e in engines[::2])
    assert engines[3].extra == gpu_backend_check.FULL_DENSITY
    assert engines[5].extra == {"proxyattn": {"min_sparse_len": 1024}}  # default gamma, every prompt sparse
    assert gpu_backend_check.parse_args(["--model", "m", "--essays", "e", "--out", "o"]).pipeline_parallel == 1


def test_dummy_128k_runs_sparse_at_the_requested_tp(monkeypatch):
    """The 128K check of the dummy 8B caps the density (random weights make gamma budgets dense,
    so without a cap the "sparse" prompt would compute every block), runs at the requested TP
    with multicast off, and reports what it ran; ``--dummy-max-density 0`` keeps the defaults."""
    pytest.importorskip("vllm")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    import types

    import vllm

    from benchmarks.robustness import gpu_backend_check

    engines = []

    class FakeLLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

        def generate(self, prompts, params):
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[7])]) for _ in prompts]

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(gpu_backend_check.vllm_engine, "shut_down", lambda llm: None)
    for density, expected in ((0.1, {"max_density": 0.1}), (0.0, {})):
        args = types.SimpleNamespace(dummy_8b="/m", eager=False, tensor_parallel=2, pipeline_parallel=1,
                                     dummy_max_density=density)
        report = {}
        gpu_backend_check.check_dummy_128k(args, report)
        kwargs = engines[-1]
        assert kwargs["additional_config"] == {"proxyattn": expected}
        assert kwargs["tensor_parallel_size"] == 2 and kwargs["pipeline_parallel_size"] == 1
        assert kwargs["attention_backend"] == "proxyattn"
        assert kwargs["compilation_config"]["pass_config"]["fuse_allreduce_rms"] is False
        assert report["dummy_8b_128k"]["completed"] is True
        assert report["dummy_8b_128k"]["config"] == (expected or "default")
        assert report["dummy_8b_128k"]["tensor_parallel_size"] == 2


def test_backend_check_report_names_gpu_and_versions(monkeypatch, tmp_path):
    """The report says where it ran (GPU, package versions) beside each check's result, and a
    check that raises is recorded as its error while the next still runs."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    from benchmarks.robustness import gpu_backend_check

    def failing(args, report):
        raise RuntimeError("no engine")

    monkeypatch.setattr(gpu_backend_check, "check_equivalence", failing)
    monkeypatch.setattr(gpu_backend_check, "check_cudagraphs", lambda args, report: report.update(cudagraphs={"ok": 1}))
    monkeypatch.setattr(gpu_backend_check, "gpu_name", lambda: "Test GPU")
    out = tmp_path / "backend.json"
    gpu_backend_check.main(["--model", "m", "--essays", "e", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["gpu"] == "Test GPU" and set(report["versions"]) == {"vllm", "torch", "triton", "proxyattn-vllm"}
    assert report["equivalence"] == {"error": "RuntimeError: no engine"} and report["cudagraphs"] == {"ok": 1}


def test_serve_check_asks_through_the_openai_client(monkeypatch, tmp_path):
    """The serve check's requests go through the official ``openai`` client (completions and chat,
    streamed and not) and judge the passkey prompt by its answer: found when the server says it,
    not found when it does not."""
    pytest.importorskip("openai")
    pytest.importorskip("aiohttp")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1"))
    from benchmarks.robustness import gpu_backend_check
    from tests._fake_openai_server import FakeOptions, FakeServer

    class ByteTokenizer:
        def encode(self, text, add_special_tokens=False):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode(errors="ignore")

    (tmp_path / "a.txt").write_text("Some essay sentence. " * 400)
    prompt = gpu_backend_check.passkey_prompt(ByteTokenizer(), str(tmp_path), 3000)
    assert prompt.count(gpu_backend_check.PASSKEY) == 2 and prompt.endswith("The pass key is")
    assert 2900 < len(prompt) < 3200

    for answer, found in ((f" {gpu_backend_check.PASSKEY}.", True), (" 12345.", False)):
        options = FakeOptions(answer=lambda body, a=answer: a if "pass key" in str(body.get("prompt")) else "Paris")
        server = FakeServer(options).start()
        try:
            results = gpu_backend_check._openai_requests(server.base_url, options.model, prompt)
        finally:
            server.stop()
        assert all(results[k] for k in results if k.startswith("/v1/"))
        assert len([k for k in results if k.startswith("/v1/")]) == 4
        assert results["passkey found"] is found and results["passkey prompt_tokens"] == len(prompt.encode())
