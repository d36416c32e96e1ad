"""benchmarks/robustness/gpu_robustness.py without a GPU: arguments, prompt layout (the cached part ends
inside the prefix), output comparison, the summary and the JSON report, the time guard; the
soak loop against tests/_fake_openai_server.py; the greedy-token verdict (near-ties vs clear
margins, the dense control); and the prefix and preemption parts themselves on the tiny CPU
model (full density and the dense control, CPU_ATTN: fp32 outputs equal the reference's)."""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time
from types import SimpleNamespace

import pytest

from benchmarks.robustness import cache_parts, gpu_robustness as gr

FAKE_SERVER = os.path.join(os.path.dirname(__file__), "_fake_openai_server.py")
BASE = ["--model", "m", "--essays", "e"]


class WordTokenizer:
    """One token per whitespace-separated word (ids from a growing vocabulary); BOS = 1."""

    def __init__(self, bos: bool = True):
        self.bos = bos
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.vocab.setdefault(w, 10 + len(self.vocab)) for w in text.split()]
        return ([1] if self.bos and add_special_tokens else []) + ids


@pytest.fixture(autouse=True)
def _restore_multiprocessing_env(monkeypatch):
    """main() sets VLLM_ENABLE_V1_MULTIPROCESSING=0; undo it after each test."""
    value = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", value)


def essay_ids(n: int = 5000) -> list[int]:
    return [100 + (i * 7) % 3001 for i in range(n)]  # no short repeats


# ---------------------------------------------------------------------------------------------
# Arguments


def test_importing_the_module_leaves_the_environment_alone():
    import subprocess

    code = ("import os; import benchmarks.robustness.gpu_robustness; "
            "print(os.environ.get('VLLM_ENABLE_V1_MULTIPROCESSING'))")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"


def test_defaults_run_prefix_and_preemption_with_a_low_memory_share(tmp_path):
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json")])
    assert args.parts == ["prefix", "preemption"]
    assert args.prefix_configs == ["dense_fa", "full", "full_block256", "sparse"]
    assert args.preempt_configs == ["dense_fa", "full", "sparse"]
    assert args.dense_backend == "FLASH_ATTN" and args.near_tie_margin == gr.NEAR_TIE_MARGIN == 0.25
    assert args.gpu_memory_utilization <= 0.2
    assert args.logdir == str(tmp_path)
    # The default prefix is not page aligned, and its whole pages end mid 256-token block.
    assert args.prefix_tokens % args.page_size != 0
    cached = args.prefix_tokens // args.page_size * args.page_size
    assert cached % 256 != 0 and cached % 128 == 0
    assert 8192 < args.prefix_tokens < args.max_model_len


def test_parts_configs_and_json_options_are_validated(tmp_path):
    out = ["--out", str(tmp_path / "r.json")]
    args = gr.parse_args(BASE + out + ["--parts", "soak,prefix", "--prefix-configs", "sparse",
                                       "--engine-args", '{"max_num_seqs": 4}',
                                       "--proxyattn-overrides", '{"sparse_kernel": "fa3"}'])
    assert args.parts == ["prefix", "soak"]  # fixed order
    assert args.engine_args == {"max_num_seqs": 4}
    assert gr.proxyattn_config(args, "sparse") == {"sparse_kernel": "fa3"}
    assert gr.proxyattn_config(args, "full")["gamma"] == 1.0
    for bad in (["--parts", "prefix,tp"], ["--parts", ""], ["--prefix-configs", "dense"],
                ["--engine-args", "[1]"], ["--engine-args", "{x"], ["--prefix-tokens", "100"],
                ["--prefix-prompts", "0"], ["--soak-long-range", "9K:8K"]):
        with pytest.raises(SystemExit):
            gr.parse_args(BASE + out + bad)
    # The dense control runs first whatever the order given (the others are compared with it).
    args = gr.parse_args(BASE + out + ["--prefix-configs", "full,dense_fa,full",
                                       "--preempt-configs", "sparse,dense_fa"])
    assert args.prefix_configs == ["dense_fa", "full"] and args.preempt_configs == ["dense_fa", "sparse"]
    with pytest.raises(SystemExit):
        gr.parse_args(BASE + out + ["--near-tie-margin", "-0.1"])
    # A soak-only run does not check the prefix settings.
    assert gr.parse_args(BASE + out + ["--parts", "soak", "--max-model-len", "64"]).parts == ["soak"]


def test_identity_is_expected_only_at_full_density():
    assert gr.identity_expected(gr.CONFIGS["dense_fa"])  # None: the dense control
    assert gr.identity_expected(gr.CONFIGS["full"])
    assert gr.identity_expected(gr.CONFIGS["full_block256"])
    assert not gr.identity_expected(gr.CONFIGS["sparse"])
    assert not gr.identity_expected({**gr.CONFIGS["full"], "max_density": 0.1})


def test_dense_control_builds_engine_kwargs_without_proxyattn_config(tmp_path):
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json"), "--engine-args", '{"max_num_seqs": 4}',
                                 "--proxyattn-overrides", '{"sparse_kernel": "fa3"}'])
    assert gr.proxyattn_config(args, "dense_fa") is None  # the overrides are proxyattn's only
    assert gr.config_backend(args, "dense_fa") == "FLASH_ATTN"
    res = gr.new_config_result(args, "dense_fa")
    assert res == {"backend": "FLASH_ATTN", "proxyattn": None, "identity_expected": True}
    dense = gr.engine_kwargs(args, proxyattn=res["proxyattn"], backend=res["backend"], prefix_caching=True,
                             max_model_len=4096, num_gpu_blocks_override=7)
    assert dense["attention_backend"] == "FLASH_ATTN" and "additional_config" not in dense
    assert dense["enable_prefix_caching"] and dense["num_gpu_blocks_override"] == 7
    assert dense["max_num_seqs"] == 4 and dense["block_size"] == args.page_size
    full = gr.new_config_result(args, "full")
    assert full["backend"] == "proxyattn" and full["identity_expected"]
    kw = gr.engine_kwargs(args, proxyattn=full["proxyattn"], backend=full["backend"], prefix_caching=False,
                          max_model_len=4096)
    assert kw["attention_backend"] == "proxyattn"
    assert kw["additional_config"] == {"proxyattn": {**gr.FULL, "sparse_kernel": "fa3"}}
    # Everything but the backend and its config is the same for both.
    strip = lambda k: {x: v for x, v in k.items() if x not in ("attention_backend", "additional_config")}  # noqa: E731
    same = {x: v for x, v in strip(dense).items() if x != "num_gpu_blocks_override"}
    assert strip(kw) == {**same, "enable_prefix_caching": False}
    other = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json"), "--dense-backend", "CPU_ATTN"])
    assert gr.config_backend(other, "dense_fa") == "CPU_ATTN" and gr.config_backend(other, "sparse") == "proxyattn"


# ---------------------------------------------------------------------------------------------
# Prompts


def test_prefix_prompts_share_exactly_the_prefix_and_cache_its_whole_pages():
    tok = WordTokenizer()
    ids = essay_ids()
    p = gr.build_prefix_prompts(tok, ids, 16 * 5 + 8, gr.QUESTIONS[:4], timing_count=3, page=16)
    prefix = p["warm"]
    assert len(prefix) == 88 and prefix[0] == 1  # BOS counted in the prefix length
    assert p["prefix_tokens"] == 88 and p["expected_cached_tokens"] == 80
    assert p["prefix_ends_mid_page"]
    prompts = p["compare"] + p["timing"]
    assert len(p["compare"]) == 4 and len(p["timing"]) == 3
    assert all(q[:88] == prefix and len(q) > 88 for q in prompts)
    assert len({tuple(q) for q in prompts}) == len(prompts)  # the suffixes differ
    # Nothing beyond the prefix's partial last page is shared, so every hit is 80 tokens.
    assert 88 <= p["longest_shared_run"] < 96
    assert p["prompt_tokens"] == [len(q) for q in prompts]


