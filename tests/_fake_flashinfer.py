"""A torch stand-in for ``flashinfer``'s paged prefill wrapper (CPU tests only), in the two API
variants of the releases ``proxyattn_kernels/block_sparse_attn/flashinfer_release.py`` accepts:
0.6.14 and 0.7.x (0.7.0.post1, 0.7.2.post1 and 0.7.4 read the same on everything below; 0.7.4's keywords).

It keeps the wrapper's Python-side contract that the module relies on, each variant with its
release's keyword names (an unknown keyword is a TypeError, as in the real signature), and
computes what the csrc computes, as read in those releases:

* ``plan`` reads ``qo_indptr``, ``paged_kv_indptr`` and ``paged_kv_last_page_len`` on the host,
  keeps ``paged_kv_indices`` as given when it is on the wrapper's device, and stores device
  copies in ``_qo_indptr_buf``, ``_paged_kv_indptr_buf``, ``_paged_kv_indices_buf`` and
  ``_paged_kv_last_page_len_buf``, which ``run`` hands to the kernel;
* backend "fa2": the kernel reads each request's query and KV lengths from those buffers at run
  time (``prefill.cuh``/``page.cuh``); backend "fa3": from the lengths planned on the host
  (``PrefillSM90Plan``), and only the page indices from the device;
* causal masking is aligned bottom-right; the fa2 kernel writes ``out`` as dense rows;
* 0.6.14: K and V must have equal strides; 0.7.x: they may differ (``SAME_KV_STRIDES``), both
  workspaces must be 16-byte aligned, and ``plan`` takes ``.contiguous()`` of its index inputs.

So a test through this module checks our plumbing (buffers, plan reuse, per-layer rewrites)
against that reading; the real kernels are checked on the GPU (tests/test_flashinfer_path.py).
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

#: One release per API variant; the fixture's default is the first.
RELEASES = ("0.6.14", "0.7.4")


class Counters:
    plans = 0
    runs = 0
    wrappers = 0


def _check_keywords(method: str, given: dict, known: frozenset) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}")


class BatchPrefillWithPagedKVCacheWrapper:
    """0.6.14's wrapper."""

    #: Keyword parameters of the real ``__init__``/``plan``/``run`` beyond the positional ones.
    INIT_KEYWORDS = frozenset({
        "kv_layout", "use_cuda_graph", "qo_indptr_buf", "paged_kv_indptr_buf", "paged_kv_indices_buf",
        "paged_kv_last_page_len_buf", "custom_mask_buf", "mask_indptr_buf", "backend", "jit_args",
        "jit_kwargs",
    })
    PLAN_KEYWORDS = frozenset({
        "head_dim_vo", "custom_mask", "packed_custom_mask", "causal", "pos_encoding_mode",
        "use_fp16_qk_reduction", "sm_scale", "window_left", "logits_soft_cap", "rope_scale",
        "rope_theta", "q_data_type", "kv_data_type", "o_data_type", "non_blocking", "prefix_len_ptr",
        "token_pos_in_items_ptr", "token_pos_in_items_len", "max_item_len_ptr", "seq_lens",
        "seq_lens_q", "block_tables", "max_token_per_sequence", "max_sequence_kv",
        "fixed_split_size", "disable_split_kv",
    })
    RUN_KEYWORDS = frozenset({
        "q_scale", "k_scale", "v_scale", "out", "lse", "return_lse", "enable_pdl", "window_left",
        "sinks", "kv_cache_sf", "skip_softmax_threshold_scale_factor",
    })
    SAME_KV_STRIDES_ONLY = True
    WORKSPACE_ALIGNMENT = None

    def __init__(self, float_workspace_buffer, kv_layout="NHD", **kwargs):
        _check_keywords("__init__", kwargs, self.INIT_KEYWORDS)
        backend = kwargs.pop("backend", "auto")
        # The wrapper's other options (CUDA graphs, its own index buffers, custom masks, JIT
        # variants) are not used: their defaults only.
        assert kv_layout == "NHD" and not kwargs, kwargs
        assert backend in ("fa2", "fa3"), backend
        self._check_alignment(float_workspace_buffer, "float_workspace_buffer")
        self.device = float_workspace_buffer.device
        self._backend = backend
        self._int_workspace_buffer = torch.empty(8 << 20, dtype=torch.uint8, device=self.device)
        self._qo_indptr_buf = self._paged_kv_indptr_buf = None
        self._paged_kv_indices_buf = self._paged_kv_last_page_len_buf = None
        Counters.wrappers += 1

    def _check_alignment(self, buffer, name):
        if self.WORKSPACE_ALIGNMENT is not None and buffer.data_ptr() % self.WORKSPACE_ALIGNMENT:
            raise ValueError(f"{name} must be {self.WORKSPACE_ALIGNMENT}-byte aligned")

    def _index_inputs(self, *tensors):
        """What ``plan`` keeps of its index inputs before copying them to the device."""
        return tensors

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim_qk, page_size, **kwargs):
        _check_keywords("plan", kwargs, self.PLAN_KEYWORDS)
        causal = kwargs.pop("causal", False)
        sm_scale = kwargs.pop("sm_scale", None)
        q_data_type = kwargs.pop("q_data_type", "float16")
        kv_data_type = kwargs.pop("kv_data_type", None)
        kwargs.pop("non_blocking", True)
        disable_split_kv = kwargs.pop("disable_split_kv", False)
        assert not kwargs, kwargs  # the options the stand-in does not compute
        assert kv_data_type in (None, q_data_type)
        self._check_alignment(self._int_workspace_buffer, "int_workspace_buffer")
        qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len = self._index_inputs(
            qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len)
        qo_host = qo_indptr.to("cpu")
        kv_host = paged_kv_indptr.to("cpu")
        last_host = paged_kv_last_page_len.to("cpu")
        assert int(kv_host[-1]) <= paged_kv_indices.numel()
        self._qo_indptr_buf = qo_indptr.to(self.device)
        self._paged_kv_indptr_buf = paged_kv_indptr.to(self.device)
        self._paged_kv_indices_buf = paged_kv_indices.to(self.device)
        self._paged_kv_last_page_len_buf = paged_kv_last_page_len.to(self.device)
        # What the SM90 schedule keeps: each request's page offset and KV length, as planned.
        self._planned_kv = (kv_host.tolist(), _kv_lens(kv_host, last_host, page_size).tolist())
        self._heads = (num_qo_heads, num_kv_heads, head_dim_qk, page_size)
        self._causal, self._sm_scale = causal, sm_scale
        self._dtype = q_data_type
        self._disable_split_kv = disable_split_kv
        self._qo_last = int(qo_host[-1])
        Counters.plans += 1

    def run(self, q, paged_kv_cache, **kwargs):
        _check_keywords("run", kwargs, self.RUN_KEYWORDS)
        out = kwargs.pop("out", None)
        enable_pdl = kwargs.pop("enable_pdl", None)
        assert not kwargs, kwargs  # the options the stand-in does not compute
        assert enable_pdl is False, "per-layer buffer writes need PDL off"
        assert self._causal, "the stand-in computes causal attention only"
        k_cache, v_cache = paged_kv_cache
        num_qo_heads, num_kv_heads, head_dim, page_size = self._heads
        assert q.shape == (self._qo_last, num_qo_heads, head_dim) and q.dtype == self._dtype
        if self.SAME_KV_STRIDES_ONLY:
            assert k_cache.stride() == v_cache.stride(), "k/v strides differ"
        assert k_cache.shape[1:] == (page_size, num_kv_heads, head_dim)
        assert out is not None and out.is_contiguous() and out.dtype == q.dtype
        if self._backend == "fa2":
            assert self._disable_split_kv, "split-kv would size the kv chunks from the host lengths"
            kv_indptr = self._paged_kv_indptr_buf.tolist()
            kv_lens = _kv_lens(self._paged_kv_indptr_buf, self._paged_kv_last_page_len_buf, page_size).tolist()
        else:
            kv_indptr, kv_lens = self._planned_kv
        qo = self._qo_indptr_buf.tolist()
        indices = self._paged_kv_indices_buf
        group = num_qo_heads // num_kv_heads
        for r in range(len(qo) - 1):
            rows = q[qo[r]:qo[r + 1]].float()
            pos = torch.arange(kv_lens[r])
            pages = indices[kv_indptr[r] + pos // page_size].long()
            k = k_cache[pages, pos % page_size].float().repeat_interleave(group, dim=1)
            v = v_cache[pages, pos % page_size].float().repeat_interleave(group, dim=1)
            logits = torch.einsum("qhd,khd->hqk", rows, k) * self._sm_scale
            n = rows.shape[0]
            visible = pos[None, :] <= torch.arange(n)[:, None] + kv_lens[r] - n
            probs = torch.softmax(logits.masked_fill(~visible, -math.inf), dim=-1)
            out[qo[r]:qo[r + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(out.dtype)
        Counters.runs += 1
        return out


class BatchPrefillWithPagedKVCacheWrapper07(BatchPrefillWithPagedKVCacheWrapper):
    """0.7.x's wrapper: more keywords, aligned workspaces, K/V strides taken separately."""

    INIT_KEYWORDS = BatchPrefillWithPagedKVCacheWrapper.INIT_KEYWORDS | {"variant_owns_mask", "max_total_num_rows"}
    PLAN_KEYWORDS = BatchPrefillWithPagedKVCacheWrapper.PLAN_KEYWORDS | {"uniform_q_len", "use_token_head_sf"}
    RUN_KEYWORDS = BatchPrefillWithPagedKVCacheWrapper.RUN_KEYWORDS | {
        "lse_base", "lse_layout", "use_fp16_softmax", "uses_spcompress"}
    SAME_KV_STRIDES_ONLY = False
    WORKSPACE_ALIGNMENT = 16

    def _index_inputs(self, *tensors):
        return tuple(t.contiguous() for t in tensors)


_WRAPPERS = {"0.6": BatchPrefillWithPagedKVCacheWrapper, "0.7": BatchPrefillWithPagedKVCacheWrapper07}


def _kv_lens(indptr, last_page_len, page_size):
    pages = indptr[1:] - indptr[:-1]
    return torch.where(pages > 0, (pages - 1) * page_size + last_page_len, 0)


@pytest.fixture
def fake_flashinfer(monkeypatch, request):
    """The stand-in as ``flashinfer`` for one test; import the fixture into a test module. Its
    release is ``RELEASES[0]`` unless the test parametrises it (``indirect=True``)."""
    from proxyattn_kernels.block_sparse_attn import flashinfer_plan as fi_plan
    from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi_release

    yield install(monkeypatch, getattr(request, "param", RELEASES[0]))
    fi_release._import_result.cache_clear()  # before monkeypatch puts the real import state back
    fi_plan.clear_plan_cache()


def install(monkeypatch, release: str = RELEASES[0]) -> type[Counters]:
    """Make ``import flashinfer`` return a stand-in of ``release`` (its API variant is that of
    its minor series) for the test; returns fresh counters."""
    from proxyattn_kernels.block_sparse_attn import flashinfer_plan as fi_plan
    from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi_release

    module = types.ModuleType("flashinfer")
    module.__version__ = release
    module.BatchPrefillWithPagedKVCacheWrapper = _WRAPPERS[".".join(release.split(".")[:2])]
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    fi_release._import_result.cache_clear()
    fi_plan.clear_plan_cache()
    monkeypatch.setattr(Counters, "plans", 0)
    monkeypatch.setattr(Counters, "runs", 0)
    monkeypatch.setattr(Counters, "wrappers", 0)
    return Counters
