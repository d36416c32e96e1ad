# Kernel benchmark: Triton, fa3-union and flashinfer-union next to FA3 dense, gate first.
set -u
source benchmarks/h200/common.sh
kill_gpu
timeout 560 python3 benchmarks/bench_kernels.py --out "$OUT/kernels_h200.json" 2>&1 | tail -45
