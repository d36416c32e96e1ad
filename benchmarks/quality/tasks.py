"""Synthetic long-context tasks in the style of RULER, at exact token lengths (own templates).

Every sample is a prompt of **exactly** ``length`` tokens for a given Hugging Face tokenizer:
an instruction, a haystack (essay text, noise sentences or a word list) with the task's
"needles" inserted at random depths, a question, and the start of the answer. The haystack is
grown or shrunk by whole units (words or sentences) until the prompt is just short of the target,
then a few one-token pad strings (e.g. ``" a"``) close the gap; the final length is checked by
encoding the final text, so ``len(encode(sample.prompt)) == length`` always holds.

Prompt format (one per tokenizer, recorded by the runner):

* **chat** (default when the tokenizer has a chat template, i.e. instruct models): the
  instruction, haystack and question are one user message rendered with
  ``apply_chat_template(..., add_generation_prompt=True)``; the answer prefix follows the
  generation prompt (the model continues the assistant turn). Encoded with
  ``add_special_tokens=False`` because the template already holds the special tokens.
* **plain**: ``instruction \\n\\n haystack \\n\\n question \\n\\n answer prefix``, encoded with
  ``add_special_tokens=True`` (a BOS token if the tokenizer adds one).

``Sample.prompt_token_ids`` is that encoding; send it as is (vLLM ``TokensPrompt``, or an
OpenAI-compatible ``/v1/completions`` with a token-id prompt) to get exactly ``length`` tokens.

Keys and values cannot be guessed: 7-digit random numbers, random pseudo-word keys
("tavo-gruselin"), random 5-letter variable names, random pseudo-words; each sample draws them
from its own seed, derived from (base seed, task, length, index), so samples are reproducible.

Scoring (:func:`score`): the fraction of the expected answers found in the model's output,
case-insensitive, each as a whole token (not inside a longer word or number).
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

#: Plain-text essays for the haystacks: $PROXYATTN_ESSAY_DIR, else the development checkout's
#: shared data folder beside the repository (any folder of .txt files works: --essay-dir).
DEFAULT_ESSAY_DIR = Path(
    os.environ.get("PROXYATTN_ESSAY_DIR")
    or Path(__file__).resolve().parents[3] / "shared" / "data" / "pg_essays"
)

# Own filler sentences for the "noise" haystack (bland, repetitive, no numbers or names).
NOISE_SENTENCES = (
    "The lamp on the desk stays lit.",
    "A train passes somewhere far away.",
    "The kettle cools slowly on the stove.",
    "Someone closes a window upstairs.",
    "The clock keeps its slow and steady pace.",
    "Rain taps lightly against the glass.",
    "A dog barks once and then goes quiet.",
    "The curtains move a little in the draft.",
)

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+$")


# --------------------------------------------------------------------------------------------
# Samples and scoring


@dataclass
class Sample:
    """One prompt of a task at an exact token length.

    Attributes:
        task: task name (a key of :data:`TASKS`).
        length: prompt length in tokens (``len(prompt_token_ids)``).
        seed: the sample's own seed (the same inputs give the same sample).
        index: position of the sample in its (task, length) cell.
        prompt: the final prompt text (chat-formatted or plain, see the module docstring).
        prompt_token_ids: its encoding, ``length`` tokens.
        answers: the strings the output must contain (all of them for full credit).
        max_tokens: a generation budget that fits the answer.
    """

    task: str
    length: int
    seed: int
    index: int
    prompt: str
    prompt_token_ids: list[int]
    answers: list[str]
    max_tokens: int


def _answer_pattern(answer: str) -> re.Pattern:
    return re.compile(r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])", re.IGNORECASE)


def score(output: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` present in ``output`` (case-insensitive, whole tokens), in [0, 1]."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    return sum(bool(_answer_pattern(a).search(output)) for a in answers) / len(answers)


# --------------------------------------------------------------------------------------------
# Random keys, values and words


def sample_seed(base_seed: int, task: str, length: int, index: int) -> int:
    """A stable 31-bit seed for one sample (independent of Python's hash randomisation)."""
    digest = hashlib.sha256(f"{base_seed}/{task}/{length}/{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def pseudo_word(rng: random.Random, syllables: int) -> str:
    """A pronounceable made-up word such as ``"tavoril"`` (consonant-vowel syllables)."""
    word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
    return word + rng.choice(_CONSONANTS) if rng.random() < 0.5 else word


def unique(rng: random.Random, make: Callable[[random.Random], str], count: int, avoid=()) -> list[str]:
    """``count`` distinct values of ``make(rng)``, none of them in ``avoid``."""
    seen, out = set(avoid), []
    while len(out) < count:
        value = make(rng)
        if value not in seen:
            seen.add(value)
            out.append(value)
    return out


def _key(rng: random.Random) -> str:
    return f"{pseudo_word(rng, 2)}-{pseudo_word(rng, 3)}"


def _number7(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _coded_word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))


_POOLS: dict[str, list[str]] = {}
_POOL_SIZE = 80_000  # more distinct words than a 32K-token list can hold


def word_pool(kind: str) -> list[str]:
    """A fixed list of distinct made-up words (``"pseudo"``) or coded words (``"coded"``).

    Samples draw their words from it with their own seed, so the words a sample uses (and
    its answers) are still unpredictable; building the pool once keeps long lists fast.
    """
    if kind not in _POOLS:
        rng = random.Random(f"word-pool/{kind}")
        make = _coded_word if kind == "coded" else lambda r: pseudo_word(r, r.choice((2, 3)))
        _POOLS[kind] = unique(rng, make, _POOL_SIZE)
    return _POOLS[kind]


# --------------------------------------------------------------------------------------------
# Haystack fillers: sequences of units (each ends with whitespace), taken m at a time


class Filler:
    """A sequence of text units; ``take(m)`` gives the first ``m``.

    ``any_boundary``: needles may go between any two units (else only after a sentence end).
    """

    any_boundary = True

    def take(self, m: int) -> list[str]:
        raise NotImplementedError


class CorpusFiller(Filler):
    """Words of a text corpus from a start offset, wrapping around."""

    any_boundary = False

    def __init__(self, units: list[str], start: int):
        self.units, self.start = units, start % len(units)

    def take(self, m: int) -> list[str]:
        out, pos = [], self.start
        while len(out) < m:
            chunk = self.units[pos : pos + m - len(out)]
            out.extend(chunk)
            pos = 0
        return out


class NoiseFiller(Filler):
    """The noise sentences, cycled from a start offset."""

    def __init__(self, start: int):
        self.start = start

    def take(self, m: int) -> list[str]:
        n = len(NOISE_SENTENCES)
        return [NOISE_SENTENCES[(self.start + i) % n] + " " for i in range(m)]


class ListFiller(Filler):
    """A fixed list of units (long enough for any prompt of the target length)."""

    def __init__(self, units: list[str]):
        self.units = units

    def take(self, m: int) -> list[str]:
        if m > len(self.units):
            raise ValueError(f"word list too short: {m} units asked, {len(self.units)} made")
        return self.units[:m]


_CORPUS_CACHE: dict[str, list[str]] = {}


def essay_units(essay_dir: str | Path = DEFAULT_ESSAY_DIR) -> list[str]:
    """The words (with their trailing whitespace) of every ``*.txt`` in ``essay_dir``, read in
    place, files in name order."""
    key = str(Path(essay_dir).resolve())
    if key not in _CORPUS_CACHE:
        files = sorted(Path(essay_dir).glob("*.txt"))
        if not files:
            raise FileNotFoundError(
                f"no .txt essays in {essay_dir}; pass --essay-dir (or set PROXYATTN_ESSAY_DIR) or use the noise haystack"
            )
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)
        _CORPUS_CACHE[key] = re.findall(r"\S+\s*", text)
    return _CORPUS_CACHE[key]


