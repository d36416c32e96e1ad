"""ProxyAttnImpl on a paged KV cache (vLLM's CPU platform; dense kernels = vLLM's Triton kernels
under the interpreter): sparse rows equal the torch reference, dense rows equal dense attention,
and unsupported features fail at construction."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("vllm")

from proxyattn_kernels import ChunkGeometry  # noqa: E402
from proxyattn_kernels.reference import dense_causal_attention, proxyattn_prefill_reference  # noqa: E402

from tests._fake_flashinfer import fake_flashinfer  # noqa: E402,F401 - fixture

PAGE = 16
MAX_PAGES = 8
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 32
SCALE = HEAD_DIM**-0.5
# Real sparsity: a low gamma, no minimum budget and a density cap, so the sparse rows differ
# clearly from dense attention (a test that can tell the paths apart). The dense tail covers the
# long row's last block only (the default 128 tokens would cover this whole 40-token chunk).
SPARSE = {
    "min_sparse_len": 64, "block_size": 16, "stride": 4, "gamma": 0.5,
    "min_budget_tokens": 0, "max_density": 0.3, "sink_blocks": 1, "local_blocks": 1,
    "dense_tail_tokens": 8,
}
MIXED_Q = [1, 1, 9, 40, 5, 0, 0]  # 2 decodes, short, long (ctx 53), short extend, 2 padded
MIXED_SEQ = [37, 20, 9, 93, 15, 0, 0]
PAD_TOKENS = 8


@pytest.fixture(scope="module")
def vllm_config(tmp_path_factory):
    from proxyattn_vllm.testing import make_vllm_config, write_tiny_llama

    model_dir = write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))
    return make_vllm_config(model_dir, SPARSE, block_size=PAGE)


class _Layer(torch.nn.Module):
    """What the impl reads from vLLM's Attention layer: the KV scales and the layer name."""

    def __init__(self, index: int):
        super().__init__()
        self.layer_name = f"model.layers.{index}.self_attn.attn"
        self._q_scale = torch.ones(1)
        self._k_scale = torch.ones(1)
        self._v_scale = torch.ones(1)


def _impl(config: dict | None = None, **kwargs):
    from proxyattn_vllm import ProxyAttnConfig
    from proxyattn_vllm.impl import ProxyAttnImpl

    args = dict(
        num_heads=NUM_HEADS, head_size=HEAD_DIM, scale=SCALE, num_kv_heads=NUM_KV_HEADS,
        alibi_slopes=None, sliding_window=None, kv_cache_dtype="auto",
    )
    args.update(kwargs)
    return ProxyAttnImpl(**args, proxyattn_config=ProxyAttnConfig.from_dict(config or SPARSE))


def _builder(vllm_config):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from proxyattn_vllm.metadata import ProxyAttnMetadataBuilder

    spec = FullAttentionSpec(
        block_size=PAGE, num_kv_heads=NUM_KV_HEADS, head_size=HEAD_DIM, dtype=torch.float32
    )
    return ProxyAttnMetadataBuilder(spec, ["model.layers.0.self_attn.attn"], vllm_config, torch.device("cpu"))


