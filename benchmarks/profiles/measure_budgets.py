"""Per-layer, per-head block densities that ProxyAttn's selection gives a real model (CPU).

The model runs dense (Hugging Face transformers, SDPA) over essay text once per prompt length; a
wrapper around its attention function sees every layer's post-RoPE queries and keys and runs the
kernels' torch reference selection (``proxyattn_kernels.reference.reference_selection``, its
steps composed so that several gammas share the proxy scores: :func:`chunk_selections`) on them
exactly as the backend does for a prefill of that length processed in chunks of ``--chunk``
tokens: chunk ``c`` has queries ``[c * chunk, (c + 1) * chunk)`` against keys ``[0, (c + 1) *
chunk)``. Queries and keys come from the dense model, which is what the first sparse layer sees
and a close stand-in for later layers (ProxyAttn keeps >= gamma of each head's attention mass).

Recorded per length, gamma, layer and query head (``[layers][heads]`` lists):

* ``density``: selected blocks / causal blocks summed over all chunks of the prefill (what the
  per-head kernel computes, forced blocks and dense tail included);
* ``density_last_chunk``: the same for the prompt's last chunk only (context = the length);
* ``gamma_fraction_last_chunk``: the blocks the head needs to reach gamma on the last chunk's last
  query block, divided by the chunk's key blocks, before the minimum budget and any cap: the
  part of the budget that reflects the attention itself, used to extrapolate to longer contexts.

``min_sparse_len`` is set to 0 (every chunk runs the selection, also below the backend's default
8192-token threshold) and ``max_density`` to None; all other settings are the defaults of
``proxyattn_vllm.config.ProxyAttnConfig``.

Example (2 CPU cores; result benchmarks/results/head_budgets_smollm2_gamma095.json)::

    nice -n 10 python benchmarks/profiles/measure_budgets.py --model-dir /tmp/prof-models/smollm2_hf \\
        --model-name SmolLM2-135M-Instruct --lengths 2048,4096,8192 --gammas 0.95,0.90,0.98 \\
        --out benchmarks/results/head_budgets_smollm2_gamma095.json
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from proxyattn_kernels.budget.naive import gamma_block_counts, last_block_mass, limit_budget
from proxyattn_kernels.params import ChunkGeometry, ProxyAttnParams
from proxyattn_kernels.proxy_scores.naive import proxy_block_scores
from proxyattn_kernels.reference import Selection, selection_from_budgets

#: Plain-text essays: $PROXYATTN_ESSAY_DIR, else the shared data folder beside the repository
#: (read in place, never copied; any folder of .txt files works: --essay-dir).
DEFAULT_ESSAY_DIR = str(Path(__file__).resolve().parents[3] / "shared" / "data" / "pg_essays")
#: Measurement settings on top of the backend defaults (see the module docstring).
OVERRIDES = {"min_sparse_len": 0, "max_density": None}
CAPTURE_NAME = "proxyattn_budget_capture"


def default_params(num_q_heads: int, num_kv_heads: int, gamma: float,
                   overrides: dict | None = None) -> ProxyAttnParams:
    """The kernel parameters the backend resolves for a layer with these heads, at ``gamma``
    (the config defaults plus ``overrides``, by default :data:`OVERRIDES`)."""
    from proxyattn_vllm.config import ProxyAttnConfig

    settings = OVERRIDES if overrides is None else overrides
    return ProxyAttnConfig(gamma=gamma, **settings).kernel_params(num_q_heads, num_kv_heads)


def chunk_starts(length: int, chunk: int) -> list[int]:
    """First token of every prefill chunk of a ``length``-token prompt."""
    return list(range(0, length, chunk))


def chunk_selections(q: torch.Tensor, k: torch.Tensor, ctx: int, params: dict[float, ProxyAttnParams],
                     scale: float) -> dict[float, Selection]:
    """:func:`proxyattn_kernels.reference.reference_selection` of one chunk for several gammas,
    its gamma-independent steps (proxy scores, last-block attention mass) computed once.

    Args:
        q: ``[q_len, Hq, D]`` post-RoPE queries at positions ``[ctx, ctx + q_len)``.
        k: ``[ctx + q_len, Hkv, D]`` post-RoPE keys.
        params: gamma -> that gamma's parameters (otherwise equal).
    """
    first = next(iter(params.values()))
    geo = ChunkGeometry(ctx, q.shape[0], first.block_size)
    scores = proxy_block_scores(q, k, ctx, scale, first.num_groups, first.stride, first.block_size)
    mass = last_block_mass(q, k, ctx, scale, first.block_size)
    out = {}
    for gamma, p in params.items():
        gamma_counts = gamma_block_counts(mass, gamma)
        budget = limit_budget(gamma_counts, geo.num_k_blocks, p.min_budget_blocks, p.budget_cap_blocks(geo))
        out[gamma] = selection_from_budgets(geo, scores, budget, gamma_counts, p)
    return out


def layer_counts(q: torch.Tensor, k: torch.Tensor, params: dict[float, ProxyAttnParams], scale: float,
                 chunk: int) -> dict[float, dict[str, torch.Tensor]]:
    """Run the selection over every chunk of one layer's prefill, per gamma.

    Args:
        q: ``[L, Hq, D]`` post-RoPE queries of the whole prompt.
        k: ``[L, Hkv, D]`` post-RoPE keys.
        params: gamma -> parameters.

    Returns:
        Per gamma: ``selected [Hq]`` and ``causal [Hq]`` block counts summed over chunks, the same
        for the last chunk (``selected_last``, ``causal_last``), and the last chunk's
        ``gamma_counts [Hq]`` and ``num_k_blocks`` (int).
    """
    length, num_heads = q.shape[:2]
    out = {g: {"selected": torch.zeros(num_heads, dtype=torch.int64), "causal": 0} for g in params}
    for start in chunk_starts(length, chunk):
        end = min(length, start + chunk)
        for g, sel in chunk_selections(q[start:end], k[:end], start, params, scale).items():
            per_head = sel.counts.long().sum(dim=1)  # [Hq]: blocks over the chunk's rows
            chunk_causal = int(sel.extents().sum())
            o = out[g]
            o["selected"] += per_head
            o["causal"] += chunk_causal
            o.update(selected_last=per_head, causal_last=torch.full((num_heads,), chunk_causal),
                     gamma_counts=sel.gamma_counts.long(), num_k_blocks=sel.geometry.num_k_blocks)
    for o in out.values():
        o["causal"] = torch.full((num_heads,), o["causal"])
    return out


class Recorder:
    """Collects per-layer selection counts from the attention wrapper, for several gammas."""

    def __init__(self, gammas: list[float], chunk: int, progress=None, overrides: dict | None = None):
        self.gammas = gammas
        self.overrides = overrides
        self.chunk = chunk
        self.progress = progress
        self.layers: dict[int, dict[float, dict]] = {}

    def __call__(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float) -> None:
        # query [1, Hq, L, D], key [1, Hkv, L, D] (transformers' layout) -> [L, H, D] fp32
        q = query[0].transpose(0, 1).float()
        k = key[0].transpose(0, 1).float()
        params = {g: default_params(q.shape[1], k.shape[1], g, self.overrides) for g in self.gammas}
        self.layers[layer] = layer_counts(q, k, params, scale, self.chunk)
        if self.progress is not None:
            self.progress.update(1)


@contextlib.contextmanager
def capture_attention(model, recorder: Recorder):
    """Run ``model``'s attention through SDPA while handing every layer's post-RoPE query and
    key to ``recorder`` (registered as an extra transformers attention implementation)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        recorder(module.layer_idx, query, key, scale)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, capture)
    configs = [model.config] + [m.config for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "config")]
    before = [(c, c._attn_implementation) for c in configs]
    try:
        for c, _ in before:
            c._attn_implementation = CAPTURE_NAME
        yield recorder
    finally:
        for c, impl in before:
            c._attn_implementation = impl