# --------------------------------------------------------------------------------------------
# Task layouts


@dataclass
class Layout:
    """What a task puts around and into the haystack.

    Attributes:
        instruction: user text before the haystack.
        question: user text after the haystack.
        answer_prefix: start of the model's answer (the model continues it).
        answers: expected strings.
        filler: the haystack units.
        inserts: ``(depth in [0, 1], text)`` placed between units at ``depth`` of the haystack,
            in list order for equal positions.
        separator: appended to each insert (units already end with whitespace).
    """

    instruction: str
    question: str
    answer_prefix: str
    answers: list[str]
    filler: Filler
    inserts: list[tuple[float, str]] = field(default_factory=list)
    separator: str = " "


@dataclass(frozen=True)
class TaskSpec:
    """A task: its layout builder ``build(rng, length, haystack)`` and its answer budget."""

    build: Callable[[random.Random, int, "Haystack"], Layout]
    max_tokens: int
    description: str


@dataclass(frozen=True)
class Haystack:
    """Where needle tasks take their background text: ``kind`` is "essay" or "noise"."""

    kind: str = "essay"
    essay_dir: Path = DEFAULT_ESSAY_DIR

    def filler(self, rng: random.Random) -> Filler:
        if self.kind == "essay":
            units = essay_units(self.essay_dir)
            return CorpusFiller(units, rng.randrange(len(units)))
        if self.kind == "noise":
            return NoiseFiller(rng.randrange(len(NOISE_SENTENCES)))
        raise ValueError(f"haystack must be 'essay' or 'noise'; got {self.kind!r}")


