"""FlashInfer's plan for one chunk, and the device buffers its kernel reads, cached per device.

**Shapes.** For a chunk of ``R`` query-block rows (one pseudo-request each, see
:mod:`.flashinfer`), FlashInfer takes a CSR page list per row: ``qo_indptr [R + 1]`` (host),
``paged_kv_indptr [R + 1]``, ``paged_kv_indices [indptr[-1]]`` and
``paged_kv_last_page_len [R]`` int32 (a row's keys are ``(pages - 1) * page_size +
last_page_len``). :meth:`_ChunkPlan.write_pages` fills them on the device from a
:class:`.union_pages.UnionPagePlan` (``block_table [R, Kb * block_size // page_size]``,
``seqused_k [R]``); ``kv_indices`` has room for every row's whole causal extent.

**Plan once per chunk, device buffers per layer (why this is safe, from the csrc of the accepted
releases, see :mod:`.flashinfer_release`).**
``BatchPrefillWithPagedKVCacheWrapper.plan()`` is host code: it reads ``qo_indptr``,
``paged_kv_indptr`` and ``paged_kv_last_page_len`` on the host and writes a schedule into the
wrapper's int workspace. What the kernel then reads differs by FlashInfer backend:

* ``"fa2"`` (``include/flashinfer/attention/prefill.cuh``,
  ``BatchPrefillWithPagedKVCacheKernel``): each CTA takes its request and query tile from the
  schedule (``request_indices``, ``qo_tile_indices``), then reads the request's lengths *from
  the device buffers* at run time: ``qo_len`` from ``qo_indptr``, ``kv_len`` from
  ``paged_kv_t::get_length`` (``include/flashinfer/page.cuh``: ``indptr`` and
  ``last_page_len``), pages from ``indices``. The host KV lengths only size the split-KV
  partition (``PrefillSplitQOKVIndptr`` in ``include/flashinfer/attention/scheduler.cuh``);
  with ``disable_split_kv=True`` every (request, query tile) is one CTA that runs over
  ``[kv_start, kv_len)`` of the *device* length, and no merge pass runs. The query side of the
  schedule (rows, tile size from the mean packed query length) is exact on the host: rows and
  their query counts follow from ``ctx``, ``q_len`` and ``block_size`` (Python ints). So plan
  runs once per chunk shape with each row's upper bound (its whole causal extent) and every
  layer only rewrites ``indptr`` (a device cumsum), ``indices`` and ``last_page_len`` on the
  device: **no host sync per layer**. The wrapper's run reads the buffers it was planned with;
  ``indices`` is ours already (``plan`` keeps a tensor that is on the device as is), ``indptr``
  and ``last_page_len`` are rebound to ours after ``plan`` (:meth:`_ChunkPlan._bind`, the one
  use of FlashInfer internals; hence the fixed set of releases). Programmatic dependent launch is
  turned off for these runs: the fa2 kernel reads the lengths before its ``griddepcontrol.wait``,
  so it must not start before the kernels that write them end.
* ``"fa3"`` (SM90; ``csrc/batch_prefill_sm90.cu``, ``PrefillSM90Plan`` in ``scheduler.cuh``,
  ``include/flashinfer/attention/hopper/sparse_mainloop.cuh``): the schedule *copies each
  request's KV length and page offset* (host values) into the workspace, and the kernel reads
  those; the device ``indptr``/``last_page_len`` are not read at all, only ``indices``. Shorter
  actual lengths would be computed at the planned length: not safe. This backend therefore
  plans every layer after one device-to-host copy of the union's lengths (a sync per layer;
  ``benchmarks/kernels/bench_kernels.py`` measures it). It is the ``backend="fa3"`` option, not the
  default: on the H200 (128K context, 8K chunk) its kernel alone beats fa2's by 1.2-1.5x, but
  the sync and its host plan (about 1.7 ms for 32 heads) stall every layer. Rewriting the
  schedule's per-work-item lengths in the workspace on the device would remove both; not done
  (it depends on the layout of ``PrefillPlanSM90Info``, deeper internals).

Wrappers, their workspaces and the per-chunk buffers are cached per device (not per layer) in a
small LRU keyed by the chunk shape ``(backend, ctx, q_len, block_size, page_size, Hq, Hkv, D,
dtype, scale)``, so layers 2..N of a step (and equal chunks of other requests) reuse the plan.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import NamedTuple

import torch

from ..params import ChunkGeometry
from .flashinfer_release import FLASHINFER_REQUIREMENT, import_flashinfer, installed_flashinfer_version
from .union_pages import UnionPagePlan, row_bounds

#: FlashInfer backends: "fa2" plans once per chunk (no per-layer sync), "fa3" plans per layer.
BACKENDS = ("fa2", "fa3")
DEFAULT_BACKEND = "fa2"
#: Planned chunks kept per device (each holds a wrapper: 8 MiB of device and 8 MiB of pinned
#: int workspace). Distinct chunk shapes in one step are the long prefill rows of the batch.
PLAN_CACHE_SIZE = 8
#: The float workspace, shared by a device's wrappers: split-KV is off, so the kernels write
#: no partial results there; FlashInfer only wants a buffer.
FLOAT_WORKSPACE_BYTES = 16 << 20


class ChunkShape(NamedTuple):
    """What a plan depends on (the cache key): the chunk's rows and the layer's shapes."""

    backend: str
    ctx: int
    q_len: int
    block_size: int
    page_size: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    scale: float


class _ChunkPlan:
    """One wrapper planned for one :class:`ChunkShape`, and the device buffers its kernel reads.

    Host (once per chunk shape): ``qo_indptr [R + 1]`` and each row's largest page list (its
    causal extent), which size the buffers. Device (rewritten by every layer):
    ``kv_indptr [R + 1]``, ``kv_indices [capacity]`` and ``last_page_len [R]`` int32.
    """

    def __init__(self, wrapper, shape: ChunkShape, device: torch.device):
        self.wrapper = wrapper
        self.planned = None  # CUDA event after the last plan's copy out of pinned memory
        self.plans = 0  # plan() calls on this chunk shape (tests, benchmark)
        self.reset(shape, device)

    def reset(self, shape: ChunkShape, device: torch.device) -> None:
        """Take a new chunk shape (the wrapper is reused; its next ``plan`` overwrites the old)."""
        self.shape = shape
        geo = ChunkGeometry(shape.ctx, shape.q_len, shape.block_size)
        _, row_end = row_bounds(geo, "cpu")
        self.num_rows = int(row_end.numel())
        self.qo_indptr_host = torch.zeros(self.num_rows + 1, dtype=torch.int32)
        self.qo_indptr_host[1:] = row_end - shape.ctx
        # Upper bound: a row whose union is its whole causal extent reads keys [0, row_end).
        max_pages = (row_end + shape.page_size - 1) // shape.page_size
        self.max_kv_indptr_host = torch.zeros(self.num_rows + 1, dtype=torch.int32)
        self.max_kv_indptr_host[1:] = max_pages.cumsum(0)
        self.max_last_page_len_host = (row_end - (max_pages - 1) * shape.page_size).to(torch.int32)
        capacity = int(self.max_kv_indptr_host[-1])
        self.kv_indptr = torch.zeros(self.num_rows + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.zeros(capacity, dtype=torch.int32, device=device)
        self.last_page_len = torch.zeros(self.num_rows, dtype=torch.int32, device=device)
        self.slots = torch.arange(capacity, dtype=torch.int32, device=device)
        self.plans = 0

    # -- host side -------------------------------------------------------------------------
    def plan(self, kv_indptr_host: torch.Tensor, last_page_len_host: torch.Tensor) -> None:
        """``wrapper.plan`` with these host lengths (host work plus one async copy)."""
        self.wait()  # the pinned buffer it refills may still be copying the last plan
        s = self.shape
        self.wrapper.plan(
            self.qo_indptr_host, kv_indptr_host, self.kv_indices, last_page_len_host,
            s.num_q_heads, s.num_kv_heads, s.head_dim, s.page_size,
            causal=True, sm_scale=s.scale, q_data_type=s.dtype, kv_data_type=s.dtype,
            non_blocking=True, disable_split_kv=True,
        )
        self._bind()
        if self.kv_indices.is_cuda:
            self.planned = torch.cuda.Event()
            self.planned.record()
        self.plans += 1

    def wait(self) -> None:
        """Wait for the copy of the last plan out of the wrapper's pinned buffer (done long
        before, unless the GPU runs a whole LRU cycle of chunk shapes behind the host)."""
        if self.planned is not None:
            self.planned.synchronize()

    def plan_upper_bound(self) -> None:
        """Plan for every row's largest page list ("fa2": valid for any union of the rows)."""
        self.plan(self.max_kv_indptr_host, self.max_last_page_len_host)

    def plan_from_device(self) -> None:
        """Plan for the lengths in the device buffers: one device-to-host copy (a sync)."""
        host = torch.cat([self.kv_indptr, self.last_page_len]).cpu()
        self.plan(host[: self.num_rows + 1], host[self.num_rows + 1 :])

    def _bind(self) -> None:
        """Make the planned wrapper read our device buffers (FlashInfer internals, the same in
        every accepted release).

        ``plan`` keeps ``paged_kv_indices`` as given (``Tensor.to`` of a tensor already on the
        device returns it) and copies ``indptr``/``last_page_len`` (it needs them on the host);
        ``run`` passes ``_paged_kv_indptr_buf``, ``_paged_kv_indices_buf`` and
        ``_paged_kv_last_page_len_buf`` to the kernel."""
        w = self.wrapper
        for name in ("_paged_kv_indptr_buf", "_paged_kv_indices_buf", "_paged_kv_last_page_len_buf"):
            if not hasattr(w, name):
                raise RuntimeError(
                    f"proxyattn: FlashInfer's prefill wrapper has no {name}; this path needs "
                    f"{FLASHINFER_REQUIREMENT}, got {installed_flashinfer_version()}"
                )
        if w._paged_kv_indices_buf is not self.kv_indices:
            raise RuntimeError(
                f"proxyattn: FlashInfer copied paged_kv_indices in plan(); this path needs "
                f"{FLASHINFER_REQUIREMENT}, got {installed_flashinfer_version()}"
            )
        w._paged_kv_indptr_buf = self.kv_indptr
        w._paged_kv_last_page_len_buf = self.last_page_len

    # -- device side (every layer) -----------------------------------------------------------
    def write_pages(self, union: UnionPagePlan) -> None:
        """Fill the device buffers with one layer's union (kernel launches only, no sync).

        Row ``r`` reads ``seqused_k[r]`` keys: its first ``ceil(seqused_k / page_size)`` pages
        of ``union.block_table[r]`` (the selected blocks ascending; only the diagonal block is
        partial). Packed back to back: slot ``s`` of ``kv_indices`` belongs to the row whose
        ``indptr`` range holds it; slots past the total keep junk that no row reads."""
        page_size = self.shape.page_size
        pages_per_row = union.block_table.shape[1]
        num_pages = (union.seqused_k + page_size - 1) // page_size  # [R]
        torch.cumsum(num_pages, 0, dtype=torch.int32, out=self.kv_indptr[1:])
        torch.sub(union.seqused_k, (num_pages - 1) * page_size, out=self.last_page_len)
        row = torch.searchsorted(self.kv_indptr[1:], self.slots, right=True, out_int32=True)
        row = row.clamp_(max=self.num_rows - 1)
        col = (self.slots - self.kv_indptr[row]).clamp_(0, pages_per_row - 1)
        torch.index_select(union.block_table.flatten(), 0, row * pages_per_row + col, out=self.kv_indices)


