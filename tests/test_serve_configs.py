"""serve_configs/*.yaml parse with vLLM's own `vllm serve` parser; each proxyattn config has a
dense twin (and each dense config a proxyattn twin) that differs only in the attention backend
and the proxyattn settings; the benchmark configs keep the settings the TTFT sweep relies on."""
from __future__ import annotations

import glob
import os

import pytest

pytest.importorskip("vllm")

from proxyattn_vllm.config import ProxyAttnConfig  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "serve_configs")
PROXY_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*-proxyattn.yaml")))
ALL_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def parse(path):
    from proxyattn_vllm.vllm_compat import make_serve_arg_parser

    return vars(make_serve_arg_parser().parse_args(["--config", path]))


def test_there_are_configs():
    assert PROXY_CONFIGS


@pytest.mark.parametrize("path", PROXY_CONFIGS, ids=os.path.basename)
def test_proxyattn_config_has_a_dense_twin(path):
    sparse = parse(path)
    dense = parse(path.replace("-proxyattn.yaml", "-dense.yaml"))
    assert sparse["attention_backend"].lower() == "proxyattn"
    assert dense["attention_backend"] == "FLASH_ATTN"
    ProxyAttnConfig.from_additional_config(sparse["additional_config"])  # valid settings
    differing = {k for k in sparse if sparse[k] != dense[k]}
    assert differing <= {"attention_backend", "additional_config"}, differing


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=os.path.basename)
def test_every_config_parses_and_has_a_twin(path):
    args = parse(path)
    assert args["model"] and args["max_model_len"]
    assert path.endswith(("-proxyattn.yaml", "-dense.yaml")), "name configs <name>-{proxyattn,dense}.yaml"
    twin = (path.replace("-dense.yaml", "-proxyattn.yaml") if path.endswith("-dense.yaml")
            else path.replace("-proxyattn.yaml", "-dense.yaml"))
    assert os.path.exists(twin)


@pytest.mark.parametrize("backend", ["proxyattn", "dense"])
def test_dummy_benchmark_configs(backend):
    args = parse(os.path.join(CONFIG_DIR, f"llama3.1-8b-dummy-256k-{backend}.yaml"))
    assert args["load_format"] == "dummy"
    # Prefix caching off for real: a YAML `false` would be dropped and leave vLLM's default (on).
    assert args["enable_prefix_caching"] is False
    assert (args["max_model_len"], args["max_num_batched_tokens"], args["block_size"]) == (262144, 8192, 128)
    if backend == "proxyattn":
        assert ProxyAttnConfig.from_additional_config(args["additional_config"]).max_density == 0.1


def test_qwen_1m_configs_switch_off_dual_chunk_attention():
    for backend in ("proxyattn", "dense"):
        args = parse(os.path.join(CONFIG_DIR, f"qwen2.5-7b-1m-256k-{backend}.yaml"))
        assert args["model"] == "Qwen/Qwen2.5-7B-Instruct-1M" and args["max_model_len"] == 262144
        assert args["hf_overrides"] == {"dual_chunk_attention_config": None}
