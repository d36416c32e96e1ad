"""Per-step microbenchmarks: the kernels, the host time of their launches, the metadata builder."""
