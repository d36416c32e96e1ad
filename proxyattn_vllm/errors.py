"""The error a deployment gets at startup for an attention feature ProxyAttn cannot run."""
from __future__ import annotations


class ProxyAttnUnsupportedError(ValueError):
    """The model or deployment uses an attention feature ProxyAttn does not support."""
