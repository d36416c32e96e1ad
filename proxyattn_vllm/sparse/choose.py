"""Which sparse kernel a layer runs: ``sparse_kernel`` from the config, decided once per layer.

* ``"triton"``, ``"fa3"``, ``"flashinfer"``: that kernel;
* ``"auto"``: per layer shape, the kernel measured fastest, read from ``auto_table.json`` (GPU,
  date, source result file and the measured times behind each entry; ``benchmarks/kernels/bench_kernels.py
  --auto-table`` writes one). A layer with several proxy groups gets the table's
  ``several_proxy_groups`` kernel: their rankings differ, so the union of the heads' blocks
  approaches dense.

A union kernel ("fa3", "flashinfer") needs KV pages that divide the selection block, and
FlashInfer needs to import and to support the head size and dtype; its path does not read an
FP8 cache (``--kv-cache-dtype fp8``: it would need FlashInfer's FP8 plan and host-side scales). Where the chosen kernel
cannot run, the layer falls back to Triton with one warning per reason and process.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from vllm.logger import init_logger

from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi
from proxyattn_kernels.paged import FP8_KV_DTYPE

from ..config import SPARSE_KERNELS, check_sparse_kernel
from ..errors import ProxyAttnUnsupportedError
from .base import SparseKernel, SparseLayer
from .fa3 import FA3UnionKernel
from .flashinfer import FlashInferUnionKernel
from .triton import TritonSparseKernel

logger = init_logger("vllm.proxyattn")

#: The kernels by ``sparse_kernel`` value ("auto" picks one of them).
KERNELS: dict[str, type[SparseKernel]] = {
    k.name: k for k in (TritonSparseKernel, FA3UnionKernel, FlashInferUnionKernel)
}
assert (*KERNELS, "auto") == SPARSE_KERNELS

AUTO_TABLE_PATH = Path(__file__).with_name("auto_table.json")
_DISPLAY = {"fa3": "FA3", "flashinfer": "FlashInfer"}

#: The fallback warnings already logged (one per reason and process, not per layer).
_warned_fallbacks: set[str] = set()


@functools.cache
def auto_table(path: Path = AUTO_TABLE_PATH) -> dict:
    """``auto_table.json``, with ``"by_shape"`` added: ``{(head_dim, page_size, q_per_kv): kernel}``."""
    table = json.loads(Path(path).read_text())
    by_shape = {(e["head_dim"], e["page_size"], e["q_per_kv"]): e["kernel"] for e in table["shapes"]}
    for kernel in (*by_shape.values(), table["default"], table["several_proxy_groups"]):
        if kernel not in KERNELS:
            raise ValueError(
                f"{path}: kernel {kernel!r} is not one of {sorted(KERNELS)}; fix its \"kernel\", \"default\" "
                "and \"several_proxy_groups\" values (benchmarks/kernels/bench_kernels.py --auto-table writes valid ones)."
            )
    return {**table, "by_shape": by_shape}


def auto_sparse_kernel(head_dim: int, page_size: int, num_q_heads: int, num_kv_heads: int,
                       num_groups: int = 1, table: dict | None = None) -> str:
    """What ``sparse_kernel: "auto"`` runs for a layer shape (``table``: :func:`auto_table`)."""
    table = auto_table() if table is None else table
    if num_groups != 1:
        return table["several_proxy_groups"]
    return table["by_shape"].get((head_dim, page_size, num_q_heads // num_kv_heads), table["default"])


def check_configured(sparse_kernel: str) -> None:
    """At layer construction: a ``sparse_kernel`` asked for by name must be able to run at all
    (``"auto"`` falls back per shape instead)."""
    check_sparse_kernel(sparse_kernel)
    if sparse_kernel == "flashinfer" and not fi.flashinfer_available():
        raise ProxyAttnUnsupportedError(
            f"proxyattn: sparse_kernel \"flashinfer\" needs {fi.FLASHINFER_REQUIREMENT}, "
            f"which cannot be used here ({fi.flashinfer_import_error()}): "
            f"{fi.INSTALL_HINT}, or set sparse_kernel to \"triton\" or \"fa3\"."
        )


def choose(sparse_kernel: str, layer: SparseLayer, page_size: int, dtype: torch.dtype) -> tuple[str, str | None]:
    """``(kernel, why it cannot run or None)`` for a layer of this page size and KV-cache dtype
    (``FP8_KV_DTYPE`` for an FP8 cache), without warning: ``sparse_kernel``, with "auto" looked
    up by shape."""
    check_sparse_kernel(sparse_kernel)
    params = layer.params
    kernel = sparse_kernel
    if sparse_kernel == "auto":
        kernel = auto_sparse_kernel(layer.head_size, page_size, layer.num_heads, layer.num_kv_heads,
                                    params.num_groups)
    name = _DISPLAY.get(kernel)
    reason = None
    if name is not None and params.block_size % page_size:
        reason = (
            f"needs KV pages that divide block_size={params.block_size}, got pages of {page_size} "
            f"tokens; set --block-size to a divisor of {params.block_size} to use {name}"
        )
    elif kernel == "flashinfer" and dtype == FP8_KV_DTYPE:
        reason = ("does not read an FP8 KV cache (--kv-cache-dtype fp8); serve with --kv-cache-dtype auto "
                  "to use FlashInfer")
    elif kernel == "flashinfer" and not fi.flashinfer_available():
        reason = f"cannot import FlashInfer ({fi.flashinfer_import_error()}); {fi.INSTALL_HINT}"
    elif kernel == "flashinfer" and not fi.flashinfer_supports(dtype, layer.head_size):
        reason = (
            f"FlashInfer takes head sizes {fi.SUPPORTED_HEAD_DIMS} in float16/bfloat16, got "
            f"{layer.head_size} in {dtype}"
        )
    if reason is None:
        return kernel, None
    chosen = f'sparse_kernel "{sparse_kernel}"' + (f' (chose "{kernel}")' if sparse_kernel == "auto" else "")
    return kernel, f"{chosen} {reason}"


def sparse_kernel_for_layer(sparse_kernel: str, layer: SparseLayer, page_size: int, dtype: torch.dtype, *,
                            warn: bool = True) -> SparseKernel:
    """The kernel object a layer runs (:func:`choose`; Triton where the choice cannot run,
    logged once per reason and process unless ``warn`` is False)."""
    kernel, fallback = choose(sparse_kernel, layer, page_size, dtype)
    if fallback is not None:
        if warn and fallback not in _warned_fallbacks:
            _warned_fallbacks.add(fallback)
            logger.warning("proxyattn: %s; using the Triton block-sparse kernel.", fallback)
        kernel = TritonSparseKernel.name
    return KERNELS[kernel](layer)
