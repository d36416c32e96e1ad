"""In-process vLLM engines for the robustness parts, and the instruments that watch them.

``engine_kwargs`` / ``with_engine`` build and tear down one ``vllm.LLM`` (proxyattn with its
config, or a dense vLLM backend with none); ``PlanRecorder`` (proxyattn's sparse chunks),
``SchedulerRecorder`` (every prefill chunk the scheduler sends) and ``PreemptionCounter``
patch their targets only while entered.
"""
from __future__ import annotations

import contextlib

from benchmarks.common import vllm_engine

# The dense control's config name: vLLM's own backend (--dense-backend), no proxyattn config.
CONTROL = "dense_fa"


def proxyattn_default(field: str, documented: int):
    """A field of ProxyAttn's default config (``documented``: its documented value, when the
    package cannot be imported here)."""
    try:
        from proxyattn_vllm.config import ProxyAttnConfig

        return getattr(ProxyAttnConfig(), field)
    except Exception:  # noqa: BLE001 - the documented default
        return documented


# ---------------------------------------------------------------------------------------------
# Engines and instruments (in-process: the scheduler and the attention metadata are reachable)


def engine_kwargs(args, *, proxyattn: dict | None, prefix_caching: bool, max_model_len: int,
                  backend: str = "proxyattn", **extra) -> dict:
    """vllm.LLM arguments; the proxyattn config goes to additional_config only for proxyattn
    (the dense control runs vLLM's own ``backend`` with none)."""
    kwargs = dict(
        model=args.model, attention_backend=backend, dtype=args.dtype, seed=0,
        enforce_eager=not args.cuda_graphs, max_model_len=max_model_len, block_size=args.page_size,
        max_num_batched_tokens=args.chunk, enable_prefix_caching=prefix_caching,
        gpu_memory_utilization=args.gpu_memory_utilization, disable_log_stats=False,
    )
    if backend == "proxyattn":
        kwargs["additional_config"] = {"proxyattn": dict(proxyattn or {})}
    kwargs.update(extra)
    kwargs.update(args.engine_args)
    return kwargs


def with_engine(kwargs: dict, fn):
    """``fn(llm)`` on a new in-process ``vllm.LLM``, which is shut down and dropped afterwards
    (also when construction or ``fn`` fails; no caller keeps a reference to it).

    (``benchmarks/common/vllm_engine.py``: a deleted in-process engine keeps its GPU memory.)"""
    from vllm import LLM

    llm = None
    try:
        llm = LLM(**kwargs)
        return fn(llm)
    finally:
        if llm is not None:
            vllm_engine.shut_down(llm)
        else:
            vllm_engine.release_memory()
        llm = None


def engine_info(llm) -> dict:
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        blocks, page = cache.num_gpu_blocks, cache.block_size
        return {"num_gpu_blocks": blocks, "page_size": page,
                "kv_cache_tokens": blocks * page if blocks else None}
    except AttributeError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:num_preemptions")


