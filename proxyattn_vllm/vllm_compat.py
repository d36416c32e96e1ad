"""Every difference between the vLLM releases this plugin supports, in one place.

The product (backend, builder, impl) and the tests use the names below instead of asking which
vLLM is installed. Each shim detects the feature, not the version number, and says which
releases behave which way:

* 0.26: ``vllm.entrypoints.openai.cli_args``; a process-wide KV-cache layout override
  (``utils._KV_CACHE_LAYOUT_OVERRIDE``) that CPU_ATTN sets to HND; ``get_kv_cache_shape`` on
  the backend; ``FlashAttentionMetadata.use_cascade``; the CPU worker always runs its warm-up
  (profiling) forward.
* 0.32: ``vllm.entrypoints.launchers.cli_args``; the layout is resolved per engine into
  ``cache_config.kv_cache_layout`` (nothing process-wide to restore); the cache's logical shape
  comes from the KV-cache spec (``compute_layer_kv_cache_shape_bytes``); no cascade attention in
  FlashAttention's metadata; the CPU worker skips its warm-up forward when ``enforce_eager`` and
  ``kv_cache_memory_bytes`` are both set; CPU_ATTN's kernel pages are multiples of 32.
* 0.33 (Python API checked from its wheel, see tests/test_vllm_api.py):
  ``vllm.entrypoints.common.cli_args``; FlashAttention declares
  ``supports_kv_cache_update_bypass`` (ProxyAttnBackend turns it off, see backend.py); the base
  metadata builder has ``build_for_drafting``, which calls ``build`` (inherited as is).
* 0.34 (Python API checked from its wheel, likewise): as 0.33 for the backend, less
  ``build_for_drafting``; ``AttentionBackend.supports_head_size_v`` (ProxyAttnBackend inherits
  the default: V's head size must equal K's). No shim differs from 0.33.
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Iterator

#: Where ``make_arg_parser`` (what ``vllm serve`` parses with) lives, newest first.
_CLI_ARGS_MODULES = (
    "vllm.entrypoints.common.cli_args",  # 0.33, 0.34
    "vllm.entrypoints.launchers.cli_args",  # 0.32
    "vllm.entrypoints.openai.cli_args",  # 0.26
)


def make_serve_arg_parser():
    """The argument parser ``vllm serve`` builds (it loads the general plugins, ours included)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for name in _CLI_ARGS_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        return module.make_arg_parser(FlexibleArgumentParser())
    raise ImportError(f"none of {_CLI_ARGS_MODULES} is importable: is this a supported vLLM?")


@contextlib.contextmanager
def kv_cache_layout_restored() -> Iterator[None]:
    """Around an in-process engine: put back the process-wide KV-cache layout on exit.

    vLLM 0.26's CPU_ATTN sets a process-wide layout override (HND) that a later engine of the
    same process would inherit; from 0.32 the layout lives in each engine's ``cache_config`` and
    there is nothing to restore."""
    from vllm.v1.attention.backends import utils

    if not hasattr(utils, "_KV_CACHE_LAYOUT_OVERRIDE"):
        yield
        return
    previous = utils._KV_CACHE_LAYOUT_OVERRIDE
    try:
        yield
    finally:
        utils.set_kv_cache_layout(previous)


def kv_cache_shape(backend, spec, num_blocks: int) -> tuple[int, ...]:
    """The logical shape of one layer's KV cache of ``num_blocks`` pages, in elements:
    ``(num_blocks, Hkv, page, 2 * D)`` for FlashAttention's packed K|V (0.26: the backend's
    ``get_kv_cache_shape``; 0.32+: the KV-cache spec, whose last dimension is in bytes)."""
    if hasattr(backend, "get_kv_cache_shape"):
        return tuple(backend.get_kv_cache_shape(num_blocks, spec.block_size, spec.num_kv_heads, spec.head_size))
    from vllm.v1.kv_cache_interface import compute_layer_kv_cache_shape_bytes

    *outer, content_bytes = compute_layer_kv_cache_shape_bytes(spec, num_blocks)
    itemsize = spec.dtype.itemsize
    assert content_bytes % itemsize == 0
    return (*outer, content_bytes // itemsize)


def uses_cascade(flash_metadata) -> bool:
    """Whether FlashAttention's metadata asks for cascade attention (0.26 has the flag; 0.32 has
    no cascade attention in FlashAttention, so never)."""
    return bool(getattr(flash_metadata, "use_cascade", False))


def run_cpu_warm_up_forward(setattr_fn: Callable = setattr) -> None:
    """Make vLLM's CPU worker run its warm-up forward (the run in which the backend sees no
    metadata and asks for its kernel warm-up), as on a GPU, where the memory-profiling forward
    always runs. vLLM 0.32's CPU worker skips it when ``enforce_eager`` and
    ``kv_cache_memory_bytes`` are both set (``CPUWorker._should_warm_up_model``); 0.26 always
    runs it. Test-only: patched through ``setattr_fn`` (e.g. ``monkeypatch.setattr``)."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    if hasattr(CPUWorker, "_should_warm_up_model"):
        setattr_fn(CPUWorker, "_should_warm_up_model", lambda self: True)


def cpu_attn_page_size(page_size: int) -> int:
    """The smallest KV page size CPU_ATTN (vLLM's dense CPU backend) takes that is a multiple of
    ``page_size``: ``page_size`` itself on 0.26 (pages of 16 tokens), 32 for 16 on 0.32, whose
    CPU kernels need multiples of 32."""
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    size = page_size
    for allowed in CPUAttentionBackend.get_supported_kernel_block_sizes():
        base = allowed.base if isinstance(allowed, MultipleOf) else int(allowed)
        while size % base:
            size += page_size
    return size