def test_prefix_layout_refuses_prompts_sharing_more_than_the_prefix():
    prefix = list(range(100, 188))
    ok = gr.prefix_layout(prefix, [prefix + [1, 2], prefix + [1, 3]], page=16)
    assert ok["expected_cached_tokens"] == 80 and ok["longest_shared_run"] == 89
    with pytest.raises(ValueError, match="past the prefix's last partial page"):
        gr.prefix_layout(prefix, [prefix + [7] * 10, prefix + [7] * 9 + [8]], page=16)
    with pytest.raises(ValueError, match="identical"):
        gr.prefix_layout(prefix, [prefix + [1], prefix + [1]], page=16)
    with pytest.raises(ValueError, match="does not extend"):
        gr.prefix_layout(prefix, [prefix[:-1] + [5, 6]], page=16)


def test_long_prompts_have_the_exact_length_and_differ():
    tok = WordTokenizer(bos=False)
    prompts = gr.build_long_prompts(tok, essay_ids(3000), count=8, tokens=1200)
    assert [len(p) for p in prompts] == [1200] * 8
    assert len({tuple(p[:50]) for p in prompts}) == 8
    with pytest.raises(ValueError):
        gr.build_long_prompts(tok, essay_ids(), count=1, tokens=5)


def test_take_tokens_wraps_around_short_essays():
    assert gr.take_tokens([1, 2, 3], 2, 5) == [3, 1, 2, 3, 1]


# ---------------------------------------------------------------------------------------------
# Comparing outputs


def test_compare_tokens_reports_the_first_difference_and_the_margin_there():
    same = gr.compare_tokens([1, 2, 3], [1, 2, 3], [0.5, 0.1, 2.0])
    assert same == {"identical": True, "first_difference": None,
                    "reference_margin_at_difference": None, "matching_prefix": 3}
    diff = gr.compare_tokens([1, 2, 3, 4], [1, 2, 9, 9], [0.5, 0.1, 0.004, 1.0])
    assert diff["identical"] is False and diff["first_difference"] == 2
    assert diff["reference_margin_at_difference"] == 0.004 and diff["matching_prefix"] == 2
    short = gr.compare_tokens([1, 2, 3], [1, 2])  # a request that stopped early differs too
    assert short["first_difference"] == 2 and short["reference_margin_at_difference"] is None
    agree = gr.agreement([same, gr.compare_tokens([1, 2, 3], [1, 5, 3])], 3)
    assert agree == {"identical": 1, "n": 2, "mean_matching_prefix_fraction": 4 / 6}


def test_compare_rows_adds_the_logprob_gap_before_the_first_difference():
    ref = {"tokens": [1, 2, 3], "margins": [1.0, 0.01, 1.0], "token_logprobs": [-0.1, -0.5, -0.2]}
    same = {"tokens": [1, 2, 3], "token_logprobs": [-0.1, -0.52, -0.25]}
    flipped = {"tokens": [1, 9, 3], "token_logprobs": [-0.13, -0.6, -3.0]}
    rows = gr.compare_rows([ref, ref], [same, flipped])
    assert rows[0]["identical"] and rows[0]["max_abs_logprob_diff"] == pytest.approx(0.05)
    assert rows[1]["first_difference"] == 1 and rows[1]["reference_margin_at_difference"] == 0.01
    assert rows[1]["max_abs_logprob_diff"] == pytest.approx(0.03)  # position 0 only
    assert gr.max_gap(rows) == pytest.approx(0.05)
    assert gr.logprob_gap([], [], None) is None


def test_margins_are_top1_minus_top2():
    lp = lambda v: SimpleNamespace(logprob=v)  # noqa: E731
    steps = [{5: lp(-0.1), 6: lp(-2.1)}, {7: lp(-0.3)}, {1: lp(-1.0), 2: lp(-0.5), 3: lp(-3.0)}]
    assert gr.margins_of(steps) == [pytest.approx(2.0), None, pytest.approx(0.5)]
    assert gr.margins_of(None) == []
    assert gr.runner_ups_of(steps) == [6, None, 1]
    assert gr.runner_ups_of(None) == []


def test_compare_rows_records_the_other_runs_margin_and_token_at_the_difference():
    ref = {"tokens": [1, 2, 3], "margins": [1.0, 0.0625, 1.0], "runner_ups": [7, 9, 8]}
    swapped = {"tokens": [1, 9, 3], "margins": [1.0, 0.125, 1.0]}  # took the runner-up
    elsewhere = {"tokens": [1, 5, 3], "margins": [1.0, 0.0, 1.0]}  # took a third token
    old = {"tokens": [1, 9, 3]}  # rows from before margins/runner-ups were kept for both
    rows = gr.compare_rows([ref, ref, ref, {"tokens": [1, 2, 3], "margins": [1.0] * 3}],
                           [swapped, elsewhere, ref, old])
    assert rows[0]["other_margin_at_difference"] == 0.125 and rows[0]["other_took_reference_runner_up"]
    assert rows[1]["other_took_reference_runner_up"] is False
    assert rows[2]["identical"] and rows[2]["other_margin_at_difference"] is None
    assert rows[3]["other_margin_at_difference"] is None and rows[3]["other_took_reference_runner_up"] is None


# ---------------------------------------------------------------------------------------------
# The greedy-token verdict


def diverged(position: int | None, ref_margin=None, other_margin=None, took=True) -> dict:
    """A compare_rows row: identical (position None) or diverging at ``position``."""
    if position is None:
        return {"identical": True, "first_difference": None, "reference_margin_at_difference": None,
                "other_margin_at_difference": None, "other_took_reference_runner_up": None}
    return {"identical": False, "first_difference": position, "reference_margin_at_difference": ref_margin,
            "other_margin_at_difference": other_margin, "other_took_reference_runner_up": took}


def control(diverging: int, n: int) -> dict:
    return {"config": "dense_fa", "backend": "FLASH_ATTN", "identical": n - diverging, "n": n,
            "diverging": diverging, "max_abs_logprob_diff": 0.07, "verdict": "PASS"}


def test_a_divergence_at_a_bf16_tie_passes():
    rows = [diverged(None), diverged(25, 0.0, 0.0), diverged(None), diverged(None)]  # today's prefix full
    v = gr.greedy_verdict(rows, identity_expected=True, control=control(0, 4))
    assert v["verdict"] == "PASS", v["reason"]
    assert v["identical"] == 3 and v["diverging"] == 1 and v["near_tie_divergences"] == 1
    assert v["first_differences"] == [{"prompt": 1, "position": 25, "reference_margin": 0.0, "other_margin": 0.0,
                                       "other_took_reference_runner_up": True, "near_tie": True,
                                       "why_not_near_tie": None}]
    assert v["near_tie_margin"] == 0.25 and v["control"]["diverging"] == 0 and v["allowed_extra_diverging"] == 1
    assert "all near-ties" in v["reason"] and "vs 0 for dense_fa" in v["reason"]
    # The tolerance is inclusive; old rows without the other run's margin use the reference's.
    edge = [diverged(3, 0.25, None, None)]
    assert gr.greedy_verdict(edge, identity_expected=True)["verdict"] == "PASS"
    identical = gr.greedy_verdict([diverged(None)] * 4, identity_expected=True, control=control(2, 4))
    assert identical["verdict"] == "PASS" and identical["reason"].startswith("identical")


@pytest.mark.parametrize("row, why", [
    (diverged(9, 0.5, 0.5), "reference margin 0.5 > 0.25"),
    (diverged(9, 0.0625, 1.5), "other run's margin 1.5 > 0.25"),  # a tie, flipped to a confident token
    (diverged(9, 0.0, 0.0, took=False), "outside the reference's top 2"),
    (diverged(9, None, None, None), "no reference margin"),  # a length difference
])
def test_a_divergence_at_a_clear_margin_fails(row, why):
    rows = [diverged(None), diverged(4, 0.0, 0.0), row, diverged(None)]
    v = gr.greedy_verdict(rows, identity_expected=True, control=control(3, 4))  # the control can't excuse it
    assert v["verdict"] == "FAIL" and why in v["reason"] and "prompt 2 at 9" in v["reason"]
    assert v["clear_divergences"] == 1 and v["near_tie_divergences"] == 1
    assert [d["near_tie"] for d in v["first_differences"]] == [True, False]
    # A larger tolerance explains it (where there is a margin to compare).
    if row["reference_margin_at_difference"] is not None and row["other_took_reference_runner_up"]:
        assert gr.greedy_verdict(rows, identity_expected=True, tol=2.0)["verdict"] == "PASS"


