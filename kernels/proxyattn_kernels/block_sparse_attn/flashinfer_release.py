"""Which FlashInfer the sparse path can use here, and its import (``sparse_kernel: "flashinfer"``).

**Shapes.** Nothing here touches a tensor: :func:`flashinfer_supports` answers for a KV dtype
and the head size ``D`` of queries ``[q_len, Hq, D]`` and of vLLM's cache
``[num_pages, Hkv, page_size, 2 * D]``. ``flashinfer`` is imported on first use, never when this
module is, so that a missing or broken install surfaces as a message, not an import failure.

**Releases.** Accepted: :data:`SUPPORTED_FLASHINFER_VERSIONS`, the ones the supported vLLMs pin
(0.26: 0.6.14, 0.32: 0.7.0.post1, 0.33: 0.7.2.post1, 0.34: 0.7.3) and 0.7.4. What
:mod:`.flashinfer_plan` relies on was read in the wheels of 0.6.14, 0.7.0.post1, 0.7.2.post1 and
0.7.4 (0.7.3 is not on PyPI; its neighbours 0.7.2.post1 and 0.7.4 agree on all of it). Between
0.6.14 and 0.7.x, for what the FlashInfer path uses:

* same calls: ``BatchPrefillWithPagedKVCacheWrapper(float_workspace, "NHD", backend=...)``,
  ``plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, Hq, Hkv, D,
  page_size, causal=, sm_scale=, q_data_type=, kv_data_type=, non_blocking=,
  disable_split_kv=)`` and ``run(q, (k, v), out=, enable_pdl=)`` keep their names, order and
  meaning; 0.7.x only adds keywords this path does not pass (``variant_owns_mask``,
  ``max_total_num_rows``; ``uniform_q_len``, ``use_token_head_sf``; ``lse_base``,
  ``lse_layout``, ``use_fp16_softmax``, ``uses_spcompress``) and a ``workspace_size`` method;
* same internals: ``plan`` (not in CUDA-graph mode) stores ``Tensor.to(device)`` of its inputs
  in ``_qo_indptr_buf``, ``_paged_kv_indptr_buf``, ``_paged_kv_indices_buf`` and
  ``_paged_kv_last_page_len_buf``, and ``run`` passes those to the kernel; 0.7.x first takes
  ``.contiguous()`` of them, which keeps our contiguous ``kv_indices`` as it is;
* workspaces: the wrapper allocates its own 8 MiB int workspace and pinned copy in both; 0.7.x
  checks that both workspaces are 16-byte aligned (a fresh allocation is);
* the fa2 kernel: the paged run moved to ``csrc/batch_prefill_paged.cuh`` and takes K and V
  strides separately (``SAME_KV_STRIDES``; ours are equal), it still reads ``qo_len`` and
  ``kv_len`` from the device buffers (``paged_kv_t::get_length``) before
  ``griddepcontrol.wait``, and ``PrefillSplitQOKVIndptr`` with ``disable_split_kv`` still makes
  one CTA per (request, query tile) over the whole device length (its new ``uniform_q_len`` is
  read only in CUDA-graph mode);
* the fa3 kernel: ``csrc/batch_prefill_sm90.cu``, ``PrefillSM90Plan`` and the hopper headers
  are unchanged.

So no call differs between them; :func:`_import_result` checks the release, and
:meth:`.flashinfer_plan._ChunkPlan._bind` checks the internals it rebinds.
"""
from __future__ import annotations

import functools

import torch

#: The flashinfer-python releases this path accepts (see "Releases" above): each supported
#: vLLM's pin (0.26: 0.6.14, 0.32: 0.7.0.post1, 0.33: 0.7.2.post1, 0.34: 0.7.3) and 0.7.4.
#: pyproject.toml's ``[flashinfer]`` extra admits the same releases.
SUPPORTED_FLASHINFER_VERSIONS = ("0.6.14", "0.7.0.post1", "0.7.2.post1", "0.7.3", "0.7.4")
#: The accepted releases in words, for messages.
FLASHINFER_REQUIREMENT = "flashinfer-python " + " or ".join(
    [", ".join(SUPPORTED_FLASHINFER_VERSIONS[:-1]), SUPPORTED_FLASHINFER_VERSIONS[-1]])
#: Next to the user's vLLM, the extra resolves to the release that vLLM pins.
INSTALL_HINT = "pip install 'proxyattn-vllm[flashinfer]'"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: Head sizes both FlashInfer prefill backends are built for.
SUPPORTED_HEAD_DIMS = (64, 128, 256)


def _release(version: str) -> str:
    """``flashinfer.__version__`` without its local part (``0.7.4+cu130`` -> ``0.7.4``)."""
    return version.split("+")[0]


@functools.cache
def _import_result():
    try:
        import flashinfer
    except ModuleNotFoundError as exc:
        if exc.name == "flashinfer":
            return None, None, "flashinfer-python is not installed"
        return None, None, f"flashinfer cannot be imported: {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001 - installed but broken (CUDA, dependencies)
        return None, None, f"flashinfer cannot be imported: {type(exc).__name__}: {exc}"
    version = str(getattr(flashinfer, "__version__", "unknown"))
    if _release(version) not in SUPPORTED_FLASHINFER_VERSIONS:
        return None, version, f"flashinfer-python {version} is installed"
    return flashinfer, version, None


def installed_flashinfer_version() -> str | None:
    """``flashinfer.__version__`` of the importable FlashInfer (accepted or not), or None."""
    return _import_result()[1]


def flashinfer_import_error() -> str | None:
    """Why FlashInfer cannot be used here (not installed, broken, unaccepted release), or None."""
    return _import_result()[2]


def flashinfer_available() -> bool:
    return flashinfer_import_error() is None


def import_flashinfer():
    """The ``flashinfer`` module, or ImportError naming the fix."""
    module, _, error = _import_result()
    if module is None:
        raise ImportError(
            f"proxyattn: the FlashInfer sparse path needs {FLASHINFER_REQUIREMENT} ({error}): "
            f"{INSTALL_HINT} next to your vLLM"
        )
    return module


def flashinfer_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether FlashInfer's prefill kernels take this KV dtype and head size."""
    return dtype in SUPPORTED_DTYPES and head_dim in SUPPORTED_HEAD_DIMS
