"""ProxyAttn kernels: torch references (``<op>/naive.py``) and Triton kernels (``<op>/triton.py``).

Installed under the import name ``proxyattn_kernels``. Never imports vLLM.
"""
from .params import ChunkGeometry, ProxyAttnParams
from .reference import Selection, proxyattn_prefill_reference

__all__ = ["ChunkGeometry", "ProxyAttnParams", "Selection", "proxyattn_prefill_reference"]