def test_more_tie_flips_than_the_dense_control_fail_beyond_the_allowance():
    assert [gr.allowed_extra(n) for n in (1, 4, 5, 8, 16)] == [1, 1, 2, 2, 4]
    ties = lambda k, n: [diverged(5, 0.0, 0.0)] * k + [diverged(None)] * (n - k)  # noqa: E731
    # Today's preemption full: 4 of 8 tie flips.
    assert gr.greedy_verdict(ties(4, 8), identity_expected=True, control=control(2, 8))["verdict"] == "PASS"
    v = gr.greedy_verdict(ties(4, 8), identity_expected=True, control=control(1, 8))
    assert v["verdict"] == "FAIL" and "near-ties only, but 4 diverging vs 1 for dense_fa (+2 allowed)" in v["reason"]
    assert gr.greedy_verdict(ties(2, 4), identity_expected=True, control=control(1, 4))["verdict"] == "PASS"
    assert gr.greedy_verdict(ties(2, 4), identity_expected=True, control=control(0, 4))["verdict"] == "FAIL"
    # No control (not run, or another prompt count): the tie rule alone, said so.
    v = gr.greedy_verdict(ties(4, 4), identity_expected=True)
    assert v["verdict"] == "PASS" and "no dense_fa control" in v["reason"] and v["control"] is None
    assert gr.greedy_verdict(ties(4, 4), identity_expected=True, control=control(0, 8))["verdict"] == "PASS"
    # The control itself is judged by the tie rule only.
    v = gr.greedy_verdict(ties(4, 4), identity_expected=True, is_control=True)
    assert v["verdict"] == "PASS" and "dense control" in v["reason"] and v["allowed_extra_diverging"] is None


def test_sparse_stays_info_whatever_the_divergences():
    rows = [diverged(3, 3.0, 2.0), diverged(7, 0.0, 0.0, took=False), diverged(None)]
    v = gr.greedy_verdict(rows, identity_expected=False, control=control(0, 3))
    assert v["verdict"] == "INFO" and v["clear_divergences"] == 2 and "2 diverging" in v["reason"]


def test_control_stats_come_from_the_control_summary():
    summary = {"rows": [diverged(None), diverged(3, 0.0, 0.0)], "max_abs_logprob_diff": 0.05,
               "backend": "FLASH_ATTN", "greedy": {"verdict": "PASS"}}
    assert gr.control_stats(summary) == {"config": "dense_fa", "backend": "FLASH_ATTN", "identical": 1,
                                         "n": 2, "diverging": 1, "max_abs_logprob_diff": 0.05,
                                         "verdict": "PASS"}
    assert gr.control_stats(None) is None and gr.control_stats({}) is None


# ---------------------------------------------------------------------------------------------
# Summary and report


def prefix_part(identical: bool, margin: float = 0.002, control_identical: bool | None = None) -> dict:
    def summary(same, m):
        ref = {"tokens": [1, 2], "margins": [1.0, m], "runner_ups": [5, 3]}
        row = gr.compare_rows([ref], [{"tokens": [1, 2] if same else [1, 3], "margins": [1.0, m]}])[0]
        return {"rows": [row], **gr.agreement([row], 2), "num_cached_tokens": [16512],
                "hits_as_expected": True, "first_chunk_ctx": 16512,
                "cached_part_ends_mid_selection_block": True, "max_abs_logprob_diff": 0.01,
                "ttft_uncached_s": 0.2, "ttft_cached_s": 0.02, "ttft_speedup": 10.0}

    configs = {}
    if control_identical is not None:
        s = summary(control_identical, 0.0)
        configs["dense_fa"] = {"identity_expected": True, "proxyattn": None,
                               "summary": {**s, "cached_part_ends_mid_selection_block": None}}
    configs["full"] = {"identity_expected": True, "proxyattn": gr.FULL, "summary": summary(identical, margin)}
    configs["sparse"] = {"identity_expected": False, "proxyattn": {}, "summary": summary(identical, margin)}
    return {"status": "ok", "expected_cached_tokens": 16512, "configs": configs}


def test_summary_rows_judge_identity_only_where_expected():
    report = {"parts": {"prefix": prefix_part(identical=False, margin=0.5),
                        "preemption": {"status": "timeout", "error": "PartTimeout: ran past 420 s"}}}
    rows = {(part, check): (verdict, detail) for part, check, verdict, detail in gr.summary_rows(report)}
    assert rows[("prefix full", "greedy tokens")][0] == "FAIL"
    assert "1: 0.5/0.5 !" in rows[("prefix full", "greedy tokens")][1]  # position, both margins, not a tie
    assert "not a near-tie" in rows[("prefix full", "greedy tokens")][1]
    assert rows[("prefix sparse", "greedy tokens")][0] == "INFO"
    assert rows[("prefix full", "cache hits")][0] == "PASS"
    assert "mid selection block" in rows[("prefix full", "cache hits")][1]
    assert rows[("prefix full", "TTFT")] == ("PASS", "200.0 ms uncached -> 20.0 ms cached (10.0x)")
    assert rows[("preemption", "ran")][0] == "FAIL" and "timeout" in rows[("preemption", "ran")][1]
    table = gr.format_summary(report)
    assert table.splitlines()[0].split() == ["part", "check", "verdict", "detail"]
    assert len(table.splitlines()) == 1 + len(rows)
    assert gr.format_summary({"parts": {}}) == "(no checks to report)"


def test_summary_rows_pass_a_tie_and_show_the_dense_control():
    part = prefix_part(identical=False, margin=0.0625, control_identical=False)
    rows = {(p, c): (v, d) for p, c, v, d in gr.summary_rows({"parts": {"prefix": part}})}
    verdict, detail = rows[("prefix full", "greedy tokens")]
    assert verdict == "PASS", detail
    assert "0/1 identical to caching off (dense_fa: 0/1)" in detail and "1: 0.0625/0.0625;" in detail
    assert rows[("prefix dense_fa", "greedy tokens")][0] == "PASS"
    assert "first chunk ctx 16512" in rows[("prefix dense_fa", "cache hits")][1]
    assert "mid selection block" not in rows[("prefix dense_fa", "cache hits")][1]
    # Same tie, but the control had none on one request (allowance 1): still a PASS; with no
    # control row at all, a PASS that says so.
    part = prefix_part(identical=False, margin=0.0625, control_identical=True)
    assert {(p, c): v for p, c, v, _ in gr.summary_rows({"parts": {"prefix": part}})}[
        ("prefix full", "greedy tokens")] == "PASS"
    part = prefix_part(identical=False, margin=0.0625)
    assert "no dense_fa control" in gr.summary_rows({"parts": {"prefix": part}})[0][3]
    # A stored verdict (what run_prefix writes) is what the table shows.
    part["configs"]["full"]["summary"]["greedy"] = {**gr.greedy_verdict(
        part["configs"]["full"]["summary"]["rows"], identity_expected=True), "verdict": "FAIL", "reason": "stored"}
    row = gr.summary_rows({"parts": {"prefix": part}})[0]
    assert row[2] == "FAIL" and row[3].endswith("stored")


