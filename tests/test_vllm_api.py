"""The backend against the Python API of the vLLM releases that have no CPU build, on a machine
without a GPU.

vLLM 0.33 and 0.34 have no CPU build. CI unpacks the Python files of each one's CUDA wheel
(hash-pinned in ``requirements/vllm0XX-api.lock``, see ``.ci/run``) into a folder and names the
folders in ``PROXYATTN_VLLM_API_SRC``, comma-separated ``SERIES=FOLDER`` pairs::

    PROXYATTN_VLLM_API_SRC=0.33=/path/to/vllm033-src,0.34=/path/to/vllm034-src

Every test runs once per release with a lock (``API_VERSIONS``); a release whose folder is not
named skips with the reason. Per release, a subprocess imports that vLLM (its compiled extensions
absent, CUDA hidden) together with this checkout, registers the plugin and reports what the
backend, its builder and its impl inherit from and call on FlashAttention: the capability flags,
the signatures vLLM calls them with, the metadata fields the plan reads, the FlashAttention
functions the impl calls and where ``vllm serve``'s argument parser lives. What legitimately
differs between the releases is spelled out in ``EXPECTED``. It does not run a forward (that needs
a GPU).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC_ENV = "PROXYATTN_VLLM_API_SRC"
REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements"


def _locked_api_versions() -> dict[str, str]:
    """Series -> the release pinned in ``requirements/vllm0XX-api.in``."""
    versions = {}
    for path in sorted(REQUIREMENTS.glob("vllm0*-api.in")):
        (release,) = re.findall(r"^vllm==(\S+)$", path.read_text(), re.M)
        versions[".".join(release.split(".")[:2])] = release
    return versions


#: The releases checked from their wheel's Python files, series -> pinned release.
API_VERSIONS = _locked_api_versions()

#: What differs between the checked releases (everything else is asserted for all of them).
EXPECTED = {
    "0.33": dict(
        cli_args_module="vllm.entrypoints.common.cli_args",
        # FlashAttention may run forward() with key/value omitted after a fused cache write.
        kv_cache_update_bypass=True,
        # No per-backend check of a V head size unlike K's (0.34 adds supports_head_size_v).
        supports_head_size_v=None,
        # The base builder's build_for_drafting calls build(common_prefix_len=0, ...,
        # fast_build=True); ours inherits it (0.34 drops the method).
        build_for_drafting="inherited",
    ),
    "0.34": dict(
        cli_args_module="vllm.entrypoints.common.cli_args",
        kv_cache_update_bypass=True,
        supports_head_size_v=False,  # AttentionBackend's default: V's head size must equal K's
        build_for_drafting=None,
    ),
}


def api_sources() -> dict[str, str]:
    """Series -> folder, from ``PROXYATTN_VLLM_API_SRC`` (empty when it is unset)."""
    sources = {}
    for entry in filter(None, (e.strip() for e in os.environ.get(SRC_ENV, "").split(","))):
        series, sep, folder = entry.partition("=")
        if not sep or not folder:
            raise ValueError(f"{SRC_ENV}: {entry!r} is not SERIES=FOLDER")
        sources[series] = folder
    return sources


PROBE = r'''
import inspect, json, sys

import torch

import vllm

facts = {"version": vllm.__version__, "vllm_file": vllm.__file__}

from vllm.v1.attention.backend import (
    AttentionBackend, AttentionCGSupport, AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata)
from vllm.v1.attention.backends import fa_utils
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend, FlashAttentionImpl, FlashAttentionMetadata, FlashAttentionMetadataBuilder)
from vllm.v1.attention.backends.registry import AttentionBackendEnum
from vllm.platforms.interface import DeviceCapability

import proxyattn_vllm
from proxyattn_vllm.vllm_version import is_supported

facts["supported"] = is_supported(vllm.__version__)
proxyattn_vllm.register()
backend = AttentionBackendEnum.CUSTOM.get_class()
facts["backend"] = backend.__name__
facts["subclass_of_fa"] = issubclass(backend, FlashAttentionBackend)
facts["impl"] = backend.get_impl_cls().__name__
facts["builder"] = backend.get_builder_cls().__name__
facts["enum_alias"] = AttentionBackendEnum["PROXYATTN"] is AttentionBackendEnum.CUSTOM

flags = {}
for name in dir(AttentionBackend):
    value = getattr(backend, name)
    if name.startswith("_"):
        continue
    if isinstance(value, bool):
        flags[name] = [value, getattr(FlashAttentionBackend, name)]
    elif inspect.ismethod(value) and name.startswith(("supports_", "is_")):
        if not [p for p in inspect.signature(value).parameters.values() if p.default is p.empty]:
            flags[name] = [value(), getattr(FlashAttentionBackend, name)()]
facts["flags"] = flags
facts["kernel_block_sizes"] = [repr(s) for s in backend.get_supported_kernel_block_sizes(None)]
facts["preferred_block_size_16"] = backend.get_preferred_block_size(16)
facts["kv_cache_dtype_fp8"] = backend.supports_kv_cache_dtype("fp8")
facts["kv_cache_layouts"] = repr(backend.supported_kv_cache_layouts())

# validate_configuration with every keyword this release has, as its selector passes them.
params = inspect.signature(AttentionBackend.validate_configuration).parameters
facts["validate_params"] = [p for p in params if p != "cls"]
base = dict(head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None,
            use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
            use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
            attn_type=AttentionType.DECODER)
base = {k: v for k, v in base.items() if k in params}
facts["validate_ok"] = backend.validate_configuration(**base)
facts["validate_sink"] = backend.validate_configuration(**{**base, "has_sink": True})
if "use_rswa" in params:
    facts["validate_rswa"] = backend.validate_configuration(**base, use_rswa=True)
facts["supports_head_size_v"] = (
    [backend.supports_head_size_v(128, 128), backend.supports_head_size_v(128, 64)]
    if hasattr(AttentionBackend, "supports_head_size_v") else None)

def sig(fn):
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]

builder = backend.get_builder_cls()
facts["builder_init"] = [sig(FlashAttentionMetadataBuilder.__init__), sig(builder.__init__)]
facts["builder_build"] = [sig(FlashAttentionMetadataBuilder.build), sig(builder.build)]
facts["builder_cg"] = [sig(FlashAttentionMetadataBuilder.get_cudagraph_support), builder._cudagraph_support.name]
facts["builder_reorder"] = sig(FlashAttentionMetadataBuilder._init_reorder_batch_threshold)
facts["builder_update_block_table"] = builder.supports_update_block_table
if hasattr(AttentionMetadataBuilder, "build_for_drafting"):
    inherited = builder.build_for_drafting is AttentionMetadataBuilder.build_for_drafting
    facts["build_for_drafting"] = "inherited" if inherited else "overridden"
else:
    facts["build_for_drafting"] = None
facts["common_fields"] = sorted(CommonAttentionMetadata.__dataclass_fields__)
facts["fa_metadata_fields"] = sorted(FlashAttentionMetadata.__dataclass_fields__)

impl = backend.get_impl_cls()
facts["impl_init"] = [sig(FlashAttentionImpl.__init__), sig(impl.__init__)]
facts["impl_forward"] = [sig(FlashAttentionImpl.forward), sig(impl.forward)]
facts["impl_kv_update"] = [sig(FlashAttentionImpl.do_kv_cache_update), sig(impl.do_kv_cache_update)]
facts["impl_supports_dcp"] = impl.supports_dcp
# (fa_utils binds flash_attn_varlen_func only where vllm_flash_attn imports, i.e. with CUDA.)
facts["fa_utils"] = [hasattr(fa_utils, n) for n in ("get_flash_attn_version", "is_flash_attn_varlen_func_available")]
facts["fa_utils"].append("flash_attn_varlen_func," in inspect.getsource(fa_utils))
# vllm_flash_attn needs its CUDA extensions to import: read the function's parameters from source.
import ast, importlib.util
interface = importlib.util.find_spec("vllm").submodule_search_locations[0] + "/vllm_flash_attn/flash_attn_interface.py"
tree = ast.parse(open(interface).read())
varlen = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "flash_attn_varlen_func")
facts["varlen_params"] = [a.arg for a in varlen.args.args + varlen.args.kwonlyargs]
from vllm.utils.torch_utils import canonicalize_singleton_dim_strides  # noqa: F401
from vllm.config import get_current_vllm_config_or_none  # noqa: F401
from vllm.model_executor.models.utils import extract_layer_index  # noqa: F401
from vllm.v1.attention.ops.triton_reshape_and_cache_flash import triton_reshape_and_cache_flash
from vllm.v1.attention.ops.triton_unified_attention import unified_attention
facts["triton_kv_write"] = sig(triton_reshape_and_cache_flash)
facts["triton_attention"] = sig(unified_attention)

# Where vllm_compat.make_serve_arg_parser finds make_arg_parser (building the parser needs a
# platform: this imports the module only).
import importlib
from proxyattn_vllm.vllm_compat import _CLI_ARGS_MODULES
facts["cli_args"] = None
for name in _CLI_ARGS_MODULES:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name and (name == error.name or name.startswith(error.name + ".")):  # absent here
            continue
        raise
    facts["cli_args"] = [name, callable(getattr(module, "make_arg_parser", None))]
    break

# The plan, from a CommonAttentionMetadata as this release builds it (CPU tensors).
from proxyattn_vllm.metadata import plan_batch
qsl = torch.tensor([0, 1, 2, 42, 47], dtype=torch.int32)
seq = torch.tensor([37, 20, 93, 15], dtype=torch.int32)
cm = CommonAttentionMetadata(
    query_start_loc=qsl.clone(), query_start_loc_cpu=qsl, seq_lens=seq.clone(), num_reqs=4,
    num_actual_tokens=47, max_query_len=40, max_seq_len=93,
    block_table_tensor=torch.zeros(4, 8, dtype=torch.int32), slot_mapping=torch.zeros(47, dtype=torch.int64),
    causal=True, seq_lens_cpu_upper_bound=seq)
plan = plan_batch(cm.query_start_loc_cpu, cm.seq_lens_cpu_upper_bound, cm.num_reqs, 64, 1, 16, 0)
facts["plan"] = [plan.decode_rows, [r.req_idx for r in plan.sparse_rows], plan.short_rows]
print("PROBE-FACTS " + json.dumps(facts, default=str))
'''


def test_the_checked_releases():
    """Every locked release has its expectations and is supported; the variable names only them."""
    assert set(API_VERSIONS) == set(EXPECTED) and API_VERSIONS
    from proxyattn_vllm.vllm_version import SUPPORTED_VLLM_SERIES

    assert set(API_VERSIONS) <= set(SUPPORTED_VLLM_SERIES)
    unknown = set(api_sources()) - set(API_VERSIONS)
    assert not unknown, f"{SRC_ENV} names {sorted(unknown)}; checked releases: {sorted(API_VERSIONS)}"


@pytest.fixture(scope="module", params=sorted(API_VERSIONS))
def series(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def facts(series):
    src = api_sources().get(series)
    if not src:
        pytest.skip(f"{SRC_ENV} names no folder for vLLM {series} (.ci/run sets it to the unpacked "
                    f"Python files of requirements/vllm0{series.split('.')[1]}-api.lock)")
    assert (Path(src) / "vllm" / "__init__.py").is_file(), f"{SRC_ENV}: {series}={src} holds no vllm package"
    import proxyattn_kernels
    import proxyattn_vllm

    paths = [src, str(Path(proxyattn_vllm.__file__).parent.parent), str(Path(proxyattn_kernels.__file__).parent.parent)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), CUDA_VISIBLE_DEVICES="",
               PROXYATTN_ALLOW_UNSUPPORTED_VLLM="1", VLLM_PLUGINS="")
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=600,
                          cwd=src)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE-FACTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(lines[-1][len("PROBE-FACTS "):])
    assert result["vllm_file"].startswith(src), result["vllm_file"]
    return result


def test_it_is_the_locked_release_and_supported(facts, series):
    assert facts["version"] == API_VERSIONS[series]
    assert facts["supported"] is True


def test_serve_argument_parser(facts, series):
    assert facts["cli_args"] == [EXPECTED[series]["cli_args_module"], True]


def test_registration(facts):
    assert facts["backend"] == "ProxyAttnBackend" and facts["subclass_of_fa"] and facts["enum_alias"]
    assert facts["impl"] == "ProxyAttnImpl" and facts["builder"] == "ProxyAttnMetadataBuilder"


def test_capability_flags(facts, series):
    flags = {name: ours for name, (ours, _fa) in facts["flags"].items()}
    fa = {name: theirs for name, (_ours, theirs) in facts["flags"].items()}
    # 0.33 adds this to FlashAttention (forward without key/value after a fused cache write).
    if EXPECTED[series]["kv_cache_update_bypass"]:
        assert fa["supports_kv_cache_update_bypass"] is True and flags["supports_kv_cache_update_bypass"] is False
    else:
        assert "supports_kv_cache_update_bypass" not in flags
    assert flags["forward_includes_kv_cache_update"] is False  # vLLM calls do_kv_cache_update first
    for name in ("is_sparse", "is_mla", "supports_sink", "supports_mm_prefix", "supports_non_causal",
                 "supports_batch_invariance", "supports_rswa", "supports_device_cpu_query_lens_mismatch",
                 "supports_alibi_sqrt", "supports_per_head_quant_scales", "supports_dcp", "supports_pcp"):
        assert flags[name] is False, name
    assert flags["supports_sliding_window"] is True  # sliding layers run dense
    # Every flag FlashAttention turns on is either one we keep on purpose or one turned off above.
    kept_on = {"supports_sliding_window", "supports_kv_connector"}
    assert {n for n, v in fa.items() if v is True and flags[n] is True} <= kept_on
    assert facts["kernel_block_sizes"] == ["MultipleOf(16)"] and facts["preferred_block_size_16"] == 128
    assert facts["kv_cache_dtype_fp8"] is False
    assert facts["kv_cache_layouts"] == "None"  # FlashAttention's: any layout (kernels take strides)
    expected_v = EXPECTED[series]["supports_head_size_v"]
    assert facts["supports_head_size_v"] == (None if expected_v is None else [True, expected_v])


def test_validate_configuration(facts):
    assert facts["validate_ok"] == []
    assert "attention sinks not supported" in facts["validate_sink"]
    assert "--attention-backend FLASH_ATTN" in facts["validate_sink"][-1]
    assert facts.get("validate_rswa", ["x"])  # R-SWA refused where the release has it


def test_builder_api(facts, series):
    fa_init, ours_init = facts["builder_init"]
    assert fa_init == ours_init == ["kv_cache_spec", "layer_names", "vllm_config", "device"]
    fa_build, ours_build = facts["builder_build"]
    assert fa_build[:3] == ours_build == ["common_prefix_len", "common_attn_metadata", "fast_build"]
    assert facts["builder_cg"] == [["vllm_config", "kv_cache_spec"], "UNIFORM_BATCH"]
    assert facts["builder_reorder"][0] == "reorder_batch_threshold"
    assert facts["builder_update_block_table"] is False
    assert facts["build_for_drafting"] == EXPECTED[series]["build_for_drafting"]
    # What the plan and the metadata wrapper read.
    assert {"query_start_loc_cpu", "seq_lens_cpu_upper_bound", "num_reqs", "max_query_len",
            "block_table_tensor"} <= set(facts["common_fields"])
    assert {"num_actual_tokens", "max_query_len", "query_start_loc", "seq_lens", "max_seq_len",
            "block_table", "slot_mapping"} <= set(facts["fa_metadata_fields"])
    assert facts["plan"] == [[0, 1], [2], [3]]


def test_impl_api(facts):
    fa_init, ours_init = facts["impl_init"]
    assert ours_init[: len(fa_init)] == fa_init and ours_init[len(fa_init):] == ["proxyattn_config"]
    fa_forward, ours_forward = facts["impl_forward"]
    assert fa_forward == ours_forward
    assert facts["impl_kv_update"][0] == facts["impl_kv_update"][1]
    assert facts["impl_supports_dcp"] is False
    assert all(facts["fa_utils"])
    assert {"q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale",
            "causal", "block_table", "scheduler_metadata", "fa_version", "q_descale", "k_descale", "v_descale",
            "return_softmax_lse", "num_splits"} <= set(facts["varlen_params"])
    assert facts["triton_kv_write"][:6] == ["key", "value", "key_cache", "value_cache", "slot_mapping", "kv_cache_dtype"]
    assert {"q", "k", "v", "out", "cu_seqlens_q", "max_seqlen_q", "seqused_k", "max_seqlen_k", "softmax_scale",
            "causal", "window_size", "block_table", "softcap", "q_descale", "k_descale", "v_descale"} <= set(
        facts["triton_attention"])
