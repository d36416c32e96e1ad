"""Per-batch metadata for the ProxyAttn backend: the FlashAttention metadata plus a CPU-side plan.

``ProxyAttnMetadataBuilder.build()`` runs once per scheduler step (shared by every layer of the
KV-cache group). It builds the stock FlashAttention metadata (the dense kernels' input) and a
:class:`ProxyAttnPlan` that sorts the batch's requests ("rows") into

* **decode** rows (``query_len == 1``; at the front because ``reorder_batch_threshold = 1``),
* **sparse** rows: prefill chunks of requests with ``seq_len >= min_sparse_len``, the rows
  ProxyAttn sparsifies (per-layer ``dense_layers`` are applied later, in the impl),
* **short** rows: other prefill chunks, attended densely,
* **padded** rows: ``query_len == 0`` (cudagraph padding), attended by nobody.

The plan is made from ``query_start_loc_cpu`` and ``seq_lens_cpu_upper_bound`` only (exact for
prefill rows; never the deprecated ``seq_lens_cpu``, which syncs the device and is gone in vLLM
0.32), so building it costs no device synchronisation. Its per-row numbers are Python ints, so
the impl can slice tensors without ``.item()``.

**Fast path.** Most steps of a serving engine are pure decode, where no row can be sparse. The
builder sees that from one scalar vLLM already computed (``max_query_len``) and then does
exactly what FlashAttention's builder does plus O(1) work: no :func:`plan_batch` (about 18 us
of numpy and tuple building per step on the CI CPU, 5x FA's whole build there), no per-request
loop, no tensor. Its plan (:meth:`ProxyAttnPlan.dense_only`) leaves the per-row classification
unset.

The FlashAttention metadata is wrapped, not subclassed: its fields differ between vLLM 0.26 and
0.32-0.34 (``use_cascade`` is gone, R-SWA and prefix-LM fields are new), and the wrapper keeps
ours separate from theirs.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.attention.backend import AttentionCGSupport, CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)

from proxyattn_kernels import ChunkGeometry

from ._compat import dense_kernel_is_flash_attn
from .config import load_config

logger = init_logger("vllm.proxyattn")

@dataclass(frozen=True)
class SparseRow:
    """One prefill chunk that ProxyAttn sparsifies: queries at ``[ctx, ctx + q_len)``.

    Attributes:
        req_idx: the request's row in the batch (its ``block_table`` row).
        token_start: offset of the chunk's first token in the batch's query/output tensors.
        q_len: tokens in the chunk.
        ctx: tokens of the request already in the cache before the chunk.
        seq_len: ``ctx + q_len``, the keys the chunk attends to.
        tail_tokens: the chunk's last tokens that form its dense tail (whole query-block rows
            holding the last ``dense_tail_tokens``; 0 without a tail).
        tail_cu_seqlens_q: ``[2]`` int32 on the device, ``[0, tail_tokens]``: the tail as one
            varlen sequence for a dense kernel (None without a tail).
    """

    req_idx: int
    token_start: int
    q_len: int
    ctx: int
    seq_len: int
    tail_tokens: int = 0
    tail_cu_seqlens_q: torch.Tensor | None = field(default=None, compare=False)

    @property
    def token_end(self) -> int:
        return self.token_start + self.q_len


@dataclass(frozen=True)
class DenseRun:
    """Consecutive dense rows (decodes and short prefill chunks), attended by one varlen call.

    Attributes:
        req_start, req_end: the rows ``[req_start, req_end)``.
        token_start, token_end: their tokens in the batch.
        max_query_len, max_seq_len: over the run (``max_seq_len`` is an upper bound).
        cu_seqlens_q: ``[req_end - req_start + 1]`` int32 on the device, rebased to 0.
    """

    req_start: int
    req_end: int
    token_start: int
    token_end: int
    max_query_len: int
    max_seq_len: int
    cu_seqlens_q: torch.Tensor | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ProxyAttnPlan:
    """CPU-side classification of one batch (see the module docstring).

    Row tuples hold request indices in batch order. ``num_tokens`` is the real token count
    (``query_start_loc_cpu[num_reqs]``; ``num_actual_tokens`` may include padding).

    The impl reads only ``has_sparse``, ``sparse_rows`` and ``dense_runs``. The per-row
    classification (``num_tokens``, ``decode_rows``, ``short_rows``, ``padded_rows``,
    ``num_decode_tokens``) is for diagnostics and tests: :func:`plan_batch` fills it; a
    :meth:`dense_only` plan (the builder's fast path) leaves it None, because computing it is
    per-row work on every decode step that nothing on the forward path needs.
    """

    num_reqs: int
    num_tokens: int | None
    decode_rows: tuple[int, ...] | None
    short_rows: tuple[int, ...] | None
    sparse_rows: tuple[SparseRow, ...]
    padded_rows: tuple[int, ...] | None
    num_decode_tokens: int | None
    dense_runs: tuple[DenseRun, ...] = ()

    @classmethod
    @functools.lru_cache(maxsize=4096)  # immutable, so one instance per batch size is shared
    def dense_only(cls, num_reqs: int) -> "ProxyAttnPlan":
        """The plan of a batch known to have no sparse row: one dense call over the whole batch.
        O(1): rows are not classified (those fields are None)."""
        return cls(num_reqs, None, None, None, (), None, None)

    @property
    def has_sparse(self) -> bool:
        return bool(self.sparse_rows)

    @property
    def is_classified(self) -> bool:
        """Whether the per-row fields are filled (a :func:`plan_batch` plan)."""
        return self.decode_rows is not None

    @property
    def num_decodes(self) -> int | None:
        return None if self.decode_rows is None else len(self.decode_rows)


def plan_batch(
    query_start_loc_cpu: torch.Tensor,
    seq_lens_cpu_upper_bound: torch.Tensor | None,
    num_reqs: int,
    min_sparse_len: int,
    max_dense_query_len: int = 1,
    block_size: int = 128,
    dense_tail_tokens: int = 0,
) -> ProxyAttnPlan:
    """Classify a batch's rows; CPU only, no device access.

    Args:
        query_start_loc_cpu: ``[>= num_reqs + 1]`` cumulative query lengths (CPU).
        seq_lens_cpu_upper_bound: ``[>= num_reqs]`` total lengths (CPU; exact for prefill rows),
            or None, in which case no row is sparsified.
        num_reqs: rows in the batch (including padded ones).
        min_sparse_len: prefill rows with ``seq_len >= min_sparse_len`` are sparse.
        max_dense_query_len: rows with ``query_len <= this`` are never sparse. It is
            ``1 + num_speculative_tokens``: a speculative-verify row looks like a short prefill,
            and its ``seq_lens_cpu_upper_bound`` is only an optimistic bound.
        block_size, dense_tail_tokens: the selection block size and the dense tail, for each
            sparse row's ``tail_tokens`` (``tail_cu_seqlens_q`` is left to the builder).

    Returns:
        The plan; ``dense_runs`` is filled (without device tensors) only when some row is sparse.
    """
    qsl = np.asarray(query_start_loc_cpu[: num_reqs + 1], dtype=np.int64)
    q_lens = np.diff(qsl)
    padded = q_lens == 0
    decode = q_lens == 1
    prefill = q_lens > 1
    if seq_lens_cpu_upper_bound is None:
        seq_lens = None
        sparse = np.zeros_like(prefill)
    else:
        seq_lens = np.asarray(seq_lens_cpu_upper_bound[:num_reqs], dtype=np.int64)
        sparse = prefill & (q_lens > max_dense_query_len) & (seq_lens >= min_sparse_len)
    short = prefill & ~sparse

    sparse_rows = []
    for r in np.flatnonzero(sparse).tolist():
        q_len, seq_len = int(q_lens[r]), int(seq_lens[r])
        geometry = ChunkGeometry(seq_len - q_len, q_len, block_size)
        tail = q_len - geometry.row_token_start(geometry.first_tail_row(dense_tail_tokens))
        sparse_rows.append(SparseRow(r, int(qsl[r]), q_len, seq_len - q_len, seq_len, tail))

    runs: list[DenseRun] = []
    if sparse_rows:
        dense = decode | short
        r = 0
        while r < num_reqs:
            if not dense[r]:
                r += 1
                continue
            start = r
            while r < num_reqs and dense[r]:
                r += 1
            max_seq = int(seq_lens[start:r].max())
            runs.append(
                DenseRun(start, r, int(qsl[start]), int(qsl[r]), int(q_lens[start:r].max()), max_seq)
            )

    return ProxyAttnPlan(
        num_reqs=num_reqs,
        num_tokens=int(qsl[-1]) if num_reqs else 0,
        decode_rows=tuple(np.flatnonzero(decode).tolist()),
        short_rows=tuple(np.flatnonzero(short).tolist()),
        sparse_rows=tuple(sparse_rows),
        padded_rows=tuple(np.flatnonzero(padded).tolist()),
        num_decode_tokens=int(decode.sum()),
        dense_runs=tuple(runs),
    )


@dataclass
class ProxyAttnMetadata:
    """What every ProxyAttn layer receives for one batch.

    Attributes:
        dense: the stock FlashAttention metadata of the whole batch (the dense kernels use it
            unchanged when no row is sparse, or sliced per :class:`DenseRun` otherwise).
        plan: the CPU-side row classification; ``plan.dense_runs`` carry device
            ``cu_seqlens_q`` when ``plan.has_sparse``.
    """

    dense: FlashAttentionMetadata
    plan: ProxyAttnPlan

    # A few FlashAttention fields that generic vLLM code reads from any metadata object.
    @property
    def num_actual_tokens(self) -> int:
        return self.dense.num_actual_tokens

    @property
    def max_query_len(self) -> int:
        return self.dense.max_query_len

    @property
    def query_start_loc(self) -> torch.Tensor:
        return self.dense.query_start_loc

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.dense.seq_lens

    @property
    def block_table(self) -> torch.Tensor:
        return self.dense.block_table

    @property
    def slot_mapping(self) -> torch.Tensor:
        return self.dense.slot_mapping


class ProxyAttnMetadataBuilder(FlashAttentionMetadataBuilder):
    """FlashAttention's builder plus the ProxyAttn plan.

    * ``reorder_batch_threshold = 1``: both model runners put decodes first.
    * ``UNIFORM_BATCH`` cudagraph support: pure-decode (uniform) batches replay FULL graphs
      through the inherited FA path; batches with prefill rows run attention eagerly (the
      sparse path is Python-driven and shape-dynamic). FA3 alone would declare ``ALWAYS``.
    * No cascade attention and no in-place block-table update (both would bypass the plan).
    * On a machine without vLLM's FlashAttention (CPU CI) FA3 ahead-of-time scheduling is
      switched off: ``get_scheduler_metadata`` does not exist there.
    * Decode-only batches (:meth:`is_decode_only`: every decode step) take a fast path:
      FA's build plus O(1) work.
    """

    _cudagraph_support = AttentionCGSupport.UNIFORM_BATCH
    supports_update_block_table: bool = False

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if not dense_kernel_is_flash_attn():
            self.aot_schedule = False
        self._init_reorder_batch_threshold(1)
        self.proxyattn_config = load_config(vllm_config)
        spec = vllm_config.speculative_config
        num_spec = (spec.num_speculative_tokens or 0) if spec is not None else 0
        self.max_dense_query_len = 1 + num_spec
        self._warned_no_upper_bound = False

    @classmethod
    def get_cudagraph_support(cls, vllm_config, kv_cache_spec) -> AttentionCGSupport:
        return cls._cudagraph_support

    def use_cascade_attention(self, *args, **kwargs) -> bool:
        # vLLM 0.26 asks; 0.32 has no cascade attention and never calls it.
        return False

    def is_decode_only(self, cm: CommonAttentionMetadata) -> bool:
        """True for batches of decode rows only (spec-decode verify rows and cudagraph padding
        rows included), where no row can be sparse. O(1): it reads ``max_query_len``, which
        bounds every row's query length (FA's kernels rely on that too).

        :func:`plan_batch` never sparsifies a row with ``q_len <= max_dense_query_len``. Should
        a model runner ever understate ``max_query_len``, the batch would run dense, which is
        exact: this test can turn a sparse row dense, never a dense row sparse.

        Batches with prefill chunks that are all shorter than ``min_sparse_len`` take the
        general path on purpose: their per-row plan costs ~20 us next to milliseconds of
        prefill, and ``benchmarks/robustness/gpu_robustness.py`` counts computed prefill tokens through
        :func:`plan_batch`.
        """
        return cm.max_query_len <= self.max_dense_query_len

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> ProxyAttnMetadata:
        cm = common_attn_metadata
        if self.is_decode_only(cm):
            # Fast path (every decode step, and FULL-cudagraph capture of decode batches): what
            # FlashAttentionMetadataBuilder.build does, with the arguments the general path
            # gives it for a batch without sparse rows.
            dense = super().build(0, cm, fast_build=fast_build)
            return ProxyAttnMetadata(dense=dense, plan=ProxyAttnPlan.dense_only(cm.num_reqs))
        upper = cm.seq_lens_cpu_upper_bound
        if upper is None and not self._warned_no_upper_bound:
            self._warned_no_upper_bound = True
            logger.warning(
                "proxyattn: the model runner gave no seq_lens_cpu_upper_bound; prefill runs "
                "dense for such batches (ProxyAttn never syncs the device to plan)."
            )
        plan = plan_batch(
            cm.query_start_loc_cpu,
            upper,
            cm.num_reqs,
            self.proxyattn_config.min_sparse_len,
            self.max_dense_query_len,
            self.proxyattn_config.block_size,
            self.proxyattn_config.dense_tail_tokens,
        )
        # With sparse rows the dense kernels run on slices, so FA3's whole-batch AOT schedule
        # would be wasted: fast_build skips it.
        dense = super().build(0, cm, fast_build=fast_build or plan.has_sparse)
        if any(row.tail_tokens for row in plan.sparse_rows):
            plan = dataclasses.replace(plan, sparse_rows=self._with_tail_tensors(plan.sparse_rows))
        if plan.dense_runs:
            qsl_cpu = cm.query_start_loc_cpu
            runs = []
            for run in plan.dense_runs:
                cu = (qsl_cpu[run.req_start : run.req_end + 1] - run.token_start).to(torch.int32)
                runs.append(
                    DenseRun(
                        run.req_start, run.req_end, run.token_start, run.token_end,
                        run.max_query_len, run.max_seq_len,
                        cu.to(self.device, non_blocking=True),
                    )
                )
            plan = dataclasses.replace(plan, dense_runs=tuple(runs))
        return ProxyAttnMetadata(dense=dense, plan=plan)

    def _with_tail_tensors(self, rows: tuple[SparseRow, ...]) -> tuple[SparseRow, ...]:
        """``rows`` with their ``tail_cu_seqlens_q`` (one host-to-device copy for all of them)."""
        cu = torch.tensor([[0, row.tail_tokens] for row in rows], dtype=torch.int32)
        cu = cu.to(self.device, non_blocking=True)
        return tuple(dataclasses.replace(row, tail_cu_seqlens_q=cu[i] if row.tail_tokens else None)
                     for i, row in enumerate(rows))
