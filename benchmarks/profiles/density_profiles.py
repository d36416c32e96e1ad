"""Named per-layer, per-head density profiles for long contexts, fitted on measured head budgets.

Input: a ``measure_budgets.py`` result (per layer and query head, the fraction of key blocks a
head needs to reach gamma on a prompt's last chunk, at several lengths). Per layer, the
layer-mean fraction is fitted with a power law ``f(L) = a * L ** -b``; each head keeps its
measured ratio to its layer's mean (the per-head spread, from the longest measured length). The
source model's layers and heads are mapped onto a target shape by relative position (layer ``i``
of ``n`` sits at depth ``i / (n - 1)``; the target takes the linear interpolation there), so a
24-layer, 14-head model gives a 32-layer, 32-head profile.

A profile gives, for any context length ``L``, each head's budget fraction ``s * ratio * f(L)``
clipped to ``(0, 1]`` (``s``: a scale, 1 for a measured profile, calibrated to a published mean
density otherwise), turned into a per-row block budget as the backend does: ``max(min budget,
ceil(fraction * key blocks))``. From those budgets it computes the density of the last prefill
chunk (what a long-context speed benchmark of the last chunk computes) and of the whole
chunked prefill, counting forced blocks and the dense tail as the selection does.

Example (writes benchmarks/profiles/profiles.json and prints each profile's densities)::

    python benchmarks/profiles/density_profiles.py \\
        --measured benchmarks/results/head_budgets_qwen05b_gamma095.json --tag qwen05b \\
        --out benchmarks/profiles/profiles.json
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

import torch

from proxyattn_kernels.params import ChunkGeometry, num_forced_blocks

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.profiles.measure_budgets import default_params, dumps  # noqa: E402

#: Llama-3.1-8B: the shape the speed benchmarks use.
LLAMA8B_SHAPE = {"name": "Llama-3.1-8B", "layers": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128}
#: Selection settings the densities are computed with: the ``ProxyAttnConfig`` defaults as the
#: backend resolves them for this shape, and chunk = vLLM's max_num_batched_tokens of the benchmarks.
_DEFAULT_PARAMS = default_params(LLAMA8B_SHAPE["q_heads"], LLAMA8B_SHAPE["kv_heads"], gamma=0.95)
SELECTION = {**{key: getattr(_DEFAULT_PARAMS, key) for key in
                ("block_size", "min_budget_blocks", "sink_blocks", "local_blocks", "dense_tail_tokens")},
             "chunk_tokens": 8192}
#: Paper (ProxyAttn, RULER table): Llama-3.1-8B at gamma 0.95 skips 0.69 of the attention
#: averaged over RULER's lengths, i.e. a mean density of 0.31 over one unchunked prefill each.
PAPER_LLAMA8B = {"density": 0.31, "lengths": [4096, 8192, 16384, 32768, 65536, 131072]}
PROFILE_LENGTHS = [65536, 131072, 262144]
PROFILES_JSON = Path(__file__).with_name("profiles.json")


def fit_power_law(lengths, values) -> tuple[float, float]:
    """Least-squares fit of ``log v = log a - b log L``; returns ``(a, b)`` (``b > 0``: falls
    with length). Needs at least two distinct lengths and positive values."""
    x = torch.log(torch.as_tensor(lengths, dtype=torch.float64))
    y = torch.log(torch.as_tensor(values, dtype=torch.float64))
    if x.numel() < 2 or float(x.max() - x.min()) == 0.0:
        raise ValueError(f"a power law needs values at two or more distinct lengths, got lengths {list(lengths)}")
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    return math.exp(float(ym - slope * xm)), -slope


def map_relative(values: torch.Tensor, n_out: int, dim: int = 0) -> torch.Tensor:
    """Resample ``values`` along ``dim`` from its ``n_in`` entries onto ``n_out`` by relative
    position: output ``j`` takes the linear interpolation at source position
    ``j * (n_in - 1) / (n_out - 1)`` (first to first, last to last)."""
    values = values.movedim(dim, 0).double()
    n_in = values.shape[0]
    if n_in == 1 or n_out == 1:
        out = values[:1].expand(n_out, *values.shape[1:]) if n_in == 1 else values.mean(0, keepdim=True)
        return out.movedim(0, dim).clone()
    pos = torch.arange(n_out, dtype=torch.float64) * (n_in - 1) / (n_out - 1)
    lo = pos.floor().long().clamp(max=n_in - 2)
    w = (pos - lo).view(-1, *([1] * (values.dim() - 1)))
    return (values[lo] * (1 - w) + values[lo + 1] * w).movedim(0, dim)


def chunk_head_counts(fraction: torch.Tensor, ctx: int, q_len: int, sel: dict = SELECTION) -> tuple[torch.Tensor, int]:
    """Blocks one chunk computes per head when each head keeps ``fraction`` of the chunk's key
    blocks per row (``budget = max(min budget, ceil(fraction * key blocks))``, the selection's
    rule), forced blocks and dense-tail rows included.

    Args:
        fraction: ``[...]`` budget fractions in (0, 1].

    Returns:
        ``(selected [...], causal)``: selected blocks summed over the chunk's rows, and the
        chunk's causal blocks (per head).
    """
    extent, forced, tail, num_k_blocks = _rows(ctx, q_len, sel["block_size"], sel["sink_blocks"],
                                               sel["local_blocks"], sel["dense_tail_tokens"])
    budget = torch.clamp(torch.ceil(fraction.double() * num_k_blocks), min=sel["min_budget_blocks"])
    per_row = torch.minimum(extent, torch.maximum(budget[..., None], forced))
    per_row = torch.where(tail, extent, per_row)
    return per_row.sum(-1), int(extent.sum())


@functools.lru_cache(maxsize=256)  # calibration evaluates the same chunks many times
def _rows(ctx: int, q_len: int, block_size: int, sink_blocks: int, local_blocks: int, dense_tail_tokens: int):
    """Per row of a chunk: causal extent, forced blocks (``[R]`` float64), dense-tail flag
    (``[R]`` bool); and the chunk's key blocks."""
    geo = ChunkGeometry(ctx, q_len, block_size)
    rows = torch.arange(geo.num_q_blocks)
    extent = geo.first_q_block + 1 + rows
    forced = torch.tensor([num_forced_blocks(int(e) - 1, sink_blocks, local_blocks) for e in extent])
    tail = rows >= geo.first_tail_row(dense_tail_tokens)
    return extent.double(), forced.double(), tail, geo.num_k_blocks


