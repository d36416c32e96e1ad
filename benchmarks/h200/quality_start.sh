# The quality run (6 engines, one at a time, ~10 min) in the background; poll it up to ~8 min.
set -u
source benchmarks/h200/common.sh
kill_gpu
rm -f "$BG/quality_h200.json"
setsid nohup python3 benchmarks/quality/run_eval.py \
  --models smollm2=/tmp/models/smollm2,qwen05b=/tmp/models/qwen05b \
  --lengths smollm2=2048,4096,8192 --lengths qwen05b=4096,8192,16384,32768 \
  --samples 50 --essay-dir .essays --gpu-memory-utilization 0.5 \
  --out "$BG/quality_h200.json" > "$BG/quality.log" 2>&1 < /dev/null &
bash benchmarks/h200/quality_wait.sh "${1:-300}"
