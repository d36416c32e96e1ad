"""benchmarks/common/dummy_llama.py: the weightless model folder the TTFT benchmark serves."""
from __future__ import annotations

import pytest

from benchmarks.common.dummy_llama import write_dummy_llama

transformers = pytest.importorskip("transformers")


def test_dummy_llama_has_the_llama_31_8b_shape_and_a_working_tokenizer(tmp_path):
    write_dummy_llama(str(tmp_path), num_layers=4, max_len=262144)
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (4096, 32, 8)
    assert config.num_hidden_layers == 4 and config.max_position_embeddings == 262144
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Needle: 7261934 — naïve café"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8")), "one token per byte"
    assert max(ids) < config.vocab_size and tokenizer.decode(ids) == text