def test_judge_greedy_compares_with_the_control_of_the_same_part(tmp_path):
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json"), "--near-tie-margin", "0.1"])
    part = prefix_part(identical=False, margin=0.0625, control_identical=True)
    for name in ("dense_fa", "full", "sparse"):
        part["configs"][name]["backend"] = gr.config_backend(args, name)
        s = gr.judge_greedy(args, part, name, part["configs"][name])
    g = part["configs"]["full"]["summary"]["greedy"]
    assert g["near_tie_margin"] == 0.1 and g["control"]["config"] == "dense_fa" and g["control"]["identical"] == 1
    assert g["verdict"] == "PASS" and part["configs"]["dense_fa"]["summary"]["greedy"]["control"] is None
    assert s["backend"] == "proxyattn" and part["configs"]["dense_fa"]["summary"]["backend"] == "FLASH_ATTN"
    assert s["greedy"]["verdict"] == "INFO"
    args.near_tie_margin = 0.05  # the tie at 0.0625 is no longer one
    assert gr.judge_greedy(args, part, "full", part["configs"]["full"])["greedy"]["verdict"] == "FAIL"
    rule = gr.greedy_rule(args)
    assert rule["near_tie_margin"] == 0.05 and rule["control_backend"] == "FLASH_ATTN"


def test_preemption_summary_needs_preemptions_and_complete_requests():
    rows = [{"tokens": [1, 2, 3], "margins": [1.0] * 3, "prompt_tokens": 100} for _ in range(2)]
    run = lambda preemptions, computed: {  # noqa: E731
        "rows": rows, "engine": {"kv_cache_tokens": 150}, "preemptions": preemptions,
        "preemptions_metric": preemptions, "prefill_tokens_computed": computed}
    res = {"identity_expected": True, "ample": run(0, 200), "pressured": run(3, 260)}
    s = res["summary"] = gr.summarize_preemption_config(res, 3)
    assert s["completed_pressured"] == 2 and s["identical"] == 2
    assert s["cache_smaller_than_prompts"] and s["recomputed_tokens"] == 60
    verdicts = {check: v for _, check, v, _ in gr.summary_rows({"parts": {"preemption": {
        "status": "ok", "configs": {"full": res}}}})}
    assert verdicts == {"all complete": "PASS", "preempted": "PASS", "greedy tokens": "PASS"}
    res["pressured"] = run(0, 200)
    res["summary"] = gr.summarize_preemption_config(res, 3)
    rows_ = gr.summary_rows({"parts": {"preemption": {"status": "ok", "configs": {"full": res}}}})
    assert [v for _, c, v, _ in rows_ if c == "preempted"] == ["FAIL"]


def test_soak_verdict_measures_growth_from_the_end_of_the_first_round():
    sample = lambda rss, gpu, alive=True: {"server_rss_mib": rss, "processes_mib": gpu,  # noqa: E731
                                           "device_used_mib": 99999, "server_alive": alive}
    part = {"long": {"failed": 0, "completed": 5}, "short": {"failed": 0, "completed": 20},
            "memory": [sample(500, 1000), sample(1000, 9000), sample(1050, 9000)]}
    v = gr.soak_verdict(part)
    assert v["gpu_memory_key"] == "processes_mib" and v["gpu_growth_mib"] == 0
    assert v["server_rss_growth_mib"] == 50 and v["memory_ok"] and v["passed"]
    part["memory"].append(sample(1200, 9000))  # +20% RSS
    assert not gr.soak_verdict(part)["passed"]
    part["memory"][-1] = sample(1000, 9000, alive=False)
    assert not gr.soak_verdict(part)["passed"]
    part["memory"][-1] = sample(1000, 9000)
    part["short"]["failed"] = 1
    assert not gr.soak_verdict(part)["passed"]


def test_json_report_is_strict_json():
    value = gr.jsonable({"a": [math.inf, 1.0, (2, float("nan"))], "b": {"c": -math.inf}})
    assert value == {"a": [None, 1.0, [2, None]], "b": {"c": None}}
    json.dumps(value, allow_nan=False)


def test_a_failing_or_slow_part_is_recorded_and_the_next_part_runs(tmp_path):
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json"), "--part-timeout-s", "0.3"])
    report = {"date": "d", "command": "c", "parts": {}}
    writes = []

    def boom(args, part, write):
        part["partial"] = 1
        raise RuntimeError("engine died")

    def slow(args, part, write):
        time.sleep(5)

    def fine(args, part, write):
        part["value"] = 42

    t0 = time.perf_counter()
    gr.run_part("prefix", boom, args, report, lambda: writes.append(1))
    gr.run_part("preemption", slow, args, report, lambda: writes.append(1))
    assert time.perf_counter() - t0 < 3
    gr.run_part("soak", fine, args, report, lambda: writes.append(1))
    parts = report["parts"]
    assert parts["prefix"]["status"] == "failed" and parts["prefix"]["error"] == "RuntimeError: engine died"
    assert parts["prefix"]["partial"] == 1  # what it measured before failing is kept
    assert parts["preemption"]["status"] == "timeout" and "time guard" in parts["preemption"]["error"]
    assert parts["soak"]["status"] == "ok" and parts["soak"]["value"] == 42
    assert len(writes) == 6


