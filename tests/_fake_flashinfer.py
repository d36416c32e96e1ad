"""A torch stand-in for ``flashinfer`` 0.6.14's paged prefill wrapper (CPU tests only).

It keeps the wrapper's Python-side contract that ``proxyattn_kernels/block_sparse_attn/flashinfer.py``
relies on, and computes what the csrc computes, as read in 0.6.14:

* ``plan`` reads ``qo_indptr``, ``paged_kv_indptr`` and ``paged_kv_last_page_len`` on the host,
  keeps ``paged_kv_indices`` as given when it is on the wrapper's device, and stores device
  copies in ``_qo_indptr_buf``, ``_paged_kv_indptr_buf``, ``_paged_kv_indices_buf`` and
  ``_paged_kv_last_page_len_buf``, which ``run`` hands to the kernel;
* backend "fa2": the kernel reads each request's query and KV lengths from those buffers at run
  time (``prefill.cuh``/``page.cuh``); backend "fa3": from the lengths planned on the host
  (``PrefillSM90Plan``), and only the page indices from the device;
* causal masking is aligned bottom-right; K and V must have equal strides; the fa2 kernel
  writes ``out`` as dense rows.

So a test through this module checks our plumbing (buffers, plan reuse, per-layer rewrites)
against that reading; the real kernels are checked on the GPU (tests/test_flashinfer_path.py).
"""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

__version__ = "0.6.14"


class Counters:
    plans = 0
    runs = 0
    wrappers = 0


class BatchPrefillWithPagedKVCacheWrapper:
    def __init__(self, float_workspace_buffer, kv_layout="NHD", use_cuda_graph=False, backend="auto", **kwargs):
        assert kv_layout == "NHD" and not use_cuda_graph and not kwargs
        assert backend in ("fa2", "fa3"), backend
        self.device = float_workspace_buffer.device
        self._backend = backend
        self._qo_indptr_buf = self._paged_kv_indptr_buf = None
        self._paged_kv_indices_buf = self._paged_kv_last_page_len_buf = None
        Counters.wrappers += 1

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
             num_qo_heads, num_kv_heads, head_dim_qk, page_size, *, causal=False, sm_scale=None,
             q_data_type="float16", kv_data_type=None, non_blocking=True, disable_split_kv=False,
             **kwargs):
        assert not kwargs, kwargs
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

    def run(self, q, paged_kv_cache, *, out=None, enable_pdl=None, **kwargs):
        assert not kwargs, kwargs
        assert enable_pdl is False, "per-layer buffer writes need PDL off"
        k_cache, v_cache = paged_kv_cache
        num_qo_heads, num_kv_heads, head_dim, page_size = self._heads
        assert q.shape == (self._qo_last, num_qo_heads, head_dim) and q.dtype == self._dtype
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


def _kv_lens(indptr, last_page_len, page_size):
    pages = indptr[1:] - indptr[:-1]
    return torch.where(pages > 0, (pages - 1) * page_size + last_page_len, 0)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    """This module as ``flashinfer`` for one test; import the fixture into a test module."""
    from proxyattn_kernels.block_sparse_attn import flashinfer as fi

    yield install(monkeypatch)
    fi._import_result.cache_clear()  # before monkeypatch puts the real import state back
    fi.clear_plan_cache()


def install(monkeypatch) -> type[Counters]:
    """Make ``import flashinfer`` return this module for the test; returns fresh counters."""
    from proxyattn_kernels.block_sparse_attn import flashinfer as fi

    module = types.ModuleType("flashinfer")
    module.__version__ = __version__
    module.BatchPrefillWithPagedKVCacheWrapper = BatchPrefillWithPagedKVCacheWrapper
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    fi._import_result.cache_clear()
    fi.clear_plan_cache()
    monkeypatch.setattr(Counters, "plans", 0)
    monkeypatch.setattr(Counters, "runs", 0)
    monkeypatch.setattr(Counters, "wrappers", 0)
    return Counters
