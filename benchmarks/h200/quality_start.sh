# The quality run (8 engines, one at a time, ~13 min) in the background; poll it up to $1 s.
# notail-0.95 is gamma 0.95 without the dense tail row (the default before session 4): the A/B of
# dense_tail_tokens on the same prompts.
set -u
source benchmarks/h200/common.sh
kill_gpu
rm -f "$BG/quality_h200.json"
setsid nohup python3 benchmarks/quality/run_eval.py \
  --models smollm2=/tmp/models/smollm2,qwen05b=/tmp/models/qwen05b \
  --lengths smollm2=2048,4096,8192 --lengths qwen05b=4096,8192,16384,32768 \
  --samples 50 --essay-dir .essays --gpu-memory-utilization 0.5 \
  --variant 'notail-0.95={"dense_tail_tokens": 0}' \
  --out "$BG/quality_h200.json" > "$BG/quality.log" 2>&1 < /dev/null &
bash benchmarks/h200/quality_wait.sh "${1:-300}"
