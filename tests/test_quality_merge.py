"""Quality results bookkeeping on CPU: merging the parts of a cut-short run, the summary against
the quality targets, and the ``--variant`` engines of run_eval.py."""
from __future__ import annotations

import json

import pytest

from benchmarks.quality import merge, run_eval


def _cell(model, label, gamma, task, length, accuracy, density=None):
    return {"model": model, "task": task, "length": length, "backend": "x", "label": label,
            "gamma": gamma, "accuracy": accuracy, "n": 50, "density": density}


def _part(cells, fidelity=(), date="2026-11-29T06:00:00+00:00", command="run A"):
    return {"gpu": "NVIDIA H200", "date": date, "command": command, "models": {"m": {"path": "/m"}},
            "config": {"backends": [{"label": c["label"]} for c in cells]}, "cells": list(cells),
            "fidelity": list(fidelity), "layer_stats": [], "timings": [{"what": "t", "seconds": 1.0}]}


def test_merge_keeps_first_of_repeats_and_reports_disagreement():
    first = _part([_cell("m", "dense", None, "t1", 4096, 0.5), _cell("m", "proxyattn-0.95", 0.95, "t1", 4096, 0.4, 0.5)])
    second = _part([_cell("m", "dense", None, "t1", 4096, 0.5), _cell("m", "dense", None, "t2", 4096, 0.7),
                    _cell("m", "proxyattn-0.95", 0.95, "t1", 4096, 0.3, 0.5)],
                   date="2026-11-29T07:00:00+00:00", command="run B")
    doc = merge.merge([first, second], ["a.json", "b.json"])
    keyed = {(c["label"], c["task"]): c["accuracy"] for c in doc["cells"]}
    assert keyed == {("dense", "t1"): 0.5, ("proxyattn-0.95", "t1"): 0.4, ("dense", "t2"): 0.7}
    assert [(r["key"]["label"], r["agrees"]) for r in doc["repeats"]] == [("dense", True), ("proxyattn-0.95", False)]
    assert doc["repeats"][1]["accuracy"] == [0.4, 0.3]
    assert doc["date"] == "2026-11-29T07:00:00+00:00"
    assert [p["command"] for p in doc["parts"]] == ["run A", "run B"]
    assert [t["part"] for t in doc["timings"]] == ["a.json", "b.json"]


def test_merge_refuses_parts_from_different_gpus():
    other = {**_part([]), "gpu": "cpu (x86_64)"}
    with pytest.raises(ValueError, match="different GPUs"):
        merge.merge([_part([]), other], ["a", "b"])


def test_summary_numbers_against_dense():
    cells = [
        _cell("m", "dense", None, "t1", 4096, 1.0), _cell("m", "dense", None, "t2", 4096, 0.5),
        _cell("m", "dense", None, "t1", 8192, 0.8),
        _cell("m", "g", 0.95, "t1", 4096, 0.9, 0.6), _cell("m", "g", 0.95, "t2", 4096, 0.6, 0.6),
        _cell("m", "g", 0.95, "t1", 8192, 0.5, 0.4),
    ]
    fidelity = [{"model": "m", "label": "g", "length": 2048, "density": 1.0, "kept_mass": 1.0},
                {"model": "m", "label": "g", "length": 4096, "density": 0.6, "kept_mass": 0.9},
                {"model": "m", "label": "g", "length": 8192, "density": 0.4, "kept_mass": 0.8}]
    (row,) = run_eval.summarize({"cells": cells, "fidelity": fidelity})
    assert row["dense_mean"] == pytest.approx(100 * 2.3 / 3)
    assert row["sparse_mean"] == pytest.approx(100 * 2.0 / 3)
    assert row["mean_drop"] == pytest.approx(10.0)
    assert row["worst_drop"] == pytest.approx(30.0) and row["worst_cell"] == "t1 @ 8192"
    assert row["density"] == pytest.approx(1.6 / 3)
    assert row["kept_mass"] == pytest.approx(0.85)  # the full-density 2048 row is left out


def test_merge_command_line_writes_json(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_part([_cell("m", "dense", None, "t1", 4096, 0.5)])))
    b.write_text(json.dumps(_part([_cell("m", "g", 0.95, "t1", 4096, 0.25, 0.3)])))
    doc = merge.main([str(a), str(b), "--out", str(tmp_path / "m.json"), "--no-plot"])
    assert json.loads((tmp_path / "m.json").read_text())["summary"] == doc["summary"]
    assert doc["summary"][0]["mean_drop"] == pytest.approx(25.0)
    assert "merged 2 parts" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="cannot read"):
        merge.main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.json")])


def test_variants_add_labelled_engines():
    args = run_eval.parse_args(["--models", "m=/m", "--gammas", "0.95", "--proxyattn-config", '{"stride": 8}',
                                "--variant", 'dl0={"dense_layers": [0]}', "--variant", 'g9dl0={"gamma": 0.9, "dense_layers": [0]}'])
    configs = run_eval.engine_configs(args, on_cuda=True)
    assert [c["label"] for c in configs] == ["dense", "proxyattn-0.95", "dl0", "g9dl0"]
    assert configs[2]["proxyattn"] == {"stride": 8, "gamma": 0.95, "min_sparse_len": 1024, "dense_layers": [0]}
    assert configs[3]["gamma"] == 0.9


