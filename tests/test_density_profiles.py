"""Density profiles (benchmarks/profiles): power-law fit, mapping by relative position, profile
generation, the block counting against the selection reference, and the budget measurement on a
tiny random model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch


from benchmarks.profiles import density_profiles as dp
from proxyattn_kernels.params import ChunkGeometry
from proxyattn_kernels.select.naive import select_blocks


def test_power_law_recovered():
    lengths = [2048, 4096, 8192, 16384]
    a, b = dp.fit_power_law(lengths, [3.0 * L ** -0.4 for L in lengths])
    assert a == pytest.approx(3.0, rel=1e-9) and b == pytest.approx(0.4, rel=1e-9)
    # A rising series gives a negative exponent.
    assert dp.fit_power_law([1000, 4000], [0.1, 0.2])[1] == pytest.approx(-0.5)


def test_power_law_needs_two_lengths():
    with pytest.raises(ValueError, match="two or more distinct lengths"):
        dp.fit_power_law([4096, 4096], [0.3, 0.2])


def test_map_relative_by_depth():
    out = dp.map_relative(torch.tensor([0.0, 1.0, 2.0]), 5)
    assert out.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0])
    src = torch.rand(24, 14)
    mapped = dp.map_relative(dp.map_relative(src, 32, 0), 32, 1)
    assert mapped.shape == (32, 32)
    assert mapped[0, 0] == pytest.approx(float(src[0, 0])) and mapped[-1, -1] == pytest.approx(float(src[-1, -1]))
    # Target layer 11 of 32 sits at depth 11/31, source position 11 * 23 / 31 = 8.16 of 24 layers.
    col = dp.map_relative(src[:, 0], 32)
    w = 11 * 23 / 31 - 8
    assert float(col[11]) == pytest.approx(float(src[8, 0]) * (1 - w) + float(src[9, 0]) * w, rel=1e-6)


@pytest.mark.parametrize("ctx,q_len", [(0, 2048), (8192, 8192), (16384 + 100, 3000)])
def test_chunk_counts_match_selection(ctx, q_len):
    """The profile's block count per head is what the reference selection computes for the same
    per-head budgets."""
    sel = {**dp.SELECTION, "min_budget_blocks": 4}
    geo = ChunkGeometry(ctx, q_len, sel["block_size"])
    fraction = torch.tensor([0.01, 0.1, 0.3, 0.9])
    budget = torch.clamp(torch.ceil(fraction * geo.num_k_blocks), min=sel["min_budget_blocks"]).int()
    scores = torch.rand(1, geo.num_q_blocks, geo.num_k_blocks)
    _, counts, _ = select_blocks(scores, budget, ctx, q_len, sel["block_size"], sel["sink_blocks"],
                                 sel["local_blocks"], sel["dense_tail_tokens"])
    selected, causal = dp.chunk_head_counts(fraction, ctx, q_len, sel)
    assert selected.tolist() == counts.sum(dim=1).double().tolist()
    assert causal == sum(geo.row_extent(r) for r in range(geo.num_q_blocks))


def _synthetic_measured(layers=6, heads=4, lengths=(4096, 8192, 16384), gamma=0.95):
    """A measured file whose per-layer mean fraction is exactly ``a_l * L ** -b_l`` and whose
    head ratios are fixed."""
    a = [2.0 + 0.5 * i for i in range(layers)]
    b = [0.3 + 0.05 * i for i in range(layers)]
    ratio = torch.linspace(0.5, 1.5, heads)  # mean 1
    results = {}
    for L in lengths:
        frac = [[a[i] * L ** -b[i] * float(r) for r in ratio] for i in range(layers)]
        results[f"len{L}_gamma{gamma}"] = {"length": L, "gamma": gamma, "gamma_fraction_last_chunk": frac}
    return {"model": {"name": "Synth-1B"}, "results": results}, a, b, ratio


def test_fit_measured_recovers_layers_and_heads():
    doc, a, b, ratio = _synthetic_measured()
    fit = dp.fit_measured(doc, 0.95)
    for (fa, fb), ea, eb in zip(fit["layer_fits"], a, b):
        assert fa == pytest.approx(ea, rel=1e-6) and fb == pytest.approx(eb, rel=1e-6)
    assert fit["head_ratio"][2].tolist() == pytest.approx(ratio.tolist(), rel=1e-6)
    with pytest.raises(ValueError, match="gamma 0.9"):
        dp.fit_measured(doc, 0.9)


def test_rising_layer_is_held_at_longest_value():
    doc, a, b, ratio = _synthetic_measured()
    for e in doc["results"].values():  # layer 3 rises: L ** +0.2
        e["gamma_fraction_last_chunk"][3] = [1e-3 * e["length"] ** 0.2 * float(r) for r in ratio]
    fit = dp.fit_measured(doc, 0.95)
    assert fit["raw_b"][3] == pytest.approx(-0.2, rel=1e-6)
    assert fit["layer_fits"][3] == pytest.approx((1e-3 * 16384 ** 0.2, 0.0), rel=1e-6)
    assert fit["layer_fits"][2] == pytest.approx((a[2], b[2]), rel=1e-6)


def test_build_profiles_llama_shape():
    doc, a, b, _ = _synthetic_measured()
    out = dp.build_profiles(doc, lengths=[65536, 131072], paper={**dp.PAPER_LLAMA8B, "lengths": [16384, 65536]})
    assert set(out["profiles"]) == {"measured-synth-gamma0.95", "paper-llama8b-gamma0.95"}
    measured = out["profiles"]["measured-synth-gamma0.95"]
    assert len(measured["a"]) == 32 and len(measured["head_ratio"]) == 32 and len(measured["head_ratio"][0]) == 32
    # First and last layers keep the source's first and last fits; exponents are monotone like the source's.
    assert measured["b"][0] == pytest.approx(b[0]) and measured["b"][-1] == pytest.approx(b[-1])
    assert all(x <= y + 1e-12 for x, y in zip(measured["b"], measured["b"][1:]))
    assert torch.tensor(measured["head_ratio"]).mean(-1).tolist() == pytest.approx([1.0] * 32)
    for name, prof in out["profiles"].items():
        for L in (65536, 131072):
            frac = dp.head_fractions(prof, L)
            assert frac.shape == (32, 32) and bool((frac > 0).all()) and bool((frac <= 1).all())
            blocks = dp.head_budget_blocks(prof, L)
            assert int(blocks.min()) >= dp.SELECTION["min_budget_blocks"] and int(blocks.max()) <= math.ceil(L / 128)
        if name.startswith("measured"):
            dens = [prof["summary"][str(L)]["mean_density_last_chunk"] for L in (65536, 131072)]
            assert 0 < dens[1] < dens[0] <= 1  # every source exponent is positive: density falls
    paper = out["profiles"]["paper-llama8b-gamma0.95"]
    for L in (65536, 131072, 32768):  # stored scales, and one calibrated on the fly
        frac = dp.head_fractions(paper, L)
        achieved = float(dp.prefill_density(lambda e: frac, L, chunk=L).mean())
        assert achieved == pytest.approx(dp.PAPER_LLAMA8B["density"], abs=2e-3)
    assert paper["summary"]["65536"]["mean_density_prefill"] == pytest.approx(dp.PAPER_LLAMA8B["density"], abs=2e-3)
    # The paper's spread is the measured one: same head ratios, a larger scale.
    assert paper["head_ratio"] == measured["head_ratio"] and paper["scale_by_length"]["65536"] > 1


def test_cli_merges_runs_and_writes_loadable_profiles(tmp_path):
    import json

    doc, *_ = _synthetic_measured()
    short = {**doc, "results": {k: v for k, v in doc["results"].items() if v["length"] < 16384}}
    long = {**doc, "results": {k: v for k, v in doc["results"].items() if v["length"] == 16384}}
    paths = []
    for name, d in (("short.json", short), ("long.json", long)):
        paths.append(str(tmp_path / name))
        Path(paths[-1]).write_text(json.dumps(d))
    out = tmp_path / "profiles.json"
    dp.main(["--measured", *paths, "--tag", "syn", "--lengths", "65536", "--out", str(out)])
    prof = dp.load_profile("measured-syn-gamma0.95", out)
    assert len(prof["source_fit"]["layer_b"]) == 6  # three lengths from two files: the fit ran
    assert dp.head_budget_blocks(prof, 131072).shape == (32, 32)
    with pytest.raises(KeyError, match="available: measured-syn-gamma0.95, paper-llama8b-gamma0.95"):
        dp.load_profile("nope", out)
    other = {**long, "model": {"name": "Other-2B"}}
    Path(paths[1]).write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="different models"):
        dp.main(["--measured", *paths, "--out", str(out)])


def test_paper_target_out_of_reach_is_an_error():
    doc, *_ = _synthetic_measured()
    prof = dp.map_profile(dp.fit_measured(doc, 0.95), 4, 4)
    with pytest.raises(ValueError, match="outside what the profile reaches"):
        dp.calibrate_scale(prof, 0.01, [4096])  # the minimum budget alone keeps half of 4K


# ---- measure_budgets.py on a tiny random Llama ------------------------------------------------

transformers = pytest.importorskip("transformers")
from benchmarks.profiles import measure_budgets as mb  # noqa: E402


class _CharTokenizer:
    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [2 + (ord(c) % 200) for c in text]}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture()
def essays(tmp_path):
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_text(("essay %d about startups and cities. " % i) * 60)
    return str(tmp_path)


def test_measure_tiny_model(tiny_model, essays):
    overrides = {**mb.OVERRIDES, "min_budget_tokens": 128}
    res = mb.measure(tiny_model, _CharTokenizer(), [1024], [0.95, 0.5], chunk=384, samples=1, seed=0,
                     essay_dir=essays, log=lambda *_: None, overrides=overrides)
    e95, e50 = res["len1024_gamma0.95"], res["len1024_gamma0.5"]
    assert e95["num_chunks"] == 3
    for e in (e95, e50):
        for key in ("density", "density_last_chunk", "gamma_fraction_last_chunk"):
            m = torch.tensor(e[key])
            assert m.shape == (2, 4) and bool((m > 0).all()) and bool((m <= 1).all())
    # A lower gamma never needs more blocks.
    assert bool((torch.tensor(e50["gamma_fraction_last_chunk"]) <= torch.tensor(e95["gamma_fraction_last_chunk"])).all())
    assert bool((torch.tensor(e50["density"]) <= torch.tensor(e95["density"]) + 1e-12).all())


@pytest.mark.parametrize("ctx,q_len,min_sparse_len", [(0, 1000, 0), (384, 500, 0), (256, 300, 4096)])
def test_chunk_selections_match_reference(ctx, q_len, min_sparse_len):
    """Sharing the proxy scores across gammas gives each gamma exactly the reference's selection."""
    from proxyattn_kernels.reference import reference_selection

    torch.manual_seed(ctx + q_len)
    q, k = torch.randn(q_len, 4, 16), torch.randn(ctx + q_len, 2, 16)
    overrides = {**mb.OVERRIDES, "min_budget_tokens": 128, "min_sparse_len": min_sparse_len}
    params = {g: mb.default_params(4, 2, g, overrides) for g in (0.5, 0.9, 0.99)}
    got = mb.chunk_selections(q, k, ctx, params, 0.25)
    for g, p in params.items():
        ref = reference_selection(q, k, ctx=ctx, params=p, scale=0.25)
        assert torch.equal(got[g].counts, ref.counts) and torch.equal(got[g].ranking, ref.ranking)
        assert torch.equal(got[g].budget, ref.budget) and torch.equal(got[g].gamma_counts, ref.gamma_counts)
        assert got[g].dense_reason == ref.dense_reason
    # Sparse chunks: the gammas do select differently; a chunk below min_sparse_len runs dense.
    assert torch.equal(got[0.5].counts, got[0.99].counts) == (ctx + q_len < min_sparse_len)


