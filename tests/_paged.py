"""Test helpers: a vLLM-0.26 paged KV cache from contiguous keys and values, random selections, and
a torch emulation of a dense varlen paged kernel (FA3's ``flash_attn_varlen_func``)."""
from __future__ import annotations

import types

import torch


def make_paged(k: torch.Tensor, v: torch.Tensor, page_size: int, extra_pages: int = 3):
    """Scatter ``k, v [seq_len, Hkv, D]`` into an NHD physical cache whose unused slots are NaN
    (so a kernel reading outside the sequence is caught) with a shuffled int32 block table.

    Returns vLLM's permuted logical view ``[pages, Hkv, page_size, 2D]`` and the table row."""
    seq_len, hkv, d = k.shape
    n = -(-seq_len // page_size)
    physical = torch.full((n + extra_pages, page_size, hkv, 2 * d), float("nan"), dtype=k.dtype,
                          device=k.device)
    table = torch.randperm(n + extra_pages, device=k.device)[:n].to(torch.int32)
    pos = torch.arange(seq_len, device=k.device)
    physical[table[pos // page_size].long(), pos % page_size] = torch.cat([k, v], dim=-1)
    return physical.permute(0, 2, 1, 3), table


def random_selection(groups: int, num_q_heads: int, ctx: int, q_len: int, block: int, page: int,
                     max_budget: int, device, tail_tokens: int = 0):
    """A selection in ``select``'s format from random proxy scores and random head budgets in
    ``[1, max_budget)``, and a shuffled int32 block-table row with spare entries that covers
    the sequence: ``(ranking [G, R, Kb], counts [Hq, R], table)``."""
    from proxyattn_kernels.select.naive import select_blocks

    num_rows = (ctx + q_len - 1) // block - ctx // block + 1
    num_k_blocks = -(-(ctx + q_len) // block)
    scores = torch.rand(groups, num_rows, num_k_blocks, device=device)
    budget = torch.randint(1, max_budget, (num_q_heads,), dtype=torch.int32, device=device)
    ranking, counts, _ = select_blocks(scores, budget, ctx, q_len, block, 1, 1, tail_tokens)
    pages = num_k_blocks * block // page + 2
    table = torch.randperm(4 * pages, device=device)[:pages].to(torch.int32)
    return ranking, counts, table


def varlen_paged_causal(q, kv_cache, plan, scale):
    """Torch emulation of a dense varlen paged kernel: ``q [q_len, Hq, D]``, NHD-permuted cache."""
    head_dim = q.shape[-1]
    num_kv_heads, page_size = kv_cache.shape[1], kv_cache.shape[2]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q)
    cu, used = plan.cu_seqlens_q.tolist(), plan.seqused_k.tolist()
    for r in range(len(used)):
        rows = q[cu[r]:cu[r + 1]].float()  # [n, Hq, D]
        pos = torch.arange(used[r])
        pages = plan.block_table[r][pos // page_size].long()
        kv = kv_cache[pages, :, pos % page_size].float()  # [k_len, Hkv, 2D]
        k = kv[..., :head_dim].repeat_interleave(group, dim=1)
        v = kv[..., head_dim:].repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", rows, k) * scale
        n = rows.shape[0]
        visible = pos[None, :] <= torch.arange(n)[:, None] + used[r] - n  # bottom-right causal
        probs = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
        out[cu[r]:cu[r + 1]] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


def torch_fa3_varlen(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                     causal, block_table, fa_version, num_splits=0):
    """vLLM's flash_attn_varlen_func over several paged sequences, through the torch emulation
    above (sequence ``i``: queries ``q[cu[i]:cu[i+1]]``, its last tokens; keys
    through ``block_table[i]`` up to ``seqused_k[i]``; causal aligned to the end)."""
    assert causal and fa_version == 3 and num_splits >= 0
    kv = torch.cat([k, v], dim=-1).transpose(1, 2)  # back to the logical [pages, Hkv, page, 2D] view
    plan = types.SimpleNamespace(cu_seqlens_q=cu_seqlens_q, seqused_k=seqused_k, block_table=block_table)
    out.copy_(varlen_paged_causal(q, kv, plan, softmax_scale))
    return out


#: Attention output tolerance per input dtype (rtol = atol). On CUDA, Triton's ``tl.dot`` rounds
#: float32 inputs to TF32 (10 mantissa bits, as float16 has), so float32 cases there are held to
#: a float16-like bound; the interpreter on CPU multiplies in full float32.
ATTN_TOL = {torch.float32: 1e-2 if torch.cuda.is_available() else 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
