"""The tiny random Llama of the tests (``proxyattn_vllm/testing.py``, shared with the demo) and a
``VllmConfig`` builder for it.

Used by the vLLM tests: ``ModelConfig`` needs a real model directory, and the end-to-end tests
serve it.
"""
from __future__ import annotations

from proxyattn_vllm.testing import (  # re-exported for the tests
    HEAD_DIM,
    HIDDEN,
    NUM_HEADS,
    NUM_KV_HEADS,
    NUM_LAYERS,
    SPECIALS,
    VOCAB_WORDS,
    prompt_words,
    write_tiny_llama,
)

__all__ = [
    "HEAD_DIM", "HIDDEN", "NUM_HEADS", "NUM_KV_HEADS", "NUM_LAYERS", "SPECIALS", "VOCAB_WORDS",
    "make_vllm_config", "prompt_words", "write_tiny_llama",
]


def make_vllm_config(model_dir: str, proxyattn: dict | None = None, block_size: int = 16, **kwargs):
    """A ``VllmConfig`` for the tiny model with the proxyattn backend (what the engine builds)."""
    from vllm.engine.arg_utils import EngineArgs

    args = dict(
        model=str(model_dir),
        dtype="float32",
        block_size=block_size,
        max_model_len=256,
        max_num_seqs=8,
        max_num_batched_tokens=256,
        enforce_eager=True,
        attention_backend="proxyattn",
        additional_config={"proxyattn": dict(proxyattn or {})},
    )
    args.update(kwargs)
    return EngineArgs(**args).create_engine_config()
