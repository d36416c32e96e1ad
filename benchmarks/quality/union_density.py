"""Union vs exact density of ProxyAttn's selection on a real model (CPU): how much more does the
FA3 union path (``sparse_kernel: "fa3"``) compute than the per-head Triton kernel?

The Triton kernel computes, per query head and query-block row, exactly the blocks that head
selected: its density is ``selected blocks / (causal blocks x heads)`` (the selection's
``density``). The FA3 path computes, per row, the union over all heads (and proxy groups) of the
selected blocks, for every head (``proxyattn_kernels/block_sparse_attn/union_pages.py``,
``union_block_mask``): its density is ``union blocks per row x heads / (causal blocks x heads)``.
Their ratio is the extra work of the union path; it pays off where the union path's speed per
computed block beats the Triton kernel's by more than that ratio.

The model runs with its attention replaced by ``sparse_sim``'s hook (the torch reference's
selection, row-by-row masked softmax), prompts are ``sparse_sim``'s (the quality runner's essay
haystack tasks), the prefill runs in chunks of ``--chunk`` tokens (vLLM's
``max_num_batched_tokens``) over a KV cache, and every (layer, chunk) selection is counted.

Example (transformers installed; 2 CPU cores; result: benchmarks/results/union_density_cpu.json)::

    python benchmarks/quality/union_density.py \\
        --model-dir /tmp/sim/smollm2_hf --lengths 4096,8192 --samples 4 --gammas 0.95,0.90
"""
from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality import sparse_sim  # noqa: E402
from proxyattn_kernels.params import ChunkGeometry  # noqa: E402

DEFAULT_OUT = "benchmarks/results/union_density_cpu.json"
#: On top of ``sparse_sim.QUALITY_CONFIG``: the product default's dense final row.
CONFIG = {"dense_tail_tokens": 128}


def block_counts(mask: torch.Tensor, geo: ChunkGeometry) -> dict:
    """One chunk's selection ``mask [Hq, R, Kb]`` (bool) -> block counts, summed over heads and rows.

    ``exact``: the blocks each head selected (what the per-head kernel computes); ``union``: per
    row, the blocks any head selected, counted once per head (what the union path computes);
    ``causal``: causal blocks x heads (what a dense kernel computes).
    """
    num_heads, rows, _ = mask.shape
    assert rows == geo.num_q_blocks, (mask.shape, geo)
    extents = geo.first_q_block + 1 + torch.arange(rows)
    return {
        "exact": int(mask.sum()),
        "union": int(mask.any(dim=0).sum()) * num_heads,
        "causal": int(extents.sum()) * num_heads,
    }


def densities(counts: dict) -> dict:
    exact = counts["exact"] / counts["causal"]
    union = counts["union"] / counts["causal"]
    return {"exact_density": exact, "union_density": union, "ratio": union / exact}


def add(total: dict, counts: dict) -> None:
    for k, v in counts.items():
        total[k] = total.get(k, 0) + v


