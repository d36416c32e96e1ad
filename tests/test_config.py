"""ProxyAttnConfig: defaults, parsing from vLLM's additional_config, and actionable errors."""
from __future__ import annotations

import dataclasses
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
