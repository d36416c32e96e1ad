"""Write a weightless Llama-3.1-8B-shaped model folder for vLLM's ``load_format="dummy"``.

    python benchmarks/common/dummy_llama.py /tmp/dummy8b [--layers 32] [--max-len 262144]

vLLM fills the weights with random values, so prefill timings have the real model's shapes
without downloading 16 GB. The folder holds ``config.json`` and a byte-level tokenizer whose
vocabulary is the 256 byte symbols (the TTFT sweep sends token ids, never text, to such a model).
"""
from __future__ import annotations

import argparse
import json
import os

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "rope_theta": 500000.0,
    # Llama 3.1's long-context RoPE scaling, as in the released checkpoint.
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}


def write_dummy_llama(out_dir: str, num_layers: int = 32, max_len: int = 262144) -> None:
    """Write ``config.json``, ``tokenizer.json`` and ``tokenizer_config.json`` into ``out_dir``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    os.makedirs(out_dir, exist_ok=True)
    config = {**LLAMA_31_8B, "num_hidden_layers": num_layers, "max_position_embeddings": max_len}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=1)

    specials = ["<unk>", "<s>", "</s>"]
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(specials + byte_symbols)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
                   "bos_token": "<s>", "eos_token": "</s>", "model_max_length": max_len,
                   "chat_template": "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"}, f)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (``argv``: the arguments, default ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", help="folder to write (created if absent)")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (default: %(default)s, as Llama-3.1-8B)")
    ap.add_argument("--max-len", type=int, default=262144,
                    help="max_position_embeddings and the tokenizer's model_max_length (default: %(default)s)")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    write_dummy_llama(args.out_dir, args.layers, args.max_len)
    print(f"wrote {args.out_dir}: Llama-3.1-8B shape, {args.layers} layers, no weights "
          f"(serve with --load-format dummy)")


if __name__ == "__main__":
    main()
