"""The vLLM releases this plugin supports, checked when vLLM loads it and when it builds the
backend.

The attention-backend API changes between vLLM minor releases (metadata fields, capability
flags, builder signatures), so an untested release may fail deep inside the engine or, worse,
run with a wrong assumption. The check turns that into one line at startup that names the
installed version, the supported ones and what to do.
"""
from __future__ import annotations

import os

#: vLLM minor series the backend is tested on (CPU CI, the API check of tests/test_vllm_api.py and
#: the GPU suite).
SUPPORTED_VLLM_SERIES = ("0.26", "0.32", "0.33", "0.34")
#: Set to 1 to run on an unsupported vLLM anyway (for porting work; expect failures).
ALLOW_UNSUPPORTED_ENV = "PROXYATTN_ALLOW_UNSUPPORTED_VLLM"


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM is not a release this plugin supports."""


def is_supported(version: str) -> bool:
    """True when ``version`` (e.g. "0.26.0", "0.26.1+cpu") is in a supported minor series."""
    release = version.split("+", 1)[0]
    return any(release == series or release.startswith(series + ".") for series in SUPPORTED_VLLM_SERIES)


def unsupported_message(version: str) -> str | None:
    """The one-line explanation for an unsupported ``version``; None when it is supported."""
    if is_supported(version):
        return None
    supported = ", ".join(f"{s}.x" for s in SUPPORTED_VLLM_SERIES)
    return (
        f"proxyattn: vLLM {version} is not supported (supported: {supported}). Install a supported "
        f"release (pip install 'proxyattn-vllm[vllm]' installs one), or serve with "
        f"--attention-backend FLASH_ATTN; set {ALLOW_UNSUPPORTED_ENV}=1 to try this one anyway."
    )


def installed_vllm_version() -> str:
    """The version of the vLLM that is imported (the CUDA wheel or the CPU build alike)."""
    import vllm

    return str(vllm.__version__)


def check_vllm_version(version: str | None = None) -> None:
    """Raise :class:`UnsupportedVLLMError` unless the installed (or given) vLLM is supported or
    the override is set."""
    message = unsupported_message(version or installed_vllm_version())
    if message and os.environ.get(ALLOW_UNSUPPORTED_ENV) != "1":
        raise UnsupportedVLLMError(message)
