"""The essay corpus the retrieval-task tests build their haystacks from.

``benchmarks.quality.tasks.DEFAULT_ESSAY_DIR``: ``$PROXYATTN_ESSAY_DIR``, else the shared data
folder beside the repository (where CI lays it). On a machine without it those tests skip with a
reason; under CI (``CI`` set) they run and fail loudly instead, so a lost corpus is never hidden.
"""
from __future__ import annotations

import os

import pytest

from benchmarks.quality.tasks import DEFAULT_ESSAY_DIR

ESSAYS_PRESENT = any(DEFAULT_ESSAY_DIR.glob("*.txt"))

needs_essays = pytest.mark.skipif(
    not ESSAYS_PRESENT and not os.environ.get("CI"),
    reason=f"no essay corpus at {DEFAULT_ESSAY_DIR}: set PROXYATTN_ESSAY_DIR to a folder of .txt files",
)
