# On the two-GPU host (kind nvidia-h200-x2), after its own bundle calls: TP=2 vs TP=1 at full
# density (Qwen2.5-0.5B: 2 KV heads), and a 128K prompt of the dummy 8B at TP=2.
set -u
source benchmarks/h200/common.sh
kill_gpu
timeout 560 python3 benchmarks/gpu_backend_check.py --model /tmp/models/qwen05b --essays .essays \
  --tensor-parallel 2 --skip cudagraphs --dummy-8b "$PWD/.dummy8b" --out "$OUT/robustness_tp2_h200.json" 2>&1 | tail -30
