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
step() {
  local name=$1 need=$2; shift 2
  if [ "$(left)" -lt "$need" ]; then echo "[chain] skip $name: $(left) s left, needs ~$need s"; return; fi
  echo "[chain] $name: start ($(left) s left)"; local t0=$(date +%s)
  kill_gpu; sleep "${PROXYATTN_KILL_WAIT_S:-2}"  # let the driver free the memory
  timeout "$(left)" "$@" > "$RES/$name.log" 2>&1
  echo "[chain] $name: rc $? after $(( $(date +%s) - t0 )) s"
  tail -25 "$RES/$name.log"
}
# ---- The plan of the next session (session 6); earlier sessions' plans are in git history. ----
# 1. Kernels (~100 s): the dense-tail launch order (tail128 vs tail128 launched-last), FA3 in two
#    calls vs one, unequal head budgets (spread) Triton vs fa3-union; then the GPU tests (~30 s).
step kernels 150 python3 benchmarks/bench_kernels.py --out "$RES/kernels_h200.json"
step gpu_tests 60 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rs
# 2. TTFT (~550 s): dense, Triton (tail rows first) and fa3 (tail call first) in one run; 6 decode
#    requests with engine-side TPOT from /metrics (session 5's 2 gave 9.4 and 12.0 ms against 8.1
#    and 8.4 ms at the client). No Poisson mix: session 5 met its target, and the device time
#    goes to the real-weights, kept-mass and robustness steps instead.
step ttft 600 python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b" \
  --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml \
  --backends FLASH_ATTN,proxyattn,proxyattn:fa3 --lengths 32K,64K,128K,256K --repeats 2 --warmups 1 \
  --warmup-len 131072 --decode-requests 6 --decode-len 256 --mix-long 0 \
  --time-budget-s "$(( $(left) < 915 ? $(left) - 15 : 900 ))" --startup-estimate-s 190 \
  --out "$RES/ttft_h200.json" --logdir "$RES/ttft_logs"
# 3. Real weights, Qwen2.5-Coder-0.5B at 32K with the default gamma budget, and its density (~200 s).
step ttft_qwen 200 python3 benchmarks/ttft_sweep.py --model /tmp/models/qwen05b \
  --config serve_configs/qwen2.5-coder-0.5b-32k-proxyattn.yaml --backends FLASH_ATTN,proxyattn \
  --lengths 8K,32K --repeats 3 --warmups 1 --warmup-len 16384 --decode-requests 0 --mix-long 0 \
  --tokenizer /tmp/models/qwen05b --text-dir .essays --density-pass \
  --time-budget-s "$(( $(left) - 10 ))" --startup-estimate-s 90 \
  --out "$RES/ttft_qwen05b_h200.json" --logdir "$RES/ttft_qwen_logs"
# 4. Kept mass with the dense tail, sampled over whole chunks (~200 s): fidelity prompts and one
#    sample per task (labels kept-*: not to be merged with the accuracy cells).
kept=(python3 benchmarks/quality/run_eval.py --samples 1 --essay-dir .essays --gpu-memory-utilization 0.5
      --no-dense --gammas "" --variant 'kept-0.95={}' --variant 'kept-0.9={"gamma": 0.9}' --fidelity-prompts 4)
step kept_smollm2 150 "${kept[@]}" --models smollm2=/tmp/models/smollm2 --lengths 4096,8192 \
  --out "$RES/kept_smollm2.json"
step kept_qwen 120 "${kept[@]}" --models qwen05b=/tmp/models/qwen05b --lengths 8192,16384,32768 \
  --out "$RES/kept_qwen.json"
# 5. Prefix caching and preemption with the FLASH_ATTN control (see gpu_robustness.py).
step robustness 180 python3 benchmarks/gpu_robustness.py --model /tmp/models/qwen05b --essays .essays \
  --parts prefix,preemption --prefix-configs dense_fa,full,full_block256 --preempt-configs dense_fa,full \
  --part-timeout-s 200 --out "$RES/robustness_h200.json"
# 6. If time is left: end-to-end TTFT of sparse_kernel "flashinfer" (issue #8), into the same JSON.
step ttft_flashinfer 140 python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b" \
  --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml --append \
  --backends proxyattn:flashinfer --lengths 32K,128K --repeats 2 --warmups 1 --warmup-len 131072 \
  --decode-requests 0 --mix-long 0 --time-budget-s "$(( $(left) - 10 ))" --startup-estimate-s 110 \
  --out "$RES/ttft_h200.json" --logdir "$RES/ttft_logs"
kill_gpu
echo "[chain] done ($(left) s left)"
touch "$BG/chain.done"