class Batch:
    """Random requests in a paged cache: the context already cached, the chunk's K/V new."""

    def __init__(self, q_lens, seq_lens, dtype, pad_tokens=0, seed=0):
        from vllm.v1.attention.backend import CommonAttentionMetadata

        gen = torch.Generator().manual_seed(seed)
        rand = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
        n = len(q_lens)
        self.q_lens, self.seq_lens = q_lens, seq_lens
        qsl = torch.zeros(n + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor(q_lens, dtype=torch.int32).cumsum(0)
        self.qsl = qsl.tolist()
        self.num_tokens = self.qsl[-1] + pad_tokens
        num_blocks = n * MAX_PAGES + 3
        perm = torch.randperm(num_blocks, generator=gen)[: n * MAX_PAGES]
        self.block_table = perm.view(n, MAX_PAGES).to(torch.int32)
        # vLLM allocates NHD (blocks, page, Hkv, 2D) and hands the impl a (blocks, Hkv, page, 2D) view.
        self.kv_cache = torch.zeros(num_blocks, PAGE, NUM_KV_HEADS, 2 * HEAD_DIM, dtype=dtype).permute(0, 2, 1, 3)
        self.keys = [rand(s, NUM_KV_HEADS, HEAD_DIM) for s in seq_lens]
        self.values = [rand(s, NUM_KV_HEADS, HEAD_DIM) for s in seq_lens]
        self.query = rand(self.num_tokens, NUM_HEADS, HEAD_DIM)
        self.key = torch.zeros(self.num_tokens, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
        self.value = torch.zeros_like(self.key)
        self.slot_mapping = torch.full((self.num_tokens,), -1, dtype=torch.int64)
        for r in range(n):
            ctx = seq_lens[r] - q_lens[r]
            for pos in range(seq_lens[r]):
                page = int(self.block_table[r, pos // PAGE])
                if pos < ctx:  # written by earlier steps
                    self.kv_cache[page, :, pos % PAGE, :HEAD_DIM] = self.keys[r][pos]
                    self.kv_cache[page, :, pos % PAGE, HEAD_DIM:] = self.values[r][pos]
                else:  # this step's tokens: written by do_kv_cache_update
                    t = self.qsl[r] + pos - ctx
                    self.key[t], self.value[t] = self.keys[r][pos], self.values[r][pos]
                    self.slot_mapping[t] = page * PAGE + pos % PAGE
        self.common = CommonAttentionMetadata(
            query_start_loc=qsl.clone(), query_start_loc_cpu=qsl,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), num_reqs=n,
            num_actual_tokens=self.num_tokens, max_query_len=max(q_lens),
            max_seq_len=max(seq_lens), block_table_tensor=self.block_table,
            slot_mapping=self.slot_mapping, causal=True,
            seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32),
        )

    def rows(self):
        for r, (q_len, seq_len) in enumerate(zip(self.q_lens, self.seq_lens)):
            if q_len:
                yield r, slice(self.qsl[r], self.qsl[r + 1]), seq_len - q_len

    def run(self, impl, metadata, layer):
        impl.do_kv_cache_update(layer, self.key, self.value, self.kv_cache, self.slot_mapping)
        output = torch.full_like(self.query, 7.0)  # sentinel: padded tokens must stay untouched
        result = impl.forward(layer, self.query, self.key, self.value, self.kv_cache, metadata, output)
        assert result is output
        return output


def _tol(dtype):
    return dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype,tail_by_dense", [(torch.float32, False), (torch.float16, False),
                                                 (torch.float32, True), (torch.float16, True)])
def test_mixed_batch_matches_reference(vllm_config, dtype, tail_by_dense, monkeypatch):
    """``tail_by_dense``: the sparse row's dense-tail rows go to the dense kernel first (as with
    FlashAttention on a GPU; here vLLM's Triton kernel), the block-sparse kernel skips them."""
    from proxyattn_vllm import ProxyAttnConfig

    batch = Batch(MIXED_Q, MIXED_SEQ, dtype, pad_tokens=PAD_TOKENS)
    md = _builder(vllm_config).build(0, batch.common)
    assert [r.req_idx for r in md.plan.sparse_rows] == [3]
    # The long row (ctx 53, 40 tokens, 16-token blocks): its last 8 tokens lie in block 5, whose
    # chunk tokens are the last 13 (positions 80-92).
    row = md.plan.sparse_rows[0]
    assert row.tail_tokens == 13 and row.tail_cu_seqlens_q.tolist() == [0, 13]
    params = ProxyAttnConfig.from_dict(SPARSE).kernel_params(NUM_HEADS, NUM_KV_HEADS)

    impl = _impl()
    monkeypatch.setattr(impl.dense, "tail_first", tail_by_dense)
    dense_calls = []  # (query rows, max_seq_len) of each dense varlen call
    real_dense_varlen = impl.dense.varlen

    def recording_dense_varlen(layer, query, *args, **kwargs):
        dense_calls.append((query.shape[0], args[-2]))
        return real_dense_varlen(layer, query, *args, **kwargs)

    monkeypatch.setattr(impl.dense, "varlen", recording_dense_varlen)
    output = batch.run(impl, md, _Layer(0))
    assert ((13, 93) in dense_calls) == tail_by_dense, dense_calls

    # The KV write put every new token where the block table says.
    for r, _, _ in batch.rows():
        pos = torch.arange(batch.seq_lens[r])
        cached = batch.kv_cache[batch.block_table[r].long()[pos // PAGE], :, pos % PAGE]
        torch.testing.assert_close(cached[..., :HEAD_DIM], batch.keys[r], atol=0, rtol=0)
        torch.testing.assert_close(cached[..., HEAD_DIM:], batch.values[r], atol=0, rtol=0)
    for r, tokens, ctx in batch.rows():
        q, k, v = batch.query[tokens], batch.keys[r], batch.values[r]
        dense = dense_causal_attention(q, k, v, ctx, SCALE)
        if r == 3:  # the sparse row: the reference on contiguous K/V (no paging involved)
            expected, selection = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params, scale=SCALE)
            assert selection.density < 0.9, selection.stats()
            last = selection.geometry.num_q_blocks - 1  # the dense tail row
            assert (selection.counts[:, last] == selection.geometry.row_extent(last)).all()
            assert (selection.counts[:, :last] < selection.geometry.row_extent(last) - 1).any()
            assert (output[tokens] - dense).abs().max() > 1e-2, "sparse row ran dense"
        else:
            expected = dense
        torch.testing.assert_close(output[tokens], expected, **_tol(dtype), msg=f"row {r}")
    assert (output[batch.qsl[-1]:] == 7.0).all(), "padded tokens were written"


def test_a_budget_profile_prescribes_each_heads_budget(vllm_config, tmp_path):
    """``budget_profile``: the sparse row's heads keep the profile's share of blocks for their
    layer (here layer 1 of the layer name) at the row's length; the output equals the reference
    given the same fractions."""
    import json

    from proxyattn_vllm import ProxyAttnConfig

    profile = {"a": [9.0, 0.5], "b": [0.0, 0.1], "head_ratio": [[1.0] * 4, [0.2, 1.0, 1.8, 1.0]], "scale": 1.0}
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"profiles": {"unequal": profile}}))
    config = {**SPARSE, "max_density": None, "budget_profile": "unequal", "budget_profile_file": str(path)}
    batch = Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS)
    md = _builder(vllm_config).build(0, batch.common)
    output = batch.run(_impl(config), md, _Layer(1))
    r, tokens, ctx = next(row for row in batch.rows() if row[0] == 3)
    fraction = torch.tensor([0.5 * ratio * MIXED_SEQ[3] ** -0.1 for ratio in profile["head_ratio"][1]])
    params = ProxyAttnConfig.from_dict(config).kernel_params(NUM_HEADS, NUM_KV_HEADS)
    expected, selection = proxyattn_prefill_reference(
        batch.query[tokens], batch.keys[r], batch.values[r], ctx=ctx, params=params, scale=SCALE,
        budget_fraction=fraction)
    assert selection.budget.tolist() == [1, 2, 4, 2]  # ceil(fraction * 6 key blocks)
    torch.testing.assert_close(output[tokens], expected, **_tol(torch.float32))
    unprescribed, _ = proxyattn_prefill_reference(batch.query[tokens], batch.keys[r], batch.values[r], ctx=ctx,
                                                  params=params, scale=SCALE)
    assert (output[tokens] - unprescribed).abs().max() > 1e-3, "the profile changed nothing"


