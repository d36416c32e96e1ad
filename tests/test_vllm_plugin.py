"""The vLLM plugin: registration, every spelling of the backend name, and spawn-safety.

``register()`` is the ``vllm.general_plugins`` entry point; these tests go through vLLM's own
CLI parser and ``EngineArgs.create_engine_config`` (what ``vllm serve`` and ``LLM(...)`` run).
"""
from __future__ import annotations

import multiprocessing
import pickle
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

BACKEND_PATH = "proxyattn_vllm.backend.ProxyAttnBackend"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from proxyattn_vllm.testing import write_tiny_llama

    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


def test_register_is_idempotent():
    import proxyattn_vllm
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    members = list(E)
    for _ in range(3):
        proxyattn_vllm.register()
    assert E.CUSTOM.get_path() == BACKEND_PATH
    assert E["PROXYATTN"] is E.CUSTOM and E["proxyattn".upper()] is E.CUSTOM
    # An alias, not a new member: iteration, values and pickling are unchanged.
    assert list(E) == members
    assert pickle.loads(pickle.dumps(E["PROXYATTN"])) is E.CUSTOM


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "proxyattn"]
    assert len(eps) == 1, "re-install the project: pip install -e ."
    assert eps[0].value == "proxyattn_vllm:register"


_CHEAP_REGISTER = r"""
import sys, torch
import proxyattn_vllm
proxyattn_vllm.register(); proxyattn_vllm.register()
from vllm.v1.attention.backends.registry import AttentionBackendEnum as E
assert E["PROXYATTN"] is E.CUSTOM, "alias missing"
assert E.CUSTOM.get_path() == "proxyattn_vllm.backend.ProxyAttnBackend"
heavy = [m for m in ("proxyattn_vllm.backend", "proxyattn_vllm.impl", "proxyattn_vllm.metadata",
                     "proxyattn_kernels.block_sparse_attn.triton",
                     "vllm.v1.attention.backends.flash_attn") if m in sys.modules]
assert not heavy, f"register() imported {heavy}"
assert not torch.cuda.is_initialized()
# vLLM's own plugin loader finds the entry point and runs it.
import vllm.plugins
vllm.plugins.load_general_plugins()
assert E.CUSTOM.get_path() == "proxyattn_vllm.backend.ProxyAttnBackend"
print("OK")
"""


def test_register_is_cheap_in_a_fresh_process():
    """register() imports only vLLM's registry: not our backend, our Triton kernels, FA, or CUDA."""
    proc = subprocess.run(
        [sys.executable, "-c", _CHEAP_REGISTER], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


CLI_SPELLINGS = [
    ["--attention-backend", "proxyattn"],
    ["--attention-backend", "PROXYATTN"],
    ["--attention-backend", "ProxyAttn"],
    ["--attention-backend", "CUSTOM"],
    ["-ac.backend=proxyattn"],
    ["--attention-config.backend", "PROXYATTN"],
    ["--attention-config", '{"backend": "proxyattn"}'],
]


def _serve_parser():
    from proxyattn_vllm.vllm_compat import make_serve_arg_parser

    # What `vllm serve` builds; it loads the general plugins (ours) before building the parser.
    return make_serve_arg_parser()


def _engine_config_from_cli(model_dir: str, extra: list[str]):
    from vllm.engine.arg_utils import AsyncEngineArgs

    args = _serve_parser().parse_args(["--model", model_dir, *extra])
    return AsyncEngineArgs.from_cli_args(args).create_engine_config()


def _child_unpickle(payload: bytes, queue) -> None:
    """Runs in a `spawn`ed process that never loads vLLM plugins (like an engine core does
    before ``EngineCore.__init__``): can it unpickle the configs?"""
    try:
        configs = pickle.loads(payload)
        import vllm.plugins
        from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

        queue.put(
            {
                "backends": [c.backend.name for c in configs],
                "plugins_loaded": vllm.plugins.plugins_loaded,
                "alias_present": "PROXYATTN" in E._member_map_,
                "ours_imported": "proxyattn_vllm" in sys.modules,
            }
        )
    except BaseException as exc:  # report, don't hang the parent
        queue.put({"error": repr(exc)})


def test_every_spelling_resolves_to_custom_and_survives_spawn(model_dir):
    import proxyattn_vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    proxyattn_vllm.register()
    attention_configs = []
    for extra in CLI_SPELLINGS:
        cfg = _engine_config_from_cli(model_dir, extra)
        assert cfg.attention_config.backend is E.CUSTOM, extra
        attention_configs.append(cfg.attention_config)
    # The Python API: LLM(model, attention_backend="proxyattn") builds exactly these EngineArgs.
    for kwargs in ({"attention_backend": "proxyattn"}, {"attention_config": {"backend": "proxyattn"}}):
        cfg = EngineArgs(model=model_dir, **kwargs).create_engine_config()
        assert cfg.attention_config.backend is E.CUSTOM, kwargs
        attention_configs.append(cfg.attention_config)
    assert E.CUSTOM.get_class().__name__ == "ProxyAttnBackend"

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_unpickle, args=(pickle.dumps(attention_configs), queue))
    child.start()
    try:
        result = queue.get(timeout=240)
    finally:
        child.join(timeout=60)
    assert "error" not in result, result
    assert result["backends"] == ["CUSTOM"] * len(attention_configs)
    # The child really had no plugin: the configs unpickled by value alone.
    assert not result["plugins_loaded"] and not result["alias_present"]
    assert not result["ours_imported"]


