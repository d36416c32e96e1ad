#!/usr/bin/env bash
# Runs the GPU tests and the benchmarks of this repository on one CUDA host, one step after the
# other, writing every log and JSON under --out. `benchmarks/run_gpu_suite.sh --help` explains
# the options; benchmarks/README.md what each benchmark measures.
set -u -o pipefail

PROG=run_gpu_suite.sh
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Plan steps in the order they run. "tests" comes first: a failing GPU test stops the sparse
# path's timings (a wrong kernel's speed means nothing). "kernels" runs before any vLLM server.
STEPS=(tests kernels host_launch ttft density ttft_page16 profile ttft_qwen backend tp2 pp2 robustness soak quality)
DEFAULT_PLAN=tests,kernels,ttft
LLAMA_CONFIG=serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml
QWEN_CONFIG=serve_configs/qwen2.5-coder-0.5b-32k-proxyattn.yaml

usage() {
  cat <<EOF
Usage: benchmarks/run_gpu_suite.sh --out DIR [options]

Runs the GPU tests and the benchmarks on any CUDA host, one step at a time (never two vLLM
engines on a GPU at once), from the repository root. Logs go to DIR/logs/STEP.log, results to
DIR/*.json; a summary line per step is printed and appended to DIR/suite.log. Exit status: 0 when
every step that ran succeeded, 1 when one failed (or no CUDA GPU is visible), 2 on bad arguments.

Options:
  --out DIR             where logs and results go (created; required)
  --plan LIST           comma list of steps (default: $DEFAULT_PLAN; "all": every step). They
                        always run in this order, whatever the order of LIST:
                          tests        the gpu-marked tests (pytest -m gpu)
                          kernels      benchmarks/kernels/bench_kernels.py: Triton / FA3 /
                                       FlashInfer kernels, the selection, chunk costs, tile sweeps
                          host_launch  benchmarks/kernels/host_launch_probe.py: host time per
                                       launch
                          ttft         benchmarks/e2e/ttft_sweep.py on the dummy Llama-3.1-8B
                                       shape, 32K-256K: FLASH_ATTN, then the sparse backends
                                       appended
                          density      the density each TTFT length used (appended to its JSON)
                          ttft_page16  TTFT on 16-token pages: FLASH_ATTN vs proxyattn:triton
                          profile      benchmarks/e2e/profile_prefill.py: one 128K prompt of the
                                       dummy 8B under vLLM's profiler, dense then sparse
                          ttft_qwen    TTFT of Qwen2.5-Coder-0.5B with real weights, 8K and 32K,
                                       with its density pass   (needs --qwen-model, --essays)
                          backend      benchmarks/robustness/gpu_backend_check.py: full-density
                                       equivalence, CUDA graphs, the OpenAI server, the dummy 8B
                                       at 128K (needs --smollm-model, --essays)
                          tp2          gpu_backend_check.py at tensor parallelism 2: TP=2 vs one
                                       GPU, and the dummy 8B at 128K (needs --qwen-model, --essays
                                       and two GPUs; skipped with one)
                          pp2          the same at pipeline parallelism 2 (each GPU runs half the
                                       layers)
                          robustness   benchmarks/robustness/gpu_robustness.py: prefix caching,
                                       preemption (needs --qwen-model, --essays)
                          soak         gpu_robustness.py --parts soak: 600 s of mixed load on a
                                       vLLM server of the dummy 8B (needs --essays)
                          quality      benchmarks/quality/run_eval.py: long-context tasks, dense vs
                                       proxyattn (needs --smollm-model, --qwen-model, --essays)
  --bundle DIR          run offline from DIR, for hosts without network access. If DIR holds
                        wheels (*.whl): every wheel in it is installed with
                          pip install --no-index --find-links DIR --target OUT/site
                        Otherwise DIR is taken as a site-packages folder where the dependencies
                        are installed already, and goes on PYTHONPATH. Either way this checkout
                        is installed into OUT/site (--no-deps --no-build-isolation --no-index;
                        setuptools must be in the bundle or the environment) and OUT/site goes
                        first on PYTHONPATH. Without --bundle the Python environment is used as
                        it is: install the project there first (pip install '.[vllm,test,bench]').
  --python PY           Python interpreter of every step (default: python3)
  --tag TAG             suffix of the result names, e.g. "h200": kernels_h200.json (default: none)
  --dummy-8b DIR        a model folder written by benchmarks/common/dummy_llama.py (default:
                        written to OUT/dummy8b when a step needs it; only config and tokenizer,
                        no weights)
  --qwen-model DIR      Hugging Face folder of Qwen2.5-Coder-0.5B-Instruct (or Qwen2.5-0.5B)
  --smollm-model DIR    Hugging Face folder of SmolLM2-135M-Instruct
  --essays DIR          folder of .txt essays: prompt text of the real-weight steps
  --sparse-backends L   sparse backends of the ttft step, comma list of proxyattn[:KERNEL]
                        (default: proxyattn:fa3)
  --time-limit-s S      the whole suite's time: a step starts only if its estimated time fits in
                        what is left (else it is skipped, and says so) and runs under a timeout
                        of what is left; the TTFT sweeps get it as --time-budget-s
  --no-multicast        keep NCCL, torch, NVSHMEM and vLLM off NVLink multicast (hosts where it is
                        disabled; gpu_backend_check.py also turns vLLM's fused all-reduce off)
  --ignore-test-failures
                        time the sparse path even after a failing GPU test
  --dry-run             print the environment and the commands of the plan, run nothing
  -h, --help            this help
EOF
}

die() { echo "$PROG: error: $*" >&2; echo "(see benchmarks/run_gpu_suite.sh --help)" >&2; exit 2; }

OUT= PLAN=$DEFAULT_PLAN BUNDLE= PY=python3 TAG= DUMMY8B= QWEN= SMOLLM= ESSAYS=
SPARSE_BACKENDS=proxyattn:fa3 TIME_LIMIT= NO_MULTICAST=0 IGNORE_TEST_FAILURES=0 DRY_RUN=0
while [ $# -gt 0 ]; do
  opt=$1 has_value=0 value=
  case $opt in --*=*) value=${opt#*=} opt=${opt%%=*} has_value=1;; esac
  case $opt in
    --out|--plan|--bundle|--python|--tag|--dummy-8b|--qwen-model|--smollm-model|--essays|--sparse-backends|--time-limit-s)
      if [ "$has_value" = 0 ]; then
        [ $# -ge 2 ] || die "$opt needs a value"
        value=$2; shift
      fi
      shift
      [ -n "$value" ] || die "$opt needs a non-empty value"
      case $opt in
        --out) OUT=$value;; --plan) PLAN=$value;; --bundle) BUNDLE=$value;; --python) PY=$value;;
        --tag) TAG=$value;; --dummy-8b) DUMMY8B=$value;; --qwen-model) QWEN=$value;;
        --smollm-model) SMOLLM=$value;; --essays) ESSAYS=$value;; --sparse-backends) SPARSE_BACKENDS=$value;;
        --time-limit-s) TIME_LIMIT=$value;;
      esac;;
    --no-multicast|--ignore-test-failures|--dry-run|-h|--help)
      [ "$has_value" = 0 ] || die "$opt takes no value"
      shift
      case $opt in
        --no-multicast) NO_MULTICAST=1;; --ignore-test-failures) IGNORE_TEST_FAILURES=1;;
        --dry-run) DRY_RUN=1;; -h|--help) usage; exit 0;;
      esac;;
    *) die "unknown argument '$opt'";;
  esac
done

# ---- argument checks (all before anything runs) ----
[ -n "$OUT" ] || die "--out DIR is required"
declare -A WANT=()
IFS=, read -r -a items <<< "$PLAN"
[ ${#items[@]} -gt 0 ] || die "--plan is empty"
for item in "${items[@]}"; do
  if [ "$item" = all ]; then
    for s in "${STEPS[@]}"; do WANT[$s]=1; done
  elif [[ " ${STEPS[*]} " == *" $item "* ]]; then
    WANT[$item]=1
  else
    die "unknown step '$item' in --plan (accepted: all, $(IFS=,; echo "${STEPS[*]}" | sed 's/,/, /g'))"
  fi
done
wants() { [ -n "${WANT[$1]:-}" ]; }
needs_dir() {  # needs_dir OPTION VALUE STEP...: the steps of the plan that need OPTION have it
  local option=$1 value=$2 step; shift 2
  for step in "$@"; do
    wants "$step" || continue
    [ -n "$value" ] || die "step '$step' needs $option DIR"
    [ -d "$value" ] || die "$option: '$value' is not a directory"
  done
}
needs_dir --qwen-model "$QWEN" ttft_qwen tp2 pp2 robustness quality
needs_dir --smollm-model "$SMOLLM" backend quality
needs_dir --essays "$ESSAYS" ttft_qwen backend tp2 pp2 robustness soak quality
if [ -n "$TIME_LIMIT" ]; then
  [[ $TIME_LIMIT =~ ^[0-9]+$ ]] && [ "$TIME_LIMIT" -gt 0 ] || die "--time-limit-s must be a positive whole number of seconds, got '$TIME_LIMIT'"
fi
[[ $TAG =~ ^[A-Za-z0-9._-]*$ ]] || die "--tag may hold letters, digits, '.', '_' and '-' only"
[[ $SPARSE_BACKENDS =~ ^proxyattn(:[a-z0-9]+)?(,proxyattn(:[a-z0-9]+)?)*$ ]] \
  || die "--sparse-backends: a comma list of proxyattn or proxyattn:KERNEL, got '$SPARSE_BACKENDS'"
command -v "$PY" > /dev/null || die "--python: '$PY' is not a command"
if [ -n "$DUMMY8B" ] && [ ! -f "$DUMMY8B/config.json" ]; then
  die "--dummy-8b: '$DUMMY8B' holds no config.json (write one with benchmarks/common/dummy_llama.py)"
fi
WHEELS=()
if [ -n "$BUNDLE" ]; then
  [ -d "$BUNDLE" ] || die "--bundle: '$BUNDLE' is not a directory"
  BUNDLE=$(cd "$BUNDLE" && pwd)
  shopt -s nullglob; WHEELS=("$BUNDLE"/*.whl); shopt -u nullglob
  if [ ${#WHEELS[@]} -eq 0 ] && [ -z "$(ls -A "$BUNDLE")" ]; then
    die "--bundle: '$BUNDLE' is empty (expected wheels or an installed site-packages folder)"
  fi
fi

absolute() {  # absolute PATH (the steps run from the repository root)
  case $1 in /*) echo "$1";; *) echo "$PWD/$1";; esac
}
for var in QWEN SMOLLM ESSAYS DUMMY8B BUNDLE; do
  [ -z "${!var}" ] || printf -v "$var" '%s' "$(absolute "${!var}")"
done
case $PY in */*) PY=$(absolute "$PY");; esac  # a path to an interpreter, e.g. venv/bin/python
mkdir_p() { [ "$DRY_RUN" = 1 ] || mkdir -p "$@"; }
mkdir_p "$OUT"
OUT=$( (cd "$OUT" 2>/dev/null && pwd) || absolute "$OUT")
LOGS=$OUT/logs
SITE=$OUT/site
mkdir_p "$LOGS"
cd "$REPO" || exit 1
name() { echo "$1${TAG:+_$TAG}.json"; }  # result file name under --out

