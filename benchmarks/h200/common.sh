# Sourced by every script: the environment the bundle installed, and helpers.
export PYTHONPATH=/tmp/pa:/tmp/site
export FLASHINFER_WORKSPACE_BASE=/root/fi_ws
export PYTHONUNBUFFERED=1
BG=${PROXYATTN_BG:-/root/bg}  # work that outlives a call (PROXYATTN_BG: tests)
mkdir -p "$BG"
gpu_mem() { nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader; }
# Kill what holds the GPU (a `pkill -f vllm` pattern would also match the calling shell).
kill_gpu() { nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9; }