@torch.inference_mode()
def chunked_prefill(model, ids: list[int], chunk: int, num_heads: int, block_size: int) -> list[dict]:
    """Prefill ``ids`` in chunks of ``chunk`` tokens with the sim attention active; per layer the
    block counts summed over chunks (a layer the hook did not record, a dense layer, counts every
    causal block)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    per_layer = [{} for _ in range(model.config.num_hidden_layers)]
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        sparse_sim.STATE.records = {}
        model(input_ids=torch.tensor([piece]), **{name: cache}, use_cache=True, logits_to_keep=1)
        geo = ChunkGeometry(start, len(piece), block_size)
        for layer, total in enumerate(per_layer):
            rec = sparse_sim.STATE.records.get(layer)
            if rec is None:
                full = torch.ones(num_heads, geo.num_q_blocks, geo.num_k_blocks, dtype=torch.bool)
                mask = full & (torch.arange(geo.num_k_blocks)[None, :] <= geo.first_q_block
                               + torch.arange(geo.num_q_blocks)[:, None])[None]
            else:
                mask = rec["mask"]
            add(total, block_counts(mask, geo))
    sparse_sim.STATE.records = {}
    return per_layer


def _r(x, d=5):
    return None if x is None else round(x, d)


def summarize(samples: list[dict], num_layers: int) -> dict:
    """Per layer and overall: block-weighted densities over the samples, and the per-sample spread."""
    per_layer = []
    for layer in range(num_layers):
        tot = {}
        for s in samples:
            add(tot, s["layers"][layer])
        d = densities(tot)
        ratios = [densities(s["layers"][layer])["ratio"] for s in samples]
        per_layer.append({"layer": layer, **{k: _r(v) for k, v in d.items()},
                          "ratio_min": _r(min(ratios)), "ratio_max": _r(max(ratios))})
    tot = {}
    for s in samples:
        add(tot, s["total"])
    overall = {k: _r(v) for k, v in densities(tot).items()}
    per_sample = [densities(s["total"]) for s in samples]
    spread = {}
    for key in ("exact_density", "union_density", "ratio"):
        vals = [p[key] for p in per_sample]
        spread[key] = {"mean": _r(statistics.mean(vals)), "std": _r(statistics.pstdev(vals)),
                       "min": _r(min(vals)), "max": _r(max(vals))}
    layer_ratios = [x["ratio"] for x in per_layer]
    return {"n": len(samples), "overall": overall, "per_sample_spread": spread,
            "layer_ratio_range": [min(layer_ratios), max(layer_ratios)],
            "per_layer": per_layer}


def print_table(doc: dict) -> None:
    print(f"\nmodel {doc['model']['name']}: union density / exact density (block-weighted over layers, chunks, prompts)")
    print(f"{'length':>7} {'gamma':>6} {'n':>3} {'exact':>7} {'union':>7} {'ratio':>6} {'ratio/prompt (min-max)':>23} "
          f"{'layer ratio range':>18} {'s/prefill':>9}")
    for key, e in doc["results"].items():
        o, sp = e["overall"], e["per_sample_spread"]["ratio"]
        lo, hi = e["layer_ratio_range"]
        print(f"{e['length']:>7} {e['gamma']:>6} {e['n']:>3} {o['exact_density']:>7.3f} {o['union_density']:>7.3f} "
              f"{o['ratio']:>6.3f} {sp['min']:>11.3f}-{sp['max']:<11.3f} {lo:>8.3f}-{hi:<9.3f} {e['seconds_per_prefill']:>9.1f}")
    for key, e in doc["results"].items():
        print(f"\n{key}: per layer exact / union / ratio")
        print("  " + "  ".join(f"L{x['layer']}:{x['exact_density']:.2f}/{x['union_density']:.2f}/{x['ratio']:.2f}"
                               for x in e["per_layer"]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sparse_sim.add_common_args(p, gguf_default=None)
    p.add_argument("--model-name", default=None, help="name of the model in the JSON (default: the folder's name)")
    p.add_argument("--lengths", default="4096,8192", help="comma list of prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--gammas", default="0.95,0.90", help="comma list of gamma values (default: %(default)s)")
    p.add_argument("--samples", type=int, default=4, help="prompts per length (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (vLLM max_num_batched_tokens)")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    import transformers

    model, _, model_dir, log = sparse_sim.start(args, "union")
    cfg = model.config
    num_heads, num_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    gammas = [float(g) for g in args.gammas.split(",")]
    lengths = [int(x) for x in args.lengths.split(",")]
    variants = {g: sparse_sim.Variant(f"gamma{g}", config={**CONFIG, "gamma": g}) for g in gammas}
    base_cfg = sparse_sim.proxyattn_config(variants[gammas[0]])
    params = base_cfg.kernel_params(num_heads, num_kv)
    log(f"model {model_dir}: {cfg.num_hidden_layers} layers, {num_heads} q / {num_kv} kv heads, "
        f"{params.num_groups} proxy groups; threads {torch.get_num_threads()}")
    doc = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "about": __doc__.split("\n\n")[0],
        "model": {"name": args.model_name or Path(model_dir).name, "hf_dir": str(model_dir),
                  "layers": cfg.num_hidden_layers, "q_heads": num_heads, "kv_heads": num_kv,
                  "proxy_groups": params.num_groups, "dtype": "float32", "device": "cpu"},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config": {
            "proxyattn": base_cfg.to_dict(), "gammas": gammas,
            "resolved_params": {k: getattr(params, k) for k in type(params).__dataclass_fields__},
            "task": args.task, "seed": args.seed, "essay_dir": args.essay_dir, "chunk_tokens": args.chunk,
            "exact_density": "selected blocks summed over heads, rows, chunks / (causal blocks x heads)",
            "union_density": "per row the union over heads of the selected blocks, counted once per head, "
                             "/ (causal blocks x heads) (what the fa3 union path computes)",
            "weighting": "overall and per-layer values are block-weighted sums over chunks and prompts; "
                         "per_sample_spread is over prompts (each prompt's all-layer ratio)",
        },
        "results": {},
    }
    out_path = Path(args.out)

    def save():
        # One file for several models: {"about", "models": {name: doc}}; other models' entries stay.
        out_path.parent.mkdir(parents=True, exist_ok=True)
        whole = json.loads(out_path.read_text()) if out_path.exists() else {}
        whole = {"about": doc["about"], "models": {**whole.get("models", {}), doc["model"]["name"]: doc}}
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(whole, indent=1))
        tmp.replace(out_path)

    stop = False
    for length in lengths:
        ev = argparse.Namespace(task=args.task, seed=args.seed, essay_dir=args.essay_dir)
        samples, _ = sparse_sim.make_samples(str(model_dir), length, args.samples, ev)
        log(f"{len(samples)} {args.task} prompts of {length} tokens")
        runs = {g: [] for g in gammas}
        seconds = {g: [] for g in gammas}
        for i, sample in enumerate(samples):
            if args.time_budget_min is not None and time.time() - t_start > 60 * args.time_budget_min:
                log("time budget reached")
                stop = True
                break
            ids = sample.prompt_token_ids
            for g in gammas:
                sparse_sim.STATE.set(variants[g])
                t0 = time.time()
                layers = chunked_prefill(model, ids, args.chunk, num_heads, params.block_size)
                seconds[g].append(time.time() - t0)
                total = {}
                for x in layers:
                    add(total, x)
                runs[g].append({"index": sample.index, "tokens": len(ids), "layers": layers, "total": total})
                d = densities(total)
                log(f"len {length} prompt {i + 1}/{len(samples)} ({len(ids)} tok) gamma {g}: exact "
                    f"{d['exact_density']:.3f} union {d['union_density']:.3f} ratio {d['ratio']:.3f} "
                    f"({seconds[g][-1]:.1f}s)")
            for g in gammas:
                if runs[g]:
                    entry = {"length": length, "gamma": g, **summarize(runs[g], cfg.num_hidden_layers),
                             "tokens": [r["tokens"] for r in runs[g]],
                             "seconds_per_prefill": _r(statistics.mean(seconds[g]), 1),
                             "per_sample": [{"index": r["index"], "tokens": r["tokens"],
                                             **{k: _r(v) for k, v in densities(r["total"]).items()}}
                                            for r in runs[g]]}
                    doc["results"][f"len{length}_gamma{g}"] = entry
            doc["elapsed_s"] = round(time.time() - t_start, 1)
            save()
        sparse_sim.STATE.set(None)
        if stop:
            break
    doc["elapsed_s"] = round(time.time() - t_start, 1)
    save()
    print_table(doc)
    print(f"\nresults: {out_path}")
    return doc


if __name__ == "__main__":
    main()
