# Poll the background chain for up to $1 s: pack its results into $OUT/res.tgz every 10 s (a call
# cut at the device-time limit still returns what was done; a call returns at most 8 files, so one
# archive), print its log when it ends or the time is up.
set -u
source benchmarks/h200/common.sh
t0=$(date +%s); limit=${1:-570}
sync_out() {
  tar czf "$OUT/res.tgz.part" -C "$BG" res chain.log 2>/dev/null && mv "$OUT/res.tgz.part" "$OUT/res.tgz"
  cp "$BG/chain.log" "$OUT/" 2>/dev/null; true
}
while [ ! -e "$BG/chain.done" ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do
  sync_out; sleep 10
done
sync_out
grep -E "^\[chain\]|^\[quality\] (results|stopped)|healthy|mean TTFT|speedup|passed|failed" "$BG/chain.log" | tail -40
[ -e "$BG/chain.done" ] && echo "chain: done" || echo "chain: still running"; gpu_mem
