"""proxyattn_vllm/sparse: the kernel interface and the one place a layer's kernel is chosen
(``choose.py``: "auto" from ``auto_table.json``, the fallback to Triton with one warning, bad
values). The kernels' results through the impl are tested in test_vllm_impl.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("vllm")

from proxyattn_kernels import ProxyAttnParams  # noqa: E402
from proxyattn_kernels.reference import proxyattn_prefill_reference  # noqa: E402

from tests._paged import make_paged  # noqa: E402

HQ, HKV, D, PAGE = 4, 2, 32, 16


def _layer(params: ProxyAttnParams | None = None, head_size: int = D):
    from proxyattn_vllm.dense import DenseAttention
    from proxyattn_vllm.sparse.base import SparseLayer

    params = params or ProxyAttnParams(block_size=16, min_budget_blocks=1, min_sparse_len=0)
    dense = DenseAttention(head_size=head_size, num_kv_heads=HKV, scale=head_size**-0.5, sliding_window=None,
                           flash_attn_version=None)
    return SparseLayer(HQ, HKV, head_size, head_size**-0.5, params, dense)


def test_every_kernel_value_has_one_kernel_class():
    from proxyattn_vllm.config import SPARSE_KERNELS
    from proxyattn_vllm.sparse.base import SparseKernel
    from proxyattn_vllm.sparse.choose import KERNELS

    assert (*KERNELS, "auto") == SPARSE_KERNELS
    for name, cls in KERNELS.items():
        assert issubclass(cls, SparseKernel) and cls.name == name
    # What the impl and the warm-up read: the union kernels run the union page plan; only
    # FlashInfer computes the dense tail itself; only Triton may copy the request's pages.
    assert {n for n, c in KERNELS.items() if c.union_pages} == {"fa3", "flashinfer"}
    assert {n for n, c in KERNELS.items() if not c.dense_tail_first} == {"flashinfer"}
    assert {n for n, c in KERNELS.items() if c.copies_pages} == {"triton"}


def test_triton_kernel_run_writes_the_reference_into_the_chunk():
    """The interface on a paged cache: ``run`` overwrites the chunk's output view (NaN before)
    with the reference's result, and only it."""
    from proxyattn_vllm.sparse.base import SparseChunk
    from proxyattn_vllm.sparse.triton import TritonSparseKernel

    ctx, q_len = 53, 40
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(q_len + 6, HQ, D, generator=gen)
    k, v = (torch.randn(ctx + q_len, HKV, D, generator=gen) for _ in range(2))
    kv_cache, table = make_paged(k, v, PAGE)
    layer = _layer(ProxyAttnParams(gamma=0.6, block_size=16, min_budget_blocks=1, min_sparse_len=0,
                                   dense_tail_tokens=8))
    out = torch.full_like(q, math.nan)
    TritonSparseKernel(layer).run(None, SparseChunk(q[3 : 3 + q_len], kv_cache, table, out[3 : 3 + q_len], ctx))
    expected, selection = proxyattn_prefill_reference(q[3 : 3 + q_len], k, v, ctx=ctx, params=layer.params,
                                                      scale=layer.scale)
    assert selection.density < 0.9, selection.stats()
    torch.testing.assert_close(out[3 : 3 + q_len], expected, atol=2e-5, rtol=1e-4)
    assert out[:3].isnan().all() and out[3 + q_len :].isnan().all()


def test_auto_follows_the_packaged_table():
    from proxyattn_vllm.sparse.choose import auto_sparse_kernel, auto_table

    table = auto_table()
    for key in ("gpu", "date", "source"):
        assert isinstance(table[key], str) and table[key], key
    assert table["shapes"], "an empty table: auto is Triton everywhere"
    for entry in table["shapes"]:
        hd, page, q_per_kv = entry["head_dim"], entry["page_size"], entry["q_per_kv"]
        assert auto_sparse_kernel(hd, page, 2 * q_per_kv, 2) == entry["kernel"], entry["model"]
        assert auto_sparse_kernel(hd, page, 2 * q_per_kv, 2, num_groups=2) == table["several_proxy_groups"]
        # Every choice rests on measured times of the kernels it compares.
        assert {"triton", "fa3"} <= set(entry["attn_ms"]), entry["model"]
    listed = {(e["head_dim"], e["page_size"], e["q_per_kv"]) for e in table["shapes"]}
    assert (96, 32, 1) not in listed and auto_sparse_kernel(96, 32, 8, 8) == table["default"]


