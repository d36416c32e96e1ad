"""Greedy tokens of two runs compared, and the verdict on their differences.

A prefix-cache hit or a recompute changes the chunks and batch shapes, so bf16 results change
in the last bits (for vLLM's own FLASH_ATTN too) and near-ties flip: :func:`greedy_verdict`
tells such flips (top-1/top-2 logprob margin within :data:`NEAR_TIE_MARGIN` in both runs) from
divergences at a clear margin, and compares their count with the dense control's.
"""
from __future__ import annotations

import math

from benchmarks.robustness.engines import CONTROL

# Greedy-token verdict at full density (see greedy_verdict). NEAR_TIE_MARGIN: the largest
# top-1/top-2 logprob margin at which a first divergence counts as a bf16 near-tie. The logits
# are bf16 (lm_head output), so margins are multiples of a logit ulp: 0.0625 for logits in
# [8, 16), 0.125 in [16, 32); 0.25 is 2 ulps there. The H200 run (Qwen2.5-0.5B) found every
# full-density divergence at margins 0..0.125, and the same sampled tokens' logprobs differ by
# up to 0.1 between caching off and on, so a top-1/top-2 difference moves by up to ~0.2.
# ALLOWED_EXTRA_FRACTION: tie flips are chance events, so the control's count is itself +-1-2
# on 4-8 requests; a config may diverge on max(1, ceil(fraction * n)) more requests than it.
NEAR_TIE_MARGIN = 0.25
ALLOWED_EXTRA_FRACTION = 0.25


# ---------------------------------------------------------------------------------------------
# Comparing outputs


def margins_of(logprobs) -> list[float | None]:
    """Per step, top-1 minus top-2 logprob (None when only one candidate came back)."""
    gaps = []
    for step in logprobs or []:
        values = sorted((lp.logprob for lp in step.values()), reverse=True)
        gaps.append(values[0] - values[1] if len(values) > 1 else None)
    return gaps


def runner_ups_of(logprobs) -> list[int | None]:
    """Per step, the token with the second-highest logprob (None when only one came back)."""
    out = []
    for step in logprobs or []:
        ranked = sorted(step.items(), key=lambda kv: kv[1].logprob, reverse=True)
        out.append(ranked[1][0] if len(ranked) > 1 else None)
    return out


def compare_tokens(reference: list[int], other: list[int], margins: list | None = None) -> dict:
    """Identity, the first differing position (also a length difference) and the reference's
    top-1/top-2 margin there (small: a bf16 near-tie, not a wrong attention result)."""
    first = next((j for j, (x, y) in enumerate(zip(reference, other)) if x != y), None)
    if first is None and len(reference) != len(other):
        first = min(len(reference), len(other))
    margin = None
    if first is not None and margins and first < len(margins):
        margin = margins[first]
    return {"identical": first is None, "first_difference": first,
            "reference_margin_at_difference": margin,
            "matching_prefix": len(reference) if first is None else first}


def logprob_gap(reference: list[float], other: list[float], upto: int | None) -> float | None:
    """Largest |logprob difference| of the sampled tokens over the positions where both runs
    sampled the same tokens (before ``upto``, the first difference): how close the numbers
    are, apart from whether a near-tie flipped."""
    n = min(len(reference), len(other), len(reference) if upto is None else upto)
    gaps = [abs(a - b) for a, b in zip(reference[:n], other[:n]) if a is not None and b is not None]
    return max(gaps) if gaps else None


def at(values, index):
    return values[index] if values is not None and index is not None and index < len(values) else None


def compare_rows(reference_rows: list[dict], other_rows: list[dict]) -> list[dict]:
    """compare_tokens per prompt, with the logprob gap of the shared positions and, at the
    first difference, the other run's own top-1/top-2 margin and whether its token was the
    reference's runner-up (None where unknown: rows without them, a length difference)."""
    out = []
    for a, b in zip(reference_rows, other_rows):
        row = compare_tokens(a["tokens"], b["tokens"], a["margins"])
        row["max_abs_logprob_diff"] = logprob_gap(a.get("token_logprobs", []), b.get("token_logprobs", []),
                                                  row["first_difference"])
        first = row["first_difference"]
        row["other_margin_at_difference"] = at(b.get("margins"), first)
        runner_up, token = at(a.get("runner_ups"), first), at(b["tokens"], first)
        row["other_took_reference_runner_up"] = (
            None if runner_up is None or token is None or first >= len(a["tokens"]) else token == runner_up)
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# The greedy-token verdict (pure functions of compare_rows rows)


def allowed_extra(n: int, fraction: float = ALLOWED_EXTRA_FRACTION) -> int:
    """How many more diverging requests than the dense control a config may have."""
    return max(1, math.ceil(fraction * n))