def essay_tokens(tokenizer, length: int, seed: int, essay_dir: str) -> list[int]:
    """``length`` tokens of essays (seeded order, joined by blank lines), starting with BOS when
    the tokenizer has one."""
    files = sorted(Path(essay_dir).glob("*.txt"))
    if not files:
        raise SystemExit(f"no *.txt essays in --essay-dir {essay_dir!r}; point it at the essay corpus "
                         f"(e.g. {DEFAULT_ESSAY_DIR})")
    random.Random(seed).shuffle(files)
    ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    for f in files:
        ids += tokenizer(f.read_text(errors="replace") + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            return ids[:length]
    raise SystemExit(f"essays in {essay_dir} hold only {len(ids)} tokens, fewer than --lengths {length}")


def dumps(doc: dict) -> str:
    """JSON with one line per innermost list of numbers (a layers x heads table reads as rows)."""
    text = json.dumps(doc, indent=1)
    return re.sub(r"\[\s*([-0-9.e+,\s]*?)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]" if m.group(1).strip() else "[]",
                  text) + "\n"


def _r(x: torch.Tensor | float, d: int = 5):
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return [round(float(v), d) for v in x]
    return round(float(x), d)


@torch.inference_mode()
def measure(model, tokenizer, lengths: list[int], gammas: list[float], chunk: int, samples: int,
            seed: int, essay_dir: str, log=print, progress_cls=None, overrides: dict | None = None) -> dict:
    """Per length and gamma: per-layer, per-head densities (see the module docstring), summed
    over ``samples`` prompts (block-weighted). ``overrides``: settings on top of the config
    defaults (default :data:`OVERRIDES`)."""
    cfg = model.config
    num_layers = cfg.num_hidden_layers
    results = {}
    for length in lengths:
        totals = {g: None for g in gammas}
        seconds = []
        for s in range(samples):
            ids = essay_tokens(tokenizer, length, seed + s, essay_dir)
            bar = progress_cls(total=num_layers, desc=f"{length} tok prompt {s + 1}/{samples}", leave=False) \
                if progress_cls else None
            rec = Recorder(gammas, chunk, bar, overrides)
            t0 = time.time()
            with capture_attention(model, rec):
                base = getattr(model, "model", model)  # the decoder without the LM head (no logits)
                base(input_ids=torch.tensor([ids]), use_cache=False)
            seconds.append(time.time() - t0)
            if bar is not None:
                bar.close()
            if sorted(rec.layers) != list(range(num_layers)):
                raise RuntimeError(f"captured layers {sorted(rec.layers)} of {num_layers}: the model's "
                                   "attention does not go through transformers' attention interface")
            for g in gammas:
                stacked = {key: torch.stack([rec.layers[i][g][key] for i in range(num_layers)])
                           for key in ("selected", "causal", "selected_last", "causal_last", "gamma_counts")}
                stacked["num_k_blocks"] = rec.layers[0][g]["num_k_blocks"]
                if totals[g] is None:
                    totals[g] = stacked
                else:
                    for key in ("selected", "causal", "selected_last", "causal_last", "gamma_counts"):
                        totals[g][key] = totals[g][key] + stacked[key]
            log(f"length {length} prompt {s + 1}/{samples}: {seconds[-1]:.1f}s")
        for g in gammas:
            t = totals[g]
            density = t["selected"].double() / t["causal"].double()  # [layers, Hq]
            last = t["selected_last"].double() / t["causal_last"].double()
            frac = t["gamma_counts"].double() / (samples * t["num_k_blocks"])
            results[f"len{length}_gamma{g}"] = {
                "length": length, "gamma": g, "samples": samples,
                "num_chunks": len(chunk_starts(length, chunk)),
                "mean_density": _r(density.mean()),
                "mean_density_last_chunk": _r(last.mean()),
                "mean_gamma_fraction_last_chunk": _r(frac.mean()),
                "layer_mean_density": _r(density.mean(dim=1)),
                "density": [_r(row) for row in density],
                "density_last_chunk": [_r(row) for row in last],
                "gamma_fraction_last_chunk": [_r(row) for row in frac],
                "seconds_per_prompt": round(sum(seconds) / len(seconds), 1),
            }
            log(f"  gamma {g}: mean density {float(density.mean()):.3f} (last chunk "
                f"{float(last.mean()):.3f}, gamma fraction {float(frac.mean()):.3f})")
    return results


def load_model(model_dir: str, dtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    return model.eval(), tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model-dir", required=True, help="Hugging Face model folder")
    p.add_argument("--model-name", default=None, help="name in the JSON (default: the folder's name)")
    p.add_argument("--lengths", default="4096,8192", help="comma list of prompt lengths in tokens (default: %(default)s)")
    p.add_argument("--gammas", default="0.95", help="comma list of gamma values (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk in tokens, vLLM's max_num_batched_tokens (default: %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="prompts per length (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="essay order seed (default: %(default)s)")
    p.add_argument("--essay-dir", default=os.environ.get("PROXYATTN_ESSAY_DIR", DEFAULT_ESSAY_DIR),
                   help="folder of *.txt essays (default: $PROXYATTN_ESSAY_DIR or %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--out", required=True, help="JSON output path")
    args = p.parse_args(argv)
    try:
        args.lengths = [int(x) for x in args.lengths.split(",")]
        args.gammas = [float(x) for x in args.gammas.split(",")]
    except ValueError:
        p.error(f"--lengths {args.lengths!r} / --gammas {args.gammas!r}: comma lists of numbers, e.g. 4096,8192 and 0.95,0.9")
    if any(g <= 0 or g > 1 for g in args.gammas):
        p.error(f"--gammas {args.gammas}: each in (0, 1], e.g. 0.95")
    if any(n < 1 for n in args.lengths) or args.chunk < 1 or args.samples < 1:
        p.error("--lengths, --chunk and --samples must be positive")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    t_start = time.time()
    model, tokenizer = load_model(args.model_dir, args.dtype)
    cfg = model.config
    params = default_params(cfg.num_attention_heads, cfg.num_key_value_heads, args.gammas[0])
    out_path = Path(args.out)
    doc = {
        "about": __doc__.split("\n\n")[0],
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "device": "CPU",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": {"name": args.model_name or Path(args.model_dir).name, "layers": cfg.num_hidden_layers,
                  "q_heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                  "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                  "max_position_embeddings": cfg.max_position_embeddings, "dtype": args.dtype},
        "lengths": args.lengths, "gammas": args.gammas, "chunk_tokens": args.chunk, "samples": args.samples,
        "seed": args.seed, "essay_dir": args.essay_dir, "threads": args.threads,
        "params": {**dataclasses.asdict(params), "gamma": args.gammas},
        "overrides": OVERRIDES,
        "definitions": {
            "density": "selected blocks / causal blocks, summed over every chunk of the prefill, per layer and query head",
            "density_last_chunk": "the same for the prompt's last chunk (context = length)",
            "gamma_fraction_last_chunk": "blocks needed to reach gamma on the last chunk's last query block / its key "
                                         "blocks, before the minimum budget (the attention's own budget)",
        },
        "results": {},
    }
    for length in args.lengths:
        doc["results"].update(measure(model, tokenizer, [length], args.gammas, args.chunk, args.samples,
                                      args.seed, args.essay_dir, progress_cls=tqdm))
        doc["elapsed_s"] = round(time.time() - t_start, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(dumps(doc))  # after every length: partial runs keep their data
    print(f"results: {out_path}")
    return doc


if __name__ == "__main__":
    main()
