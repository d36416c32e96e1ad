# Sourced by every script: the environment the bundle installed, and helpers.
export PYTHONPATH=/tmp/pa:/tmp/site
export FLASHINFER_WORKSPACE_BASE=/root/fi_ws
export PYTHONUNBUFFERED=1
BG=${PROXYATTN_BG:-/root/bg}  # work that outlives a call (PROXYATTN_BG: tests)
mkdir -p "$BG"
gpu_mem() { nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader; }
# Never NVLink multicast on the shared multi-GPU hosts (KINDS.md): NCCL, torch and NVSHMEM are
# told so by the image; vLLM's symmetric-memory all-reduce would use multimem, so it is off too,
# and FlashInfer's fused all-reduce (vLLM's default at TP>1 under torch.compile) is kept off its
# multicast "mnnvl" backend (benchmarks/gpu_backend_check.py also turns that fusion off).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
export VLLM_FLASHINFER_ALLREDUCE_BACKEND=trtllm
# Kill what holds the GPU (a `pkill -f vllm` pattern would also match the calling shell); with
# PROXYATTN_GPU set, only what holds that GPU (two lanes of work on a two-GPU host).
kill_gpu() { nvidia-smi ${PROXYATTN_GPU:+-i "$PROXYATTN_GPU"} --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9; }
num_gpus() { nvidia-smi -L 2>/dev/null | grep -c '^GPU'; }
