"""Prompts of the robustness parts, as token ids (so that shared prefixes are exact).

Essay tokens (``--essays``: every ``.txt`` file, in name order) are the filler; the prefix
parts' layout check (:func:`prefix_layout`) says how many tokens a prefix-cache hit must give.
The sparse scenarios ask retrieval questions: a needle sentence ``The special magic number for
KEY is: NNNNNNN.`` is inserted into the essay text and the question at the end asks for KEY's
number, so whether an answer is right is a string check (:func:`answer_correct`).
"""
from __future__ import annotations

import os
import random
import re

NEEDLE = "The special magic number for {key} is: {value}."
QUESTION = "What is the special magic number for {key} mentioned in the text above?"
ANSWER_START = "The special magic number for {key} is:"
PLAIN_FRAME = "\n\nQuestion: {question}\nAnswer: {answer_start}"
ADJECTIVES = ("amber", "quiet", "rapid", "silver", "hollow", "golden", "crimson", "distant")
NOUNS = ("falcon", "harbor", "meadow", "lantern", "glacier", "orchard", "compass", "canyon")
MARKER = "\u2063CONTENT\u2063"


def load_essay_ids(tokenizer, essays_dir: str) -> list[int]:
    names = sorted(n for n in os.listdir(essays_dir) if n.endswith(".txt"))
    if not names:
        raise RuntimeError(f"no .txt files in {essays_dir}")
    text = "\n\n".join(open(os.path.join(essays_dir, n), encoding="utf-8").read() for n in names)
    return tokenizer.encode(text, add_special_tokens=False)


def take_tokens(ids: list[int], start: int, count: int) -> list[int]:
    """``count`` tokens from ``start``, wrapping around (the essays may be shorter)."""
    return [ids[(start + i) % len(ids)] for i in range(count)]


def special_prefix(tokenizer) -> list[int]:
    """What the tokenizer puts before any text (BOS for Llama, nothing for Qwen)."""
    return list(tokenizer.encode("", add_special_tokens=True))



def common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def prefix_layout(prefix: list[int], prompts: list[list[int]], page: int) -> dict:
    """Where the cached part ends: every prompt shares ``prefix`` and nothing more than the rest
    of its last, partial page with any other prompt, so each one's cache hit is exactly the
    prefix's whole pages (a longer shared run would make the hits, and the timing, depend on
    the order of the requests). Raises ValueError when that does not hold."""
    shared = len(prefix)
    expected = shared // page * page
    longest = 0
    for i, p in enumerate(prompts):
        if p[:shared] != prefix or len(p) <= shared:
            raise ValueError(f"prompt {i} does not extend the shared prefix")
        for q in prompts[i + 1:]:
            longest = max(longest, common_prefix_len(p, q))
    if longest // page != shared // page:
        raise ValueError(
            f"prompts share {longest} tokens, past the prefix's last partial page "
            f"({shared} tokens, pages of {page}): cache hits would exceed {expected} tokens")
    if len(set(map(tuple, prompts))) != len(prompts):
        raise ValueError("two prompts are identical")
    return {"prefix_tokens": shared, "expected_cached_tokens": expected,
            "prefix_ends_mid_page": shared % page != 0, "longest_shared_run": longest,
            "prompt_tokens": [len(p) for p in prompts]}


# ---------------------------------------------------------------------------------------------
# Retrieval (needle) prompts


def needle_key(index: int) -> str:
    """A distinct two-word key per index below 64 (then the pairs repeat with a number)."""
    pair = f"{ADJECTIVES[index % 8]}-{NOUNS[(index // 8 + index) % 8]}"
    return pair if index < 64 else f"{pair}-{index // 64}"


def needle_value(seed: int, index: int) -> str:
    """A 7-digit number, fixed by ``(seed, index)``."""
    return str(random.Random(seed * 100003 + index).randint(1_000_000, 9_999_999))


def answer_correct(text: str, answer: str) -> bool:
    """The first number in the generated text is the needle's value."""
    numbers = re.findall(r"\d+", text or "")
    return bool(numbers) and numbers[0] == answer