def counters(llm) -> dict:
    """vLLM's Prometheus counters of this engine (needs ``disable_log_stats=False``)."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - stats off or API changed: report nothing
        return {}
    out = dict.fromkeys(COUNTERS, 0)
    for m in metrics:
        if m.name in out and hasattr(m, "value"):
            out[m.name] += m.value
    return out


def counter_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


class _AttributePatch:
    """While entered, ``owner.name`` (from :meth:`_target`) is replaced by
    ``self._wrap(original)`` and restored on exit; ``available`` says whether the target existed
    (if not, nothing is patched and the subclass records nothing)."""

    def __init__(self):
        self.available = False
        self._owner = self._name = self._original = None

    def _target(self) -> tuple[object, str] | None:
        raise NotImplementedError

    def _wrap(self, original):
        raise NotImplementedError

    def __enter__(self):
        target = self._target()
        original = getattr(*target, None) if target is not None else None
        if original is None:
            return self
        self._owner, self._name = target
        self._original = original
        setattr(self._owner, self._name, self._wrap(original))
        self.available = True
        return self

    def __exit__(self, *exc):
        if self._owner is not None:
            setattr(self._owner, self._name, self._original)


def _scheduler_method(name: str) -> tuple[object, str] | None:
    try:
        from vllm.v1.core.sched.scheduler import Scheduler
    except ImportError:
        return None
    return Scheduler, name


class PlanRecorder(_AttributePatch):
    """Wraps ``proxyattn_vllm.metadata.plan_batch`` (called once per scheduler step): records the
    (ctx, q_len) of every sparse prefill chunk and counts prefill tokens, while ``active``."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.sparse: list[tuple[int, int]] = []
        self.prefill_tokens = 0

    def _target(self):
        try:
            import proxyattn_vllm.metadata as module
        except ImportError:
            return None
        return module, "plan_batch"

    def _wrap(self, original):
        def recording(*a, **k):
            plan = original(*a, **k)
            if self.active:
                try:
                    self.sparse.extend((int(r.ctx), int(r.q_len)) for r in plan.sparse_rows)
                    self.prefill_tokens += int(plan.num_tokens) - int(plan.num_decode_tokens)
                except (AttributeError, TypeError):
                    pass
            return plan

        return recording

    @contextlib.contextmanager
    def recording(self):
        self.sparse, self.prefill_tokens, self.active = [], 0, True
        try:
            yield self
        finally:
            self.active = False

    def summary(self) -> dict:
        if not self.available:
            return {"available": False}
        ctxs = sorted({c for c, _ in self.sparse})
        return {"available": True, "sparse_chunks": len(self.sparse),
                "sparse_ctx_values": ctxs[:32], "min_sparse_ctx": ctxs[0] if ctxs else None,
                "max_sparse_q_len": max((q for _, q in self.sparse), default=None),
                "prefill_tokens": self.prefill_tokens}


class SchedulerRecorder(_AttributePatch):
    """Wraps ``Scheduler._update_after_schedule`` (every backend): records the (ctx, q_len) of
    every prefill chunk the scheduler sends (q_len > 1, as plan_batch counts prefill; ctx = the
    request's computed tokens before it, so a cache hit or a recompute shows), while active."""

    def __init__(self):
        super().__init__()
        self.active = False
        self.chunks: list[tuple[int, int]] = []

    def _target(self):
        return _scheduler_method("_update_after_schedule")

    def _wrap(self, original):
        def recording(sched, scheduler_output, *a, **k):
            if self.active:
                try:
                    for req_id, n in scheduler_output.num_scheduled_tokens.items():
                        if n > 1:
                            self.chunks.append((int(sched.requests[req_id].num_computed_tokens), int(n)))
                except (AttributeError, KeyError, TypeError):
                    pass
            return original(sched, scheduler_output, *a, **k)

        return recording

    @contextlib.contextmanager
    def recording(self):
        self.chunks, self.active = [], True
        try:
            yield self
        finally:
            self.active = False

    @property
    def prefill_tokens(self) -> int:
        return sum(q for _, q in self.chunks)

    def summary(self) -> dict:
        if not self.available:
            return {"available": False}
        return {"available": True, "prefill_chunks": len(self.chunks), "prefill_tokens": self.prefill_tokens,
                "min_prefill_ctx": min((c for c, _ in self.chunks), default=None)}


@contextlib.contextmanager
def recording_both(recorder: PlanRecorder, scheduled: SchedulerRecorder | None):
    with recorder.recording(), (scheduled.recording() if scheduled else contextlib.nullcontext()):
        yield


class PreemptionCounter(_AttributePatch):
    """Counts ``Scheduler._preempt_request`` calls (the scheduler runs in this process)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def _target(self):
        return _scheduler_method("_preempt_request")

    def _wrap(self, original):
        def counting(sched, *a, **k):
            self.count += 1
            return original(sched, *a, **k)

        return counting


def greedy(max_tokens: int, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=logprobs)


def token_prompts(prompts: list[list[int]]):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=p) for p in prompts]