def test_main_writes_gpu_date_versions_command_and_appends_parts(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"

    def fake(name):
        def run(args, part, write):
            part["ran"] = name
        return run

    monkeypatch.setattr(gr, "run_prefix", fake("prefix"))
    monkeypatch.setattr(gr, "run_preemption", fake("preemption"))
    monkeypatch.setattr(gr.ttft_sweep, "gpu_name", lambda: "Fake H200")
    assert gr.main(BASE + ["--out", str(out), "--parts", "prefix"]) == 0
    assert gr.main(BASE + ["--out", str(out), "--parts", "preemption", "--append"]) == 0
    report = json.loads(out.read_text())
    assert report["gpu"] == "Fake H200" and report["date"] and "vllm" in report["versions"]
    assert "--parts preemption" in report["command"] and len(report["earlier_commands"]) == 1
    assert report["parts"]["prefix"]["ran"] == "prefix"
    assert report["parts"]["preemption"]["ran"] == "preemption"
    assert "--parts prefix" in report["parts"]["prefix"]["command"]
    assert capsys.readouterr().out.rstrip().endswith("(no checks to report)")


# ---------------------------------------------------------------------------------------------
# Soak against the fake server


def test_soak_loop_against_a_fake_server(tmp_path):
    pytest.importorskip("aiohttp")
    out = tmp_path / "soak.json"
    serve = f"{shlex.quote(sys.executable)} {FAKE_SERVER} --itl-s 0.001"
    rc = gr.main(["--model", "fake-model", "--essays", str(tmp_path), "--out", str(out),
                  "--parts", "soak", "--soak-s", "1.5", "--soak-round-s", "0.5", "--soak-token-ids",
                  "--max-model-len", "2048", "--soak-long-rate", "6", "--soak-short-rate", "12",
                  "--soak-short-output", "8", "--serve-cmd", serve, "--health-timeout-s", "30"])
    report = json.loads(out.read_text())
    soak = report["parts"]["soak"]
    assert rc == 0, soak.get("error")
    assert soak["status"] == "ok" and len(soak["rounds"]) >= 2
    assert soak["duration_s"] >= 1.5  # the load lasts at least --soak-s (the last round may overrun it)
    assert soak["long"]["failed"] == 0 and soak["short"]["failed"] == 0
    assert soak["long"]["completed"] == 3 * len(soak["rounds"])
    assert soak["short"]["completed"] == 6 * len(soak["rounds"])
    lens = [r["total_input_tokens"] / r["completed"] for r in (x["long"] for x in soak["rounds"])]
    assert all(512 <= n <= 2048 - 32 for n in lens)
    assert soak["memory"][0]["label"] == "before load" and soak["memory"][1]["label"] == "after round 1"
    assert soak["memory"][-1]["server_rss_mib"] > 0
    assert soak["verdict"]["passed"]
    assert "--host 127.0.0.1" in soak["cmd"] and "--attention-backend proxyattn" in soak["cmd"]


def test_soak_server_command():
    args = gr.parse_args(BASE + ["--out", "r.json", "--parts", "soak", "--soak-eager",
                                 "--proxyattn-overrides", '{"gamma": 0.9}', "--serve-cmd", "vllm serve",
                                 "--soak-serve-args", "--load-format dummy"])
    cmd = gr.soak_serve_cmd(args, 1234)
    assert cmd[:3] == ["vllm", "serve", "m"]
    assert cmd[cmd.index("--load-format") + 1] == "dummy"
    assert cmd[cmd.index("--port") + 1] == "1234" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--enforce-eager" in cmd
    assert json.loads(cmd[cmd.index("--additional-config") + 1]) == {"proxyattn": {"gamma": 0.9}}


# ---------------------------------------------------------------------------------------------
# The prefix part on the tiny CPU model


def _tiny_model_and_essays(tmp_path, monkeypatch) -> str:
    """The tiny word-level CPU Llama (skipped without vLLM's CPU ops), an essay folder of its
    words, questions made of its words, and the CUSTOM backend honoured on CPU; the model path."""
    from tests._vllm_cpu import honour_custom_backend_on_cpu, skip_unless_vllm_on_cpu

    skip_unless_vllm_on_cpu()
    from proxyattn_vllm.testing import prompt_words, write_tiny_llama

    model = str(write_tiny_llama(tmp_path / "tiny"))
    (tmp_path / "essays").mkdir()
    (tmp_path / "essays" / "a.txt").write_text(prompt_words(0, 400))
    # The word-level tokenizer knows only its own words: questions made of them.
    monkeypatch.setattr(cache_parts, "QUESTIONS", tuple(prompt_words(500 + 97 * i, 6) for i in range(8)))
    honour_custom_backend_on_cpu(monkeypatch.setattr)
    return model


def test_prefix_part_on_the_tiny_cpu_model(tmp_path, monkeypatch):
    """Pages of 32 tokens (vLLM 0.32's CPU_ATTN takes no smaller ones), selection blocks of 64, a
    104-token prefix: the cached part (96 tokens) ends mid-block; full density must give the
    uncached tokens."""
    from tests._vllm_cpu import kv_cache_layout_restored

    model = _tiny_model_and_essays(tmp_path, monkeypatch)
    built = []
    with_engine = cache_parts.with_engine
    monkeypatch.setattr(cache_parts, "with_engine", lambda kwargs, fn: (built.append(kwargs), with_engine(kwargs, fn))[1])
    out = tmp_path / "out.json"
    with kv_cache_layout_restored():
        rc = gr.main([
            "--model", model, "--essays", str(tmp_path / "essays"), "--out", str(out),
            "--parts", "prefix", "--prefix-configs", "full,dense_fa", "--dense-backend", "CPU_ATTN",
            "--prefix-tokens", "104",
            "--prefix-prompts", "2", "--prefix-output-tokens", "6", "--timing-repeats", "1",
            "--page-size", "32", "--chunk", "32", "--max-model-len", "256", "--dtype", "float32",
            "--proxyattn-overrides", '{"min_sparse_len": 48, "block_size": 64, "stride": 4}',
            "--engine-args", json.dumps({"kv_cache_memory_bytes": 16 << 20, "max_num_seqs": 4,
                                         "distributed_executor_backend": "uni"})])
    part = json.loads(out.read_text())["parts"]["prefix"]
    assert rc == 0, part.get("error")
    res = part["configs"]["full"]
    s = res["summary"]
    assert s["identical"] == s["n"] == 2
    assert s["max_abs_logprob_diff"] < 1e-3  # fp32: the cached chunk computes the same numbers
    assert s["num_cached_tokens"] == [96, 96] and s["hits_as_expected"] and s["reference_had_no_hits"]
    assert s["first_chunk_ctx"] == 96 and s["cached_part_ends_mid_selection_block"]
    assert res["cached"]["counters"]["vllm:prefix_cache_hits"] == 192
    assert res["uncached"]["counters"]["vllm:prefix_cache_hits"] == 0
    assert s["ttft_cached_s"] > 0 and s["ttft_uncached_s"] > 0
    assert res["cached"]["engine"]["page_size"] == 32
    # The scheduler saw the same prefill chunks as proxyattn's plan (the cached one at ctx 96).
    assert s["first_chunk_ctx_scheduled"] == 96 and res["uncached"]["scheduled"]["min_prefill_ctx"] == 0
    for key in ("cached", "uncached"):
        assert res[key]["scheduled"]["prefill_tokens"] == res[key]["plan"]["prefill_tokens"] > 0
    assert s["greedy"]["verdict"] == "PASS" and s["greedy"]["control"]["config"] == "dense_fa"
    # The dense control ran first, on vLLM's own backend with no proxyattn config, and passes.
    assert list(part["configs"]) == ["dense_fa", "full"]
    assert [k["attention_backend"] for k in built] == ["CPU_ATTN"] * 2 + ["proxyattn"] * 2
    assert all("additional_config" not in k for k in built[:2]) and "additional_config" in built[2]
    dense = part["configs"]["dense_fa"]
    d = dense["summary"]
    assert dense["backend"] == "CPU_ATTN" and dense["proxyattn"] is None
    assert d["identical"] == 2 and d["greedy"]["verdict"] == "PASS" and d["hits_as_expected"]
    assert d["first_chunk_ctx"] == 96 and d["cached_part_ends_mid_selection_block"] is None
    assert dense["cached"]["plan"]["sparse_chunks"] == 0  # proxyattn's plan never ran
    assert part["greedy_rule"]["near_tie_margin"] == 0.25


def test_preemption_part_on_the_tiny_cpu_model(tmp_path, monkeypatch):
    """A KV cache of 1.5 prompts for 4 concurrent prompts: requests are preempted and recomputed,
    on the dense control (CPU_ATTN) and proxyattn at full density alike; fp32, so the outputs
    match the ample run and both verdicts pass; the scheduler counts the recompute for both."""
    from tests._vllm_cpu import kv_cache_layout_restored

    model = _tiny_model_and_essays(tmp_path, monkeypatch)
    out = tmp_path / "out.json"
    with kv_cache_layout_restored():
        rc = gr.main([
            "--model", model, "--essays", str(tmp_path / "essays"), "--out", str(out),
            "--parts", "preemption", "--preempt-configs", "full,dense_fa", "--dense-backend", "CPU_ATTN",
            "--preempt-prompts", "4", "--preempt-prompt-tokens", "100", "--preempt-output-tokens", "12",
            "--preempt-cache-prompts", "1.5", "--page-size", "32", "--chunk", "64", "--dtype", "float32",
            "--proxyattn-overrides", '{"min_sparse_len": 48, "block_size": 32, "stride": 4}',
            "--engine-args", json.dumps({"max_num_seqs": 4, "distributed_executor_backend": "uni"})])
    part = json.loads(out.read_text())["parts"]["preemption"]
    assert rc == 0, part.get("error")
    assert list(part["configs"]) == ["dense_fa", "full"]
    for name in ("dense_fa", "full"):
        res = part["configs"][name]
        s = res["summary"]
        assert s["completed_pressured"] == s["n"] == 4 and s["preemptions"] > 0, (name, s)
        assert s["identical"] == 4 and s["greedy"]["verdict"] == "PASS", (name, s["greedy"])
        assert s["recomputed_tokens"] > 0 and s["prefill_tokens_computed"] > 4 * 100
        assert res["ample"]["prefill_tokens_computed"] == 4 * 100  # no preemption, no recompute
    assert part["configs"]["dense_fa"]["pressured"]["prefill_tokens_planned"] is None
    full = part["configs"]["full"]["pressured"]
    assert full["prefill_tokens_planned"] == full["prefill_tokens_computed"]  # plan and scheduler agree
    assert part["configs"]["full"]["summary"]["greedy"]["control"]["identical"] == 4


def test_recorders_patch_their_targets_while_entered_and_restore_them():
    pytest.importorskip("vllm")
    import torch

    import proxyattn_vllm.metadata as metadata
    from vllm.v1.core.sched.scheduler import Scheduler

    originals = (metadata.plan_batch, Scheduler._preempt_request, Scheduler._update_after_schedule)
    with gr.PlanRecorder() as plans, gr.PreemptionCounter() as preempted, gr.SchedulerRecorder() as scheduled:
        assert plans.available and preempted.available and scheduled.available
        patched = (metadata.plan_batch, Scheduler._preempt_request, Scheduler._update_after_schedule)
        assert all(p is not o for p, o in zip(patched, originals))
        metadata.plan_batch(torch.tensor([0, 1, 300], dtype=torch.int32), torch.tensor([10, 400]), 2, 64)
        assert plans.sparse == []  # not recording
        with plans.recording():
            metadata.plan_batch(torch.tensor([0, 1, 300], dtype=torch.int32), torch.tensor([10, 400]), 2, 64)
        assert plans.sparse == [(101, 299)] and plans.prefill_tokens == 299
    assert (metadata.plan_batch, Scheduler._preempt_request, Scheduler._update_after_schedule) == originals


# ---------------------------------------------------------------------------------------------
# Sparse scenarios: arguments, retrieval prompts, verdicts, the compile counter

from benchmarks.robustness import compiles, prompts as rp, sparse_scenarios as ss  # noqa: E402


def test_sparse_parts_are_selected_by_name_or_all_at_once(tmp_path):
    out = ["--out", str(tmp_path / "r.json")]
    args = gr.parse_args(BASE + out + ["--parts", "soak,sparse"])
    assert args.parts == ["sparse_prefix", "sparse_preemption", "sparse_chunks", "sparse_mixed", "soak"]
    args = gr.parse_args(BASE + out + ["--parts", "sparse_mixed,prefix"])
    assert args.parts == ["prefix", "sparse_mixed"]
    assert args.sparse_mixed_short_range == (200, 800) and args.sparse_chunk_sizes == [2048, 4096, 16384]
    assert gr.part_timeout(args, "sparse_mixed") == args.sparse_part_timeout_s == 900
    assert gr.part_timeout(args, "prefix") == args.part_timeout_s
    # The default prefix document's whole pages end mid 256-token block and mid 8192-token chunk.
    cached = args.sparse_prefix_tokens // args.page_size * args.page_size
    assert args.sparse_prefix_tokens % args.page_size and cached % 256 and cached % args.chunk
    for bad in (["--parts", "sparse_x"], ["--parts", "sparse", "--sparse-mixed-short-range", "9:8"],
                ["--parts", "sparse", "--sparse-mixed-long-tokens", "40000"],
                ["--parts", "sparse_chunks", "--sparse-chunk-sizes", "2048,0"],
                ["--parts", "sparse", "--sparse-questions", "0"]):
        with pytest.raises(SystemExit):
            gr.parse_args(BASE + out + bad)
    # The sparse options are checked only when a sparse part runs.
    assert gr.parse_args(BASE + out + ["--parts", "soak", "--sparse-mixed-long-tokens", "40000"]).parts == ["soak"]


def test_help_lists_every_part(capsys):
    with pytest.raises(SystemExit):
        gr.parse_args(["--help"])
    text = capsys.readouterr().out
    for name in gr.PARTS + ("sparse",):
        assert f"\n  {name} " in text, name
    assert "--sparse-chunk-sizes" in text and "no Triton/torch.compile compile inside a request" in text


def test_sparse_config_is_the_default_with_min_sparse_len_lowered_only_when_needed(tmp_path):
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json")])
    assert ss.sparse_config(args, 16000) == {}  # the default config: no override at all
    assert ss.sparse_config(args, 3000) == {"min_sparse_len": 3000}
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json"), "--proxyattn-overrides",
                                 '{"min_sparse_len": 100, "sparse_kernel": "fa3"}'])
    assert ss.sparse_config(args, 3000) == {"min_sparse_len": 100, "sparse_kernel": "fa3"}


