"""Helpers for the demo (``proxyattn-demo``), the tests and the benchmarks: a tiny random Llama,
prompts for it, a ``VllmConfig`` for it, and what running several in-process vLLM engines one
after the other needs.

Nothing here is used on the serving path. The tiny model is written to a directory without any
hub access: random weights (fp32 safetensors), a Llama config and a word-level tokenizer whose
vocabulary is ``a``..``z`` and ``w0``..``w969`` (one token per word). It shows the mechanism of
the backend, never output quality. ``head_dim`` is 32 because vLLM's dense CPU backend
(CPU_ATTN, the dense reference on CPU) supports head sizes 32, 64, 80, ... only.

Imports vLLM, transformers and tokenizers lazily (inside the functions that need them).
"""
from __future__ import annotations

import gc
import json
from pathlib import Path

NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
HIDDEN = NUM_HEADS * HEAD_DIM
MAX_POSITION_EMBEDDINGS = 512
VOCAB_WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"w{i}" for i in range(970)]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def write_tiny_llama(path: str | Path, seed: int = 0,
                     max_position_embeddings: int = MAX_POSITION_EMBEDDINGS) -> Path:
    """Write model weights (fp32 safetensors), config and tokenizer into ``path``; return it.

    The weights are random (``torch.manual_seed(seed)``): the same seed gives the same model.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + VOCAB_WORDS)}
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(path, safe_serialization=True)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(path)
    # A word-level tokenizer must not prepend BOS twice or add spaces oddly; keep it plain.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return path


def prompt_words(start: int, count: int) -> str:
    """A deterministic prompt of ``count`` vocabulary words of the tiny model (one token each)."""
    return " ".join(VOCAB_WORDS[26 + (start + 7 * i) % 970] for i in range(count))


def make_vllm_config(model_dir: str | Path, proxyattn: dict | None = None, block_size: int = 16,
                     **kwargs):
    """A ``VllmConfig`` for the tiny model at ``model_dir`` with the proxyattn backend (what the
    engine builds), for building the backend's pieces without an engine. ``proxyattn`` is the
    backend's ``additional_config["proxyattn"]``; ``kwargs`` override the ``EngineArgs``."""
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


# ------------------------------------------------------------------------------------------
# Several in-process engines, one after the other


def tear_down_engine() -> None:
    """Free what an in-process engine leaves behind (its model-parallel groups and distributed
    environment), so that the next ``LLM`` of this process can start."""
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
    )

    gc.collect()
    destroy_model_parallel()
    destroy_distributed_environment()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover  (freeing cached memory is best effort)
        pass