def prefill_density(fraction_at, length: int, sel: dict = SELECTION, chunk: int | None = None) -> torch.Tensor:
    """Density (selected / causal blocks) of a whole prefill of ``length`` tokens in chunks of
    ``chunk`` (default ``sel["chunk_tokens"]``; ``length``: one unchunked pass), where the chunk
    ending at token ``e`` uses the fractions ``fraction_at(e)`` (``[...]``)."""
    chunk = chunk or sel["chunk_tokens"]
    selected, causal = 0.0, 0
    for start in range(0, length, chunk):
        q_len = min(chunk, length - start)
        s, c = chunk_head_counts(fraction_at(start + q_len), start, q_len, sel)
        selected, causal = selected + s, causal + c
    return selected / causal


def last_chunk_density(fraction: torch.Tensor, length: int, sel: dict = SELECTION) -> torch.Tensor:
    """Density of the last ``sel["chunk_tokens"]``-token chunk of a ``length``-token prompt."""
    q_len = min(sel["chunk_tokens"], length)
    s, c = chunk_head_counts(fraction, length - q_len, q_len, sel)
    return s / c


def fit_measured(doc: dict, gamma: float) -> dict:
    """Per-layer power laws and per-head ratios of one measured model at ``gamma``.

    A layer whose fitted fraction rises with length (``b < 0``) is held at its value at the
    longest measured length (``b = 0``): growth measured over a few short lengths is not
    extrapolated 4-16x (the raw exponents stay in ``raw_b``).

    Returns ``{"lengths", "layer_fits": [(a, b)] * layers, "raw_b": [layers], "head_ratio":
    [layers, heads] tensor (mean 1 per layer), "overall_fit": (a, b), "layer_means": {length:
    [layers]}}``.
    """
    entries = sorted((e for e in doc["results"].values() if abs(e["gamma"] - gamma) < 1e-9),
                     key=lambda e: e["length"])
    if len(entries) < 2:
        raise ValueError(f"gamma {gamma}: the measured file holds {len(entries)} length(s) at this gamma; "
                         f"a fit needs two or more (gammas there: {sorted({e['gamma'] for e in doc['results'].values()})})")
    lengths = [e["length"] for e in entries]
    frac = torch.stack([torch.tensor(e["gamma_fraction_last_chunk"], dtype=torch.float64) for e in entries])  # [n, layers, heads]
    layer_mean = frac.mean(-1)  # [n, layers]
    raw = [fit_power_law(lengths, layer_mean[:, i].tolist()) for i in range(frac.shape[1])]
    fits = [(a, b) if b >= 0 else (float(layer_mean[-1, i]), 0.0) for i, (a, b) in enumerate(raw)]
    longest = frac[-1]
    return {
        "lengths": lengths,
        "layer_fits": fits,
        "raw_b": [b for _, b in raw],
        "head_ratio": longest / longest.mean(-1, keepdim=True),
        "overall_fit": fit_power_law(lengths, frac.mean((1, 2)).tolist()),
        "layer_means": {L: layer_mean[j].tolist() for j, L in enumerate(lengths)},
    }