say() {  # a summary line: printed, and kept in OUT/suite.log
  echo "[suite] $*"
  [ "$DRY_RUN" = 1 ] || echo "$(date -u +%FT%TZ) $*" >> "$OUT/suite.log"
}
quote() {  # one argument as the shell reads it back: bare when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() {  # a command line, quoted
  local first=1 arg
  for arg in "$@"; do [ "$first" = 1 ] || printf ' '; quote "$arg"; first=0; done
  echo
}

# ---- environment ----
setenv() {  # setenv NAME VALUE: export it, and print it in a dry run
  export "$1=$2"
  [ "$DRY_RUN" = 0 ] || echo "export $1=$(quote "$2")"
}
[ "$DRY_RUN" = 0 ] || echo "# plan: $(for s in "${STEPS[@]}"; do wants "$s" && printf '%s ' "$s"; done | sed 's/ $//')"
setenv PYTHONUNBUFFERED 1
if [ "$NO_MULTICAST" = 1 ]; then
  setenv NCCL_NVLS_ENABLE 0
  setenv TORCH_SYMM_MEM_DISABLE_MULTICAST 1
  setenv NVSHMEM_DISABLE_NVLS 1
  setenv VLLM_ALLREDUCE_USE_SYMM_MEM 0
  setenv VLLM_FLASHINFER_ALLREDUCE_BACKEND trtllm