def decode_words(tok: WordTokenizer, ids: list[int]) -> str:
    words = {v: k for k, v in tok.vocab.items()}
    return " ".join(words.get(i, "?") for i in ids)


def word_essay(tok: WordTokenizer, n: int = 3000) -> list[int]:
    return tok.encode(" ".join(f"w{i % 997}" for i in range(n)), add_special_tokens=False)


def test_retrieval_prompts_have_the_exact_length_and_their_needle_before_the_question():
    tok = WordTokenizer()
    essay = word_essay(tok)
    prompts = rp.retrieval_prompts(tok, essay, [300, 450, 600, 301], seed=5)
    assert [len(p["ids"]) for p in prompts] == [300, 450, 600, 301]
    assert len({p["key"] for p in prompts}) == 4 and len({p["answer"] for p in prompts}) == 4
    for p in prompts:
        assert p["ids"][0] == 1  # the tokenizer's BOS (no chat template)
        assert len(p["answer"]) == 7 and p["answer"].isdigit()
        needle = tok.encode(rp.NEEDLE.format(key=p["key"], value=p["answer"]), add_special_tokens=False)
        at = p["needle_position"]
        assert p["ids"][at:at + len(needle)] == needle
        text = decode_words(tok, p["ids"])
        assert text.endswith(f"Answer: {rp.ANSWER_START.format(key=p['key'])}")
        assert text.count(p["answer"]) == 1  # only the needle holds the number
    depths = [p["needle_position"] / len(p["ids"]) for p in prompts[:3]]
    assert depths[0] < depths[1] < depths[2]  # 0.2, 0.5, 0.8
    with pytest.raises(ValueError, match="cannot hold"):
        rp.retrieval_prompts(tok, essay, [20], seed=5)


def test_shared_document_holds_every_needle_and_caches_its_whole_pages():
    tok = WordTokenizer()
    doc = rp.shared_document_prompts(tok, word_essay(tok), 16 * 20 + 5, questions=3, seed=1, page=16)
    warm = doc["warm"]
    assert len(warm) == 325 and doc["expected_cached_tokens"] == 320 and doc["prefix_ends_mid_page"]
    assert len(doc["prompts"]) == 3 and len({p["key"] for p in doc["prompts"]}) == 3
    for p in doc["prompts"]:
        assert p["ids"][:325] == warm and p["needle_position"] < 325
        assert p["answer"] in decode_words(tok, warm)
        assert decode_words(tok, p["ids"][325:]).startswith(f"Question: What is the special magic number for {p['key']}")


