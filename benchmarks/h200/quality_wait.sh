# Poll the background quality run for up to $1 s (default 540); copy what it wrote to $OUT.
set -u
source benchmarks/h200/common.sh
t0=$(date +%s); limit=${1:-540}
while pgrep -f benchmarks/quality/run_eval.py > /dev/null; do
  [ $(( $(date +%s) - t0 )) -ge "$limit" ] && break
  grep -q "stopped:" "$BG/quality.log" 2>/dev/null && { echo "quality run stopped early"; break; }
  sleep 5
done
grep -E "^\[quality\]" "$BG/quality.log" | tail -25
if pgrep -f benchmarks/quality/run_eval.py > /dev/null; then echo "quality: still running"; else tail -40 "$BG/quality.log"; fi
cp "$BG"/quality* "$OUT/" 2>/dev/null; true