def test_layer_counts_chunks_cover_causal_map():
    """Block-aligned chunks add up to the whole causal block map, and one chunk reproduces the
    selection's own density."""
    from proxyattn_kernels.reference import reference_selection

    torch.manual_seed(1)
    q, k = torch.randn(1000, 4, 16), torch.randn(1000, 2, 16)
    params = {0.9: mb.default_params(4, 2, 0.9, {**mb.OVERRIDES, "min_budget_tokens": 128})}
    chunked = mb.layer_counts(q, k, params, 0.25, chunk=256)[0.9]  # block-aligned: no row split
    nb = math.ceil(1000 / 128)
    assert chunked["causal"].tolist() == [nb * (nb + 1) // 2] * 4
    whole = mb.layer_counts(q, k, params, 0.25, chunk=1000)[0.9]
    sel = reference_selection(q, k, ctx=0, params=params[0.9], scale=0.25)
    assert float(whole["selected"].sum() / whole["causal"].sum()) == pytest.approx(sel.density)
    assert whole["gamma_counts"].tolist() == sel.gamma_counts.tolist()


def test_capture_leaves_outputs_and_settings(tiny_model):
    ids = torch.randint(0, 256, (1, 300))
    with torch.inference_mode():
        before = tiny_model.model(input_ids=ids).last_hidden_state
        rec = mb.Recorder([0.95], chunk=128, overrides={**mb.OVERRIDES, "min_budget_tokens": 128})
        with mb.capture_attention(tiny_model, rec):
            during = tiny_model.model(input_ids=ids).last_hidden_state
        after = tiny_model.model(input_ids=ids).last_hidden_state
    assert sorted(rec.layers) == [0, 1]
    torch.testing.assert_close(during, before)
    torch.testing.assert_close(after, before)
    assert tiny_model.config._attn_implementation != mb.CAPTURE_NAME


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exc:
        mb.parse_args(["--help"])
    assert exc.value.code == 0 and "--lengths" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        mb.parse_args(["--model-dir", "x", "--out", "y", "--gammas", "1.5"])


def test_dumps_round_trips_with_one_line_per_row():
    import json

    doc = {"t": [[0.5, -1e-05, 3], [2, 1.25e+20, 0]], "e": [], "s": ["a, b", "[1]"], "n": {"x": [1]}}
    text = mb.dumps(doc)
    assert json.loads(text) == doc
    assert "[0.5, -1e-05, 3]" in text and "[2, 1.25e+20, 0]" in text
