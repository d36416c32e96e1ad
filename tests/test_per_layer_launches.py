"""The per-layer work of a sparse chunk stays a handful of device launches.

Each small launch costs a fixed few microseconds of GPU time, paid for every layer of every
chunk: the H200 TTFT fit found ~0.3 ms per layer and chunk above dense, and the selection
plus the union page plan then issued ~57 launches (11 + 38 torch ops, 8 Triton kernels). This
counts them on CPU: torch ops through a dispatch mode (views and allocations are free), Triton
launches through stubs (nothing runs, so the counts are about launches, not results)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import proxyattn_kernels.block_sparse_attn.head_lists as head_lists
import proxyattn_kernels.block_sparse_attn.triton as block_sparse_triton
import proxyattn_kernels.block_sparse_attn.union_pages as union_pages
import proxyattn_kernels.budget.gamma as budget_gamma
import proxyattn_kernels.budget.triton as budget_triton
import proxyattn_kernels.proxy_scores.triton as proxy_triton
import proxyattn_kernels.select.triton as select_triton
from proxyattn_kernels import ChunkGeometry, ProxyAttnParams
from proxyattn_kernels.selection import select_blocks_paged

# Ops that only allocate or re-view memory: no kernel.
FREE_OPS = {"empty", "empty_strided", "empty_like", "view", "slice", "select", "expand", "permute",
            "transpose", "unsqueeze", "t", "alias", "detach", "_reshape_alias", "as_strided", "split",
            "split_with_sizes"}


class TorchOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in FREE_OPS:
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_launches(monkeypatch):
    """Every Triton kernel of the selection and plan modules replaced by a launch recorder."""
    launched: list[str] = []
    for module in (proxy_triton, budget_triton, budget_gamma, select_triton, union_pages, block_sparse_triton,
                   head_lists):
        for name, fn in list(vars(module).items()):
            if name.endswith("_kernel") and type(fn).__name__ in ("JITFunction", "InterpretedFunction"):
                monkeypatch.setattr(module, name, _Recorder(name, launched))
    return launched


class _Recorder:
    def __init__(self, name: str, launched: list[str]):
        self.name, self.launched = name, launched

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched.append(self.name)


def test_selection_and_union_plan_launch_counts(triton_launches):
    ctx, q_len, hq, hkv, d, page, block = 4096, 1024, 8, 2, 32, 16, 128
    q = torch.zeros(q_len, hq, d)
    kv_cache = torch.zeros((ctx + q_len) // page, hkv, page, 2 * d)
    table = torch.arange((ctx + q_len) // page, dtype=torch.int32)
    params = ProxyAttnParams(num_groups=1, max_density=0.1, dense_tail_tokens=128, min_sparse_len=0)

    with TorchOps() as torch_ops:
        sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=0.1, params=params)
    # Torch: the proxy scores' -inf fill. Triton: proxy scores 4 (2 proxy-head means, 2 passes),
    # budgets 3 (block LSE, block mass, gamma count + limits), select 1.
    assert torch_ops.ops == ["full"], torch_ops.ops
    assert len(triton_launches) == 8, triton_launches
    assert triton_launches.count("_gamma_budget_kernel") == 1

    # With the budget rows' LSE from the dense tail: the block mass is one pass.
    triton_launches.clear()
    row_lse = torch.zeros(hq, block)
    with TorchOps() as torch_ops:
        select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=0.1, params=params, row_lse=row_lse)
    assert torch_ops.ops == ["full"], torch_ops.ops
    assert len(triton_launches) == 7 and "_block_mass_from_lse_kernel" in triton_launches, triton_launches

    triton_launches.clear()
    with TorchOps() as torch_ops:
        plan = union_pages.union_page_plan(sel.ranking, sel.counts, table, ctx=ctx, q_len=q_len,
                                           block_size=block, page_size=page)
        geo = ChunkGeometry(ctx, q_len, block)
        calls = union_pages.tail_first_calls(plan, geo, geo.first_tail_row(params.dense_tail_tokens))
    assert triton_launches == ["_union_plan_kernel"]
    assert len(calls) == 2 and torch_ops.ops == ["sub", "sub"], torch_ops.ops  # each call's rebased offsets


def test_triton_path_launch_counts(triton_launches):
    """The default kernel's attention: the heads' position-ordered lists in one launch, then the
    block-sparse kernel; no torch ops (6, with a sort over [Hq, R, Kb], before)."""
    ctx, q_len, hq, hkv, d, page, block = 4096, 1024, 8, 2, 32, 16, 128
    num_rows, num_k_blocks = q_len // block, (ctx + q_len) // block
    ranking = torch.arange(num_k_blocks, dtype=torch.int32).flip(0).expand(1, num_rows, -1).contiguous()
    counts = torch.full((hq, num_rows), 4, dtype=torch.int32)
    q = torch.zeros(q_len, hq, d)
    kv_cache = torch.zeros((ctx + q_len) // page, hkv, page, 2 * d)
    table = torch.arange((ctx + q_len) // page, dtype=torch.int32)
    with TorchOps() as torch_ops:
        block_sparse_triton.block_sparse_attn(q, kv_cache, table, ranking, counts, torch.empty_like(q),
                                              ctx=ctx, scale=0.1, block_size=block, skip_rows=1)
    assert torch_ops.ops == [], torch_ops.ops
    assert triton_launches == ["_head_lists_kernel", "_block_sparse_attn_kernel"]


def test_an_fp8_cache_adds_no_launch(triton_launches):
    """With an FP8 cache the scales are read inside the kernels: the selection and the attention
    launch what they launch on a model-dtype cache, and no torch op."""
    ctx, q_len, hq, hkv, d, page, block = 4096, 1024, 8, 2, 32, 16, 128
    q = torch.zeros(q_len, hq, d)
    kv_cache = torch.zeros((ctx + q_len) // page, hkv, page, 2 * d, dtype=torch.float8_e4m3fn)
    table = torch.arange((ctx + q_len) // page, dtype=torch.int32)
    scale = torch.tensor(0.5)
    params = ProxyAttnParams(num_groups=1, max_density=0.1, dense_tail_tokens=128, min_sparse_len=0)
    with TorchOps() as torch_ops:
        sel = select_blocks_paged(q, kv_cache, table, ctx=ctx, scale=0.1, params=params, k_scale=scale)
    assert torch_ops.ops == ["full"] and len(triton_launches) == 8, (torch_ops.ops, triton_launches)
    triton_launches.clear()
    with TorchOps() as torch_ops:
        block_sparse_triton.block_sparse_attn(q, kv_cache, table, sel.ranking, sel.counts, torch.empty_like(q),
                                              ctx=ctx, scale=0.1, block_size=block, k_scale=scale, v_scale=scale)
    assert torch_ops.ops == [] and triton_launches == ["_head_lists_kernel", "_block_sparse_attn_kernel"]
