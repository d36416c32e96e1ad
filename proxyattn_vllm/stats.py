"""Selection statistics of every sparse prefill chunk, as JSON lines (diagnostic only).

Enable with ``PROXYATTN_STATS=/path/file.jsonl`` (read once, when this module is imported; an
in-process caller such as ``benchmarks/quality/run_eval.py`` may also call :func:`configure`).
Disabled, the cost is one Python bool check per sparse chunk (``stats.ENABLED`` in
``sparse/triton.py::sparse_prefill`` and ``sparse/union.py``). Enabled, each sparse chunk appends one line::

    {"layer": 3, "ctx": 8192, "q_len": 8192, "causal_blocks": 192, "density": 0.41,
     "kept_mass": 0.93, "kept_mass_sparse_rows": 0.92, "pid": 1234}

* ``density``: selected / causal key blocks of the chunk, averaged over query heads
  (``proxyattn_kernels.selection_stats.selection_density``; rows that run dense count as 1).
* ``kept_mass``: with ``PROXYATTN_STATS_MASS_HEADS=N`` > 0 (default 4), for ``N`` evenly spaced
  query heads and (up to) 128 queries spread evenly over the whole chunk (its first and last
  included), the share of the dense causal softmax mass that falls inside the blocks the head
  computes, averaged over those heads and queries (``kept_attention_mass``); ``null`` when ``N``
  is 0. The whole chunk, not its last queries: the rows of the chunk's last
  ``dense_tail_tokens`` tokens compute every block, and sampling only them reported 1.0 at any
  density. (Files written before this change measured the chunk's last 128 queries.)
* ``kept_mass_sparse_rows``: the same heads and sampled queries, restricted to the queries in
  rows before the chunk's dense tail (``selection_stats.dense_tail_rows``: the trailing rows
  that compute every causal block for every head); ``null`` when ``N`` is 0 or no sampled query
  lies before the tail (e.g. a chunk that runs dense).
* ``causal_blocks``: causal key blocks of one head over the chunk's query-block rows, the
  weight of the chunk's density in a whole-prompt density (selected / causal blocks).
* ``layer``: the layer index from the attention layer's name (``null`` if it has none).

Not for timing: the kept mass gathers the request's whole K from the paged cache and runs dense
softmax for the sampled heads, and the values are copied to the host (a device sync) every
:data:`FLUSH_EVERY` lines, on :func:`flush` and at process exit. Lines of tensor-parallel
ranks share the file (``pid`` tells them apart); each rank sees its own heads.
"""
from __future__ import annotations

import atexit
import json
import math
import os
from collections import defaultdict

import torch

from proxyattn_kernels.reference import gather_paged_kv
from proxyattn_kernels.selection_stats import (
    causal_blocks,
    dense_tail_rows,
    kept_mass_per_query,
    query_rows,
    sample_heads,
    selection_density,
)

ENV_PATH = "PROXYATTN_STATS"
ENV_MASS_HEADS = "PROXYATTN_STATS_MASS_HEADS"
DEFAULT_MASS_HEADS = 4
MASS_QUERIES = 128
FLUSH_EVERY = 64

# Read by the sparse kernels on every sparse chunk: keep it a plain module-level bool.
ENABLED = False


