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
  kill_gpu; sleep 2
  timeout "$(left)" "$@" > "$RES/$name.log" 2>&1
  echo "[chain] $name: rc $? after $(( $(date +%s) - t0 )) s"
  tail -25 "$RES/$name.log"
}
quality=(python3 benchmarks/quality/run_eval.py --samples 50 --essay-dir .essays --gpu-memory-utilization 0.5 --gammas 0.95)
# Quality of the dense-tail default: SmolLM2 dense (the cross-session check of the earlier run's
# dense cells, which the merge reports as repeats) + 0.95; Qwen 0.95 only (dense from the earlier run).
step quality_smollm2 200 "${quality[@]}" --models smollm2=/tmp/models/smollm2 --lengths 2048,4096,8192 \
  --out "$RES/quality_smollm2.json"
step quality_qwen 230 "${quality[@]}" --no-dense --models qwen05b=/tmp/models/qwen05b \
  --lengths 4096,8192,16384,32768 --out "$RES/quality_qwen.json"
# TTFT, dense FA3 first (it pays the cold compile), then proxyattn (Triton kernel, dense tail on);
# ~505 s expected, at most 700 s (each backend gets half).
step ttft 420 python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b" \
  --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml \
  --backends FLASH_ATTN,proxyattn --lengths 32K,64K,128K,256K --repeats 2 --warmups 1 --warmup-len 131072 \
  --decode-requests 2 --decode-len 256 --mix-long 6 --time-budget-s "$(( $(left) < 715 ? $(left) - 15 : 700 ))" \
  --startup-estimate-s 190 \
  --out "$RES/ttft_h200.json" --logdir "$RES/ttft_logs"
# Compiled artifacts for the next session's carry (only if small).
for d in /root/.cache/vllm/torch_compile_cache /root/.triton/cache; do du -sm "$d" 2>/dev/null; done
step kernels 280 python3 benchmarks/bench_kernels.py --out "$RES/kernels_h200.json"
# Issue #8: end-to-end TTFT of the FA3-union sparse kernel, appended to the same JSON.
step ttft_fa3 130 python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b" \
  --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml --append \
  --backends proxyattn:fa3 --lengths 32K,128K --repeats 2 --warmups 1 --warmup-len 131072 \
  --decode-requests 0 --mix-long 0 --time-budget-s "$(( $(left) - 10 ))" --startup-estimate-s 90 \
  --out "$RES/ttft_h200.json" --logdir "$RES/ttft_logs"
step gpu_tests 100 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rs
kill_gpu
echo "[chain] done ($(left) s left)"
touch "$BG/chain.done"
