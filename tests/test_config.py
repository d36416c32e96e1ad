"""ProxyAttnConfig: defaults, parsing from vLLM's additional_config, and actionable errors."""
from __future__ import annotations

import dataclasses
import math
import pickle

import pytest

from proxyattn_vllm.config import ProxyAttnConfig, ProxyAttnConfigError


def test_defaults_follow_the_paper():
    cfg = ProxyAttnConfig()
    assert (cfg.gamma, cfg.stride, cfg.block_size, cfg.num_proxy_groups) == (0.95, 4, 128, "auto")
    assert (cfg.min_budget_tokens, cfg.sink_blocks, cfg.local_blocks) == (2048, 1, 1)
    assert (cfg.min_sparse_len, cfg.max_density, cfg.dense_layers) == (8192, None, ())
    assert ProxyAttnConfig.from_additional_config(None) == cfg
    assert ProxyAttnConfig.from_additional_config({"other_plugin": {}}) == cfg


def test_from_additional_config_and_frozen():
    cfg = ProxyAttnConfig.from_additional_config(
        {"proxyattn": {"gamma": 0.9, "max_density": 0.1, "dense_layers": [3, 0, 3], "num_proxy_groups": 2}}
    )
    assert cfg.gamma == 0.9 and cfg.max_density == 0.1 and cfg.dense_layers == (0, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = 0.5
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert "gamma=0.9" in cfg.describe()


@pytest.mark.parametrize(
    "values,key,accepted",
    [
        ({"gamma": 1.5}, "gamma", "(0, 1]"),
        ({"gamma": 0}, "gamma", "(0, 1]"),
        ({"gamma": "high"}, "gamma", "(0, 1]"),
        ({"gamma": float("nan")}, "gamma", "(0, 1]"),
        ({"stride": 0}, "stride", "integer"),
        ({"stride": 3}, "stride", "divisor of block_size=128"),
        ({"stride": True}, "stride", "integer"),
        ({"block_size": 100}, "block_size", "multiple of 16"),
        ({"block_size": 2048}, "block_size", "multiple of 16"),
        ({"num_proxy_groups": "many"}, "num_proxy_groups", "integer"),
        ({"num_proxy_groups": 0}, "num_proxy_groups", "integer"),
        ({"min_budget_tokens": -1}, "min_budget_tokens", ">= 0"),
        ({"sink_blocks": 1.0}, "sink_blocks", "integer"),
        ({"local_blocks": 0}, "local_blocks", ">= 1"),
        ({"min_sparse_len": None}, "min_sparse_len", "integer"),
        ({"max_density": 0.0}, "max_density", "(0, 1]"),
        ({"max_density": 2}, "max_density", "(0, 1]"),
        ({"dense_layers": 3}, "dense_layers", "list"),
        ({"dense_layers": [-1]}, "dense_layers", "non-negative"),
        ({"sparse_kernel": "cuda"}, "sparse_kernel", '"triton", "fa3", "flashinfer" or "auto"'),
    ],
)
def test_bad_values_name_key_value_and_accepted(values, key, accepted):
    with pytest.raises(ProxyAttnConfigError) as err:
        ProxyAttnConfig.from_additional_config({"proxyattn": values})
    msg = str(err.value)
    assert f"{key}=" in msg and repr(values[key]) in msg and accepted in msg, msg


def test_unknown_key_lists_accepted_keys():
    with pytest.raises(ProxyAttnConfigError, match=r"unknown key 'gama'.*accepted keys: gamma, stride"):
        ProxyAttnConfig.from_additional_config({"proxyattn": {"gama": 0.9}})


def test_proxyattn_entry_must_be_a_mapping():
    with pytest.raises(ProxyAttnConfigError, match="mapping"):
        ProxyAttnConfig.from_additional_config({"proxyattn": [0.9]})


@pytest.mark.parametrize("hq,hkv,groups", [(32, 8, 1), (28, 4, 4), (14, 2, 2), (9, 3, 1), (8, 8, 1)])
def test_auto_groups(hq, hkv, groups):
    assert ProxyAttnConfig().resolve_num_groups(hq, hkv) == groups


def test_groups_must_divide_kv_heads():
    cfg = ProxyAttnConfig(num_proxy_groups=3)
    with pytest.raises(ProxyAttnConfigError, match=r"num_proxy_groups=3.*divisor of the 8 KV heads.*\[1, 2, 4, 8\]"):
        cfg.kernel_params(32, 8)
    assert ProxyAttnConfig(num_proxy_groups=4).kernel_params(32, 8).num_groups == 4


def test_kernel_params():
    p = ProxyAttnConfig(min_budget_tokens=2000, block_size=64, max_density=0.1).kernel_params(32, 8)
    assert (p.min_budget_blocks, p.block_size, p.num_groups, p.max_density) == (32, 64, 1, 0.1)
    assert ProxyAttnConfig(min_budget_tokens=0).kernel_params(32, 8).min_budget_blocks == 1
    assert ProxyAttnConfig().kernel_params(32, 8).dense_tail_tokens == 128
    assert ProxyAttnConfig(dense_tail_tokens=0).kernel_params(32, 8).dense_tail_tokens == 0


# Every key, every kind of wrong value: a bool where a number is expected (JSON true/false,
# which Python would otherwise accept as 1/0), NaN and infinities, strings, and out-of-range.
_INT_KEYS = {  # key: (smallest accepted, largest accepted or None)
    "stride": (1, 64), "block_size": (16, 1024), "num_proxy_groups": (1, None),
    "min_budget_tokens": (0, None), "sink_blocks": (0, None), "local_blocks": (1, None),
    "min_sparse_len": (0, None), "dense_tail_tokens": (0, None),
}
_BAD_VALUES = (
    [(key, bad) for key in _INT_KEYS for bad in (True, False, 16.0, "16", None, math.nan, math.inf)]
    + [(key, lo - 1) for key, (lo, _) in _INT_KEYS.items()]
    + [(key, hi + 16) for key, (_, hi) in _INT_KEYS.items() if hi is not None]
    + [("gamma", bad) for bad in (True, math.nan, math.inf, -math.inf, -0.1, 1.0001, "0.9", None)]
    + [("max_density", bad) for bad in (True, math.nan, math.inf, -0.5, 1.5, "0.1", [0.1])]
    + [("dense_layers", bad) for bad in ([True], [0.0], ["0"], [math.nan], "0,1", {0: 1}, None)]
    + [("sparse_kernel", bad) for bad in ("FlashInfer", "FA3", "Auto", "flashinfer-fa3", "", None, 3, ["fa3"])]
)


@pytest.mark.parametrize("key,value", _BAD_VALUES, ids=[f"{k}={v!r}" for k, v in _BAD_VALUES])
def test_every_key_rejects_wrong_types_and_ranges(key, value):
    with pytest.raises(ProxyAttnConfigError) as err:
        ProxyAttnConfig.from_dict({key: value})
    msg = str(err.value)
    assert f"{key}=" in msg and "accepted:" in msg and "--additional-config" in msg, msg


@pytest.mark.parametrize("key", sorted(_INT_KEYS))
def test_int_keys_accept_their_bounds(key):
    lo, hi = _INT_KEYS[key]
    for value in (lo, hi) if hi is not None else (lo,):
        extra = {"stride": 1} if key == "block_size" else {}  # stride must divide block_size
        assert getattr(ProxyAttnConfig.from_dict({key: value, **extra}), key) == value


def test_gamma_and_max_density_accept_their_bounds():
    cfg = ProxyAttnConfig.from_dict({"gamma": 1, "max_density": 1})
    assert (cfg.gamma, cfg.max_density) == (1.0, 1.0) and isinstance(cfg.gamma, float)
    assert ProxyAttnConfig.from_dict({"gamma": 1e-6}).gamma == 1e-6


def test_unknown_keys_and_wrong_case_are_rejected():
    for key in ("Gamma", "block-size", "num_groups", ""):
        with pytest.raises(ProxyAttnConfigError, match=f"unknown key {key!r}"):
            ProxyAttnConfig.from_dict({key: 1})


def test_num_proxy_groups_is_checked_per_tensor_parallel_rank():
    """8 KV heads and TP=2: each rank has 4, so 8 groups (valid without TP) is rejected and the
    message says why (per rank) and lists what is accepted."""
    cfg = ProxyAttnConfig(num_proxy_groups=8)
    assert cfg.kernel_params(32, 8).num_groups == 8  # TP=1
    with pytest.raises(ProxyAttnConfigError) as err:
        cfg.kernel_params(16, 4)  # TP=2: the head counts vLLM gives each rank's layer
    msg = str(err.value)
    assert "num_proxy_groups=8" in msg and "4 KV heads per rank" in msg, msg
    assert "tensor-parallel" in msg and "[1, 2, 4]" in msg, msg


def test_dense_layers_must_exist_in_the_model():
    cfg = ProxyAttnConfig(dense_layers=[0, 31])
    cfg.check_model(32)
    with pytest.raises(ProxyAttnConfigError, match=r"dense_layers=\[0, 31\].*0\.\.23 \(not \[31\]\)"):
        cfg.check_model(24)


def test_sparse_kernel_values():
    from proxyattn_vllm.config import SPARSE_KERNELS

    assert ProxyAttnConfig().sparse_kernel == "triton"
    for kernel in SPARSE_KERNELS:
        assert ProxyAttnConfig.from_dict({"sparse_kernel": kernel}).sparse_kernel == kernel


def test_kernel_params_take_every_same_named_setting():
    """Each kernel parameter is either the user setting of the same name, passed through, or one
    of the few the config resolves per layer; a parameter added to the kernels without a setting
    fails here, not silently at its default."""
    from dataclasses import fields

    from proxyattn_kernels import ProxyAttnParams
    from proxyattn_vllm.config import RESOLVED_PARAMS

    config_names = {f.name for f in fields(ProxyAttnConfig)}
    for f in fields(ProxyAttnParams):
        assert (f.name in config_names) != (f.name in RESOLVED_PARAMS), f.name
    # Values differing from both classes' defaults, so a dropped one shows.
    values = {"gamma": 0.7, "stride": 8, "block_size": 64, "sink_blocks": 3, "local_blocks": 2,
              "min_sparse_len": 1000, "max_density": 0.3, "dense_tail_tokens": 40,
              "min_budget_tokens": 130, "num_proxy_groups": 2}
    params = ProxyAttnConfig.from_dict(values).kernel_params(8, 4)
    for f in fields(ProxyAttnParams):
        if f.name not in RESOLVED_PARAMS:
            assert getattr(params, f.name) == values[f.name], f.name
    assert params.num_groups == 2 and params.min_budget_blocks == 3  # ceil(130 / 64)
