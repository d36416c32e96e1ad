# A whole session's GPU work as one background chain, so the GPU never waits between device calls
# (the calls only poll: benchmarks/h200/poll.sh). Steps run in order of value; a step starts only
# if its estimated time fits before the deadline ($1: seconds from now the device time lasts).
# Results go to $BG/res (copied to $OUT by every poll), the log to $BG/chain.log.
set -u
source benchmarks/h200/common.sh
deadline=$(( $(date +%s) + ${1:?seconds of device time left} ))
RES=$BG/res; mkdir -p "$RES"
left() { echo $(( deadline - $(date +%s) )); }
# step NAME ESTIMATE_S COMMAND...: run COMMAND (a timeout of the time left) if ESTIMATE_S fits.
last_rc=0
step() {
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "[chain] skip $name: $(left) s left, needs ~$need s"; last_rc=skipped; return; fi
  echo "[chain] $name: start ($(left) s left)"; local t0=$(date +%s)
  kill_gpu; sleep "${PROXYATTN_KILL_WAIT_S:-2}"  # let the driver free the memory
  timeout "$(left)" "$@" > "$RES/$name.log" 2>&1
  last_rc=$?
  echo "[chain] $name: rc $last_rc after $(( $(date +%s) - t0 )) s"
  tail -25 "$RES/$name.log"
}
# ---- Plans written at the end of session 11 (benchmarks/NOTES.md: what is next); earlier
# sessions' plans are in git history. ----
ttft=(python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b"
      --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml --lengths 32K,64K,128K,256K
      --repeats 2 --warmups 1 --warmup-len 131072 --decode-requests 6 --decode-len 256 --mix-long 0
      --out "$RES/ttft_h200.json" --logdir "$RES/ttft_logs")
kernels() {
  # Kernels (~240 s: the cases, chunk_costs (the per-chunk fa3 path at ctx 0-120K, also as CUDA
  # graph replays: GPU time without host launches), the budget and proxy-score tile sweeps, the
  # union call's probes; since session 11 the page-16 Triton rows are the default path through
  # the contiguous 128-token copy, and "gather" rows the kernel without it).
  step kernels 250 python3 benchmarks/bench_kernels.py --out "$RES/kernels_h200.json"
}
ttft_page16() {
  # The contiguous copy in the engine (issue #3's page-16 path, wired in session 11, measured
  # only as kernel calls): 16-token pages (--block-size 16 over the config's 128), the default
  # "triton" kernel against dense FA3 on the same pages, 64K and 128K; the startup log shows the
  # copy's reservation. Its own JSON (it runs next to the TTFT lane).
  step ttft_page16 420 python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b" \
    --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml --lengths 64K,128K --repeats 2 \
    --warmups 1 --warmup-len 131072 --decode-requests 0 --mix-long 0 \
    --backends FLASH_ATTN,proxyattn:triton --serve-args="--block-size 16" \
    --time-budget-s "$(( $(left) - 10 ))" --startup-estimate-s 220 \
    --out "$RES/ttft_page16_h200.json" --logdir "$RES/ttft_page16_logs"
}
profile_args=(python3 benchmarks/profile_prefill.py --model "$PWD/.dummy8b" --dummy --prompt-len 131008
              --out "$RES/profile_prefill_h200.json")