def map_profile(fit: dict, layers: int, heads: int) -> dict:
    """A fitted model mapped onto ``layers`` x ``heads`` by relative depth and head position:
    ``log a`` and ``b`` are interpolated across layers, head ratios across layers and heads
    (then renormalized to mean 1 per layer)."""
    log_a = torch.tensor([math.log(a) for a, _ in fit["layer_fits"]])
    b = torch.tensor([b for _, b in fit["layer_fits"]])
    ratio = map_relative(map_relative(fit["head_ratio"], layers, 0), heads, 1)
    return {"a": map_relative(log_a, layers).exp().tolist(), "b": map_relative(b, layers).tolist(),
            "head_ratio": (ratio / ratio.mean(-1, keepdim=True)).tolist(), "scale": 1.0}


def _fractions(profile: dict, length: int, scale: float) -> torch.Tensor:
    a = torch.tensor(profile["a"], dtype=torch.float64)
    b = torch.tensor(profile["b"], dtype=torch.float64)
    layer = a * float(length) ** -b
    frac = scale * torch.tensor(profile["head_ratio"], dtype=torch.float64) * layer[:, None]
    return frac.clamp(1e-6, 1.0)


def profile_scale(profile: dict, length: int, sel: dict = SELECTION) -> float:
    """The profile's scale at ``length``: ``profile["scale"]``, or for a profile with a
    ``target_density``, the scale whose unchunked prefill of ``length`` tokens has that mean
    density (stored in ``scale_by_length`` for the profile lengths, else calibrated here)."""
    if "target_density" not in profile:
        return float(profile["scale"])
    stored = profile.get("scale_by_length", {}).get(str(length))
    if stored is not None:
        return float(stored)
    return calibrate_scale(profile, profile["target_density"], [length], sel)


def head_fractions(profile: dict, length: int, sel: dict = SELECTION) -> torch.Tensor:
    """``[layers, heads]`` budget fractions of a profile at context ``length``: ``scale *
    head_ratio * a * length ** -b``, clipped to ``[1e-6, 1]``."""
    return _fractions(profile, length, profile_scale(profile, length, sel))


def head_budget_blocks(profile: dict, length: int, sel: dict = SELECTION) -> torch.Tensor:
    """``[layers, heads]`` per-row block budgets at context ``length`` (the backend's rule:
    ``max(min budget, ceil(fraction * key blocks))``, at most the key blocks)."""
    num_k_blocks = math.ceil(length / sel["block_size"])
    blocks = torch.ceil(head_fractions(profile, length) * num_k_blocks).clamp(min=sel["min_budget_blocks"])
    return blocks.clamp(max=num_k_blocks).long()


