# Last bundle part, FlashInfer's precompiled kernels, the project, then the GPU tests.
set -u
t0=$(date +%s)
bash .gpu_bundle/c13/install.sh 2>&1 | tail -3
source benchmarks/h200/common.sh
for f in .whl/fi_aot/*.so; do
  [ -e "$f" ] || continue
  n=$(basename "$f" .so); mkdir -p "/tmp/site/flashinfer/data/aot/$n"; cp "$f" "/tmp/site/flashinfer/data/aot/$n/"
done
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/pa . > "$OUT/pip.log" 2>&1 \
  || { echo "project install failed"; tail -20 "$OUT/pip.log"; exit 1; }
echo "installed after $(( $(date +%s) - t0 )) s"; gpu_mem
# SKIP_GPU_TESTS=1 leaves the GPU tests for a later call (gpu_tests.sh) when device time is short.
[ "${SKIP_GPU_TESTS:-0}" = 1 ] && { echo "GPU tests skipped (SKIP_GPU_TESTS=1)"; exit 0; }
bash benchmarks/h200/gpu_tests.sh