@pytest.mark.parametrize("spec, message", [
    ("nolabel", "LABEL=JSON"),
    ("x={bad", "not JSON"),
    ("x=[1]", "JSON object"),
    ("proxyattn-0.95={}", "must differ"),
])
def test_variant_errors_are_clear(spec, message):
    args = run_eval.parse_args(["--models", "m=/m", "--gammas", "0.95", "--variant", spec])
    with pytest.raises(SystemExit, match=message):
        run_eval.engine_configs(args, on_cuda=True)


def test_relabel_renames_one_part_before_the_join(tmp_path):
    old = _part([_cell("m", "dense", None, "t1", 4096, 0.5), _cell("m", "proxyattn-0.95", 0.95, "t1", 4096, 0.2, 0.5)],
                fidelity=[{"model": "m", "label": "proxyattn-0.95", "length": 4096, "top1_agreement": 0.9,
                           "mean_kl": 0.1, "density": 0.5, "kept_mass": 0.9}])
    new = _part([_cell("m", "proxyattn-0.95", 0.95, "t1", 4096, 0.4, 0.6)], date="2026-11-30T00:00:00+00:00")
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    doc = merge.main([str(tmp_path / "new.json"), str(tmp_path / "old.json"), "--out", str(tmp_path / "m.json"),
                      "--no-plot", "--relabel", "old.json:proxyattn-0.95=notail-0.95"])
    keyed = {c["label"]: c["accuracy"] for c in doc["cells"]}
    assert keyed == {"proxyattn-0.95": 0.4, "notail-0.95": 0.2, "dense": 0.5}
    assert not doc["repeats"]  # renamed rows are not repeats of the new configuration
    assert doc["fidelity"][0]["label"] == "notail-0.95"
    assert doc["parts"][1]["relabeled"] == {"proxyattn-0.95": "notail-0.95"} and "relabeled" not in doc["parts"][0]
    assert {r["label"]: r["mean_drop"] for r in doc["summary"]} == pytest.approx({"proxyattn-0.95": 10.0, "notail-0.95": 30.0})
    with pytest.raises(SystemExit, match="no rows labelled 'gone'"):
        merge.main([str(tmp_path / "old.json"), "--out", str(tmp_path / "x.json"), "--relabel", "old.json:gone=x"])
    with pytest.raises(SystemExit, match="not one of the parts"):
        merge.main([str(tmp_path / "old.json"), "--out", str(tmp_path / "x.json"), "--relabel", "other.json:a=b"])
    with pytest.raises(SystemExit, match="PART:OLD=NEW"):
        merge.main([str(tmp_path / "old.json"), "--out", str(tmp_path / "x.json"), "--relabel", "old.json"])


def test_no_dense_runs_only_sparse_engines_and_keeps_kept_mass():
    args = run_eval.parse_args(["--models", "m=/m", "--gammas", "0.95", "--no-dense"])
    assert [c["label"] for c in run_eval.engine_configs(args, on_cuda=True)] == ["proxyattn-0.95"]
    with pytest.raises(SystemExit, match="nothing to run"):
        run_eval.engine_configs(run_eval.parse_args(["--models", "m=/m", "--gammas", "", "--no-dense"]), on_cuda=True)

    class _Logprobs:  # what fidelity.from_vllm returns, as far as add_fidelity reads it
        def __init__(self, n):
            self.token_logprobs = [0.0] * n

    results = type("R", (), {})()
    results.doc = {"fidelity": [], "layer_stats": [
        {"model": "m", "label": "proxyattn-0.95", "length": 64, "layer": 0, "density": 0.5, "kept_mass": 0.9},
        {"model": "m", "label": "proxyattn-0.95", "length": 64, "layer": 1, "density": 0.3, "kept_mass": None},
    ]}
    configs = run_eval.engine_configs(args, on_cuda=True)
    run_eval.add_fidelity(results, "m", configs, [(64, [1] * 64)], {"proxyattn-0.95": [_Logprobs(63)]})
    (row,) = results.doc["fidelity"]
    assert row["top1_agreement"] is None and row["mean_kl"] is None and row["positions"] == 63
    assert row["density"] == pytest.approx(0.4) and row["kept_mass"] == pytest.approx(0.9)


def test_sparse_rows_wait_for_their_dense_twin():
    """On CPU the sparse engines run first; their fidelity rows are written once dense ran."""
    args = run_eval.parse_args(["--models", "m=/m", "--gammas", "0.95"])
    configs = run_eval.engine_configs(args, on_cuda=False)
    results = type("R", (), {})()
    results.doc = {"fidelity": [], "layer_stats": []}
    run_eval.add_fidelity(results, "m", configs, [(64, [1] * 64)], {"proxyattn-0.95": [object()]})
    assert results.doc["fidelity"] == []


def test_a_merged_part_keeps_its_own_parts_and_repeats():
    inner = merge.merge([_part([_cell("m", "dense", None, "t1", 4096, 0.5)]),
                         _part([_cell("m", "dense", None, "t1", 4096, 0.5)], command="run B")], ["a.json", "b.json"])
    doc = merge.merge([_part([_cell("m", "g", 0.95, "t1", 4096, 0.4, 0.5)], command="run C"), inner], ["c.json", "ab.json"])
    assert [p["file"] for p in doc["parts"][1]["parts"]] == ["a.json", "b.json"]
    assert [(r["part"], r["agrees"]) for r in doc["repeats"]] == [("ab.json/b.json", True)]