def test_unknown_name_still_fails(model_dir):
    with pytest.raises(ValueError, match="Unknown attention backend"):
        _engine_config_from_cli(model_dir, ["--attention-backend", "proxyatn"])


def test_both_flags_are_mutually_exclusive(model_dir):
    with pytest.raises(ValueError, match="mutually exclusive"):
        _engine_config_from_cli(
            model_dir, ["--attention-backend", "proxyattn", "-ac.backend=proxyattn"]
        )


def test_backend_capabilities():
    import torch
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backend import AttentionType, MultipleOf
    from vllm.v1.attention.backends.registry import AttentionBackendEnum as E

    import proxyattn_vllm

    proxyattn_vllm.register()
    backend = E.CUSTOM.get_class()
    assert backend.get_name() == "CUSTOM" and E[backend.get_name()] is E.CUSTOM
    assert backend.get_impl_cls().__name__ == "ProxyAttnImpl"
    assert backend.get_builder_cls().__name__ == "ProxyAttnMetadataBuilder"
    for spec in (None, object()):
        sizes = backend.get_supported_kernel_block_sizes(spec)
        assert len(sizes) == 1 and isinstance(sizes[0], MultipleOf) and sizes[0].base == 16
    assert [s.base for s in backend.get_supported_kernel_block_sizes()] == [16]
    # Without --block-size vLLM takes the preferred page size: 128 keeps the sparse kernel on TMA.
    assert backend.get_preferred_block_size(16) == 128
    assert backend.get_preferred_block_size(256) == 256
    assert not backend.is_sparse() and not backend.is_mla()
    assert backend.supports_sliding_window() and not backend.supports_sink()  # sliding layers run dense
    assert not backend.supports_mm_prefix() and not backend.supports_non_causal()
    assert backend.supports_attn_type(AttentionType.DECODER)
    for t in (AttentionType.ENCODER, AttentionType.ENCODER_ONLY, AttentionType.ENCODER_DECODER):
        assert not backend.supports_attn_type(t)
    # fp8 needs a dense kernel that stores it (FA3 on Hopper, or Triton on SM89+): not on this CPU
    # (tests/test_vllm_impl_fp8.py checks both answers).
    assert not backend.supports_kv_cache_dtype("fp8")
    # KV layout is FLASH_ATTN's packed (blocks, Hkv, page, 2*D).
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from proxyattn_vllm.vllm_compat import kv_cache_shape

    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
    assert kv_cache_shape(backend, spec, 8) == (8, 2, 16, 64)
    # Forward always gets this step's key/value (vLLM 0.33+ may otherwise omit them when a fused
    # op already wrote the cache: the sparse path reads the chunk's keys from them).
    assert backend.supports_kv_cache_update_bypass is False

    common = dict(
        head_size=128, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=None,
        use_mla=False, has_sink=False, use_sparse=False, use_mm_prefix=False,
        use_per_head_quant_scales=False, device_capability=DeviceCapability(9, 0),
        attn_type=AttentionType.DECODER,
    )
    assert backend.validate_configuration(**common) == []
    assert backend.validate_configuration(**common, has_sliding_window=True) == []
    reasons = backend.validate_configuration(**{**common, "has_sink": True}, has_sliding_window=True)
    assert "attention sinks not supported" in reasons and "sliding window not supported" not in reasons
    reasons = backend.validate_configuration(**{**common, "kv_cache_dtype": "fp8"})
    # FlashAttention's own reasons (one or more, by vLLM release), then ProxyAttn's hint, once.
    assert reasons[0] == "kv_cache_dtype not supported"
    assert "--attention-backend FLASH_ATTN" in reasons[-1]
    assert sum("--attention-backend FLASH_ATTN" in r for r in reasons) == 1
