# The session's first call after the 12 bundle calls: install the rest, start the chain in the
# background, poll it until ~570 s after this call began. $1: the device time left (s) when the
# call starts (the lease's budget_left_s of the previous call); $2: the chain's plan (chain.sh:
# full, diagnose or measure; default full).
set -u
t0=$(date +%s)
SKIP_GPU_TESTS=1 bash benchmarks/h200/setup.sh || exit 1
source benchmarks/h200/common.sh
rm -rf "$BG/res" "$BG/chain.done"
PROXYATTN_CHAIN_PLAN=${2:-full} setsid nohup bash benchmarks/h200/chain.sh "$(( ${1:?device seconds left} - ($(date +%s) - t0) - 40 ))" \
  > "$BG/chain.log" 2>&1 < /dev/null &
bash benchmarks/h200/poll.sh "$(( 570 - ($(date +%s) - t0) ))"
