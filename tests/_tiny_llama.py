"""A tiny random Llama and a word-level tokenizer, written to a directory (no hub access).

Used by the vLLM tests: ``ModelConfig`` needs a real model directory, and the end-to-end test
serves it. head_dim is 32 because vLLM's CPU_ATTN backend (the dense reference on CPU) supports
head sizes 32, 64, 80, ... only.
"""
from __future__ import annotations

import json
from pathlib import Path

NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 32
HIDDEN = NUM_HEADS * HEAD_DIM
VOCAB_WORDS = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [f"w{i}" for i in range(970)]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def write_tiny_llama(path: str | Path, seed: int = 0) -> Path:
    """Write model weights (fp32 safetensors), config and tokenizer into ``path``; return it."""
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
        max_position_embeddings=512,
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
    """A deterministic prompt of ``count`` vocabulary words (one token each)."""
    return " ".join(VOCAB_WORDS[26 + (start + 7 * i) % 970] for i in range(count))


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