profile_sparse() {
  # Where the engine's time goes at 128K (benchmarks/profile_prefill.py; GPU kernel time per
  # category and idle time) for "fa3" at max_density 0.1. Session 9's fit put the engine's
  # per-chunk attention 10-14% above the kernel bench's path. The traces stay on the host.
  step profile_sparse 180 "${profile_args[@]}" "$@" --backend proxyattn --trace-dir "$BG/traces/fa3" \
    --proxyattn-overrides '{"max_density": 0.1, "sparse_kernel": "fa3"}'
}
gpu_tests() {
  step gpu_tests 60 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rs
  gpu_tests_rc=$last_rc  # a failing GPU test (e.g. a new kernel) stops the sparse timings
}
ttft_timed() {
  # Dense FA3 alone first (the host's first vLLM start is cold, ~165-220 s, and 256K takes 33 s a
  # request; the sweep's equal shares per backend would cut its 256K), then "fa3" (the best
  # kernel at max_density; session 9: 1.45x / 1.83x / 2.48x / 3.46x) appended. Triton is not
  # re-timed. Write the prediction into benchmarks/NOTES.md before the run.
  step ttft_dense 330 "${ttft[@]}" --append --backends FLASH_ATTN --time-budget-s 420 --startup-estimate-s 220
  if [ "$gpu_tests_rc" != 0 ]; then
    echo "[chain] GPU tests: rc $gpu_tests_rc; sparse TTFT not timed (a wrong kernel's speed means nothing)"
  else
    step ttft_sparse 180 "${ttft[@]}" --append --backends proxyattn:fa3 \
      --time-budget-s "$(( $(left) < 250 ? $(left) - 10 : 240 ))" --startup-estimate-s 110
  fi
}
density() {
  # The density each length used (the default config with PROXYATTN_STATS; untimed; session 7
  # measured 0.096-0.100 with the same cap; session 11 0.096-0.099), added to the timed runs'
  # JSON, or written to $1 instead: a lane running next to the TTFT sweep must not append to
  # its file (two sweeps appending at once keep only the last writer's results: session 11 lost
  # its density pass that way). Session 8's pass got 160 s and its cold server was not healthy
  # in time: 260 s.
  step ttft_density 200 "${ttft[@]}" --append --out "${1:-$RES/ttft_h200.json}" --backends proxyattn --density-only \
    --time-budget-s "$(( $(left) < 270 ? $(left) - 10 : 260 ))" --startup-estimate-s 200
}
qwen() {
  # Real weights again, Qwen2.5-Coder-0.5B at 8K/32K (0.78x / 0.80x in session 6, before the FA3
  # tail), with the density pass, if it fits and the GPU tests passed.
  [ "$gpu_tests_rc" = 0 ] || return 0
  step ttft_qwen 200 python3 benchmarks/ttft_sweep.py --model /tmp/models/qwen05b \
    --config serve_configs/qwen2.5-coder-0.5b-32k-proxyattn.yaml --backends FLASH_ATTN,proxyattn \
    --lengths 8K,32K --repeats 3 --warmups 1 --warmup-len 16384 --decode-requests 0 --mix-long 0 \
    --tokenizer /tmp/models/qwen05b --text-dir .essays --density-pass \
    --time-budget-s "$(( $(left) - 10 ))" --startup-estimate-s 90 \
    --out "$RES/ttft_qwen05b_h200.json" --logdir "$RES/ttft_qwen_logs"
}
tp2_128k() {
  # Issue #7's last item: a sparse 128K prompt of the 8B shape at TP=2 (max_density 0.1; session
  # 8's attempt died in vLLM's multicast all-reduce fusion, now off). Both GPUs.
  step tp2_128k 300 python3 benchmarks/gpu_backend_check.py --model /tmp/models/qwen05b --essays .essays \
    --tensor-parallel 2 --skip equivalence,cudagraphs --dummy-8b "$PWD/.dummy8b" \
    --out "$RES/robustness_tp2_128k_h200.json"
  # vLLM's JIT monitor names every Triton compile inside a request: none is expected after the
  # startup warm-up (session 10 saw four on rank 0, from a warm-up at a stale page size).
  echo "[chain] tp2_128k: $(grep -c 'JIT compilation during inference' "$RES/tp2_128k.log" 2>/dev/null || true)" \
       "Triton compiles during inference"
}
on_gpu() { export CUDA_VISIBLE_DEVICES=$1 PROXYATTN_GPU=$1; }
all_gpus() { unset CUDA_VISIBLE_DEVICES PROXYATTN_GPU; }
# The plan ($PROXYATTN_CHAIN_PLAN): "full" (the next session's steps, in order of value), or a
# session split in two chains with CPU work between them: "diagnose" (the profile, the TP=2
# prompt, the kernels and their probes) and "measure" (the TTFT, the Qwen TTFT and the density
# pass).
plan=${PROXYATTN_CHAIN_PLAN:-full}
case $plan in
  full|diagnose|measure) ;;
  *) echo "[chain] unknown plan '$plan' (accepted: full, diagnose, measure)"; touch "$BG/chain.done"; exit 2;;
esac
echo "[chain] plan $plan on $(num_gpus) GPU(s)"
gpu_tests_rc=skipped
if [ "$plan" = diagnose ] && [ "$(num_gpus)" -ge 2 ]; then
  # GPU 1 profiles the engine while GPU 0 runs the GPU tests; then TP=2 on both; then the
  # kernels alone (a vLLM server on the other GPU disturbs short timings).
  on_gpu 0
  ( on_gpu 1; profile_sparse ) &
  lane1=$!
  gpu_tests
  wait "$lane1"
  all_gpus
  tp2_128k
  on_gpu 0
  kernels
elif [ "$plan" = diagnose ]; then
  gpu_tests
  kernels
  profile_sparse
elif [ "$plan" = measure ] && [ "$(num_gpus)" -ge 2 ]; then
  # GPU 0: the GPU tests (they gate everything sparse), then the TTFT; GPU 1 meanwhile: the Qwen
  # TTFT and the density pass (a server on the other GPU: the TTFT is GPU-bound, session 8).
  on_gpu 0
  gpu_tests
  ( on_gpu 1; qwen; [ "$gpu_tests_rc" = 0 ] && density "$RES/ttft_density_h200.json" ) &
  lane1=$!
  ttft_timed
  wait "$lane1"
elif [ "$plan" = measure ]; then
  gpu_tests
  ttft_timed
  qwen
  [ "$gpu_tests_rc" = 0 ] && density
elif [ "$(num_gpus)" -ge 2 ]; then
  # "full", session 12's plan: the GPU tests (they gate everything sparse) and the kernels alone
  # first (the page-16 rows now through the copy); then GPU 1 runs the page-16 TTFT (the copy in
  # the engine) while GPU 0 times the TTFT again (session 11's slower host: 2.50x / 3.48x at
  # 128K / 256K; session 10's 2.52x / 3.53x). The density pass and the TP=2 prompt were measured
  # in session 11 (plans "measure" and "diagnose" still run them).
  on_gpu 0
  gpu_tests
  kernels
  ( on_gpu 1; [ "$gpu_tests_rc" = 0 ] && ttft_page16 ) &
  lane1=$!
  ttft_timed
  wait "$lane1"
else
  # "full" on one GPU: the GPU tests, the kernels, the TTFT, the page-16 TTFT last.
  gpu_tests
  kernels
  ttft_timed
  [ "$gpu_tests_rc" = 0 ] && ttft_page16
fi
kill_gpu
echo "[chain] done ($(left) s left)"
touch "$BG/chain.done"
