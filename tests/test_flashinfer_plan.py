"""proxyattn_kernels/block_sparse_attn/flashinfer*.py on CPU, without FlashInfer: the inputs it builds
(FlashInfer's CSR page lists) against an independent construction from the naive selection
masks, the host plan, plan reuse across layers, and the import error. The kernel itself runs
on the GPU (tests/test_flashinfer_path.py); here a torch stand-in (tests/_fake_flashinfer.py)
computes what the kernels of the accepted releases read, in each of their API variants (0.6.14,
0.7.x). Which releases are accepted, and that pyproject.toml's extra admits exactly those."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import types
from pathlib import Path

import pytest
import torch

from proxyattn_kernels.block_sparse_attn import flashinfer as fi
from proxyattn_kernels.block_sparse_attn import flashinfer_plan as fi_plan
from proxyattn_kernels.block_sparse_attn import flashinfer_release as fi_release
from proxyattn_kernels.block_sparse_attn.naive import selection_block_mask
from proxyattn_kernels.block_sparse_attn.union_pages import row_bounds, union_page_plan
from proxyattn_kernels.params import ChunkGeometry

from tests._fake_flashinfer import RELEASES, fake_flashinfer  # noqa: F401 - fixture
from tests._union_cases import CASE_IDS, CASES, random_cache, random_selection, union_reference

D = 16
#: Run a test with the stand-in of each API variant.
each_api = pytest.mark.parametrize("fake_flashinfer", RELEASES, indirect=True)


def expected_page_lists(ranking, counts, table, ctx, q_len, block_size, page_size):
    """FlashInfer's inputs built the slow way: per row, the key positions of the blocks any head
    selected (ascending; the diagonal block only up to the row's last query), then their pages."""
    geo = ChunkGeometry(ctx, q_len, block_size)
    mask = selection_block_mask(ranking, counts, geo.num_k_blocks)  # [Hq, R, Kb]
    qo_indptr, kv_indptr, indices, last_page_len = [0], [0], [], []
    for r in range(geo.num_q_blocks):
        row_block = geo.first_q_block + r
        row_end = min((row_block + 1) * block_size, geo.seq_len)
        qo_indptr.append(row_end - ctx)
        blocks = [b for b in range(geo.num_k_blocks) if bool(mask[:, r, b].any())]
        assert blocks[-1] == row_block  # the diagonal is selected and comes last
        positions = [p for b in blocks for p in range(b * block_size, min((b + 1) * block_size, row_end))]
        pages = [int(table[p // page_size]) for p in positions if p % page_size == 0]
        indices += pages
        kv_indptr.append(len(indices))
        last_page_len.append(len(positions) - (len(pages) - 1) * page_size)
    return qo_indptr, kv_indptr, indices, last_page_len


def shape(backend, ctx, q_len, block, page, hq, hkv, dtype=torch.float32):
    return fi_plan.ChunkShape(backend, ctx, q_len, block, page, hq, hkv, D, dtype, D**-0.5)


@pytest.mark.parametrize("ctx,q_len,block,page,hq,hkv,groups", CASES, ids=CASE_IDS)
def test_page_lists_equal_the_naive_construction(rng_seed, ctx, q_len, block, page, hq, hkv, groups):
    _, table = random_cache(ctx + q_len, hkv, D, page, torch.float32)
    geo = ChunkGeometry(ctx, q_len, block)
    extents = geo.first_q_block + torch.arange(geo.num_q_blocks) + 1
    # With several groups on short rows a random draw can cover every block (the union of four
    # random 30% selections of 8-12 blocks): draw again, so the test always sees a sparse union.
    for _ in range(50):
        ranking, counts = random_selection(hq, groups, ctx, q_len, block, density=0.3)
        union = union_page_plan(ranking, counts, table, ctx=ctx, q_len=q_len, block_size=block, page_size=page)
        if int(extents.max()) <= 6 or int(union.union_blocks.sum()) < int(extents.sum()):
            break
    plan = fi_plan._ChunkPlan(None, shape("fa2", ctx, q_len, block, page, hq, hkv), torch.device("cpu"))
    plan.write_pages(union)

    qo_indptr, kv_indptr, indices, last_page_len = expected_page_lists(
        ranking, counts, table, ctx, q_len, block, page)
    assert plan.qo_indptr_host.tolist() == qo_indptr
    assert plan.kv_indptr.tolist() == kv_indptr
    assert plan.kv_indices[: kv_indptr[-1]].tolist() == indices
    assert plan.last_page_len.tolist() == last_page_len
    assert all(1 <= n <= page for n in last_page_len)
    # The plan's host bounds (each row's whole causal extent) hold every union.
    bound = plan.max_kv_indptr_host
    assert ((bound[1:] - bound[:-1]) >= (plan.kv_indptr[1:] - plan.kv_indptr[:-1])).all()
    assert plan.kv_indices.numel() == int(bound[-1]) >= kv_indptr[-1]
    # A sparse test: some row's union leaves blocks out, and some head computes more than its own.
    if int(extents.max()) > 6:
        assert int(union.union_blocks.sum()) < int(extents.sum())
        assert bool((counts < union.union_blocks).any())


def test_host_bounds_are_the_dense_rows():
    """The upper bound planned once per chunk is the dense causal row: keys [0, row_end)."""
    ctx, q_len, block, page = 300, 1000, 128, 16
    plan = fi_plan._ChunkPlan(None, shape("fa2", ctx, q_len, block, page, 4, 1), torch.device("cpu"))
    _, row_end = row_bounds(ChunkGeometry(ctx, q_len, block), "cpu")
    lens = (plan.max_kv_indptr_host[1:] - plan.max_kv_indptr_host[:-1] - 1) * page + plan.max_last_page_len_host
    assert lens.tolist() == row_end.tolist()
    assert plan.qo_indptr_host.tolist() == [0, 84, 212, 340, 468, 596, 724, 852, 980, 1000]


@each_api
@pytest.mark.parametrize("backend", fi_plan.BACKENDS)
@pytest.mark.parametrize("ctx,q_len,block,page,hq,hkv,groups", [CASES[0], CASES[2]], ids=[CASE_IDS[0], CASE_IDS[2]])
def test_plan_reuse_across_layers(fake_flashinfer, backend, rng_seed, ctx, q_len, block, page, hq, hkv, groups):
    """Two layers of one step: same chunk, other caches and selections. "fa2" plans once and
    each layer only rewrites the device buffers; "fa3" plans per layer (after one sync)."""
    scale = D**-0.5
    q_by_layer, outs, refs = [], [], []
    for layer in range(3):
        q = torch.randn(q_len, hq, D)
        kv_cache, table = random_cache(ctx + q_len, hkv, D, page, torch.float32)
        density = 0.2 if layer % 2 else 0.5
        ranking, counts = random_selection(hq, groups, ctx, q_len, block, density)
        out = torch.full_like(q, float("nan"))
        fi.block_sparse_attn_flashinfer(q, kv_cache, table, ranking, counts, out, ctx=ctx, scale=scale,
                                        block_size=block, backend=backend)
        q_by_layer.append(q)
        outs.append(out)
        refs.append(union_reference(q, kv_cache, table, ranking, counts, ctx, block, scale))
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert fake_flashinfer.wrappers == 1 and fake_flashinfer.runs == 3
    assert fake_flashinfer.plans == (1 if backend == "fa2" else 3)


@each_api
def test_lru_reuses_wrappers_and_stays_correct(fake_flashinfer, monkeypatch, rng_seed):
    monkeypatch.setattr(fi_plan, "PLAN_CACHE_SIZE", 2)
    scale = D**-0.5
    hq, hkv, block, page = 4, 2, 64, 16
    for ctx in (10, 100, 300, 10):  # the third shape evicts the first, which then comes back
        q = torch.randn(150, hq, D)
        kv_cache, table = random_cache(ctx + 150, hkv, D, page, torch.float32)
        ranking, counts = random_selection(hq, 1, ctx, 150, block, 0.4)
        out = torch.full_like(q, float("nan"))
        fi.block_sparse_attn_flashinfer(q, kv_cache, table, ranking, counts, out, ctx=ctx, scale=scale,
                                        block_size=block)
        torch.testing.assert_close(out, union_reference(q, kv_cache, table, ranking, counts, ctx, block, scale),
                                   atol=2e-5, rtol=1e-4)
    assert fake_flashinfer.wrappers == 2 and fake_flashinfer.plans == 4
    assert len(fi_plan._STATES[torch.device("cpu")].plans) == 2


@each_api
def test_non_contiguous_output_is_written(fake_flashinfer, rng_seed):
    ctx, q_len, block, page, hq, hkv = 37, 300, 64, 16, 8, 2
    q = torch.randn(q_len, hq, D)
    kv_cache, table = random_cache(ctx + q_len, hkv, D, page, torch.float32)
    ranking, counts = random_selection(hq, 1, ctx, q_len, block, 0.3)
    wide = torch.full((q_len, hq, 2 * D), float("nan"))
    out = wide[..., :D]  # rows with a stride the kernel does not take
    fi.block_sparse_attn_flashinfer(q, kv_cache, table, ranking, counts, out, ctx=ctx, scale=D**-0.5,
                                    block_size=block)
    torch.testing.assert_close(out, union_reference(q, kv_cache, table, ranking, counts, ctx, block, D**-0.5),
                               atol=2e-5, rtol=1e-4)
    assert wide[..., D:].isnan().all()


def test_missing_flashinfer_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flashinfer", None)  # `import flashinfer` raises ImportError
    fi_release._import_result.cache_clear()
    try:
        assert not fi_release.flashinfer_available() and fi_release.installed_flashinfer_version() is None
        with pytest.raises(ImportError, match=r"pip install 'proxyattn-vllm\[flashinfer\]'") as err:
            fi_release.import_flashinfer()
        message = str(err.value)
        assert "\n" not in message and "flashinfer-python is not installed" in message
        assert "flashinfer-python 0.6.14, 0.7.0.post1, 0.7.2.post1, 0.7.3 or 0.7.4" in message
        with pytest.raises(ImportError, match="flashinfer"):
            fi_plan.chunk_plan(torch.zeros(64, 4, D), torch.zeros(8, 2, 16, 2 * D), ctx=0, scale=1.0, block_size=64)
    finally:
        fi_release._import_result.cache_clear()
        fi_plan.clear_plan_cache()


def _with_version(monkeypatch, version):
    monkeypatch.setitem(sys.modules, "flashinfer", types.SimpleNamespace(__version__=version))
    fi_release._import_result.cache_clear()


@pytest.mark.parametrize("version", ["0.6.13", "0.6.15", "0.6.18.post1", "0.7.0", "0.7.1", "0.7.2",
                                     "0.7.2rc6", "0.7.5", "0.8.0", "unknown"])
def test_other_flashinfer_versions_are_refused(monkeypatch, version):
    _with_version(monkeypatch, version)
    try:
        assert fi_release.flashinfer_import_error() == f"flashinfer-python {version} is installed"
        assert fi_release.installed_flashinfer_version() == version
        with pytest.raises(ImportError) as err:
            fi_release.import_flashinfer()
        message = str(err.value)
        # One line: what is installed, what is accepted, what to do.
        assert "\n" not in message
        assert f"flashinfer-python {version} is installed" in message
        assert fi_release.FLASHINFER_REQUIREMENT in message and fi_release.INSTALL_HINT in message
    finally:
        fi_release._import_result.cache_clear()


@pytest.mark.parametrize("version", ["0.6.14", "0.7.0.post1", "0.7.2.post1", "0.7.3", "0.7.4", "0.7.4+cu130"])
def test_each_supported_vllms_flashinfer_is_accepted(monkeypatch, version):
    _with_version(monkeypatch, version)
    try:
        assert fi_release.flashinfer_import_error() is None
        assert fi_release.import_flashinfer() is sys.modules["flashinfer"]
    finally:
        fi_release._import_result.cache_clear()


def test_the_extra_admits_exactly_the_accepted_releases():
    """pyproject.toml's ``[flashinfer]`` extra, against flashinfer-python's releases from 0.6.13
    to 0.7.5: it admits the accepted ones and no other, so that next to a supported vLLM it
    resolves to that vLLM's pin and alone to a release the path accepts."""
    specifiers = pytest.importorskip("packaging.specifiers")
    requirements = pytest.importorskip("packaging.requirements")
    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    (line,) = meta["optional-dependencies"]["flashinfer"]
    requirement = requirements.Requirement(line)
    assert requirement.name == "flashinfer-python"
    releases = ["0.6.13", "0.6.14", "0.6.15", "0.6.15.post1", "0.6.16", "0.6.16.post4", "0.6.17",
                "0.6.18", "0.6.18.post1", "0.7.0", "0.7.0.post1", "0.7.1", "0.7.2", "0.7.2.post1",
                "0.7.3", "0.7.4", "0.7.5", "0.8.0"]
    assert isinstance(requirement.specifier, specifiers.SpecifierSet)
    admitted = [v for v in releases if requirement.specifier.contains(v)]
    assert admitted == list(fi_release.SUPPORTED_FLASHINFER_VERSIONS)


def test_module_imports_without_flashinfer():
    code = ("import sys; import proxyattn_kernels.block_sparse_attn.flashinfer as m; "
            "import proxyattn_kernels.block_sparse_attn.flashinfer_release; "
            "assert 'flashinfer' not in sys.modules, 'imported eagerly'; print(m.DEFAULT_BACKEND)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "fa2", result.stderr


@each_api
def test_warm_up_plans_a_one_row_chunk(fake_flashinfer):
    fi.warm_up("cpu", torch.float32, num_q_heads=8, num_kv_heads=2, head_dim=D, page_size=16, block_size=64)
    assert (fake_flashinfer.wrappers, fake_flashinfer.plans, fake_flashinfer.runs) == (1, 1, 1)
