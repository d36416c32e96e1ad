"""benchmarks/quality/run_eval.py end to end on CPU: a tiny random Llama, dense CPU_ATTN and
proxyattn engines in one process, 2 tasks x 1 length x 2 samples, fidelity and stats.

Accuracy is ~0 with random weights; this checks the structure of the results, that both
backends ran on identical prompts, and that the sparse path recorded densities and kept mass.
The CUSTOM-backend selection on CPU uses the TEST-ONLY patch of tests/test_vllm_e2e.py.
"""
from __future__ import annotations

import json

import pytest

from tests._vllm_cpu import honour_custom_backend_on_cpu, skip_unless_vllm_on_cpu
from tests._essays import needs_essays

skip_unless_vllm_on_cpu()

from tests.test_vllm_e2e import restore_kv_cache_layout  # noqa: E402,F401  (fixture)

pytestmark = needs_essays

LENGTH = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from proxyattn_vllm.testing import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def test_runner_end_to_end_on_cpu(model_dir, tmp_path, monkeypatch, restore_kv_cache_layout):
    from benchmarks.quality import run_eval

    from benchmarks.common import vllm_engine

    honour_custom_backend_on_cpu(monkeypatch.setattr)
    shut_down = []  # every engine is shut down, not just deleted (it would keep its GPU memory)
    real_shut_down = vllm_engine.shut_down
    monkeypatch.setattr(vllm_engine, "shut_down", lambda llm: (shut_down.append(llm), real_shut_down(llm)))
    out = tmp_path / "quality.json"
    doc = run_eval.main([
        "--models", f"tiny={model_dir}", "--lengths", str(LENGTH),
        "--tasks", "niah_single,niah_multikey", "--samples", "2", "--gammas", "0.5",
        "--haystack", "noise", "--max-tokens", "2", "--dtype", "float32",
        "--kv-block-size", "32", "--max-num-batched-tokens", "256", "--min-sparse-len", "48",
        "--kv-cache-memory-bytes", str(64 << 20),
        "--proxyattn-config", json.dumps({"block_size": 32, "stride": 4, "min_budget_tokens": 0, "dense_layers": [1]}),
        "--fidelity-prompts", "1", "--fidelity-logprobs", "5", "--stats-mass-heads", "2",
        "--stats-dir", str(tmp_path / "stats"), "--out", str(out), "--no-plot",
    ])

    saved = json.loads(out.read_text())
    assert saved["cells"] == doc["cells"] and not saved.get("errors")
    assert len(shut_down) == 2 and all(llm is not None for llm in shut_down)  # dense, proxyattn
    assert {"gpu", "date", "command", "models", "cells", "fidelity", "layer_stats"} <= saved.keys()
    assert saved["models"]["tiny"]["lengths"] == [LENGTH]
    backends = {c["proxyattn"]["gamma"] if c["proxyattn"] else None: c for c in saved["config"]["backends"]}
    assert backends[0.5]["proxyattn"]["min_sparse_len"] == 48  # the effective config is recorded

    cells = {(c["task"], c["label"]): c for c in saved["cells"]}
    assert set(cells) == {(t, b) for t in ("niah_single", "niah_multikey") for b in ("dense", "proxyattn-0.5")}
    for (task, label), cell in cells.items():
        assert cell["model"] == "tiny" and cell["length"] == LENGTH and cell["n"] == 2
        assert 0.0 <= cell["accuracy"] <= 1.0
        if label == "dense":
            assert cell["backend"] == "CPU_ATTN" and cell["gamma"] is None and cell["density"] is None
        else:
            assert cell["backend"] == "proxyattn" and cell["gamma"] == 0.5
            assert 0.0 < cell["density"] <= 1.0

    (fid,) = saved["fidelity"]
    assert fid["label"] == "proxyattn-0.5" and fid["length"] == LENGTH and fid["positions"] == LENGTH - 1
    assert 0.0 <= fid["top1_agreement"] <= 1.0 and fid["mean_kl"] >= 0.0
    assert 0.0 < fid["density"] <= 1.0 and 0.0 <= fid["kept_mass"] <= 1.0
    # Layer 1 is in dense_layers (it keeps the Triton interpreter's work small): no stats there.
    assert {row["layer"] for row in saved["layer_stats"]} == {0}
    # Stats lines were written for the task prompts (density only) and the fidelity prompts.
    lines = [json.loads(line) for line in (tmp_path / "stats" / f"tiny_proxyattn-0.5_{LENGTH}_tasks.jsonl").read_text().splitlines()]
    assert lines and all(line["kept_mass"] is None and line["ctx"] + line["q_len"] <= LENGTH for line in lines)


def test_plot_only_needs_matplotlib_or_draws(tmp_path):
    from benchmarks.quality import run_eval

    doc = {"gpu": "cpu", "date": "2026-01-01", "cells": [
        {"model": "m", "task": t, "length": n, "label": b, "backend": b, "gamma": None,
         "accuracy": 0.5, "n": 2, "density": None}
        for t in ("a", "b") for n in (1024, 2048) for b in ("dense", "proxyattn-0.9")
    ], "fidelity": [], "layer_stats": []}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="matplotlib"):
            run_eval.main(["--plot-only", str(path)])
    else:
        run_eval.main(["--plot-only", str(path)])
        assert path.with_suffix(".png").stat().st_size > 0
