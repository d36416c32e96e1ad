"""Output helpers of the robustness parts: progress lines and table cells."""
from __future__ import annotations


def log(msg: str) -> None:
    print(msg, flush=True)


def fmt(value, spec: str = "") -> str:
    """A table cell: ``-`` for None, else ``format(value, spec)``."""
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)