def served_prefill_density(name: str, length: int, chunk: int = SELECTION["chunk_tokens"],
                           path: str | Path | None = None, sel: dict = SELECTION) -> float:
    """Mean density (selected / causal blocks, all layers and heads) of a ``length``-token prompt
    prefilled in ``chunk``-token chunks by the backend with ``budget_profile: name``: each chunk
    keeps the fractions the backend's :class:`~proxyattn_vllm.budget_profile.BudgetProfile`
    gives at the chunk's end (its ``scale(L)`` included)."""
    from proxyattn_vllm.budget_profile import BudgetProfile

    path = str(path or PROFILES_JSON)
    served, doc = BudgetProfile.load(path, name), load_profile(name, path)
    return float(prefill_density(lambda end: _fractions(doc, end, served.scale_at(end)), length, sel, chunk).mean())


def calibrate_scale(profile: dict, target: float, lengths, sel: dict = SELECTION, chunked: bool = False) -> float:
    """The scale ``s`` for which the mean over ``lengths`` of the profile's mean prefill density
    (unchunked unless ``chunked``) equals ``target`` (bisection; density is nondecreasing in s)."""
    def mean_density(s):
        return sum(float(prefill_density(lambda e: _fractions(profile, e, s), L, sel, None if chunked else L).mean())
                   for L in lengths) / len(lengths)

    lo, hi = 1e-4, 1e4
    if not mean_density(lo) <= target <= mean_density(hi):
        raise ValueError(f"target density {target} is outside what the profile reaches "
                         f"({mean_density(lo):.3f}..{mean_density(hi):.3f}) with the minimum budget and forced blocks")
    for _ in range(40):  # geometric bisection: log-width ln(1e8) / 2**40, a relative error below 1e-10
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if mean_density(mid) < target else (lo, mid)
    return math.sqrt(lo * hi)


def summarize(profile: dict, lengths, sel: dict = SELECTION) -> dict:
    """Per length: mean budget fraction, mean density of the last chunk and of one unchunked
    prefill (the budget of the last row for every row, as the paper measures), per-layer
    last-chunk densities, and the spread of head densities."""
    out = {}
    for L in lengths:
        frac = head_fractions(profile, L, sel)
        last = last_chunk_density(frac, L, sel)
        whole = prefill_density(lambda e: frac, L, sel, chunk=L)
        out[str(L)] = {
            "mean_fraction": round(float(frac.mean()), 4),
            "mean_density_last_chunk": round(float(last.mean()), 4),
            "mean_density_prefill": round(float(whole.mean()), 4),
            "head_density_last_chunk_min_max": [round(float(last.min()), 4), round(float(last.max()), 4)],
            "layer_density_last_chunk": [round(float(x), 4) for x in last.mean(-1)],
        }
    return out