def test_chat_frame_wraps_the_document_in_the_template():
    class ChatTokenizer(WordTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<s> user: {messages[0]['content']} </s> assistant:\n"

    tok = ChatTokenizer()
    head, tail = rp.chat_frame(tok)
    assert decode_words(tok, head) == "<s> user:" and tail == " </s> assistant:\n"
    p = rp.retrieval_prompts(tok, word_essay(tok), [200], seed=2)[0]
    text = decode_words(tok, p["ids"])
    assert text.startswith("<s> user:") and len(p["ids"]) == 200
    assert text.endswith(f"mentioned in the text above? </s> assistant: {rp.ANSWER_START.format(key=p['key'])}")


def test_answer_check_takes_the_first_number():
    assert rp.answer_correct(" 4417723.", "4417723")
    assert rp.answer_correct("The number is 4417723, I think 12", "4417723")
    assert not rp.answer_correct(" 12 or 4417723", "4417723")
    assert not rp.answer_correct(" 44177230", "4417723")
    assert not rp.answer_correct("", "4417723") and not rp.answer_correct(None, "1")
    assert len({rp.needle_key(i) for i in range(64)}) == 64 and rp.needle_key(64) != rp.needle_key(0)


def row(answer="1234567", correct=True, tokens=24, cached=0, max_tokens=24):
    return {"answer": answer, "correct": correct, "output_tokens": tokens, "max_tokens": max_tokens,
            "key": "k", "text": " 1234567" if correct else " 99", "num_cached_tokens": cached}


def batch(rows, label="all", compiled=0, sparse_chunks=5, max_q=None, min_ctx=None, available=True):
    summary = {"triton_available": available, "triton_compiles": compiled,
               "triton_kernels": ["m.kern"] if compiled else [], "dynamo_frames": 0, "dynamo_graphs": 0,
               "total": compiled}
    return {"label": label, "rows": rows, "compiles": summary, "max_scheduled_q_len": max_q,
            "plan": {"sparse_chunks": sparse_chunks, "min_sparse_ctx": min_ctx}}


def run(*batches, preemptions=0, density=0.3):
    return {"batches": list(batches), "compiles": compiles.merge([b["compiles"] for b in batches]),
            "preemptions": preemptions, "density": {"density": density, "chunks": 48}}


def part_of(control_runs, sparse_runs, **info):
    return {"configs": {"dense_fa": {"runs": control_runs}, "sparse": {"runs": sparse_runs}}, **info}


def verdicts(name, part):
    return {check: (verdict, detail) for check, verdict, detail in ss.judge(name, part)}


def test_sparse_verdicts_pass_and_each_check_can_fail():
    good = lambda **kw: {"ample": run(batch([row(), row(correct=False)], **kw)),  # noqa: E731
                         "pressured": run(batch([row(), row(correct=False)], **kw), preemptions=3)}
    info = {"pressured_kv_tokens": 30000, "prompt_tokens_sum": 72000}
    v = verdicts("sparse_preemption", part_of(good(sparse_chunks=0), good(), **info))
    assert {k: x[0] for k, x in v.items()} == {"all complete": "PASS", "answers": "PASS", "no compiles": "PASS",
                                              "sparse path ran": "PASS", "preempted dense_fa": "PASS",
                                              "preempted sparse": "PASS", "density": "INFO"}
    assert v["answers"][1] == "sparse 2/4 right, dense_fa 2/4"
    # Wrong where the control is right; right where the control is wrong is fine.
    sparse = good()
    sparse["pressured"]["batches"][0]["rows"] = [row(correct=False), row(correct=True)]
    assert verdicts("sparse_preemption", part_of(good(), sparse, **info))["answers"][0] == "FAIL"
    none_right = {k: run(batch([row(correct=False)])) for k in ("ample", "pressured")}
    assert verdicts("sparse_preemption", part_of(none_right, good(), **info))["answers"][0] == "INFO"
    # A short request (of either config), a compile in a request, no sparse chunk, no preemption.
    short = good()
    short["ample"]["batches"][0]["rows"][0]["output_tokens"] = 3
    assert verdicts("sparse_preemption", part_of(short, good(), **info))["all complete"][0] == "FAIL"
    compiled = {"ample": run(batch([row()], compiled=2)), "pressured": run(batch([row()]), preemptions=1)}
    v = verdicts("sparse_preemption", part_of(good(), compiled, **info))
    assert v["no compiles"][0] == "FAIL" and "m.kern" in v["no compiles"][1]
    # The control's compiles are reported, not judged.
    assert verdicts("sparse_preemption", part_of(compiled, good(), **info))["no compiles"][0] == "PASS"
    blind = {"ample": run(batch([row()], available=False)), "pressured": run(batch([row()]), preemptions=1)}
    assert verdicts("sparse_preemption", part_of(good(), blind, **info))["no compiles"][0] == "FAIL"
    dense_only = {"ample": run(batch([row()])), "pressured": run(batch([row()], sparse_chunks=0), preemptions=1)}
    assert verdicts("sparse_preemption", part_of(good(), dense_only, **info))["sparse path ran"][0] == "FAIL"
    calm = {"ample": run(batch([row()])), "pressured": run(batch([row()]), preemptions=0)}
    assert verdicts("sparse_preemption", part_of(good(), calm, **info))["preempted sparse"][0] == "FAIL"


def test_sparse_prefix_and_chunk_verdicts():
    def cached(hit, min_ctx):
        warm = batch([row(answer=None, correct=None, tokens=1, max_tokens=1)], label="warm", min_ctx=0)
        return {"cached": run(warm, batch([row(cached=hit), row(cached=hit)], label="questions", min_ctx=min_ctx))}

    info = {"expected_cached_tokens": 16512, "hit_ends_mid_selection_block": True, "hit_ends_mid_chunk": True}
    v = verdicts("sparse_prefix", part_of(cached(16512, None), cached(16512, 16512), **info))
    assert v["cache hits dense_fa"][0] == v["cache hits sparse"][0] == "PASS"
    assert "first sparse chunk ctx 16512" in v["cache hits sparse"][1]
    v = verdicts("sparse_prefix", part_of(cached(16512, None), cached(16512, 16384), **info))
    assert v["cache hits sparse"][0] == "FAIL"  # the sparse chunk did not start at the hit
    assert verdicts("sparse_prefix", part_of(cached(0, None), cached(16512, 16512), **info))[
        "cache hits dense_fa"][0] == "FAIL"
    chunks = lambda q: {"chunk2048": run(batch([row()], max_q=q)), "chunk4096": run(batch([row()], max_q=4096))}  # noqa: E731
    assert verdicts("sparse_chunks", part_of(chunks(2048), chunks(2048)))["chunk sizes"][0] == "PASS"
    assert verdicts("sparse_chunks", part_of(chunks(2048), chunks(2049)))["chunk sizes"][0] == "FAIL"
    # The summary table shows a sparse part's checks, and a failed part as such.
    report = {"parts": {"sparse_chunks": {"status": "ok", "checks": ss.judge("sparse_chunks",
                                                                             part_of(chunks(2048), chunks(2048)))},
                        "sparse_mixed": {"status": "timeout", "error": "ran past its time guard"}}}
    rows = gr.summary_rows(report)
    assert ("sparse_chunks", "chunk sizes", "PASS") in [r[:3] for r in rows]
    assert ("sparse_mixed", "ran", "FAIL") in [r[:3] for r in rows]


def test_mixed_scenario_puts_the_long_prompt_among_the_short_ones(tmp_path):
    tok = WordTokenizer()
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json"), "--parts", "sparse_mixed",
                                 "--sparse-mixed-short", "6", "--sparse-mixed-short-range", "100:150",
                                 "--sparse-mixed-long-tokens", "900", "--sparse-mixed-short-output", "8"])
    info, runs, shortest = ss.scenario_mixed(args, tok, word_essay(tok))
    batch_ = runs[0]["batches"][0][1]
    assert shortest == 900 and len(batch_) == 7 and info["long_request_index"] == 3
    assert [len(p["ids"]) for p in batch_][3] == 900 and all(100 <= len(p["ids"]) <= 150 for p in batch_[:3])
    assert [p["max_tokens"] for p in batch_] == [8, 8, 8, args.sparse_output_tokens, 8, 8, 8]
    assert len({p["key"] for p in batch_}) == 7


def test_chunk_and_preemption_scenarios_build_one_engine_per_setting(tmp_path):
    tok = WordTokenizer()
    args = gr.parse_args(BASE + ["--out", str(tmp_path / "r.json"), "--parts", "sparse",
                                 "--sparse-chunk-lengths", "700,900", "--sparse-chunk-sizes", "64,128",
                                 "--sparse-preempt-prompts", "4", "--sparse-preempt-tokens", "500",
                                 "--sparse-preempt-cache-prompts", "1.5", "--page-size", "16"])
    info, runs, shortest = ss.scenario_chunks(args, tok, word_essay(tok))
    assert [r["key"] for r in runs] == ["chunk64", "chunk128"] and shortest == 700
    assert [r["extra"] for r in runs] == [{"max_num_batched_tokens": 64}, {"max_num_batched_tokens": 128}]
    info, runs, shortest = ss.scenario_preemption(args, tok, word_essay(tok))
    pages = math.ceil((500 + args.sparse_output_tokens) / 16)
    assert info["pressured_num_gpu_blocks"] == math.ceil(1.5 * pages)
    assert info["pressured_kv_tokens"] < info["prompt_tokens_sum"]
    assert runs[1]["extra"] == {"num_gpu_blocks_override": info["pressured_num_gpu_blocks"],
                                "scheduler_reserve_full_isl": False}
    assert runs[0]["batches"] == runs[1]["batches"] and not runs[0]["prefix_caching"]


def test_triton_calls_the_counted_hook_before_compiling_a_new_specialization():
    """The installed Triton's JITFunction consults the hook the counter replaces on every
    in-memory cache miss, before compiling: the route it counts."""
    pytest.importorskip("triton")
    import inspect

    from triton.runtime.jit import JITFunction

    owner, attr = compiles._triton_hook_owner()
    source = inspect.getsource(JITFunction._do_compile)
    assert attr in source and source.index(attr) < source.index("self.compile(")
    run_source = inspect.getsource(JITFunction.run)
    assert "_do_compile" in run_source and "kernel_cache" in run_source