class _Collector:
    """Buffers per-chunk results as device tensors and appends them to a JSONL file."""

    def __init__(self, path: str, mass_heads: int):
        self.path = path
        self.mass_heads = mass_heads
        # (fixed fields, density 0-dim tensor, kept mass and kept mass of the sparse rows,
        # 0-dim tensors (the latter NaN when no sampled query is before the tail) or None)
        self.pending: list[tuple[dict, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = []

    def record(self, query, kv_cache, block_table_row, selection, ctx, scale, block_size, layer_index, k_scale):
        q_len = query.shape[0]
        density = selection_density(selection.counts, ctx, q_len, block_size)
        kept = None
        if self.mass_heads > 0:
            keys, _ = gather_paged_kv(kv_cache, block_table_row, ctx + q_len, k_scale)
            per_query = kept_mass_per_query(
                query, keys, selection.ranking, selection.counts, ctx=ctx, scale=scale,
                block_size=block_size, heads=sample_heads(query.shape[1], self.mass_heads),
                num_queries=MASS_QUERIES,
            )  # [N, n]
            _, rows = query_rows(ctx, q_len, block_size, MASS_QUERIES)
            sparse = ~dense_tail_rows(selection.counts, ctx, q_len, block_size)[rows.to(query.device)]  # [n]
            # Masked mean, no host sync: 0 / 0 = NaN (written as null) when no query is sparse.
            kept_sparse = (per_query * sparse).sum() / (sparse.sum() * per_query.shape[0])
            kept = (per_query.mean(), kept_sparse)
        fields = {"layer": layer_index, "ctx": ctx, "q_len": q_len,
                  "causal_blocks": causal_blocks(ctx, q_len, block_size)}
        self.pending.append((fields, density, kept))
        if len(self.pending) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        lines = []
        for fields, density, kept in self.pending:
            line = dict(fields, density=round(float(density), 6))
            line["kept_mass"] = None if kept is None else round(float(kept[0]), 6)
            sparse = None if kept is None else float(kept[1])
            line["kept_mass_sparse_rows"] = None if sparse is None or math.isnan(sparse) else round(sparse, 6)
            line["pid"] = os.getpid()
            lines.append(json.dumps(line))
        self.pending.clear()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


_collector: _Collector | None = None


def configure(path: str | os.PathLike | None, mass_heads: int = DEFAULT_MASS_HEADS) -> None:
    """Start writing to ``path`` (appending), or stop with ``None``; pending lines are flushed.

    Takes effect for the engines of this process (in-process vLLM: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
    """
    global _collector, ENABLED
    flush()
    if path is None:
        _collector, ENABLED = None, False
        return
    if mass_heads < 0:
        raise ValueError(f"{ENV_MASS_HEADS} must be >= 0; got {mass_heads}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _collector, ENABLED = _Collector(str(path), mass_heads), True


def flush() -> None:
    """Write the buffered lines (syncs the device)."""
    if _collector is not None:
        _collector.flush()


def record(query, kv_cache, block_table_row, selection, *, ctx, scale, block_size, layer_index,
           k_scale=None) -> None:
    """Buffer the statistics of one sparse chunk (see the module docstring).

    Args:
        query: ``[q_len, Hq, D]`` the chunk's queries (in the model dtype, as the kernels read them).
        kv_cache: the layer's paged cache ``[num_pages, Hkv, page_size, 2 * D]``.
        k_scale: an FP8 cache's key scale (1-element float32 tensor): the kept mass is computed
            on the dequantized keys; None for a cache in the model dtype.
        block_table_row: ``[max_pages]`` the request's physical pages.
        selection: the chunk's ``PagedSelection`` (``ranking [G, R, Kb]``, ``counts [Hq, R]``).
        ctx, scale, block_size: as in ``sparse_prefill``; ``layer_index``: int or None.
    """
    if _collector is not None:
        _collector.record(query, kv_cache, block_table_row, selection, ctx, scale, block_size, layer_index, k_scale)


def layer_index(layer: torch.nn.Module) -> int | None:
    """Index of a vLLM attention layer from its ``layer_name`` (None if the name has none)."""
    from vllm.model_executor.models.utils import extract_layer_index

    try:
        return extract_layer_index(getattr(layer, "layer_name", None))
    except (AssertionError, ValueError, AttributeError, TypeError):
        return None


def read_lines(path: str | os.PathLike) -> list[dict]:
    """All lines of a stats file (an absent file has none)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _means(lines: list[dict]) -> dict:
    """``{"chunks", "density", "kept_mass", "kept_mass_sparse_rows"}`` over ``lines`` (non-empty).

    ``density`` is selected / causal blocks over all the chunks: each chunk's density weighs
    its ``causal_blocks`` (lines of older files, without it, weigh the same). ``kept_mass`` and
    ``kept_mass_sparse_rows`` are the means over the chunks that have one (None when none has)."""
    weights = [line.get("causal_blocks") or 1 for line in lines]
    out = {
        "chunks": len(lines),
        "density": sum(w * line["density"] for w, line in zip(weights, lines)) / sum(weights),
    }
    for key in ("kept_mass", "kept_mass_sparse_rows"):
        values = [line[key] for line in lines if line.get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def summarize(lines: list[dict]) -> list[dict]:
    """Per-layer means: ``[{"layer", "chunks", "density", "kept_mass", "kept_mass_sparse_rows"}]``
    sorted by layer.

    ``kept_mass`` (``kept_mass_sparse_rows``) is None for a layer without such values. For the
    kept masses every chunk weighs the same.
    """
    by_layer: dict = defaultdict(list)
    for line in lines:
        by_layer[line.get("layer")].append(line)
    order = sorted(by_layer, key=lambda x: (x is None, x if x is not None else 0))
    return [{"layer": layer, **_means(by_layer[layer])} for layer in order]


def overall(lines: list[dict]) -> dict:
    """Means over every chunk of every layer: ``{"chunks", "density", "kept_mass", "kept_mass_sparse_rows"}``."""
    if not lines:
        return {"chunks": 0, "density": None, "kept_mass": None, "kept_mass_sparse_rows": None}
    return _means(lines)


def _configure_from_env() -> None:
    path = os.environ.get(ENV_PATH)
    if path:
        configure(path, int(os.environ.get(ENV_MASS_HEADS, DEFAULT_MASS_HEADS)))


_configure_from_env()
atexit.register(flush)
