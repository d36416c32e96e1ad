"""benchmarks/quality/ruler.py in-process on CPU: a tiny random Llama, proxyattn and dense
(CPU_ATTN) engines in one process, one RULER task at a short length.

Scores are ~0 with random weights; this checks that both configurations ran the same prompts,
that every cell is there and that the proxyattn cells carry the density proxyattn_vllm.stats
measured. The CUSTOM-backend selection on CPU uses the TEST-ONLY patch of tests/_vllm_cpu.py.
"""
from __future__ import annotations

import json

from tests._ruler import needs_ruler, tokenizer_dir
from tests._vllm_cpu import honour_custom_backend_on_cpu, skip_unless_vllm_on_cpu

skip_unless_vllm_on_cpu()

from tests.test_vllm_e2e import restore_kv_cache_layout  # noqa: E402,F401  (fixture)

pytestmark = needs_ruler

LENGTH = 320  # prompt ~190 tokens + niah's 128-token answer budget


def test_in_process_proxyattn_and_dense_on_cpu(tmp_path_factory, tmp_path, monkeypatch, restore_kv_cache_layout):
    from benchmarks.quality import ruler

    honour_custom_backend_on_cpu(monkeypatch.setattr)
    model = tokenizer_dir(tmp_path_factory)
    out = tmp_path / "r.json"
    doc = ruler.main([
        "--model-path", model, "--lengths", str(LENGTH), "--tasks", "niah_single_1", "--samples", "2",
        "--configs", "dense,proxyattn:gamma=0.5,block_size=32,stride=4,min_budget_tokens=0,min_sparse_len=48,dense_layers=[1]",
        "--dtype", "float32", "--kv-block-size", "32", "--max-num-batched-tokens", "128",
        "--kv-cache-memory-bytes", str(64 << 20), "--cache-dir", str(tmp_path / "cache"),
        "--max-tokens", "4", "--out", str(out), "--no-progress",
    ])
    assert json.loads(out.read_text()) == doc and not doc["errors"]
    assert doc["config"]["mode"] == "in-process" and doc["config"]["max_tokens_cap"] == 4
    backends = {b["label"]: b for b in doc["config"]["backends"]}
    label = "proxyattn:gamma=0.5,block_size=32,stride=4,min_budget_tokens=0,min_sparse_len=48,dense_layers=[1]"
    assert backends[label]["proxyattn"]["min_sparse_len"] == 48  # the effective configuration
    cells = {c["label"]: c for c in doc["cells"]}
    assert set(cells) == {"dense", label}
    assert cells["dense"]["backend"] == "CPU_ATTN" and cells["dense"]["density"] is None
    assert cells[label]["backend"] == "proxyattn" and 0.0 < cells[label]["density"] <= 1.0
    assert cells["dense"]["prompt_tokens"] == cells[label]["prompt_tokens"] <= LENGTH - 128 + 2
    for cell in cells.values():
        assert cell["n"] == 2 and 0.0 <= cell["score"] <= 100.0