def test_a_chunk_that_is_all_dense_tail_skips_the_selection(vllm_config, monkeypatch):
    """With the tail through the dense kernel, a chunk whose dense tail covers it whole (a short
    last chunk) is one dense call: no selection runs for it."""
    from proxyattn_vllm.sparse import triton as triton_module

    config = {**SPARSE, "dense_tail_tokens": 64}  # covers the long row's 40 tokens
    batch = Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS, seed=5)
    md = _builder(vllm_config).build(0, batch.common)
    md.plan = dataclasses.replace(md.plan, sparse_rows=tuple(
        dataclasses.replace(r, tail_tokens=r.q_len, tail_cu_seqlens_q=torch.tensor([0, r.q_len], dtype=torch.int32))
        for r in md.plan.sparse_rows))

    def no_selection(*args, **kwargs):
        raise AssertionError("selection ran for a chunk that is all dense tail")

    monkeypatch.setattr(triton_module, "select_blocks_paged", no_selection)
    impl = _impl(config)
    monkeypatch.setattr(impl.dense, "tail_first", True)
    output = batch.run(impl, md, _Layer(0))
    for r, tokens, ctx in batch.rows():
        expected = dense_causal_attention(batch.query[tokens], batch.keys[r], batch.values[r], ctx, SCALE)
        torch.testing.assert_close(output[tokens], expected, **_tol(torch.float32), msg=f"row {r}")


