# The TTFT comparison on a quiet GPU (dense 8B shape, dummy weights), ~500 s.
set -u
source benchmarks/h200/common.sh
kill_gpu; gpu_mem
timeout 585 python3 benchmarks/ttft_sweep.py --model "$PWD/.dummy8b" \
  --config serve_configs/llama3.1-8b-dummy-256k-proxyattn.yaml \
  --backends proxyattn,FLASH_ATTN --lengths 32K,64K,128K,256K --repeats 2 --warmups 1 --warmup-len 131072 \
  --decode-requests 2 --decode-len 256 --mix-long 6 --time-budget-s 560 --startup-estimate-s 150 \
  --out "$OUT/ttft_h200.json" --logdir "$OUT/ttft_logs" 2>&1 | tail -40
grep -h -i "jit_monitor\|compiled the sparse" "$OUT"/ttft_logs/*.log | head -10
