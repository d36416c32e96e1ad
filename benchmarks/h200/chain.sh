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
# ---- The plan of the next session (session 7); earlier sessions' plans are in git history. ----
# 1. Kernels (~100 s): the Triton path with the dense tail through FA3 (tail128 fa3-tail) next to
#    tail-first and fa3-union; then the GPU tests (~45 s; new: the FA3-tail composition).
step kernels 150 python3 benchmarks/bench_kernels.py --out "$RES/kernels_h200.json"
step gpu_tests 60 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rs
# 2. TTFT: dense FA3 alone first (~340 s: the host's first vLLM start is cold, ~220 s, and
#    256K takes 33 s a request; the sweep's equal shares per backend would cut its 256K), then the
#    three sparse kernels appended to the same JSON with the density pass (~620 s). max_density
#    now caps the whole chunk (~0.10 predicted). Decode first (6 requests, engine-side TPOT).
#    flashinfer's end-to-end TTFT (issue #8) rides along; its 256K is the first thing cut.
ttft=(python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b"
      --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml --lengths 32K,64K,128K,256K
      --repeats 2 --warmups 1 --warmup-len 131072 --decode-requests 6 --decode-len 256 --mix-long 0
      --out "$RES/ttft_h200.json" --logdir "$RES/ttft_logs")
step ttft_dense 330 "${ttft[@]}" --backends FLASH_ATTN --time-budget-s 420 --startup-estimate-s 220
quality_reserve=410  # step 3 below
step ttft_sparse 450 "${ttft[@]}" --append --backends proxyattn,proxyattn:fa3,proxyattn:flashinfer \
  --density-pass --time-budget-s "$(( $(left) - quality_reserve < 700 ? $(left) - quality_reserve : 700 ))" \
  --startup-estimate-s 110
# 3. Accuracy at gamma 0.90 with the dense tail (issue #6's last cells; ~360-400 s), 50 samples per
#    cell, no dense (the dense cells of quality_h200.json are reused; merge with merge.py).
quality=(python3 benchmarks/quality/run_eval.py --samples 50 --essay-dir .essays --gpu-memory-utilization 0.5
         --no-dense --gammas 0.9)
step quality_smollm2_09 170 "${quality[@]}" --models smollm2=/tmp/models/smollm2 --lengths 2048,4096,8192 \
  --out "$RES/quality_smollm2_09.json"
step quality_qwen_09 230 "${quality[@]}" --models qwen05b=/tmp/models/qwen05b \
  --lengths 4096,8192,16384,32768 --out "$RES/quality_qwen_09.json"
# 4. Real weights again, Qwen2.5-Coder-0.5B at 8K/32K (0.78x / 0.80x in session 6, before the
#    FA3 tail), with the density pass (its flush now fits max-model-len).
step ttft_qwen 200 python3 benchmarks/ttft_sweep.py --model /tmp/models/qwen05b \
  --config serve_configs/qwen2.5-coder-0.5b-32k-proxyattn.yaml --backends FLASH_ATTN,proxyattn \
  --lengths 8K,32K --repeats 3 --warmups 1 --warmup-len 16384 --decode-requests 0 --mix-long 0 \
  --tokenizer /tmp/models/qwen05b --text-dir .essays --density-pass \
  --time-budget-s "$(( $(left) - 10 ))" --startup-estimate-s 90 \
  --out "$RES/ttft_qwen05b_h200.json" --logdir "$RES/ttft_qwen_logs"
# Not planned (does not fit): the 10-minute soak of issue #7 (gpu_robustness.py --parts soak
# --soak-s 600) needs a session of its own; TP=2 needs the two-GPU host.
kill_gpu
echo "[chain] done ($(left) s left)"
touch "$BG/chain.done"
