"""Fixes for running Triton kernels on CPU under ``TRITON_INTERPRET=1`` (triton 3.6.0).

* bf16 ``tl.dot``: the interpreter multiplies bf16's raw uint16 bits; convert to fp32 first.
* multi-config ``@triton.autotune``: benchmarking needs a GPU driver; make every config cost 0
  so the first one is taken.
Imported by conftest.py only on machines without CUDA.
"""
import numpy as np
import triton.language as tl
from triton.runtime import autotuner, interpreter


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


_create_dot = interpreter.InterpreterBuilder.create_dot


def _create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
    if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
        a32 = _bf16_bits_to_f32(a.data) if a.dtype == tl.bfloat16 else a.data.astype(np.float32)
        b32 = _bf16_bits_to_f32(b.data) if b.dtype == tl.bfloat16 else b.data.astype(np.float32)
        return interpreter.TensorHandle(np.matmul(a32, b32, dtype=d.data.dtype) + d.data, d.dtype.scalar)
    return _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)


interpreter.InterpreterBuilder.create_dot = _create_dot_bf16
autotuner.Autotuner.do_bench = property(lambda self: (lambda fn, quantiles: [0.0] * len(quantiles)))
