# Restart of a quality run cut short after SmolLM2's dense and gamma-0.95 engines: Qwen (all three
# engines), then SmolLM2 at gamma 0.9 (with its dense twin again, a greedy-identity cross-check).
# Results: $BG/quality_qwen.json, $BG/quality_smollm2_g090.json; merge them with the first part.
set -u
source benchmarks/h200/common.sh
common=(--samples 50 --essay-dir .essays --gpu-memory-utilization 0.5)
python3 benchmarks/quality/run_eval.py --models qwen05b=/tmp/models/qwen05b \
  --lengths 4096,8192,16384,32768 "${common[@]}" --out "$BG/quality_qwen.json"
python3 benchmarks/quality/run_eval.py --models smollm2=/tmp/models/smollm2 \
  --lengths 2048,4096,8192 --gammas 0.9 "${common[@]}" --out "$BG/quality_smollm2_g090.json"
