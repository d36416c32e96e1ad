"""Merge quality results of several ``run_eval.py`` runs into one document.

A quality run cut short (a time limit, a lost host), or split to fit the time a GPU is
available, is finished by further runs of the missing configurations; this joins the parts. Cells, fidelity rows and layer statistics are keyed
by (model, configuration, task/length/layer); a key seen twice keeps the first part's row, and
the JSON lists every repeat under ``repeats`` with whether the numbers agreed (a dense
configuration re-run with greedy decoding should agree exactly). ``parts`` records each input's
file, date and command.

    python benchmarks/quality/merge.py part1.json part2.json --out benchmarks/results/quality_h200.json

``--relabel PART:OLD=NEW`` renames one configuration of one part before the join, for a part
whose label means something else today (e.g. ``proxyattn-0.95`` measured before a default
changed, joined with a new ``proxyattn-0.95``); the rename is recorded under ``parts``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import run_eval  # noqa: E402

_KEYS = {
    "cells": ("model", "label", "task", "length"),
    "fidelity": ("model", "label", "length"),
    "layer_stats": ("model", "label", "length", "layer"),
}
_COMPARED = {"cells": ("accuracy", "n"), "fidelity": ("top1_agreement", "mean_kl"),
             "layer_stats": ("density", "kept_mass")}


def relabel(doc: dict, old: str, new: str) -> dict:
    """A copy of ``doc`` whose configuration ``old`` is called ``new`` (cells, fidelity, layer
    statistics, timings' text and the recorded backends)."""
    doc = json.loads(json.dumps(doc))
    found = False
    for field in _KEYS:
        for row in doc.get(field, []):
            if row.get("label") == old:
                row["label"], found = new, True
    for backend in doc.get("config", {}).get("backends", []):
        if backend.get("label") == old:
            backend["label"] = new
    for timing in doc.get("timings", []):
        timing["what"] = timing.get("what", "").replace(f" {old}", f" {new}")
    if not found:
        raise ValueError(f"--relabel: no rows labelled {old!r} in that part")
    doc.setdefault("relabeled", {})[old] = new
    return doc


def merge(docs: list[dict], names: list[str]) -> dict:
    """One document from ``docs`` (in order of precedence); ``names`` label them in ``parts``."""
    if not docs:
        raise ValueError("nothing to merge")
    out = {
        "gpu": docs[0].get("gpu"),
        "date": max(d.get("date", "") for d in docs),
        "command": [d.get("command") for d in docs],
        "parts": [{"file": n, "date": d.get("date"), "command": d.get("command"),
                   **({"relabeled": d["relabeled"]} if d.get("relabeled") else {}),
                   **({"parts": d["parts"]} if d.get("parts") else {})}  # a part that is itself a merge
                  for n, d in zip(names, docs)],
        "models": {},
        "config": json.loads(json.dumps(docs[0].get("config", {}))),
        "cells": [], "fidelity": [], "layer_stats": [], "timings": [], "errors": [], "repeats": [],
    }
    gpus = {d.get("gpu") for d in docs}
    if len(gpus) > 1:
        raise ValueError(f"parts come from different GPUs {sorted(map(str, gpus))}; merge only one machine's runs")
    backends = out["config"].setdefault("backends", [])
    for name, doc in zip(names, docs):
        for model, info in doc.get("models", {}).items():
            out["models"].setdefault(model, info)
        for backend in doc.get("config", {}).get("backends", []):
            if backend not in backends:
                backends.append(backend)
        for field, key_names in _KEYS.items():
            seen = {tuple(r.get(k) for k in key_names): r for r in out[field]}
            for row in doc.get(field, []):
                key = tuple(row.get(k) for k in key_names)
                if key in seen:
                    first = seen[key]
                    out["repeats"].append({
                        "field": field, "key": dict(zip(key_names, key)), "part": name,
                        "agrees": all(first.get(k) == row.get(k) for k in _COMPARED[field]),
                        **{k: [first.get(k), row.get(k)] for k in _COMPARED[field]},
                    })
                    continue
                seen[key] = row
                out[field].append(row)
        out["repeats"] += [{**r, "part": f"{name}/{r.get('part')}"} for r in doc.get("repeats", [])]
        out["timings"] += [{**t, "part": name} for t in doc.get("timings", [])]
        out["errors"] += [{**e, "part": name} for e in doc.get("errors", [])]
    out["summary"] = run_eval.summarize(out)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("parts", nargs="+", help="run_eval.py JSON files, first one wins on repeats")
    p.add_argument("--out", required=True, help="merged JSON (the heat map goes next to it)")
    p.add_argument("--relabel", action="append", default=[], metavar="PART:OLD=NEW",
                   help="rename configuration OLD of the part whose file name is PART (repeatable)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the heat map PNG")
    args = p.parse_args(argv)
    docs = []
    for path in args.parts:
        try:
            docs.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"cannot read quality results {path}: {exc}") from exc
    names = [Path(p).name for p in args.parts]
    for spec in args.relabel:
        part, sep1, rest = spec.rpartition(":")
        old, sep2, new = rest.partition("=")
        if not (sep1 and sep2 and part and old and new):
            raise SystemExit(f"--relabel must be PART:OLD=NEW (PART: a file name given); got {spec!r}")
        if part not in names:
            raise SystemExit(f"--relabel {spec!r}: {part!r} is not one of the parts {names}")
        i = names.index(part)
        try:
            docs[i] = relabel(docs[i], old, new)
        except ValueError as exc:
            raise SystemExit(f"{exc} ({part})") from exc
    doc = merge(docs, names)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    disagree = [r for r in doc["repeats"] if not r["agrees"]]
    print(f"[quality] merged {len(docs)} parts: {len(doc['cells'])} cells, {len(doc['repeats'])} repeated rows "
          f"({len(disagree)} disagree) -> {out}")
    if not args.no_plot:
        try:
            run_eval.plot(doc, out.with_suffix(".png"))
        except SystemExit as exc:
            print(f"[quality] {exc}")
    run_eval.print_tables(doc)
    return doc


if __name__ == "__main__":
    main()
