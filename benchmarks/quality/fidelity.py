"""Label-free fidelity of sparse against dense attention: next-token agreement and KL.

Both engines score the same essay windows with vLLM prompt logprobs
(``SamplingParams(max_tokens=1, prompt_logprobs=K, flat_logprobs=True)``): for every position
``t >= 1`` of the prompt, the top-``K`` next-token log-probabilities given tokens ``< t``, plus the
log-probability of the actual token ``t``. From those, per position:

* **top-1 agreement**: the dense and the sparse most likely next token are the same token.
* **approximate KL(dense || sparse)**: vLLM returns only the top ``K`` of each distribution, so
  both are coarse-grained onto the dense top-``K`` tokens plus one "everything else" bucket, and
  KL is taken between those ``K + 1``-point distributions. A dense top-``K`` token missing from
  the sparse top-``K`` gets the sparse ``K``-th log-probability, an upper bound of its true
  value. Coarse-graining can only lower KL (data processing inequality), so with exact sparse
  values this is a lower bound of the true KL; the substitution makes it an estimate. Identical
  inputs give exactly 0.
* **NLL**: mean negative log-likelihood of the actual next tokens (perplexity = exp(NLL)).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from . import tasks


@dataclass
class PromptLogprobs:
    """Prompt logprobs of one prompt as arrays (positions ``1 .. L-1``).

    Attributes:
        top_ids: ``[L-1, K]`` int64 token ids, most likely first.
        top_logprobs: ``[L-1, K]`` float64 their log-probabilities.
        token_logprobs: ``[L-1]`` float64 log-probability of the actual next prompt token.
    """

    top_ids: np.ndarray
    top_logprobs: np.ndarray
    token_logprobs: np.ndarray


def fidelity_prompts(tokenizer, lengths, num_prompts: int, *, seed: int = 0, essay_dir=tasks.DEFAULT_ESSAY_DIR) -> list[tuple[int, list[int]]]:
    """``num_prompts`` windows of plain essay text per length, ``(length, token ids)``.

    Windows of the tokenized essay corpus (wrapping around) at seeded random offsets; a BOS
    token leads if the tokenizer adds one to plain text.
    """
    corpus = tokenizer("".join(tasks.essay_units(essay_dir)), add_special_tokens=False)["input_ids"]
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    is_prefixed = with_special[len(with_special) - len(plain):] == plain
    lead = with_special[: len(with_special) - len(plain)] if is_prefixed else []
    prompts = []
    for length in lengths:
        rng = random.Random(f"fidelity/{seed}/{length}")
        for _ in range(num_prompts):
            start = rng.randrange(len(corpus))
            need = length - len(lead)
            window = (corpus[start:] + corpus * (need // len(corpus) + 1))[:need]
            prompts.append((length, list(lead) + window))
    return prompts


def from_vllm(prompt_logprobs, prompt_token_ids: list[int], num_logprobs: int) -> PromptLogprobs:
    """Convert one request's ``RequestOutput.prompt_logprobs`` (flat or a list of dicts).

    vLLM gives, per position, the actual token first and then the top ``K`` (ranks 1..K); the
    first position has none.
    """
    k = num_logprobs
    actual = prompt_token_ids[1:]
    if hasattr(prompt_logprobs, "start_indices"):  # FlatLogprobs
        starts = np.asarray(prompt_logprobs.start_indices)[1:]
        ids = np.asarray(prompt_logprobs.token_ids, dtype=np.int64)
        lps = np.asarray(prompt_logprobs.logprobs, dtype=np.float64)
        ranks = np.asarray([-1 if r is None else r for r in prompt_logprobs.ranks], dtype=np.int64)
        top = starts[:, None] + 1 + np.arange(k)[None, :]
        if not (np.all(ranks[top] == np.arange(1, k + 1)) and np.array_equal(ids[starts], actual)):
            raise ValueError("unexpected vLLM prompt-logprob layout (not actual token + top-K)")
        return PromptLogprobs(ids[top], lps[top], lps[starts])
    top_ids, top_lps, token_lps = [], [], []
    for position, token in zip(prompt_logprobs[1:], actual, strict=True):
        ranked = sorted((lp.rank, tok, lp.logprob) for tok, lp in position.items() if lp.rank <= k)
        top_ids.append([tok for _, tok, _ in ranked[:k]])
        top_lps.append([lp for _, _, lp in ranked[:k]])
        token_lps.append(position[token].logprob)
    return PromptLogprobs(np.asarray(top_ids), np.asarray(top_lps), np.asarray(token_lps))


def approx_kl(dense: PromptLogprobs, sparse: PromptLogprobs) -> np.ndarray:
    """``[positions]`` KL(dense || sparse) on the dense top-K plus a rest bucket (module docstring)."""
    match = dense.top_ids[:, :, None] == sparse.top_ids[:, None, :]  # [P, K, K]
    found = match.any(axis=-1)
    sparse_at = np.where(match, sparse.top_logprobs[:, None, :], -np.inf).max(axis=-1)
    floor = sparse.top_logprobs.min(axis=-1, keepdims=True)
    log_q = np.where(found, sparse_at, floor)  # [P, K]
    log_p = dense.top_logprobs
    p, q = np.exp(log_p), np.exp(log_q)
    rest_p = np.clip(1.0 - p.sum(axis=-1), 1e-12, 1.0)
    rest_q = np.clip(1.0 - q.sum(axis=-1), 1e-12, 1.0)
    kl = (p * (log_p - log_q)).sum(axis=-1) + rest_p * (np.log(rest_p) - np.log(rest_q))
    return np.maximum(kl, 0.0)


def compare(dense: list[PromptLogprobs], sparse: list[PromptLogprobs]) -> dict:
    """Agreement, KL and NLL over all positions of paired prompts (dense[i] vs sparse[i])."""
    agree, kl, nll_dense, nll_sparse = [], [], [], []
    for d, s in zip(dense, sparse, strict=True):
        agree.append(d.top_ids[:, 0] == s.top_ids[:, 0])
        kl.append(approx_kl(d, s))
        nll_dense.append(-d.token_logprobs)
        nll_sparse.append(-s.token_logprobs)
    cat = np.concatenate
    return {
        "positions": int(sum(len(a) for a in agree)),
        "top1_agreement": float(cat(agree).mean()),
        "mean_kl": float(cat(kl).mean()),
        "nll_dense": float(cat(nll_dense).mean()),
        "nll_sparse": float(cat(nll_sparse).mean()),
    }


__all__ = ["PromptLogprobs", "approx_kl", "compare", "fidelity_prompts", "from_vllm"]