def divergence(row: dict, tol: float) -> dict | None:
    """None for an identical request, else its first difference, classed as a near-tie when
    both runs are within ``tol`` of a tie there and the other run took the reference's
    runner-up (where known): a bf16 flip. Anything else (a clear margin, a token outside the
    reference's top 2, a length difference, no margin) is ``clear``: not explained by bf16."""
    if row["identical"]:
        return None
    ref, other = row.get("reference_margin_at_difference"), row.get("other_margin_at_difference")
    took = row.get("other_took_reference_runner_up")
    if ref is None:
        why = "no reference margin (a length difference or no logprobs)"
    elif ref > tol:
        why = f"reference margin {ref:.3g} > {tol:g}"
    elif other is not None and other > tol:
        why = f"other run's margin {other:.3g} > {tol:g}"
    elif took is False:
        why = "other token outside the reference's top 2"
    else:
        why = None
    return {"position": row["first_difference"], "reference_margin": ref, "other_margin": other,
            "other_took_reference_runner_up": took, "near_tie": why is None, "why_not_near_tie": why}


def control_stats(summary: dict | None, name: str = CONTROL) -> dict | None:
    """What the other configs' verdicts compare with: the dense control's counts."""
    if not summary or "rows" not in summary:
        return None
    n = len(summary["rows"])
    identical = sum(r["identical"] for r in summary["rows"])
    greedy = summary.get("greedy") or {}
    return {"config": name, "backend": summary.get("backend"), "identical": identical, "n": n,
            "diverging": n - identical, "max_abs_logprob_diff": summary.get("max_abs_logprob_diff"),
            "verdict": greedy.get("verdict")}


def greedy_verdict(rows: list[dict], *, identity_expected: bool, tol: float = NEAR_TIE_MARGIN,
                   control: dict | None = None, is_control: bool = False,
                   fraction: float = ALLOWED_EXTRA_FRACTION) -> dict:
    """PASS / FAIL / INFO of greedy tokens vs the reference (caching off, ample KV cache).

    Bitwise identity is not the test: a prefix-cache hit or a recompute changes the chunks and
    batch shapes, so bf16 sums change in the last bits (for vLLM's own FLASH_ATTN too) and a
    near-tie can flip. Where identity is expected (full density, the dense control): FAIL when
    any divergence is ``clear`` (see :func:`divergence`: a real bug); FAIL when the config
    diverges on more than ``allowed_extra(n)`` requests more than the dense ``control``
    (ties only, but more often than dense attention flips them); else PASS. Sparse: INFO."""
    n = len(rows)
    diffs = [dict(d, prompt=i) for i, r in enumerate(rows) if (d := divergence(r, tol)) is not None]
    clear = [d for d in diffs if not d["near_tie"]]
    allowance = allowed_extra(n, fraction)
    out = {"identical": n - len(diffs), "n": n, "diverging": len(diffs),
           "near_tie_divergences": len(diffs) - len(clear), "clear_divergences": len(clear),
           "first_differences": diffs, "near_tie_margin": tol, "control": control,
           "allowed_extra_diverging": None if is_control else allowance}
    comparable = control is not None and control.get("n") == n and not is_control
    if not identity_expected:
        verdict = "INFO"
        reason = (f"sparse, may differ: {len(diffs)} diverging, {len(clear)} of them not near-ties "
                  f"(margin <= {tol:g})")
    elif clear:
        d = clear[0]
        verdict = "FAIL"
        reason = (f"{len(clear)} divergence(s) not a near-tie: prompt {d['prompt']} at {d['position']}, "
                  f"{d['why_not_near_tie']}")
    elif comparable and len(diffs) > control["diverging"] + allowance:
        verdict = "FAIL"
        reason = (f"near-ties only, but {len(diffs)} diverging vs {control['diverging']} for "
                  f"{control['config']} (+{allowance} allowed)")
    else:
        verdict = "PASS"
        reason = "identical" if not diffs else f"{len(diffs)} divergence(s), all near-ties (margin <= {tol:g})"
        if is_control:
            reason += " (the dense control)"
        elif comparable:
            reason += (f"; {len(diffs)} diverging vs {control['diverging']} for {control['config']} "
                       f"(+{allowance} allowed)")
        else:
            reason += f"; no {CONTROL} control to compare with"
    out["verdict"], out["reason"] = verdict, reason
    return out


def max_gap(rows: list[dict]) -> float | None:
    gaps = [r["max_abs_logprob_diff"] for r in rows if r.get("max_abs_logprob_diff") is not None]
    return max(gaps) if gaps else None


def agreement(rows: list[dict], length: int) -> dict:
    """Counts over compare_tokens rows: identical prompts and the mean matching prefix."""
    n = len(rows)
    return {"identical": sum(r["identical"] for r in rows), "n": n,
            "mean_matching_prefix_fraction": (sum(r["matching_prefix"] for r in rows) / (n * length))
            if n and length else None}