def _code_needle(key: str, value: str) -> str:
    return f"The access code for {key} is {value}."


def _niah(rng: random.Random, haystack: Haystack, *, keys: int, values_per_key: int, queries: int) -> Layout:
    """Needles ``"The access code for KEY is VALUE."``; the first ``queries`` keys are asked."""
    key_list = unique(rng, _key, keys)
    values = unique(rng, _number7, keys * values_per_key)
    inserts = [
        (rng.random(), _code_needle(key, values[k * values_per_key + v]))
        for k, key in enumerate(key_list)
        for v in range(values_per_key)
    ]
    rng.shuffle(inserts)
    asked = key_list[:queries]
    intro = "Below is a long text. Hidden in it are access codes, each given for a named item."
    if queries == 1 and values_per_key == 1:
        question = f"What is the access code for {asked[0]}? Answer with the number only."
        prefix = f"The access code for {asked[0]} is"
        answers = [values[0]]
    elif queries == 1:
        question = (
            f"The text gives {values_per_key} different access codes for {asked[0]}. "
            "List all of them, numbers only."
        )
        prefix = f"The access codes for {asked[0]} are"
        answers = values[:values_per_key]
    else:
        names = ", ".join(asked[:-1]) + f" and {asked[-1]}"
        question = f"What are the access codes for {names}? Give one number for each item."
        prefix = "The access codes are:"
        answers = [values[k * values_per_key] for k in range(queries)]
    return Layout(
        instruction=intro + " Read it carefully: a question about the codes follows the text.",
        question=question,
        answer_prefix=prefix,
        answers=answers,
        filler=haystack.filler(rng),
        inserts=inserts,
    )


def _variable_tracking(rng: random.Random, length: int, haystack: Haystack) -> Layout:
    """Two chains of 5 variables (``VAR A = 12345.``, ``VAR B = VAR A.``, ...) in noise; the
    answer is every variable of the chain that holds the asked value."""
    names = unique(rng, _var_name, 10)
    value, other = unique(rng, lambda r: str(r.randint(10_000, 99_999)), 2)
    inserts = []
    for chain, start_value in ((names[:5], value), (names[5:], other)):
        depths = sorted(rng.random() for _ in chain)
        inserts.append((depths[0], f"VAR {chain[0]} = {start_value}."))
        inserts.extend(
            (depth, f"VAR {name} = VAR {prev}.") for depth, prev, name in zip(depths[1:], chain, chain[1:])
        )
    return Layout(
        instruction=(
            "Below is a long text with a few variable assignments in it. A line 'VAR X = n.' "
            "gives X the number n; a line 'VAR Y = VAR X.' gives Y the value that X holds."
        ),
        question=f"Which variables end up holding the value {value}? List every one of them.",
        answer_prefix=f"The variables holding {value} are:",
        answers=names[:5],
        filler=NoiseFiller(rng.randrange(len(NOISE_SENTENCES))),
        inserts=inserts,
    )


def _shuffled_multiset(rng: random.Random, counts: list[tuple[str, int]]) -> list[str]:
    units = [word + " " for word, count in counts for _ in range(count)]
    rng.shuffle(units)
    return units


