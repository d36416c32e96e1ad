# The GPU tests (marker `gpu`), ~2 min on a warm host.
set -u
source benchmarks/h200/common.sh
timeout 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider -rs 2>&1 | tail -15