def _lse_from_cache(query, kv_cache, seq_len, block_table_row):
    """``[Hq, T]`` natural-log LSE of the causal logits of the request's last ``T`` queries, the
    keys read back from the paged cache (what FlashAttention returns with the output)."""
    pos = torch.arange(seq_len)
    k = kv_cache[block_table_row.long()[pos // PAGE], :, pos % PAGE, :HEAD_DIM]  # [S, Hkv, D]
    k = k.float().repeat_interleave(NUM_HEADS // NUM_KV_HEADS, dim=1)
    logits = torch.einsum("qhd,khd->hqk", query.float(), k) * SCALE
    q_pos = torch.arange(seq_len - query.shape[0], seq_len)
    return torch.logsumexp(logits.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf")), -1)


@pytest.mark.parametrize("kernel", ["triton", "fa3"])
@pytest.mark.parametrize("tail", [16, 8])
def test_budget_reuses_the_dense_tails_lse(vllm_config, kernel, tail, monkeypatch):
    """With the dense tail through FlashAttention first (here vLLM's Triton kernel, plus the LSE
    FlashAttention would return), the budget takes the tail's LSE of the chunk's last
    ``block_size`` queries when the tail covers them (``dense_tail_tokens`` 16 = the block) and
    computes its own otherwise (8); either way the output is the one without the LSE."""
    from proxyattn_kernels.budget.naive import last_rows_lse

    from proxyattn_vllm.sparse import triton as triton_module
    from proxyattn_vllm.sparse import union as union_module

    config = {**SPARSE, "sparse_kernel": kernel, "dense_tail_tokens": tail}
    batch = Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS, seed=11)
    md = _builder(vllm_config).build(0, batch.common)
    (row,) = md.plan.sparse_rows
    geo = ChunkGeometry(row.ctx, row.q_len, 16)
    tail_tokens = row.q_len - geo.row_token_start(geo.first_tail_row(tail))
    assert tail_tokens == {16: 29, 8: 13}[tail]  # rows 4-5 (tokens 64-92) / row 5 (80-92)
    md.plan = dataclasses.replace(md.plan, sparse_rows=(dataclasses.replace(
        row, tail_tokens=tail_tokens, tail_cu_seqlens_q=torch.tensor([0, tail_tokens], dtype=torch.int32)),))
    lses, real_select = [], triton_module.select_blocks_paged

    def recording_select(*args, **kwargs):
        lses.append(kwargs["row_lse"])
        return real_select(*args, **kwargs)

    for module in (triton_module, union_module):  # the selection of "triton" and of "fa3"
        monkeypatch.setattr(module, "select_blocks_paged", recording_select)
    outputs = []
    for with_lse in (True, False):
        impl = _impl(config)
        monkeypatch.setattr(impl.dense, "tail_first", True)
        real_varlen = impl.dense.varlen

        def dense_varlen(layer, query, kv_cache, output, *args, return_lse=False, num_splits=0, _real=real_varlen):
            _real(layer, query, kv_cache, output, *args, num_splits=num_splits)
            seq_lens, block_table = args[2], args[4]
            if return_lse and with_lse:
                return _lse_from_cache(query, kv_cache, int(seq_lens[0]), block_table[0])
            return None

        monkeypatch.setattr(impl.dense, "varlen", dense_varlen)
        outputs.append(batch.run(impl, md, _Layer(0)))
    q, k = batch.query[batch.qsl[3] : batch.qsl[4]], batch.keys[3]
    if tail == 16:
        torch.testing.assert_close(lses[0], last_rows_lse(q, k, row.ctx, SCALE, 16), atol=1e-5, rtol=1e-5)
    else:
        assert lses[0] is None
    assert lses[1] is None
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-5, rtol=1e-4)
    expected = dense_causal_attention(q, k, batch.values[3], row.ctx, SCALE)
    assert (outputs[0][batch.qsl[3] : batch.qsl[4]] - expected).abs().max() > 1e-2, "sparse row ran dense"


@pytest.mark.parametrize("kernel,tail", [("fa3", 0), ("fa3", 8), ("flashinfer", 0)])
def test_union_kernels_match_the_union_reference(vllm_config, tmp_path, kernel, tail, request, monkeypatch):
    """``sparse_kernel: "fa3"`` / ``"flashinfer"``: the long row runs through a dense paged kernel
    (fa3: vLLM's Triton kernel on CPU, FA3 on Hopper; flashinfer: a torch stand-in on CPU, see
    tests/_fake_flashinfer.py) over each query block's union of selected blocks; it equals
    attention with that union mask for every head, and the other rows stay dense. With a dense
    tail (``tail`` tokens), fa3 runs the tail rows in a call of their own, first."""
    from proxyattn_kernels.block_sparse_attn.naive import block_sparse_attention
    from proxyattn_kernels.block_sparse_attn.union_pages import union_block_mask

    from proxyattn_vllm import ProxyAttnConfig
    from proxyattn_vllm import stats
    from proxyattn_vllm.sparse import fa3 as fa3_module

    if kernel == "flashinfer":
        from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi_release

        counters = request.getfixturevalue("fake_flashinfer")
        # The stand-in takes any dtype and head size; the real kernels' limits are tested below.
        monkeypatch.setattr(fi_release, "SUPPORTED_DTYPES", (torch.float32,))
        monkeypatch.setattr(fi_release, "SUPPORTED_HEAD_DIMS", (HEAD_DIM,))
    # Two proxy groups rank blocks differently, so the union exceeds what each head selected.
    # Without the dense tail row all three rows have room for the groups to differ.
    config = {**SPARSE, "sparse_kernel": kernel, "num_proxy_groups": 2, "max_density": 0.6, "dense_tail_tokens": tail}
    batch = Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS, seed=3)
    md = _builder(vllm_config).build(0, batch.common)
    stats_path = tmp_path / "stats.jsonl"
    stats.configure(stats_path, mass_heads=2)
    impl = _impl(config)
    calls, splits = [], []  # query rows and num_splits of each dense varlen call
    real_varlen = impl.dense.varlen
    monkeypatch.setattr(impl.dense, "varlen", lambda layer, query, *a, **kw: (
        calls.append(query.shape[0]), splits.append(kw.get("num_splits", 0)), real_varlen(layer, query, *a, **kw)))
    # As if on a 1-SM GPU: union calls of >= 8 (row, head) tiles run unsplit (union_call_num_splits).
    monkeypatch.setattr(fa3_module, "sm_count", lambda device: 1)
    try:
        output = batch.run(impl, md, _Layer(0))
    finally:
        stats.configure(None)
    sparse_tokens = batch.qsl[4] - batch.qsl[3]
    if kernel == "fa3":  # after the dense rows' call(s): the tail rows' call, then the rest
        tail_rows_tokens = sparse_tokens - ((batch.seq_lens[3] - 1) // 16 * 16 - (batch.seq_lens[3] - sparse_tokens))
        union_calls = [tail_rows_tokens, sparse_tokens - tail_rows_tokens] if tail else [sparse_tokens]
        assert calls[-len(union_calls):] == union_calls, calls
        # 3 rows x 4 heads in one call, or the tail's 1 row (FA3 splits) and then 2 rows.
        assert splits[-len(union_calls):] == ([0, 1] if tail else [1]), splits
        assert not any(splits[:-len(union_calls)]), "a dense rows' call got a split count"
    (line,) = stats.read_lines(stats_path)
    params = ProxyAttnConfig.from_dict(config).kernel_params(NUM_HEADS, NUM_KV_HEADS)
    for r, tokens, ctx in batch.rows():
        q, k, v = batch.query[tokens], batch.keys[r], batch.values[r]
        dense = dense_causal_attention(q, k, v, ctx, SCALE)
        if r == 3:
            _, selection = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params, scale=SCALE)
            union = union_block_mask(selection.ranking, selection.counts, selection.ranking.shape[-1])
            geo = selection.geometry
            causal_blocks = sum(geo.row_extent(row) for row in range(geo.num_q_blocks))
            assert int(union.sum()) < causal_blocks, "the union covers every block: not a sparse test"
            # The statistics count what this path computes: the union, for every head.
            assert line["density"] == pytest.approx(int(union.sum()) / causal_blocks, abs=1e-6)
            # (The dense tail row leaves the groups less room to differ: they may agree.)
            assert line["density"] > selection.density + 1e-3 or tail
            assert 0.0 <= line["kept_mass"] <= 1.0
            expected = block_sparse_attention(q, k, v, ctx, union.expand(NUM_HEADS, -1, -1), SCALE, 16)
            assert (output[tokens] - dense).abs().max() > 1e-2, "sparse row ran dense"
        else:
            expected = dense
        torch.testing.assert_close(output[tokens], expected, atol=2e-5, rtol=1e-4, msg=f"row {r}")
    assert (output[batch.qsl[-1]:] == 7.0).all(), "padded tokens were written"
    if kernel == "flashinfer":  # a second layer of the step reuses the chunk's plan
        again = batch.run(_impl(config), md, _Layer(1))
        torch.testing.assert_close(again, output, atol=0, rtol=0)
        assert (counters.wrappers, counters.plans, counters.runs) == (1, 1, 2)


@pytest.fixture
def no_flashinfer(monkeypatch):
    """``import flashinfer`` fails, whatever is installed."""
    import sys

    from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi_release

    monkeypatch.setitem(sys.modules, "flashinfer", None)
    fi_release._import_result.cache_clear()
    yield
    fi_release._import_result.cache_clear()


def test_explicit_flashinfer_without_flashinfer_fails_at_init(no_flashinfer):
    from proxyattn_vllm.impl import ProxyAttnUnsupportedError

    with pytest.raises(ProxyAttnUnsupportedError) as err:
        _impl({**SPARSE, "sparse_kernel": "flashinfer"})
    msg = str(err.value)
    assert "pip install 'proxyattn-vllm[flashinfer]'" in msg and 'set sparse_kernel to "triton"' in msg, msg
    _impl({**SPARSE, "sparse_kernel": "auto"})  # "auto" starts: it falls back per shape


@pytest.mark.parametrize(
    "kernel, setup, page, message",
    [
        ("fa3", None, 32, 'sparse_kernel "fa3" needs KV pages that divide block_size=16, got pages of 32'),
        ("flashinfer", "fake", 32, "set --block-size to a divisor of 16 to use FlashInfer"),
        ("flashinfer", "fake", 16, "FlashInfer takes head sizes (64, 128, 256) in float16/bfloat16, got 32"),
        ("auto", "missing", 16, 'sparse_kernel "auto" (chose "flashinfer") cannot import FlashInfer'),
    ],
)
def test_union_kernels_fall_back_to_triton_with_one_warning(kernel, setup, page, message, request, monkeypatch):
    from proxyattn_vllm import impl as impl_module
    from proxyattn_vllm.sparse import choose

    if setup == "fake":
        request.getfixturevalue("fake_flashinfer")
    elif setup == "missing":
        request.getfixturevalue("no_flashinfer")
        monkeypatch.setitem(choose.auto_table()["by_shape"], (HEAD_DIM, page, NUM_HEADS // NUM_KV_HEADS), "flashinfer")
    warnings = []
    monkeypatch.setattr(choose, "_warned_fallbacks", set())
    monkeypatch.setattr(impl_module.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    kv_cache = torch.zeros(4, page, NUM_KV_HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)
    for _ in range(2):  # two layers: one warning
        impl = _impl({**SPARSE, "sparse_kernel": kernel})
        assert impl._choose_sparse_kernel(kv_cache).name == "triton"
    assert len(warnings) == 1 and message in warnings[0], warnings
    assert "using the Triton block-sparse kernel" in warnings[0]


def test_a_warm_up_for_another_page_size_is_reported_once(monkeypatch):
    """If the profiling run compiled the kernels for other pages than the cache has (vLLM
    settling the page size after the warm-up read it, fixed; see tests/test_warmup.py), the
    first sparse chunk says so, once per process; a matching or unknown warm-up says nothing."""
    from proxyattn_vllm import impl as impl_module
    from proxyattn_vllm import warmup

    warnings = []
    monkeypatch.setattr(warmup, "_warned_page_mismatch", False)
    monkeypatch.setattr(impl_module.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    kv_cache = torch.zeros(4, PAGE, NUM_KV_HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)
    for warmed in (None, PAGE):
        impl = _impl(SPARSE)
        impl._warmed_page_size = warmed
        impl._choose_sparse_kernel(kv_cache)
    assert warnings == []
    for _ in range(2):  # two layers: one warning
        impl = _impl(SPARSE)
        impl._warmed_page_size = 2 * PAGE
        assert impl._choose_sparse_kernel(kv_cache).name == "triton"
    assert len(warnings) == 1, warnings
    assert f"compiled at startup for KV pages of {2 * PAGE} tokens, but the cache has pages of {PAGE}" in warnings[0]


def test_auto_takes_the_measured_kernel(monkeypatch):
    from proxyattn_vllm.sparse import choose

    kv_cache = torch.zeros(4, PAGE, NUM_KV_HEADS, 2 * HEAD_DIM).permute(0, 2, 1, 3)
    assert _impl({**SPARSE, "sparse_kernel": "auto"})._choose_sparse_kernel(kv_cache).name == "triton"
    monkeypatch.setitem(choose.auto_table()["by_shape"], (HEAD_DIM, PAGE, NUM_HEADS // NUM_KV_HEADS), "fa3")
    assert _impl({**SPARSE, "sparse_kernel": "auto"})._choose_sparse_kernel(kv_cache).name == "fa3"
    # Two proxy groups: the union of their rankings is much larger, so Triton whatever the table says.
    two_groups = {**SPARSE, "sparse_kernel": "auto", "num_proxy_groups": 2}
    assert _impl(two_groups)._choose_sparse_kernel(kv_cache).name == "triton"


def test_dense_layers_and_pure_dense_batches(vllm_config):
    batch = Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS, seed=1)
    md = _builder(vllm_config).build(0, batch.common)
    # Layer 1 is listed in dense_layers: the long row runs dense too.
    impl = _impl({**SPARSE, "dense_layers": [1]})
    output = batch.run(impl, md, _Layer(1))
    for r, tokens, ctx in batch.rows():
        expected = dense_causal_attention(batch.query[tokens], batch.keys[r], batch.values[r], ctx, SCALE)
        torch.testing.assert_close(output[tokens], expected, atol=2e-5, rtol=1e-4)
    # Layer 0 of the same config is not: the sparse row differs from dense.
    sparse_out = batch.run(_impl({**SPARSE, "dense_layers": [1]}), md, _Layer(0))
    tokens = slice(batch.qsl[3], batch.qsl[4])
    assert (sparse_out[tokens] - output[tokens]).abs().max() > 1e-2

    # A batch without long rows: one dense call over the whole batch (decode + short prefill).
    short = Batch([1, 1, 12, 0], [30, 17, 40, 0], torch.float32, seed=2)
    md = _builder(vllm_config).build(0, short.common)
    assert not md.plan.has_sparse
    output = short.run(_impl(), md, _Layer(0))
    for r, tokens, ctx in short.rows():
        expected = dense_causal_attention(short.query[tokens], short.keys[r], short.values[r], ctx, SCALE)
        torch.testing.assert_close(output[tokens], expected, atol=2e-5, rtol=1e-4)


def test_decode_batch_fast_path_metadata_attends_correctly(vllm_config):
    """A decode-only batch (long rows, cudagraph padding rows and tokens) gets the builder's
    fast-path plan, which leaves rows unclassified: the impl still attends every row densely."""
    batch = Batch([1, 1, 1, 0, 0], [100, 37, 70, 0, 0], torch.float32, pad_tokens=5, seed=3)
    md = _builder(vllm_config).build(0, batch.common)
    assert not md.plan.has_sparse and not md.plan.is_classified  # the fast path was taken
    output = batch.run(_impl(), md, _Layer(0))
    for r, tokens, ctx in batch.rows():
        expected = dense_causal_attention(batch.query[tokens], batch.keys[r], batch.values[r], ctx, SCALE)
        torch.testing.assert_close(output[tokens], expected, atol=2e-5, rtol=1e-4)


def test_profiling_run_zero_fills():
    impl = _impl()
    output = torch.ones(5, NUM_HEADS, HEAD_DIM)
    q = torch.randn(5, NUM_HEADS, HEAD_DIM)
    kv = torch.randn(5, NUM_KV_HEADS, HEAD_DIM)
    assert impl.forward(_Layer(0), q, kv, kv, torch.zeros(2, 2, 16, 64), None, output) is output
    assert (output == 0).all()


def test_sparse_prefill_boundary_writes_in_place():
    """The kernel boundary: a view of the query, the paged cache and a block-table row in, the
    output view overwritten; equal to the reference on the same inputs."""
    from proxyattn_vllm import ProxyAttnConfig
    from proxyattn_vllm.sparse.triton import sparse_prefill

    params = ProxyAttnConfig.from_dict(SPARSE).kernel_params(NUM_HEADS, NUM_KV_HEADS)
    batch = Batch([50], [120], torch.float32, seed=3)
    batch.run(_impl(), None, _Layer(0))  # profiling-style call, only to write the KV cache
    out = torch.full((50, NUM_HEADS, HEAD_DIM), math.nan)
    sparse_prefill(batch.query, batch.kv_cache, batch.block_table[0], out, 70, SCALE, params)
    expected, _ = proxyattn_prefill_reference(
        batch.query, batch.keys[0], batch.values[0], ctx=70, params=params, scale=SCALE
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_sliding_window_layers_run_dense_with_their_window(vllm_config):
    """A sliding-window layer is never sparsified: every row, the long one included, equals
    dense attention restricted to the window (and differs from attention without it)."""
    window = 24
    batch = Batch(MIXED_Q, MIXED_SEQ, torch.float32, pad_tokens=PAD_TOKENS, seed=4)
    md = _builder(vllm_config).build(0, batch.common)
    assert md.plan.has_sparse  # a global layer would run the sparse path on this batch
    output = batch.run(_impl(sliding_window=window), md, _Layer(0))
    for r, tokens, ctx in batch.rows():
        q, k, v = batch.query[tokens], batch.keys[r], batch.values[r]
        expected = dense_causal_attention(q, k, v, ctx, SCALE, window=window)
        torch.testing.assert_close(output[tokens], expected, atol=2e-5, rtol=1e-4, msg=f"row {r}")
        if batch.seq_lens[r] > window + 8:
            assert (output[tokens] - dense_causal_attention(q, k, v, ctx, SCALE)).abs().max() > 1e-3
    assert (output[batch.qsl[-1]:] == 7.0).all(), "padded tokens were written"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alibi_slopes": [0.5, 0.25, 0.125, 0.0625]}, "ALiBi"),
        ({"logits_soft_cap": 30.0}, "soft-capping"),
        ({"attn_type": "encoder_only"}, "attention type 'encoder_only'"),
        ({"attn_type": "encoder_decoder"}, "cross-attention"),
        ({"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype='fp8_e5m2' is not supported"),
        ({"sinks": torch.zeros(NUM_HEADS)}, "attention sinks"),
    ],
)
def test_unsupported_features_fail_at_init(kwargs, message):
    from proxyattn_vllm.impl import ProxyAttnUnsupportedError

    with pytest.raises(ProxyAttnUnsupportedError, match=message) as info:
        _impl(**kwargs)
    assert "FLASH_ATTN" in str(info.value) or "--kv-cache-dtype auto" in str(info.value)


def test_config_is_validated_against_the_layer():
    from proxyattn_vllm import ProxyAttnConfigError

    with pytest.raises(ProxyAttnConfigError, match="num_proxy_groups=3"):
        _impl({**SPARSE, "num_proxy_groups": 3})  # 2 KV heads per rank
    assert _impl({**SPARSE, "num_proxy_groups": 2}).proxyattn_params.num_groups == 2
    assert _impl().proxyattn_params.num_groups == 1  # auto: Hq/Hkv = 2 <= 4


def test_dense_layers_need_a_layer_index(vllm_config):
    from proxyattn_vllm.impl import ProxyAttnUnsupportedError

    batch = Batch([40], [80], torch.float32, seed=4)
    md = _builder(vllm_config).build(0, batch.common)
    layer = _Layer(0)
    layer.layer_name = "model.attn"
    for metadata in (None, md):  # fails already in the (metadata-less) profiling run
        with pytest.raises(ProxyAttnUnsupportedError, match="dense_layers"):
            batch.run(_impl({**SPARSE, "dense_layers": [0]}), metadata, layer)
    # Without dense_layers the name is never needed.
    batch.run(_impl(), md, layer)


def test_sparse_prefill_reads_the_pages_directly_after_the_copy_ran_out_of_memory(monkeypatch):
    """An engine sized without the copy's reservation (--kv-cache-memory-bytes skips the profiling
    run): the Triton kernel's contiguous copy runs out of memory once; that chunk and every later
    one read the pages directly (copy_page=0), with the reference's result and one warning that
    says what to do. Another out-of-memory (no copy involved) is not swallowed."""
    import proxyattn_vllm.sparse.triton as triton_module
    from proxyattn_kernels import ProxyAttnParams
    from tests._paged import make_paged

    ctx, q_len = 53, 40
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(q_len, NUM_HEADS, HEAD_DIM, generator=gen)
    k, v = (torch.randn(ctx + q_len, NUM_KV_HEADS, HEAD_DIM, generator=gen) for _ in range(2))
    kv_cache, table = make_paged(k, v, PAGE)
    params = ProxyAttnParams(**{**{key: SPARSE[key] for key in ("block_size", "stride", "gamma", "max_density",
                                                                   "sink_blocks", "local_blocks", "dense_tail_tokens",
                                                                   "min_sparse_len")}, "min_budget_blocks": 1})
    expected, _ = proxyattn_prefill_reference(q, k, v, ctx=ctx, params=params, scale=SCALE)

    real = triton_module.block_sparse_attn
    copy_pages = []

    def copy_runs_out_of_memory(*args, copy_page, **kwargs):
        copy_pages.append(copy_page)
        if copy_page != 0:
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return real(*args, copy_page=copy_page, **kwargs)

    warnings = []
    monkeypatch.setattr(triton_module, "_copy_out_of_memory", False)
    monkeypatch.setattr(triton_module, "block_sparse_attn", copy_runs_out_of_memory)
    # As on Hopper with the kernel's TMA tiles: the kernel would copy these pages (its own rule,
    # default_copy_page, is tested in test_block_sparse_triton.py).
    monkeypatch.setattr(triton_module, "default_copy_page", lambda *args: 128)
    monkeypatch.setattr(triton_module.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    for _ in range(2):  # two layers
        out = torch.full_like(q, float("nan"))
        triton_module.sparse_prefill(q, kv_cache, table, out, ctx, SCALE, params)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert copy_pages == [128, 0, 0]  # the second layer no longer tries the copy
    assert len(warnings) == 1 and "out of GPU memory for the sparse kernel's copy of a 93-token prompt" in warnings[0]
    assert "--block-size 128" in warnings[0] and "--kv-cache-memory-bytes" in warnings[0]

    monkeypatch.setattr(triton_module, "_copy_out_of_memory", False)
    monkeypatch.setattr(triton_module, "default_copy_page", lambda *args: 0)  # no copy: the error is another one

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(triton_module, "block_sparse_attn", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        triton_module.sparse_prefill(q, kv_cache, table, torch.empty_like(q), ctx, SCALE, params)