fi

install() {  # install CMD...: a setup command, logged to OUT/logs/install.log
  if [ "$DRY_RUN" = 1 ]; then echo -n "[install] "; show "$@"; return 0; fi
  "$@" >> "$LOGS/install.log" 2>&1 || { say "install failed: $(show "$@")"; tail -20 "$LOGS/install.log"; exit 1; }
}
if [ -n "$BUNDLE" ]; then
  if [ ${#WHEELS[@]} -gt 0 ]; then
    install "$PY" -m pip install --quiet --upgrade --no-index --find-links "$BUNDLE" --target "$SITE" "${WHEELS[@]}"
    setenv PYTHONPATH "$SITE${PYTHONPATH:+:$PYTHONPATH}"
  else
    setenv PYTHONPATH "$SITE:$BUNDLE${PYTHONPATH:+:$PYTHONPATH}"
  fi
  install "$PY" -m pip install --quiet --upgrade --no-deps --no-build-isolation --no-index --target "$SITE" "$REPO"
fi
if [ "$DRY_RUN" = 0 ]; then
  "$PY" -c "import proxyattn_vllm, proxyattn_kernels" 2> /dev/null || {
    echo "$PROG: $PY cannot import proxyattn_vllm: install the project (pip install '.[vllm,test,bench]') or pass --bundle" >&2
    exit 1; }
  NUM_GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2> /dev/null | tail -1)
  [[ ${NUM_GPUS:-} =~ ^[0-9]+$ ]] && [ "$NUM_GPUS" -gt 0 ] || {
    echo "$PROG: no CUDA GPU visible to $PY: nothing to run" >&2; exit 1; }
  say "plan $(for s in "${STEPS[@]}"; do wants "$s" && printf '%s ' "$s"; done)on $NUM_GPUS GPU(s), results in $OUT"
fi

# ---- steps ----
START=$(date +%s)
left() { echo $(( TIME_LIMIT - ($(date +%s) - START) )); }
set_budget() {  # BUDGET=(--time-budget-s S) for a TTFT sweep when the suite has a time limit
  BUDGET=()
  [ -z "$TIME_LIMIT" ] || BUDGET=(--time-budget-s "$(( $(left) - 10 ))")
}
FAILED=0 TESTS_RC=
step() {  # step NAME ESTIMATE_S CMD...: run CMD, its output in OUT/logs/NAME.log
  # Returns CMD's exit status, or 125 when the step did not fit in the time left.
  local name=$1 need=$2 rc t0; shift 2
  if [ "$DRY_RUN" = 1 ]; then echo -n "[$name] "; show "$@"; return 0; fi
  if [ -n "$TIME_LIMIT" ] && [ "$(left)" -lt "$need" ]; then
    say "skip $name: $(left) s left, needs ~$need s"; return 125
  fi
  say "$name: start"
  t0=$(date +%s)
  if [ -n "$TIME_LIMIT" ]; then
    timeout "$(left)" "$@" > "$LOGS/$name.log" 2>&1
  else
    "$@" > "$LOGS/$name.log" 2>&1
  fi
  rc=$?
  say "$name: rc $rc after $(( $(date +%s) - t0 )) s (log: $LOGS/$name.log)"
  if [ "$rc" != 0 ]; then FAILED=1; tail -20 "$LOGS/$name.log"; fi
  return "$rc"
}
timing_allowed() {  # timing_allowed STEP: no sparse timing after a failing (or skipped) GPU test
  if [ "$DRY_RUN" = 0 ] && [ -n "$TESTS_RC" ] && [ "$TESTS_RC" != 0 ] && [ "$IGNORE_TEST_FAILURES" = 0 ]; then
    say "skip $1: the GPU tests $([ "$TESTS_RC" = 125 ] && echo 'did not run' || echo failed) (a wrong kernel's speed means nothing; --ignore-test-failures times it anyway)"
    return 1
  fi
}

if wants tests; then
  step tests 240 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider -rs
  TESTS_RC=$?
fi
wants kernels && step kernels 300 "$PY" benchmarks/kernels/bench_kernels.py --out "$OUT/$(name kernels)"
wants host_launch && step host_launch 60 "$PY" benchmarks/kernels/host_launch_probe.py --out "$OUT/$(name host_launch)"

if [ -z "$DUMMY8B" ] && { wants ttft || wants density || wants ttft_page16 || wants profile || wants backend || wants tp2 || wants pp2 || wants soak; }; then
  DUMMY8B=$OUT/dummy8b
  step dummy_model 30 "$PY" benchmarks/common/dummy_llama.py "$DUMMY8B"
fi
set_ttft() {  # TTFT=(the TTFT sweep of the dummy 8B at 32K-256K; max_density 0.1 in the config)
  set_budget
  TTFT=("$PY" benchmarks/e2e/ttft_sweep.py --model "$DUMMY8B" --config "$LLAMA_CONFIG" --lengths 32K,64K,128K,256K
        --repeats 2 --warmups 1 --warmup-len 131072 --decode-requests 6 --decode-len 256 --mix-long 0
        --out "$OUT/$(name ttft_llama8b_dummy)" --logdir "$OUT/ttft_logs" --append ${BUDGET[@]+"${BUDGET[@]}"})
}
if wants ttft; then
  # Dense first, alone (its cold start and its 33 s 256K requests), then the sparse backends
  # appended to the same JSON.
  set_ttft
  step ttft_dense 330 "${TTFT[@]}" --backends FLASH_ATTN --startup-estimate-s 220
  if timing_allowed ttft_sparse; then
    set_ttft
    step ttft_sparse 240 "${TTFT[@]}" --backends "$SPARSE_BACKENDS" --startup-estimate-s 110
  fi
fi
if wants density && timing_allowed density; then
  # The density each length used: a restart with PROXYATTN_STATS, untimed, into the TTFT JSON.
  set_ttft
  step density 260 "${TTFT[@]}" --backends proxyattn --density-only --startup-estimate-s 200
fi
if wants ttft_page16 && timing_allowed ttft_page16; then
  # 16-token pages (vLLM's default page size): the Triton kernel through its contiguous copy
  # against FA3 dense on the same pages.
  set_budget
  step ttft_page16 420 "$PY" benchmarks/e2e/ttft_sweep.py --model "$DUMMY8B" --config "$LLAMA_CONFIG" \
    --lengths 64K,128K --repeats 2 --warmups 1 --warmup-len 131072 --decode-requests 0 --mix-long 0 \
    --backends FLASH_ATTN,proxyattn:triton --serve-args="--block-size 16" --startup-estimate-s 220 \
    --out "$OUT/$(name ttft_page16_llama8b_dummy)" --logdir "$OUT/ttft_page16_logs" ${BUDGET[@]+"${BUDGET[@]}"}
fi
if wants profile && timing_allowed profile; then
  # Where one 131008-token prompt's GPU time goes in the engine: dense, then "fa3" at max_density 0.1.
  profile=("$PY" benchmarks/e2e/profile_prefill.py --model "$DUMMY8B" --dummy --prompt-len 131008
           --out "$OUT/$(name profile_prefill)")
  step profile_dense 180 "${profile[@]}" --backend FLASH_ATTN --trace-dir "$OUT/traces/dense"
  step profile_sparse 180 "${profile[@]}" --append --backend proxyattn --trace-dir "$OUT/traces/fa3" \
    --proxyattn-overrides '{"max_density": 0.1, "sparse_kernel": "fa3"}'
fi
if wants ttft_qwen && timing_allowed ttft_qwen; then
  # Real weights at the default gamma 0.95, with the density each length used.
  set_budget
  step ttft_qwen 420 "$PY" benchmarks/e2e/ttft_sweep.py --model "$QWEN" --config "$QWEN_CONFIG" \
    --backends FLASH_ATTN,proxyattn --lengths 8K,32K --repeats 3 --warmups 1 --warmup-len 16384 \
    --decode-requests 0 --mix-long 0 --tokenizer "$QWEN" --text-dir "$ESSAYS" --density-pass \
    --startup-estimate-s 90 --out "$OUT/$(name ttft_qwen05b)" --logdir "$OUT/ttft_qwen_logs" ${BUDGET[@]+"${BUDGET[@]}"}
fi
wants backend && step backend 300 "$PY" benchmarks/robustness/gpu_backend_check.py --model "$SMOLLM" --essays "$ESSAYS" \
  --dummy-8b "$DUMMY8B" --serve --out "$OUT/$(name backend)"
# Two GPUs: the equivalence check and the dummy 8B at TP=2, then at PP=2.
for layout in "tp2 2 1" "pp2 1 2"; do
  read -r two tp pp <<< "$layout"
  wants "$two" || continue
  if [ "$DRY_RUN" = 0 ] && [ "$NUM_GPUS" -lt 2 ]; then
    say "skip $two: needs 2 GPUs, $NUM_GPUS visible"
  else
    step "$two" 600 "$PY" benchmarks/robustness/gpu_backend_check.py --model "$QWEN" --essays "$ESSAYS" \
      --tensor-parallel "$tp" --pipeline-parallel "$pp" --skip cudagraphs --dummy-8b "$DUMMY8B" \
      --out "$OUT/$(name "backend_$two")"
  fi
done
ROBUSTNESS_JSON=$OUT/$(name robustness)
wants robustness && step robustness 300 "$PY" benchmarks/robustness/gpu_robustness.py --model "$QWEN" --essays "$ESSAYS" \
  --parts prefix,preemption --prefix-configs dense_fa,full,full_block256 --preempt-configs dense_fa,full \
  --append --out "$ROBUSTNESS_JSON"
wants soak && step soak 900 "$PY" benchmarks/robustness/gpu_robustness.py --model "$DUMMY8B" --essays "$ESSAYS" \
  --parts soak --soak-s 600 --soak-token-ids --max-model-len 131072 --soak-long-range 8192:131000 \
  --soak-long-rate 0.1 --soak-short-rate 2 --gpu-memory-utilization 0.85 \
  --soak-serve-args "--load-format dummy" --proxyattn-overrides '{"max_density": 0.1}' \
  --append --out "$ROBUSTNESS_JSON"
wants quality && step quality 900 "$PY" benchmarks/quality/run_eval.py \
  --models "smollm2=$SMOLLM,qwen05b=$QWEN" --lengths smollm2=2048,4096,8192 \
  --lengths qwen05b=4096,8192,16384,32768 --samples 50 --essay-dir "$ESSAYS" \
  --gpu-memory-utilization 0.5 --out "$OUT/$(name quality)"

[ "$DRY_RUN" = 1 ] && exit 0
say "done: $([ "$FAILED" = 0 ] && echo 'every step that ran succeeded' || echo 'a step failed')"
exit "$FAILED"