def test_auto_decisions_come_from_the_table_file(tmp_path):
    """Another table file gives other decisions: nothing about the shapes is in the code."""
    from proxyattn_vllm.sparse.choose import auto_sparse_kernel, auto_table

    data = {"gpu": "test", "date": "2026-01-01", "source": "none", "default": "fa3",
            "several_proxy_groups": "flashinfer",
            "shapes": [{"model": "m", "head_dim": 64, "page_size": 32, "q_per_kv": 2, "kernel": "triton",
                        "attn_ms": {"triton": 1.0, "fa3": 2.0}}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(data))
    table = auto_table(path)
    assert auto_sparse_kernel(64, 32, 8, 4, table=table) == "triton"
    assert auto_sparse_kernel(64, 16, 8, 4, table=table) == "fa3"  # unlisted: the default
    assert auto_sparse_kernel(64, 32, 8, 4, num_groups=2, table=table) == "flashinfer"
    data["shapes"][0]["kernel"] = "cuda"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="kernel 'cuda' is not one of"):
        auto_table.__wrapped__(path)


@pytest.mark.parametrize("value", ["cuda", "FA3", "", None])
def test_a_bad_kernel_value_is_an_error_naming_the_accepted_ones(value):
    from proxyattn_vllm.config import ProxyAttnConfigError
    from proxyattn_vllm.sparse.choose import check_configured, choose

    accepted = '"triton", "fa3", "flashinfer" or "auto"'
    with pytest.raises(ProxyAttnConfigError, match=f"sparse_kernel={value!r} is invalid; accepted: {accepted}"):
        check_configured(value)
    with pytest.raises(ProxyAttnConfigError, match="accepted"):
        choose(value, _layer(), PAGE, torch.float16)


def test_fallback_to_triton_warns_once_per_reason(monkeypatch):
    from proxyattn_vllm.sparse import choose
    from proxyattn_vllm.sparse.fa3 import FA3UnionKernel
    from proxyattn_vllm.sparse.triton import TritonSparseKernel

    warnings = []
    monkeypatch.setattr(choose, "_warned_fallbacks", set())
    monkeypatch.setattr(choose.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    layer = _layer()  # block_size 16
    assert isinstance(choose.sparse_kernel_for_layer("fa3", layer, 16, torch.float32), FA3UnionKernel)
    assert choose.sparse_kernel_for_layer("fa3", layer, 32, torch.float32, warn=False).name == "triton"
    assert warnings == []  # a fitting page, and a decision without warning (the warm-up's)
    for _ in range(3):  # three layers: one warning
        kernel = choose.sparse_kernel_for_layer("fa3", layer, 32, torch.float32)
        assert isinstance(kernel, TritonSparseKernel) and kernel.layer is layer
    assert len(warnings) == 1, warnings
    assert warnings[0] == ('proxyattn: sparse_kernel "fa3" needs KV pages that divide block_size=16, got pages '
                           'of 32 tokens; set --block-size to a divisor of 16 to use FA3; using the Triton '
                           'block-sparse kernel.')
    choose.sparse_kernel_for_layer("fa3", layer, 64, torch.float32)  # another reason: its own warning
    assert len(warnings) == 2 and "got pages of 64" in warnings[1]


def test_auto_names_the_kernel_it_chose_when_that_cannot_run(monkeypatch):
    from proxyattn_vllm.sparse import choose

    monkeypatch.setitem(choose.auto_table()["by_shape"], (D, 32, HQ // HKV), "fa3")
    kernel, reason = choose.choose("auto", _layer(), 32, torch.float32)
    assert kernel == "fa3" and reason.startswith('sparse_kernel "auto" (chose "fa3") needs KV pages'), reason
    assert choose.choose("auto", _layer(), 16, torch.float32) == ("triton", None)  # unlisted shape