def _common_words(rng: random.Random, length: int, haystack: Haystack, num_common: int = 5) -> Layout:
    """A list of made-up words, each at most 3 times, plus ``num_common`` words repeated
    ``freq`` > 3 times at random places; the answer is those common words."""
    freq = max(6, min(30, length // 600))
    # Any prefix of a shuffled multiset with counts <= 3 has counts <= 3; every word is at
    # least one token, so ``length`` units always suffice.
    rare_count = -(-length // 3)
    words = rng.sample(word_pool("pseudo"), num_common + rare_count)
    common, rare = words[:num_common], words[num_common:]
    inserts = [(rng.random(), word) for word in common for _ in range(freq)]
    return Layout(
        instruction=(
            "Below is a long list of made-up words. A few of the words occur many more times "
            "than all the others."
        ),
        question=f"Which {num_common} words occur most often in the list? Answer with the {num_common} words only.",
        answer_prefix="The most frequent words are:",
        answers=common,
        filler=ListFiller(_shuffled_multiset(rng, [(word, 3) for word in rare])),
        inserts=inserts,
    )


def _frequent_words(rng: random.Random, length: int, haystack: Haystack, num_top: int = 3) -> Layout:
    """Coded 5-letter words with Zipf-shaped counts; the ``num_top`` most frequent are inserted
    ``4k, 3k, 2k`` times, strictly more than any other word (``<= 1.6k``), so the answer holds
    for any prefix of the filler."""
    k = max(3, length // 360)
    top_counts = [(num_top + 1 - i) * k for i in range(num_top)]  # 4k, 3k, 2k
    # Enough words for ``length`` units (each >= 1 token): rank r >= 4 gets 1.6k * (4/r)^1.5.
    ranks, total = [], 0
    rank = num_top + 1
    while total < length:
        count = max(1, int(0.8 * top_counts[-1] * ((num_top + 1) / rank) ** 1.5))
        ranks.append(count)
        total += count
        rank += 1
    words = rng.sample(word_pool("coded"), num_top + len(ranks))
    inserts = [(rng.random(), word) for word, count in zip(words, top_counts) for _ in range(count)]
    return Layout(
        instruction=(
            "Below is a long sequence of coded words. Some coded words are repeated far more "
            "often than the rest."
        ),
        question=f"Which {num_top} coded words appear most often? Answer with the {num_top} words only.",
        answer_prefix=f"The {num_top} most frequent coded words are:",
        answers=words[:num_top],
        filler=ListFiller(_shuffled_multiset(rng, list(zip(words[num_top:], ranks)))),
        inserts=inserts,
    )


TASKS: dict[str, TaskSpec] = {
    "niah_single": TaskSpec(
        lambda rng, length, hay: _niah(rng, hay, keys=1, values_per_key=1, queries=1), 16,
        "one access code, one question",
    ),
    "niah_multikey": TaskSpec(
        lambda rng, length, hay: _niah(rng, hay, keys=4, values_per_key=1, queries=1), 16,
        "four codes for four keys, one asked",
    ),
    "niah_multivalue": TaskSpec(
        lambda rng, length, hay: _niah(rng, hay, keys=1, values_per_key=4, queries=1), 48,
        "four codes for one key, all asked",
    ),
    "niah_multiquery": TaskSpec(
        lambda rng, length, hay: _niah(rng, hay, keys=4, values_per_key=1, queries=4), 48,
        "four codes for four keys, all asked",
    ),
    "variable_tracking": TaskSpec(_variable_tracking, 32, "follow a chain of 5 assignments"),
    "common_words": TaskSpec(_common_words, 40, "5 most common words of a list"),
    "frequent_words": TaskSpec(_frequent_words, 32, "3 most frequent coded words (Zipf)"),
}


# --------------------------------------------------------------------------------------------
# Prompt format and exact-length fitting

_SENTINEL = "\x00HAYSTACK\x00"
_PAD_CANDIDATES = (" a", " x", " -", " .", "x", "-", ".")


class PromptFormat:
    """Chat or plain prompt framing for one tokenizer (see the module docstring)."""

    def __init__(self, tokenizer, chat: bool | None = None):
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("chat format asked for, but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.chat = has_template if chat is None else chat
        self._pad_unit: str | None = None

    @property
    def name(self) -> str:
        return "chat" if self.chat else "plain"

    def frame(self, instruction: str, question: str, answer_prefix: str) -> tuple[str, str]:
        """Text before and after the haystack."""
        content = f"{instruction}\n\n{_SENTINEL}\n\n{question}"
        if not self.chat:
            head, tail = content.split(_SENTINEL)
            return head, f"{tail}\n\n{answer_prefix}"
        rendered = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the chat template altered the user message; use the plain format")
        head, tail = rendered.split(_SENTINEL)
        return head, tail + answer_prefix

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (batched: fast tokenizers encode in parallel)."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=not self.chat)["input_ids"]

    def pad_unit(self) -> str:
        """A short string that adds exactly one token per repetition at the end of a haystack."""
        if self._pad_unit is None:
            # Most haystacks end inside a sentence; after a sentence end the first pad may
            # merge differently, which fit_lengths corrects with one more round.
            base, after = "It ends here", "\n\nWhat"
            ref = len(self.encode([base + after])[0])
            self._pad_unit = _PAD_CANDIDATES[0]
            for unit in _PAD_CANDIDATES:
                lens = self.encode([base + unit * k + after for k in (1, 2, 3, 7)])
                if [len(ids) - ref for ids in lens] == [1, 2, 3, 7]:
                    self._pad_unit = unit
                    break
        return self._pad_unit


@dataclass
class _Draft:
    """A prompt being fitted: ``units`` haystack units plus ``pad`` pad strings.

    ``lo``/``lo_gap``: the most units known to leave a gap >= 0 (0 units always do);
    ``hi``: the fewest units known to overshoot.
    """

    layout: Layout
    head: str
    tail: str
    ratio: float = 1.0  # tokens per unit, refined as we go
    units: int = 0
    pad: int = 0
    padding: bool = False
    fixed: int = 0  # tokens with an empty haystack
    lo: int = 0
    lo_gap: int = 0
    hi: int | None = None
    tried_pads: set[int] = field(default_factory=set)
    ids: list[int] | None = None

    def haystack(self, m: int) -> str:
        units = self.layout.filler.take(m)
        positions = [(self._position(units, depth), i) for i, (depth, _) in enumerate(self.layout.inserts)]
        pieces, start = [], 0
        for pos, i in sorted(positions):
            pieces.extend(units[start:pos])
            pieces.append(self.layout.inserts[i][1] + self.layout.separator)
            start = pos
        pieces.extend(units[start:])
        return "".join(pieces).rstrip()

    def _position(self, units: list[str], depth: float) -> int:
        """Unit index for ``depth``: after a sentence end when the filler needs it."""
        target = min(len(units), round(depth * len(units)))
        if self.layout.filler.any_boundary:
            return target
        for offset in range(200):
            for pos in (target - offset, target + offset):
                if 0 <= pos <= len(units) and (pos == 0 or _SENTENCE_END.search(units[pos - 1])):
                    return pos
        return target

    def render(self, pad_unit: str, units: int | None = None, pad: int | None = None) -> str:
        units = self.units if units is None else units
        pad = self.pad if pad is None else pad
        return self.head + self.haystack(units) + pad_unit * pad + self.tail

    def update(self, tokens: int, length: int) -> None:
        """Next ``units``/``pad`` after the current prompt came out at ``tokens`` tokens."""
        gap = length - tokens
        if self.padding:
            pad = self.pad + gap
            if pad >= 0 and pad not in self.tried_pads:
                self.pad = pad
                self.tried_pads.add(pad)
                return
            # The pads merge with the haystack's end so that no pad count hits the target:
            # one unit less (a different end), then pad again; 0 units is a safe lower bound.
            self.padding, self.pad, self.tried_pads = False, 0, set()
            self.hi, self.units = self.units, max(0, self.units - 1)
            self.lo, self.lo_gap = 0, length - self.fixed
            return
        if self.units > 0:
            self.ratio = max((tokens - self.fixed) / self.units, 0.05)
        if gap > 0:
            self.lo, self.lo_gap = self.units, gap
        else:
            self.hi = self.units if self.hi is None else min(self.hi, self.units)
        step = gap / self.ratio
        proposal = self.units + (max(1, int(step)) if gap > 0 else -math.ceil(-step))
        if self.hi is not None and not self.lo < proposal < self.hi:
            proposal = (self.lo + self.hi) // 2
        if 0 < gap < max(2 * self.ratio, 4) or proposal <= self.lo:
            # Within a unit or two of the target, or no unit count in between: pad.
            self.units, self.pad, self.padding = self.lo, self.lo_gap, True
            self.tried_pads = {self.lo_gap}
        else:
            self.units = proposal


_MAX_ROUNDS = 32


def fit_lengths(drafts: list[_Draft], length: int, fmt: PromptFormat, what: Callable[[int], str]) -> None:
    """Choose ``units``/``pad`` of every draft so its prompt is exactly ``length`` tokens.

    Each round encodes all unfinished prompts in one batch. Units are added or removed using the
    observed tokens per unit (bisecting once the target is bracketed) until the gap is under
    two units, then pad strings close it.
    """
    pad_unit = fmt.pad_unit()
    empty = fmt.encode([d.render(pad_unit, 0, 0) for d in drafts])
    # Tokens per unit from the first units (a list filler holds >= ``length`` units).
    probe_units = min(2000, length)
    probe = fmt.encode(["".join(d.layout.filler.take(probe_units)) for d in drafts])
    for i, (draft, e, p) in enumerate(zip(drafts, empty, probe)):
        draft.fixed = len(e)
        if draft.fixed > length:
            raise ValueError(f"{what(i)}: {length} tokens is too short (the frame and needles alone take {draft.fixed})")
        draft.lo_gap = length - draft.fixed
        draft.ratio = max(len(p) / probe_units, 0.05)
        draft.units = int(draft.lo_gap / draft.ratio)

    pending = list(range(len(drafts)))
    for _ in range(_MAX_ROUNDS):
        if not pending:
            return
        encoded = fmt.encode([drafts[i].render(pad_unit) for i in pending])
        still = []
        for i, ids in zip(pending, encoded):
            draft = drafts[i]
            if len(ids) == length:
                draft.ids = ids
                continue
            draft.update(len(ids), length)
            still.append(i)
        pending = still
    if pending:
        raise RuntimeError(
            f"could not fit {len(pending)} prompts to exactly {length} tokens, e.g. {what(pending[0])}"
        )


def generate_samples(
    tokenizer,
    tasks: Sequence[str],
    lengths: Sequence[int],
    num_samples: int,
    *,
    seed: int = 0,
    haystack: Haystack = Haystack(),
    chat: bool | None = None,
) -> list[Sample]:
    """``num_samples`` samples of every task at every length, ordered by length, task, index.

    Args:
        tokenizer: a Hugging Face tokenizer (fast tokenizers make this much quicker).
        tasks: names from :data:`TASKS`.
        lengths: prompt lengths in tokens.
        seed: base seed; sample ``i`` of ``(task, length)`` uses ``sample_seed(seed, task, length, i)``.
        haystack: background text of the needle tasks (variable tracking uses noise, the word
            tasks their own lists).
        chat: force the chat (True) or plain (False) format; None picks chat when available.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    fmt = PromptFormat(tokenizer, chat)
    samples: list[Sample] = []
    for length in lengths:
        keys, drafts = [], []
        for task in tasks:
            for index in range(num_samples):
                s = sample_seed(seed, task, length, index)
                layout = TASKS[task].build(random.Random(s), length, haystack)
                head, tail = fmt.frame(layout.instruction, layout.question, layout.answer_prefix)
                keys.append((task, index, s))
                drafts.append(_Draft(layout, head, tail))
        fit_lengths(drafts, length, fmt, lambda i: f"task {keys[i][0]} sample {keys[i][1]} (seed {keys[i][2]})")
        pad_unit = fmt.pad_unit()
        for (task, index, s), draft in zip(keys, drafts):
            samples.append(Sample(
                task=task, length=length, seed=s, index=index,
                prompt=draft.render(pad_unit), prompt_token_ids=list(draft.ids),
                answers=list(draft.layout.answers), max_tokens=TASKS[task].max_tokens,
            ))
    return samples


__all__ = [
    "DEFAULT_ESSAY_DIR",
    "Haystack",
    "PromptFormat",
    "Sample",
    "TASKS",
    "essay_units",
    "generate_samples",
    "sample_seed",
    "score",
]
