"""benchmarks/e2e/profile_prefill.py on CPU: the trace summary (categories, busy and idle GPU time) on
synthetic traces, and every Triton kernel of the package named into its own category."""
from __future__ import annotations

import gzip
import json
import os

import pytest

from benchmarks.e2e import profile_prefill


def kernel(name, ts, dur, stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_summary_sums_categories_and_measures_idle_time_across_streams():
    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # not a kernel
        kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 100, 50),
        kernel("_proxy_lse_kernel", 150, 20),  # back to back with the GEMM
        kernel("_block_mass_from_lse_kernel", 200, 10),  # 30 us idle before
        kernel("void flash::prepare_varlen_num_blocks_kernel<1, 1>(int, int)", 205, 10, stream=9),  # overlaps
        kernel("cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<...>>>", 300, 100),
        kernel("triton_poi_fused_mul_silu_0", 400, 5),
    ]
    summary = profile_prefill.summarize_trace(events)
    assert summary["kernels"] == 6
    assert summary["span_ms"] == pytest.approx(0.305)
    assert summary["gpu_busy_ms"] == pytest.approx((50 + 20 + 15 + 100 + 5) / 1e3)
    assert summary["gpu_idle_ms"] == pytest.approx((30 + 85) / 1e3)
    assert summary["by_category_ms"] == pytest.approx({"flash_attention": 0.11, "gemm": 0.05, "proxy_scores": 0.02,
                                                       "budget": 0.01, "other": 0.005})
    assert list(summary["by_category_ms"])[0] == "flash_attention"  # largest first
    assert summary["top_kernels"][0]["count"] == 1 and summary["top_kernels"][0]["ms"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no GPU kernels"):
        profile_prefill.summarize_trace([{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0, "dur": 1}])


def test_every_package_kernel_has_its_own_category():
    """A renamed Triton kernel would silently land in "other" (or in FlashAttention's category)."""
    import proxyattn_kernels.block_sparse_attn.head_lists as head_lists
    import proxyattn_kernels.block_sparse_attn.triton as attn
    import proxyattn_kernels.block_sparse_attn.union_pages as union
    import proxyattn_kernels.budget.gamma as gamma
    import proxyattn_kernels.budget.triton as budget
    import proxyattn_kernels.proxy_scores.triton as proxy
    import proxyattn_kernels.select.triton as select

    expected = {proxy: "proxy_scores", budget: "budget", gamma: "budget", select: "select", union: "union_plan",
                attn: "triton_sparse_attention", head_lists: "triton_sparse_attention"}
    names = 0
    for module, category in expected.items():
        for name, fn in vars(module).items():
            if name.endswith("_kernel") and callable(getattr(fn, "fn", None)):  # a @triton.jit (or interpreted) kernel
                names += 1
                assert profile_prefill.categorize(name) == category, name
    assert names >= 10


def test_vllm_kernels_are_categorized_by_what_they_do():
    """Names seen in an H200 profile (results/profile_prefill_h200.json); the KV-cache write has
    "flash" in its name and was once counted as FlashAttention there (26 ms of 882)."""
    cases = {
        "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16, (vllm::Fp8KVCacheDataType)0>(": "kv_cache_write",
        "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<": "flash_attention",
        "void cutlass::device_kernel<flash::FlashAttnFwdCombine<cute::tuple<": "flash_attention",
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "gemm",
        "triton_poi_fused_mul_silu_slice_1": "other",
    }
    for name, category in cases.items():
        assert profile_prefill.categorize(name) == category, name


def test_the_newest_trace_is_read(tmp_path):
    old = tmp_path / "worker.1.pt.trace.json.gz"
    new = tmp_path / "worker.2.pt.trace.json"
    with gzip.open(old, "wt") as f:
        json.dump({"traceEvents": [kernel("old", 0, 1)]}, f)
    new.write_text(json.dumps({"traceEvents": [kernel("new", 0, 1)]}))
    os.utime(old, (1, 1))
    assert profile_prefill.load_trace_events(str(tmp_path))[0]["name"] == "new"
    with pytest.raises(FileNotFoundError, match="no \\*.pt.trace.json"):
        profile_prefill.load_trace_events(str(tmp_path / "empty"))


def test_main_profiles_one_prompt_and_appends(monkeypatch, tmp_path):
    """The run's flow with a stand-in engine: the profiler config vLLM takes, a warm-up and an
    unprofiled request before the profiled one, the summary and the backend's settings in the
    JSON, ``--append`` adding a second backend."""
    pytest.importorskip("vllm")
    import types

    import vllm

    engines, calls = [], []

    class FakeLLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)
            self.trace_dir = kwargs["profiler_config"]["torch_profiler_dir"]

        def get_tokenizer(self):
            return types.SimpleNamespace(vocab_size=1000)

        def generate(self, prompts, params, use_tqdm=True):
            calls.append(len(prompts[0]["prompt_token_ids"]))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[1])])]

        def start_profile(self):
            calls.append("start")

        def stop_profile(self):
            calls.append("stop")
            with gzip.open(f"{self.trace_dir}/w.pt.trace.json.gz", "wt") as f:
                json.dump({"traceEvents": [kernel("_select_kernel", 0, 10), kernel("flash_fwd", 20, 30)]}, f)

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    out = tmp_path / "profile.json"
    base = ["--model", "/m", "--dummy", "--prompt-len", "1000", "--out", str(out)]
    assert profile_prefill.main(base + ["--proxyattn-overrides", '{"max_density": 0.1}',
                                        "--trace-dir", str(tmp_path / "a")]) == 0
    assert calls == [1000, 1000, "start", 1000, "stop"]
    kwargs = engines[0]
    assert kwargs["profiler_config"]["profiler"] == "torch" and kwargs["attention_backend"] == "proxyattn"
    from vllm.config.profiler import ProfilerConfig

    ProfilerConfig(**kwargs["profiler_config"])  # what LLM() builds from the dict: every key accepted
    assert kwargs["additional_config"] == {"proxyattn": {"max_density": 0.1}} and kwargs["max_model_len"] == 1064
    assert kwargs["block_size"] == 128 and kwargs["max_num_batched_tokens"] == 8192
    assert profile_prefill.main(base + ["--backend", "FLASH_ATTN", "--append", "--trace-dir", str(tmp_path / "b")]) == 0
    assert "additional_config" not in engines[1]
    report = json.loads(out.read_text())
    assert [run["backend"] for run in report["runs"]] == ["proxyattn", "FLASH_ATTN"]
    assert report["runs"][0]["profile"]["by_category_ms"] == pytest.approx({"flash_attention": 0.03, "select": 0.01})
    assert report["runs"][0]["profile"]["gpu_idle_ms"] == pytest.approx(0.01)
    assert len(report["commands"]) == 2 and "versions" in report
    with pytest.raises(SystemExit):
        profile_prefill.main(base + ["--proxyattn-overrides", "[1]"])