def chat_frame(tokenizer) -> tuple[list[int], str]:
    """``(head ids, tail text)`` around a user message: the chat template's opening (with any
    BOS it adds) and the text after the message up to the assistant's turn; a tokenizer
    without a chat template gets its special prefix and a plain ``Question:/Answer:`` tail
    (``""``: :func:`question_ids` then uses :data:`PLAIN_FRAME`)."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": MARKER}], tokenize=False,
                                             add_generation_prompt=True)
        if text.count(MARKER) == 1:
            before, after = text.split(MARKER)
            return list(tokenizer.encode(before, add_special_tokens=False)), after
    return special_prefix(tokenizer), ""


def question_ids(tokenizer, tail: str, key: str) -> list[int]:
    """The question about ``key`` after the document, the chat tail and the answer's start."""
    question, start = QUESTION.format(key=key), ANSWER_START.format(key=key)
    text = f"\n\n{question}{tail}{start}" if tail else PLAIN_FRAME.format(question=question, answer_start=start)
    return list(tokenizer.encode(text, add_special_tokens=False))


def haystack(tokenizer, essay_ids: list[int], start: int, length: int,
             needles: list[tuple[float, str, str]]) -> tuple[list[int], list[int]]:
    """``length`` tokens of essay text from ``start`` with each ``(depth, key, value)`` needle
    sentence inserted at that fraction of the filler; also each needle's first token position."""
    pieces = [(depth, tokenizer.encode(f"\n{NEEDLE.format(key=k, value=v)}\n", add_special_tokens=False))
              for depth, k, v in sorted(needles)]
    filler = length - sum(len(ids) for _, ids in pieces)
    if filler < 1:
        raise ValueError(f"a document of {length} tokens cannot hold {len(needles)} needle(s)")
    text = take_tokens(essay_ids, start, filler)
    out, positions, taken = [], [], 0
    for depth, ids in pieces:
        cut = int(depth * filler)
        out += text[taken:cut]
        taken = cut
        positions.append(len(out))
        out += ids
    return out + text[taken:], positions


def retrieval_prompt(tokenizer, frame, essay_ids: list[int], tokens: int, index: int, seed: int,
                     depth: float) -> dict:
    """One prompt of exactly ``tokens`` tokens asking for needle ``index``'s number."""
    head, tail = frame
    key, value = needle_key(index), needle_value(seed, index)
    question = question_ids(tokenizer, tail, key)
    doc_len = tokens - len(head) - len(question)
    start = (index * 7919 + seed * 104729) % max(1, len(essay_ids))
    doc, positions = haystack(tokenizer, essay_ids, start, doc_len, [(depth, key, value)])
    return {"ids": head + doc + question, "key": key, "answer": value,
            "needle_position": len(head) + positions[0]}


def retrieval_prompts(tokenizer, essay_ids: list[int], lengths: list[int], seed: int,
                      first_index: int = 0) -> list[dict]:
    """One retrieval prompt per length, each with its own needle, at depths 0.2, 0.5, 0.8 in turn."""
    frame = chat_frame(tokenizer)
    return [retrieval_prompt(tokenizer, frame, essay_ids, n, first_index + i, seed, (0.2, 0.5, 0.8)[i % 3])
            for i, n in enumerate(lengths)]


def shared_document_prompts(tokenizer, essay_ids: list[int], prefix_tokens: int, questions: int,
                            seed: int, page: int) -> dict:
    """The sparse prefix scenario's prompts: one document of ``prefix_tokens`` tokens (chat
    head included) holding ``questions`` needles at evenly spread depths, asked about one needle
    per prompt. ``warm`` is the document alone; :func:`prefix_layout` checks the hits."""
    head, tail = chat_frame(tokenizer)
    needles = [((i + 1) / (questions + 1), needle_key(i), needle_value(seed, i)) for i in range(questions)]
    doc, positions = haystack(tokenizer, essay_ids, 0, prefix_tokens - len(head), needles)
    prefix = head + doc
    prompts = [{"ids": prefix + question_ids(tokenizer, tail, k), "key": k, "answer": v,
                "needle_position": len(head) + p} for (_, k, v), p in zip(needles, positions)]
    layout = prefix_layout(prefix, [p["ids"] for p in prompts], page)
    return {"warm": prefix, "prompts": prompts, **layout}
