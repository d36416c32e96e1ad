"""RULER results documents (``ruler.py``'s JSON): averages, the table, the comparison against
dense, the score-density plot, and joining the parts of a run split over processes or hosts.

    python benchmarks/quality/ruler.py --plot-only results.json
    python benchmarks/quality/ruler.py --merge part_a.json part_b.json --out results.json [--plot]

A document holds ``cells``: one per configuration label, length and task, with the mean score
(0-100), the number of samples ``n``, the density the sparse prefill used and (newer runs) each
sample's score, ``per_sample``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

#: Keys of ``config`` that must agree for parts to be joined: the same prompts and scoring.
SAME_PROMPTS = ("model", "tokenizer", "samples", "seed", "template", "max_tokens_cap", "sentence_splitter")
#: Targets of the comparison with dense (RULER points, 0-100).
MAX_AVERAGE_DROP = 1.0
MAX_CELL_DROP = 5.0
#: How a configuration label names a KV-cache dtype other than the model's (``--kv-cache-dtype``).
KV_TAG = " kv="


def with_kv_dtype(label: str, kv_cache_dtype: str) -> str:
    """``label`` of an engine whose KV cache is ``kv_cache_dtype`` ("auto": the label as is)."""
    return label if kv_cache_dtype == "auto" else f"{label}{KV_TAG}{kv_cache_dtype}"


def averages(doc) -> list[dict]:
    """Per configuration and length: the mean score over its tasks and the mean density."""
    rows = []
    keys = dict.fromkeys((c["label"], c["length"]) for c in doc["cells"])
    for label, length in keys:
        cells = [c for c in doc["cells"] if (c["label"], c["length"]) == (label, length)]
        densities = [c["density"] for c in cells if c["density"] is not None]
        rows.append({"label": label, "backend": cells[0]["backend"], "length": length, "tasks": len(cells),
                     "score": round(sum(c["score"] for c in cells) / len(cells), 2),
                     "density": round(sum(densities) / len(densities), 4) if densities else None})
    return rows


def table(doc) -> str:
    """Scores per configuration and length (rows) and task (columns), average and density last."""
    tasks = list(dict.fromkeys(c["task"] for c in doc["cells"]))
    short = {t: t.replace("niah_", "").replace("single", "s").replace("multikey", "mk")
             .replace("multivalue", "mv").replace("multiquery", "mq") for t in tasks}
    width = max([len("config")] + [len(c["label"]) for c in doc["cells"]])
    head = f"{'config':<{width}} {'length':>6} " + " ".join(f"{short[t]:>6}" for t in tasks) + f" {'avg':>6} {'density':>7}"
    lines = [f"RULER scores (0-100), {doc.get('device', '')}, {doc.get('date', '')[:10]}", head]
    rows = averages(doc)
    for row in rows:
        scores = []
        for t in tasks:
            cell = next((c for c in doc["cells"] if (c["label"], c["length"], c["task"]) == (row["label"], row["length"], t)), None)
            scores.append(f"{cell['score']:>6.1f}" if cell else f"{'-':>6}")
        density = "-" if row["density"] is None else f"{row['density']:.3f}"
        lines.append(f"{row['label']:<{width}} {row['length']:>6} " + " ".join(scores) + f" {row['score']:>6.1f} {density:>7}")
    partial = partial_rows(rows)
    if partial:
        lines.append("avg of a row with fewer tasks than its length's others is over its own tasks only: "
                     + describe_partial(partial))
    return "\n".join(lines)


def partial_rows(rows: list[dict]) -> list[dict]:
    """The rows of :func:`averages` that ran fewer tasks than the most any row ran at their length
    (their average is not comparable with the others'), each with ``of``: that most."""
    most = {}
    for r in rows:
        most[r["length"]] = max(most.get(r["length"], 0), r["tasks"])
    return [{**r, "of": most[r["length"]]} for r in rows if r["tasks"] < most[r["length"]]]


def describe_partial(partial: list[dict]) -> str:
    """:func:`partial_rows` as one line: ``LABEL LENGTH (TASKS of MOST); ...``."""
    return "; ".join(f"{r['label']} {r['length']} ({r['tasks']} of {r['of']})" for r in partial)


def point_label(doc, label: str) -> str:
    """A plot point's short name: the gamma of a proxyattn configuration, else its label (with
    the KV-cache dtype when the label names one)."""
    gamma = next((c["gamma"] for c in doc["cells"] if c["label"] == label), None)
    if gamma is None:
        return label
    kv = label.partition(KV_TAG)[2]
    return f"g={gamma:g}" + (f" {kv}" if kv else "")


def plot(doc, png: Path) -> None:
    """Average score against density, one line per length and KV-cache dtype (dense at density
    1.0). Rows with fewer tasks than others at their length are left out (their average is over
    other tasks), and named on stdout."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit(f"--plot needs matplotlib: pip install matplotlib ({exc})") from exc
    rows = averages(doc)
    partial = partial_rows(rows)
    if partial:
        print("[ruler] plot leaves out rows with fewer tasks: " + describe_partial(partial))
    skipped = {(r["label"], r["length"]) for r in partial}
    rows = [r for r in rows if (r["label"], r["length"]) not in skipped]
    series = dict.fromkeys((r["length"], r["label"].partition(KV_TAG)[2]) for r in rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for length, kv in sorted(series):
        # Dense engines have no density: they compute every block. A server without
        # --server-stats has none either and is left out.
        points = sorted((1.0 if r["density"] is None else r["density"], r["score"], r["label"])
                        for r in rows if r["length"] == length and r["label"].partition(KV_TAG)[2] == kv
                        and (r["density"] is not None or r["backend"] not in ("proxyattn", "server")))
        if not points:
            continue
        name = f"{length // 1024}K" if length % 1024 == 0 else str(length)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if not kv else "s",
                linestyle="-" if not kv else "--", label=name + (f" kv={kv}" if kv else ""))
        for x, y, label in points:
            ax.annotate(point_label(doc, label), (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("mean selection density (dense = 1.0)")
    ax.set_ylabel("RULER average score")
    ax.set_title(f"RULER: score against density ({doc.get('device', '')}, {doc.get('date', '')[:10]})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(title="length")
    fig.savefig(png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"[ruler] plot: {png}")


def paired_counts(cell: dict, reference: dict) -> dict | None:
    """``cell`` against ``reference`` prompt by prompt (their ``per_sample`` scores, matched by
    sample index; both configurations ran the same prompts): ``worse`` / ``better``, the prompts
    that scored lower / higher than the reference, and ``p``, the two-sided exact sign test over
    those (ties dropped): how often a split at least this uneven comes from a configuration that
    answers like the reference with flips both ways equally likely. None where either cell has
    no per-sample scores (older runs)."""
    ours, theirs = (dict(map(tuple, c.get("per_sample") or ())) for c in (cell, reference))
    common = ours.keys() & theirs.keys()
    if not common:
        return None
    worse = sum(ours[i] < theirs[i] for i in common)
    better = sum(ours[i] > theirs[i] for i in common)
    return {"worse": worse, "better": better, "p": round(sign_test_p(worse, better), 4)}


def sign_test_p(worse: int, better: int) -> float:
    """Two-sided exact sign-test p-value of ``worse`` against ``better`` paired outcomes."""
    n = worse + better
    tail = sum(math.comb(n, k) for k in range(min(worse, better) + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(doc, reference: str = "dense", labels=None) -> list[dict]:
    """Per configuration other than ``reference`` (or only those in ``labels``) and length: the
    average score minus the reference's over the tasks both ran, the worst task's difference, and
    whether both stay within :data:`MAX_AVERAGE_DROP` / :data:`MAX_CELL_DROP`, and ``sample_points``:
    what one sample weighs in the worst task (100 / the fewer samples of its two cells), the
    resolution a task's difference has, and ``worst_pairs``: :func:`paired_counts` of the worst
    task (None without per-sample scores). Empty without reference cells."""
    ref = {(c["length"], c["task"]): c for c in doc["cells"] if c["label"] == reference}
    rows = []
    for row in averages(doc):
        if row["label"] == reference or (labels is not None and row["label"] not in labels):
            continue
        cells = [c for c in doc["cells"] if (c["label"], c["length"]) == (row["label"], row["length"])
                 and (c["length"], c["task"]) in ref]
        if not cells:
            continue
        deltas = {c["task"]: c["score"] - ref[(c["length"], c["task"])]["score"] for c in cells}
        worst = min(deltas, key=deltas.get)
        worst_cell = next(c for c in cells if c["task"] == worst)
        worst_ref = ref[(row["length"], worst)]
        worst_n = min(worst_cell["n"], worst_ref["n"])
        average = sum(deltas.values()) / len(deltas)
        rows.append({"label": row["label"], "length": row["length"], "density": row["density"],
                     "average_delta": round(average, 2), "worst_task": worst, "worst_delta": round(deltas[worst], 2),
                     "sample_points": round(100 / worst_n, 2) if worst_n else None,
                     "worst_pairs": paired_counts(worst_cell, worst_ref),
                     "within_targets": average >= -MAX_AVERAGE_DROP and deltas[worst] >= -MAX_CELL_DROP})
    return rows


def comparison_table(doc, reference: str = "dense", labels=None) -> str:
    rows = compare(doc, reference, labels)
    if not rows:
        return ""
    width = max(len("config"), *(len(r["label"]) for r in rows))
    lines = [f"against {reference} (targets: average >= -{MAX_AVERAGE_DROP:g}, every task >= -{MAX_CELL_DROP:g} points)",
             f"{'config':<{width}} {'length':>6} {'density':>7} {'avg diff':>8} {'worst task':>16} {'diff':>6} "
             f"{'1 sample':>8} {'worse/better':>12} {'p':>6}  verdict"]
    for r in rows:
        density = "-" if r["density"] is None else f"{r['density']:.3f}"
        sample = "-" if r["sample_points"] is None else f"{r['sample_points']:.1f}"
        pairs = r.get("worst_pairs")
        split, p = ("-", "-") if pairs is None else (f"{pairs['worse']}/{pairs['better']}", f"{pairs['p']:.3f}")
        lines.append(f"{r['label']:<{width}} {r['length']:>6} {density:>7} {r['average_delta']:>+8.2f} "
                     f"{r['worst_task']:>16} {r['worst_delta']:>+6.1f} {sample:>8} {split:>12} {p:>6}  "
                     f"{'within' if r['within_targets'] else 'MISSED'}")
    if any(r.get("worst_pairs") for r in rows):
        lines.append("worse/better: the worst task's prompts that scored below / above the reference on the "
                     "same prompt; p: two-sided exact sign test over them (small p: not a chance split)")
    return "\n".join(lines)


def merge(paths: list[Path]) -> dict:
    """One document from the parts of a run (each a ``ruler.py`` JSON): their cells, errors and
    commands. Parts must have built the same prompts (:data:`SAME_PROMPTS`); a configuration may
    come from several parts (e.g. a run stopped early, then the other tasks with ``--tasks``), but
    each of its task-length cells from one only."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    if not docs:
        raise SystemExit("--merge: give the result files of the parts")
    first = docs[0]
    for path, doc in zip(paths[1:], docs[1:]):
        for key in SAME_PROMPTS:
            if doc["config"].get(key) != first["config"].get(key):
                raise SystemExit(f"--merge: {path} has {key}={doc['config'].get(key)!r}, {paths[0]} "
                                 f"{first['config'].get(key)!r}: the parts must share their prompts")
    owner: dict = {}
    for path, doc in zip(paths, docs):
        for cell in doc["cells"]:
            key = (cell["label"], cell["length"], cell["task"])
            if owner.setdefault(key, path) != path:
                raise SystemExit(f"--merge: {cell['label']!r} {cell['task']} at {cell['length']} is in both "
                                 f"{owner[key]} and {path}")
    merged = {key: value for key, value in first.items() if key not in ("cells", "errors", "command")}
    merged["config"] = dict(first["config"])
    merged["config"]["lengths"] = sorted({n for d in docs for n in d["config"]["lengths"]})
    backends = {b["label"]: b for d in docs for b in d["config"].get("backends", [])}
    merged["config"]["backends"] = list(backends.values())
    # Engine settings may differ between parts (e.g. --kv-cache-dtype): each part keeps its own.
    merged["config"].pop("engine", None)
    merged["parts"] = [{"file": Path(p).name, "date": d.get("date"), "device": d.get("device"),
                        "command": d.get("command"), "engine": d["config"].get("engine")}
                       for p, d in zip(paths, docs)]
    merged["cells"] = [c for d in docs for c in d["cells"]]
    merged["errors"] = [e for d in docs for e in d.get("errors", [])]
    return merged


def kv_dtype_tables(doc) -> list[str]:
    """For each configuration run with another KV-cache dtype (label ``X kv=DTYPE``): the
    comparison with its twin ``X`` (what the KV dtype costs this configuration) and, for a
    sparse one, with ``dense kv=DTYPE`` where that ran (what sparsity costs on that cache). Dense
    on another cache against dense is left to ``comparison_table(doc)``, which has it."""
    labels = list(dict.fromkeys(c["label"] for c in doc["cells"]))
    tables = []
    for label in labels:
        twin, tag, dtype = label.partition(KV_TAG)
        if not tag:
            continue
        dense_same_cache = f"dense{KV_TAG}{dtype}"
        for reference in (twin, dense_same_cache):
            if reference in labels and reference not in (label, "dense"):
                tables.append(comparison_table(doc, reference=reference, labels=[label]))
    return [t for t in tables if t]