def test_compile_counter_counts_real_hook_calls_only_while_measuring():
    pytest.importorskip("triton")
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.runtime.jit import JITFunction

    def tiny_kernel(x_ptr, n):
        pass

    kernel = JITFunction(tiny_kernel)  # not launched: no GPU here; its hook call is real
    owner, attr = compiles._triton_hook_owner()
    previous_calls = []
    original = getattr(owner, attr)

    def previous(**kw):
        previous_calls.append(kw["fn"].name)
        return None

    setattr(owner, attr, previous)
    try:
        def miss():
            values = {"hook": getattr(owner, attr), "key": ("k", ("*fp32", "i32")), "signature": {"x_ptr": "*fp32"},
                      "target": GPUTarget("cuda", 90, 32), "device": 0, "constants": {}, "options": CUDAOptions(),
                      "configs": [{}], "is_warmup": False}
            return kernel._call_hook(*[values[p] for p in inspect.signature(kernel._call_hook).parameters])

        with compiles.CompileCounter() as counter:
            assert counter.triton_available and getattr(owner, attr) == counter.hook
            assert not miss()  # never tells Triton to skip the compile
            with counter.measuring():
                miss()
                miss()
            miss()
            s = counter.summary()
        assert getattr(owner, attr) is previous  # restored
        assert s["triton_compiles"] == 2 and s["total"] == 2 + (s["dynamo_frames"] or 0)
        [name] = s["triton_kernels"]  # module and qualified name
        assert name.startswith(__name__ + ".") and name.endswith(".tiny_kernel")
        assert len(previous_calls) == 4  # the earlier hook still sees every call
    finally:
        setattr(owner, attr, original)


def test_compile_counter_counts_torch_compile_frames():
    import torch

    def f(x):
        return x * 2 + 1

    compiled = torch.compile(f, backend="eager", dynamic=False)
    with compiles.CompileCounter() as counter:
        with counter.measuring():
            compiled(torch.ones(3))
        first = counter.summary()
        with counter.measuring():
            compiled(torch.ones(3))  # cached: nothing compiles
        again = counter.summary()
        with counter.measuring():
            compiled(torch.ones(3, 4))  # a new shape: a recompile
        new_shape = counter.summary()
    assert first["dynamo_frames"] >= 1 and first["total"] >= 1
    assert again["dynamo_frames"] == 0 and again["total"] == 0
    assert new_shape["dynamo_frames"] >= 1
    merged = compiles.merge([first, again, new_shape])
    assert merged["dynamo_frames"] == first["dynamo_frames"] + new_shape["dynamo_frames"]


def run_sparse_parts_on_tiny_model(tmp_path, monkeypatch, *options: str) -> tuple[int, dict]:
    """gpu_robustness.main on the tiny CPU model with needle keys it knows (its word-level
    tokenizer maps unknown words to one token), CPU_ATTN as the control, fp32, pages of 32 and
    64-token selection blocks; the exit status and the report."""
    from proxyattn_vllm.testing import prompt_words
    from tests._vllm_cpu import kv_cache_layout_restored

    model = _tiny_model_and_essays(tmp_path, monkeypatch)
    monkeypatch.setattr(rp, "needle_key", lambda i: prompt_words(900 + 11 * i, 1))
    out = tmp_path / "out.json"
    with kv_cache_layout_restored():
        rc = gr.main(["--model", model, "--essays", str(tmp_path / "essays"), "--out", str(out),
                      "--dense-backend", "CPU_ATTN", "--page-size", "32", "--max-model-len", "256",
                      "--dtype", "float32", "--sparse-output-tokens", "4", *options])
    return rc, json.loads(out.read_text())


def test_sparse_prefix_and_mixed_parts_on_the_tiny_cpu_model(tmp_path, monkeypatch):
    """The sparse parts end to end on the tiny CPU model (fp32, pages of 32, selection blocks of
    64, a 104-token document: its cached 96 tokens end mid-block): every request completes, the
    hits are the document's whole pages and the first sparse chunk starts there, the sparse
    path ran beside short requests, its density was recorded, and no request compiled anything
    (the CPU runs Triton's interpreter). The random model knows no digits: answers are INFO."""
    rc, report = run_sparse_parts_on_tiny_model(
        tmp_path, monkeypatch, "--parts", "sparse_prefix,sparse_mixed", "--sparse-prefix-tokens", "104",
        "--sparse-questions", "2", "--sparse-mixed-short", "3", "--sparse-mixed-short-range", "40:60",
        "--sparse-mixed-short-output", "3", "--sparse-mixed-long-tokens", "200", "--chunk", "32",
        "--proxyattn-overrides", '{"min_sparse_len": 96, "block_size": 64, "stride": 4}',
        "--engine-args", json.dumps({"kv_cache_memory_bytes": 16 << 20, "max_num_seqs": 8,
                                     "distributed_executor_backend": "uni"}))
    for name in ("sparse_prefix", "sparse_mixed"):
        part = report["parts"][name]
        assert part["status"] == "ok", part.get("error")
        checks = {c: v for c, v, _ in part["checks"]}
        assert checks["all complete"] == "PASS" and checks["sparse path ran"] == "PASS", part["checks"]
        assert checks["no compiles"] == "PASS" and checks["answers"] in ("PASS", "INFO"), part["checks"]
        assert list(part["configs"]) == ["dense_fa", "sparse"]
        assert part["configs"]["sparse"]["proxyattn"]["min_sparse_len"] == 96
        for run_ in part["configs"]["sparse"]["runs"].values():
            assert 0 < run_["density"]["density"] <= 1 and run_["density"]["chunks"] > 0
    prefix = report["parts"]["sparse_prefix"]
    assert prefix["expected_cached_tokens"] == 96 and prefix["hit_ends_mid_selection_block"]
    checks = {c: v for c, v, _ in prefix["checks"]}
    assert checks["cache hits dense_fa"] == checks["cache hits sparse"] == "PASS", prefix["checks"]
    mixed = report["parts"]["sparse_mixed"]["configs"]["sparse"]["runs"]["mixed"]["batches"][0]
    assert [r["output_tokens"] for r in mixed["rows"]] == [3, 4, 3, 3]
    assert rc == 0


def test_sparse_preemption_and_chunks_parts_on_the_tiny_cpu_model(tmp_path, monkeypatch):
    """Four 100-token retrieval prompts on a KV cache of 1.5 prompts are preempted and
    recomputed on both configs, and prompts of 150-200 tokens run at chunk sizes 32 (half a
    64-token selection block) and 64: every request completes, the sparse path ran in every
    engine, no scheduled chunk exceeds its engine's limit, and no request compiled anything."""
    rc, report = run_sparse_parts_on_tiny_model(
        tmp_path, monkeypatch, "--parts", "sparse_preemption,sparse_chunks", "--sparse-preempt-prompts", "4",
        "--sparse-preempt-tokens", "100", "--sparse-preempt-cache-prompts", "1.5", "--sparse-chunk-sizes", "32,64",
        "--sparse-chunk-lengths", "150,200", "--chunk", "64",
        "--proxyattn-overrides", '{"block_size": 64, "stride": 4}',
        "--engine-args", json.dumps({"max_num_seqs": 4, "distributed_executor_backend": "uni"}))
    for name in ("sparse_preemption", "sparse_chunks"):
        part = report["parts"][name]
        assert part["status"] == "ok", part.get("error")
        checks = {c: v for c, v, _ in part["checks"]}
        assert {v for c, v in checks.items() if c not in ("answers", "density")} == {"PASS"}, part["checks"]
    # Prompts below the default min_sparse_len: lowered to the shortest, so the sparse path ran.
    assert report["parts"]["sparse_preemption"]["configs"]["sparse"]["proxyattn"] == {
        "block_size": 64, "stride": 4, "min_sparse_len": 100}
    assert report["parts"]["sparse_chunks"]["configs"]["sparse"]["proxyattn"]["min_sparse_len"] == 150
    pressured = report["parts"]["sparse_preemption"]["configs"]["sparse"]["runs"]["pressured"]
    assert pressured["preemptions"] > 0
    assert rc == 0
