"""Counting kernel compilations inside measured requests, in this process.

Triton: every ``JITFunction`` looks a launch's specialization up in its in-memory kernel cache
and, on a miss, calls ``knobs.runtime.jit_cache_hook`` (Triton >= 3.4; ``JITFunction.cache_hook``
before that) right before it compiles (or loads from Triton's disk cache) that variant: one call
per new specialization of the process, whichever code launches it. :class:`CompileCounter`
installs a hook there (chaining to any hook already set, never asking Triton to skip the
compile) and, while :meth:`CompileCounter.measuring`, records the kernel's name and module.
torch.compile: Dynamo counts each frame it converts (``counters["frames"]["total"]``, a
compile or a recompile) and each new graph (``counters["stats"]["unique_graphs"]``); the
counter takes their growth over the measured window.

(vLLM's own JIT monitor uses the other knob, ``jit_post_compile_hook``, after the compile.)
Hooks are process-wide, so the engine must run in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
A kernel variant compiled once stays cached for later engines of the process: a count is the
compiles this window paid, not the compiles a fresh process would pay.
"""
from __future__ import annotations

import contextlib


def _triton_hook_owner():
    """``(object, attribute)`` holding Triton's pre-compile hook, or None without Triton."""
    try:
        import triton
    except ImportError:
        return None
    knobs = getattr(triton, "knobs", None)
    runtime = getattr(knobs, "runtime", None)
    if runtime is not None and hasattr(runtime, "jit_cache_hook"):
        return runtime, "jit_cache_hook"
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        return None
    return (JITFunction, "cache_hook") if hasattr(JITFunction, "cache_hook") else None


def _dynamo_counts() -> dict | None:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - no torch.compile here: nothing to count
        return None
    return {"frames": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"])}


class CompileCounter:
    """While entered, Triton's pre-compile hook points here; compiles are recorded only inside
    :meth:`measuring` windows. ``triton_available`` says whether a hook could be installed."""

    def __init__(self):
        self.triton_available = False
        self.active = False
        self.kernels: list[dict] = []
        self._owner = self._attr = self._previous = None
        self._dynamo_start: dict | None = None
        self.dynamo: dict | None = None

    def hook(self, *args, **kwargs):
        """Triton's hook signature (keywords ``key, repr, fn, compile, is_manual_warmup,
        already_compiled``); returns what a previous hook returns (None: compile as usual)."""
        if self.active:
            fn = kwargs.get("fn")
            self.kernels.append({"name": getattr(fn, "name", None) or str(kwargs.get("repr", "?"))[:80],
                                 "module": getattr(fn, "module", None),
                                 "warmup": bool(kwargs.get("is_manual_warmup", False))})
        if self._previous is not None:
            return self._previous(*args, **kwargs)
        return None

    def __enter__(self):
        target = _triton_hook_owner()
        if target is not None:
            self._owner, self._attr = target
            self._previous = getattr(self._owner, self._attr)
            setattr(self._owner, self._attr, self.hook)
            self.triton_available = True
        return self

    def __exit__(self, *exc):
        if self._owner is not None:
            setattr(self._owner, self._attr, self._previous)
            self._owner = None

    @contextlib.contextmanager
    def measuring(self):
        """Record the compiles of this window (the lists start empty)."""
        self.kernels, self.dynamo = [], None
        self._dynamo_start = _dynamo_counts()
        self.active = True
        try:
            yield self
        finally:
            self.active = False
            end = _dynamo_counts()
            if self._dynamo_start is not None and end is not None:
                self.dynamo = {k: end[k] - self._dynamo_start[k] for k in end}

    def summary(self) -> dict:
        """Counts of the last window: ``total`` is Triton compiles + Dynamo frames converted
        (None when neither could be watched)."""
        triton = len(self.kernels) if self.triton_available else None
        frames = self.dynamo["frames"] if self.dynamo is not None else None
        known = [v for v in (triton, frames) if v is not None]
        return {"triton_available": self.triton_available, "triton_compiles": triton,
                "triton_kernels": sorted({f"{k['module']}.{k['name']}" for k in self.kernels}),
                "dynamo_frames": frames, "dynamo_graphs": self.dynamo["graphs"] if self.dynamo else None,
                "total": sum(known) if known else None}


def merge(summaries: list[dict]) -> dict:
    """The counts of several windows added up (``total`` None when every window's is)."""
    def add(key):
        values = [s[key] for s in summaries if s.get(key) is not None]
        return sum(values) if values else None

    return {"triton_available": all(s["triton_available"] for s in summaries) if summaries else False,
            "triton_compiles": add("triton_compiles"),
            "triton_kernels": sorted({k for s in summaries for k in s["triton_kernels"]}),
            "dynamo_frames": add("dynamo_frames"), "dynamo_graphs": add("dynamo_graphs"),
            "total": add("total")}