def build_profiles(measured: dict, shape: dict = LLAMA8B_SHAPE, gammas=(0.95, 0.90), lengths=PROFILE_LENGTHS,
                   paper: dict = PAPER_LLAMA8B, sel: dict = SELECTION, source: str = "") -> dict:
    """The named profiles: ``measured-<model>-gamma<g>`` per gamma the measured file holds at two
    or more lengths, and ``paper-llama8b-gamma0.95`` (the gamma-0.95 measured shape scaled, per
    length, to the paper's mean density for one unchunked prefill)."""
    tag = measured.get("tag") or measured["model"]["name"].split("-")[0].lower()
    profiles = {}
    for g in gammas:
        try:
            fit = fit_measured(measured, g)
        except ValueError:
            continue
        prof = map_profile(fit, shape["layers"], shape["q_heads"])
        prof.update({
            "derivation": (f"{measured['model']['name']} at gamma {g} on essay text (measured lengths {fit['lengths']}); "
                           f"per-layer power law of the mean last-chunk gamma fraction (a rising layer held at its "
                           f"longest-length value), head ratios at the longest length; mapped onto {shape['layers']} layers x {shape['q_heads']} heads by relative position"),
            "source": source, "gamma": g,
            "source_fit": {"overall_a": fit["overall_fit"][0], "overall_b": fit["overall_fit"][1],
                           "layer_b": [round(b, 4) for _, b in fit["layer_fits"]],
                           "layer_b_raw": [round(b, 4) for b in fit["raw_b"]],
                           "layers_held": [i for i, b in enumerate(fit["raw_b"]) if b < 0]},
        })
        profiles[f"measured-{tag}-gamma{g:.2f}"] = prof
    base = profiles.get(f"measured-{tag}-gamma0.95")
    if base is not None and paper is not None:
        prof = {k: base[k] for k in ("a", "b", "head_ratio")}
        prof["target_density"] = paper["density"]
        prof["scale_by_length"] = {str(L): calibrate_scale(prof, paper["density"], [L], sel) for L in lengths}
        # For reference: one scale for all lengths whose mean over the paper's lengths is the target.
        prof["scale_if_averaged_over_paper_lengths"] = calibrate_scale(prof, paper["density"], paper["lengths"], sel)
        prof.update({
            "derivation": (f"the measured-{tag}-gamma0.95 per-layer pattern and head spread, scaled at each length so "
                           f"one unchunked prefill has mean density {paper['density']} (the paper's Llama-3.1-8B "
                           f"sparsity 0.69 at gamma 0.95, averaged over {paper['lengths']}, taken as holding at "
                           f"every length: an upper bound, since density falls with length)"),
            "source": source, "gamma": 0.95,
        })
        profiles["paper-llama8b-gamma0.95"] = prof
    for prof in profiles.values():
        prof["summary"] = summarize(prof, lengths, sel)
    return {"shape": shape, "selection": sel, "lengths": list(lengths), "profiles": profiles}


def _round(doc):
    if isinstance(doc, float):
        return float(f"{doc:.4g}")
    if isinstance(doc, dict):
        return {k: _round(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_round(v) for v in doc]
    return doc


def merge_measured(docs: list[dict]) -> dict:
    """One measured document from several runs of the same model (their results side by side)."""
    names = {d["model"]["name"] for d in docs}
    if len(names) != 1:
        raise SystemExit(f"--measured files hold different models {sorted(names)}; pass the runs of one model")
    merged = {**docs[0], "results": {}}
    for d in docs:
        merged["results"].update(d["results"])
    return merged


def load_profile(name: str, path: str | Path | None = None) -> dict:
    """One named profile from ``profiles.json`` (for :func:`head_budget_blocks`)."""
    path = path or PROFILES_JSON
    doc = json.loads(Path(path).read_text())
    if name not in doc["profiles"]:
        raise KeyError(f"profile {name!r} is not in {path}; available: {', '.join(doc['profiles'])}")
    return doc["profiles"][name]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--measured", required=True, nargs="+",
                   help="measure_budgets.py result JSON(s) of one model (several: their lengths are merged)")
    p.add_argument("--tag", default=None, help="short model name in the profile names (default: from the JSON)")
    p.add_argument("--lengths", default=",".join(map(str, PROFILE_LENGTHS)),
                   help="comma list of context lengths the summary covers (default: %(default)s)")
    p.add_argument("--out", default=str(PROFILES_JSON), help="profiles JSON (default: %(default)s)")
    args = p.parse_args(argv)
    measured = merge_measured([json.loads(Path(m).read_text()) for m in args.measured])
    if args.tag:
        measured["tag"] = args.tag
    lengths = [int(x) for x in args.lengths.split(",")]
    doc = _round(build_profiles(measured, lengths=lengths, source=", ".join(args.measured)))
    Path(args.out).write_text(dumps(doc))
    for name, prof in doc["profiles"].items():
        scale = prof.get("scale_by_length") or prof["scale"]
        print(f"{name}: scale {scale}")
        for L, s in prof["summary"].items():
            print(f"  {int(L) // 1024:>4}K: fraction {s['mean_fraction']:.3f}  last chunk {s['mean_density_last_chunk']:.3f} "
                  f"(heads {s['head_density_last_chunk_min_max'][0]:.3f}-{s['head_density_last_chunk_min_max'][1]:.3f})  "
                  f"prefill {s['mean_density_prefill']:.3f}")
    print(f"profiles: {args.out}")
    return doc


if __name__ == "__main__":
    main()
