"""benchmarks/quality/tasks.py: exact lengths with real tokenizers, answers present and not
guessable, reproducible seeds, task invariants, and the scorer."""
from __future__ import annotations

import re
from collections import Counter

import pytest

pytest.importorskip("transformers")

from benchmarks.quality import tasks  # noqa: E402
from tests._essays import needs_essays  # noqa: E402

pytestmark = needs_essays


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory):
    """The byte-level BPE tokenizer (one token per byte, a chat template) of the TTFT benchmark's
    dummy model (benchmarks/common/dummy_llama.py)."""
    from transformers import AutoTokenizer

    from benchmarks.common.dummy_llama import write_dummy_llama

    path = tmp_path_factory.mktemp("byte_tok")
    write_dummy_llama(str(path), num_layers=1)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    """The word-level tokenizer of the tiny test Llama (no chat template: plain format)."""
    from transformers import AutoTokenizer

    from proxyattn_vllm.testing import write_tiny_llama

    return AutoTokenizer.from_pretrained(write_tiny_llama(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def byte_samples(byte_tokenizer):
    return tasks.generate_samples(byte_tokenizer, list(tasks.TASKS), [1500, 2001], 2, seed=7)


def _haystack(sample: tasks.Sample, fmt: tasks.PromptFormat) -> str:
    """The prompt between the instruction and the question."""
    return sample.prompt.split("\n\n", 1)[1].rsplit("\n\n", 1)[0]


def test_exact_lengths_chat_format(byte_tokenizer, byte_samples):
    fmt = tasks.PromptFormat(byte_tokenizer)
    assert fmt.chat
    assert Counter((s.task, s.length) for s in byte_samples) == {
        (t, n): 2 for t in tasks.TASKS for n in (1500, 2001)
    }
    for s in byte_samples:
        assert len(s.prompt_token_ids) == s.length
        assert fmt.encode([s.prompt])[0] == s.prompt_token_ids


def test_exact_lengths_plain_format(word_tokenizer):
    samples = tasks.generate_samples(
        word_tokenizer, ["niah_single", "niah_multiquery", "variable_tracking"], [300, 333], 3,
        haystack=tasks.Haystack("essay"),
    )
    assert not tasks.PromptFormat(word_tokenizer).chat
    for s in samples:
        assert len(word_tokenizer(s.prompt)["input_ids"]) == s.length == len(s.prompt_token_ids)


def test_answers_in_haystack_not_in_question(byte_samples, byte_tokenizer):
    fmt = tasks.PromptFormat(byte_tokenizer)
    for s in byte_samples:
        haystack = _haystack(s, fmt)
        question = s.prompt[len(s.prompt) - 400:].rsplit("\n\n", 1)[-1]
        for answer in s.answers:
            assert re.search(rf"(?<![0-9A-Za-z]){re.escape(answer)}(?![0-9A-Za-z])", haystack), (s.task, answer)
            assert answer not in question, (s.task, answer)
        assert tasks.score(s.prompt, s.answers) == 1.0


def test_reproducible_and_not_guessable(byte_tokenizer, byte_samples):
    again = tasks.generate_samples(byte_tokenizer, list(tasks.TASKS), [1500, 2001], 2, seed=7)
    assert [(s.prompt, s.answers) for s in again] == [(s.prompt, s.answers) for s in byte_samples]
    other = tasks.generate_samples(byte_tokenizer, ["niah_single"], [1500], 2, seed=8)
    mine = [s for s in byte_samples if s.task == "niah_single" and s.length == 1500]
    assert {a for s in other for a in s.answers}.isdisjoint({a for s in mine for a in s.answers})
    numbers = [a for s in byte_samples if s.task.startswith("niah") for a in s.answers]
    assert all(re.fullmatch(r"[1-9]\d{6}", a) for a in numbers)
    assert len(set(numbers)) == len(numbers)


def _words(s: tasks.Sample, fmt) -> Counter:
    return Counter(_haystack(s, fmt).split())


def test_word_tasks_answers_are_the_most_frequent(byte_tokenizer, byte_samples):
    fmt = tasks.PromptFormat(byte_tokenizer)
    for s in byte_samples:
        if s.task not in ("common_words", "frequent_words"):
            continue
        counts = _words(s, fmt)
        others = [c for w, c in counts.items() if w not in s.answers and w.isalpha()]
        assert min(counts[a] for a in s.answers) > max(others), s.task
        if s.task == "frequent_words":
            top = [counts[a] for a in s.answers]
            assert top == sorted(top, reverse=True) and len(set(top)) == 3


def test_variable_chain_in_order(byte_samples):
    for s in byte_samples:
        if s.task != "variable_tracking":
            continue
        value = re.search(r"holding the value (\d+)", s.prompt).group(1)
        first = s.prompt.index(f"VAR {s.answers[0]} = {value}.")
        positions = [first] + [
            s.prompt.index(f"VAR {b} = VAR {a}.") for a, b in zip(s.answers, s.answers[1:])
        ]
        assert positions == sorted(positions)


def test_too_short_length_fails_clearly(byte_tokenizer):
    with pytest.raises(ValueError, match="too short"):
        tasks.generate_samples(byte_tokenizer, ["niah_multiquery"], [200], 1)


def test_score():
    assert tasks.score("The code is 1234567.", ["1234567"]) == 1.0
    assert tasks.score("codes: 12345678", ["1234567"]) == 0.0  # not part of a longer number
    assert tasks.score("ABCDE, fghij and more", ["abcde", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert tasks.score("", ["x"]) == 0.0
    with pytest.raises(ValueError):
        tasks.score("anything", [])
