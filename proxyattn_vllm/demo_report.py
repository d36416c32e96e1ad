"""What ``proxyattn-demo`` prints: its progress lines, the selection statistics per layer and
the greedy tokens of the sparse run next to the dense reference's (see ``demo.py``)."""
from __future__ import annotations

import time


class Progress:
    """Numbered phases with their wall time."""

    def __init__(self, total: int):
        self.total, self.step, self.start = total, 0, time.perf_counter()
        self._phase_start = self.start

    def phase(self, text: str) -> None:
        self.step += 1
        self._phase_start = time.perf_counter()
        print(f"[{self.step}/{self.total}] {text} ...", flush=True)

    def done(self, text: str = "") -> None:
        took = time.perf_counter() - self._phase_start
        print(f"      done in {took:.1f} s{'; ' + text if text else ''}", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def decode(model_dir: str, ids: list[int]) -> str:
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(model_dir).decode(ids)
    return text if len(text) <= 100 else text[:97] + "..."


def report_stats(lines: list[dict], proxyattn: dict, num_layers: int | None) -> None:
    from . import stats

    print("\nSelection statistics, per layer (density: key blocks computed / causal key blocks, averaged "
          "over query heads; attention mass kept: the share of dense attention's softmax mass inside the "
          "computed blocks, for sampled heads and queries):")
    if not lines:
        print("  no prefill chunk went through the sparse path")
        return
    by_layer: dict = {}
    for line in lines:
        by_layer.setdefault(line.get("layer"), []).append(line)
    for summary in stats.summarize(lines):
        layer = summary["layer"]
        chunks = by_layer[layer]
        fewer = sum(1 for c in chunks if c["density"] < 1.0)
        with_ctx = sum(1 for c in chunks if c["ctx"] > 0)
        causal = sum(c["causal_blocks"] for c in chunks)
        computed = sum(c["density"] * c["causal_blocks"] for c in chunks)
        kept = summary.get("kept_mass")
        kept_text = "" if kept is None else f", dense attention mass kept {kept:.3f}"
        print(f"  layer {layer}: {summary['chunks']} sparse chunks ({with_ctx} with ctx > 0, {fewer} "
              f"computing fewer than all blocks), density {summary['density']:.3f} "
              f"({computed:.1f} of {causal} causal blocks per head){kept_text}")
    spans = ", ".join(f"{c['ctx']}+{c['q_len']}:{c['density']:.2f}" for c in by_layer[next(iter(by_layer))])
    print(f"  chunks of layer {next(iter(by_layer))} (ctx+q_len:density): {spans}")
    total = stats.overall(lines)
    sparse_layers = len(by_layer)
    layers_text = "" if num_layers is None else f" in {sparse_layers} of {num_layers} layers"
    cap = proxyattn.get("max_density")
    cap_text = "" if cap is None else f" (max_density {cap})"
    print(f"  overall: {total['chunks']} sparse chunks{layers_text}, density {total['density']:.3f}{cap_text}")
    if cap is not None and total["density"] > cap:
        print("  (each query block always computes its forced blocks, the sink and the diagonal, and the "
              "chunk's dense tail computes every block: with short contexts these alone exceed max_density)")


def report_tokens(model_dir: str, sparse: list[int], dense: list[int], dense_name: str, tiny: bool) -> None:
    print("\nGreedy tokens:")
    print(f"  proxyattn: {sparse}  {decode(model_dir, sparse)!r}")
    print(f"  {dense_name:<9}: {dense}  {decode(model_dir, dense)!r}")
    first = next((i for i, (a, b) in enumerate(zip(sparse, dense)) if a != b), None)
    if first is None and len(sparse) == len(dense):
        print(f"  identical: all {len(sparse)} generated tokens are the same")
    elif first is None:
        print(f"  the same up to the shorter output ({min(len(sparse), len(dense))} tokens), "
              f"then of different lengths ({len(sparse)} vs {len(dense)})")
    else:
        same = "" if first == 0 else f"the first {first} are the same; "
        print(f"  not identical: {same}they differ from generated token {first + 1} of {len(sparse)} on "
              f"(proxyattn {sparse[first]}, {dense_name} {dense[first]}).")
        print("  Sparse attention computes fewer blocks, so a different greedy choice is expected where the "
              "top candidates are close" + (" (with random weights they are: attention is almost flat, so "
                                             "skipped blocks carry much of its mass)" if tiny else "")
              + ". At full density (--gamma 1 --max-density none) every block is computed and the tokens "
              "match dense attention's (in float32; lower precision can tip near-ties).")
