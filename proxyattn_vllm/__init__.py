"""proxyattn-vllm: ProxyAttn block-sparse prefill as a vLLM attention backend.

This is the only package that imports vLLM, and it does so lazily: importing it is cheap.
"""
from .config import ProxyAttnConfig, ProxyAttnConfigError

__all__ = ["ProxyAttnConfig", "ProxyAttnConfigError"]
__version__ = "0.1.0"