class _DeviceState:
    """A device's shared float workspace and its planned chunks (LRU)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.workspace = torch.empty(FLOAT_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.plans: OrderedDict[ChunkShape, _ChunkPlan] = OrderedDict()

    def get(self, shape: ChunkShape) -> _ChunkPlan:
        plan = self.plans.get(shape)
        if plan is not None:
            self.plans.move_to_end(shape)
            return plan
        if len(self.plans) >= PLAN_CACHE_SIZE:
            _, plan = self.plans.popitem(last=False)  # the least recently used
            if plan.shape.backend == shape.backend:
                plan.reset(shape, self.device)  # keep its wrapper and workspaces
            else:
                plan.wait()  # its pinned workspace is freed with it
                plan = None
        if plan is None:
            wrapper = import_flashinfer().BatchPrefillWithPagedKVCacheWrapper(
                self.workspace, "NHD", backend=shape.backend
            )
            plan = _ChunkPlan(wrapper, shape, self.device)
        if shape.backend == "fa2":
            plan.plan_upper_bound()
        self.plans[shape] = plan
        return plan


_STATES: dict[torch.device, _DeviceState] = {}


def clear_plan_cache() -> None:
    """Forget every planned chunk, wrapper and workspace (tests, benchmarks)."""
    _STATES.clear()


def chunk_plan(
    query: torch.Tensor, kv_cache: torch.Tensor, *, ctx: int, scale: float, block_size: int,
    backend: str = DEFAULT_BACKEND,
) -> _ChunkPlan:
    """The cached plan of this chunk shape (planned now on a miss; "fa2": plan done)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; accepted: {BACKENDS}")
    q_len, num_q_heads, head_dim = query.shape
    num_kv_heads, page_size = kv_cache.shape[1], kv_cache.shape[2]
    shape = ChunkShape(backend, ctx, q_len, block_size, page_size, num_q_heads, num_kv_heads,
                       head_dim, kv_cache.dtype, float(scale))
    device = query.device
    state = _STATES.get(device)
    if state is None:
        state = _STATES[device] = _DeviceState(device)
    return state.get(shape)
