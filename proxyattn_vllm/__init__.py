"""proxyattn-vllm: ProxyAttn block-sparse prefill as a vLLM attention backend.

This is the only package that imports vLLM, and it does so lazily: importing it is cheap.
:func:`register` is the ``vllm.general_plugins`` entry point (see ``setup.py``).
"""
from .config import ProxyAttnConfig, ProxyAttnConfigError

__all__ = ["ProxyAttnConfig", "ProxyAttnConfigError", "register", "BACKEND_CLASS_PATH", "BACKEND_ALIAS"]
__version__ = "0.1.0"

#: Where vLLM finds the backend class; given as a string so nothing is imported at registration.
BACKEND_CLASS_PATH = "proxyattn_vllm.backend.ProxyAttnBackend"
#: The extra enum name that ``--attention-backend proxyattn`` resolves to (case-insensitive).
BACKEND_ALIAS = "PROXYATTN"


def register() -> None:
    """vLLM plugin entry point: make ``--attention-backend proxyattn`` select ProxyAttn.

    vLLM runs this in every process (API server while it builds the CLI parser, engine core,
    workers), so it must stay cheap and idempotent: it imports only vLLM's backend registry (no
    torch.cuda, no kernels, not our backend module) and registers the class by string path.

    * ``register_backend(CUSTOM, "proxyattn_vllm.backend.ProxyAttnBackend")`` fills vLLM's one
      slot for out-of-tree backends, so ``--attention-backend CUSTOM`` works.
    * ``PROXYATTN`` is added as an *alias* of the ``CUSTOM`` member (standard ``Enum`` alias
      semantics: an extra name in ``_member_map_``). vLLM upper-cases the user's string and looks
      it up by name, so ``proxyattn``/``PROXYATTN``/``-ac.backend=proxyattn`` all resolve to
      ``CUSTOM``. The resolved member pickles as ``CUSTOM`` (by value), so a ``spawn``-ed engine
      process can unpickle the config before it has loaded any plugin.
    """
    import logging

    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from .vllm_version import installed_vllm_version, unsupported_message

    logger = logging.getLogger("vllm.proxyattn")
    # Said here, in the API server, before any engine starts. The backend module itself refuses
    # to load on such a release (``backend.py``), so only engines that select proxyattn stop.
    message = unsupported_message(installed_vllm_version())
    if message:
        logger.warning("%s", message)
    custom = AttentionBackendEnum.CUSTOM
    if custom.is_overridden() and custom.get_path() != BACKEND_CLASS_PATH:
        logger.warning(
            "proxyattn: replacing the CUSTOM attention backend %s registered by another plugin",
            custom.get_path(),
        )
    register_backend(custom, BACKEND_CLASS_PATH)
    AttentionBackendEnum._member_map_[BACKEND_ALIAS] = custom
