"""serve_configs/*.yaml parse with vLLM's own `vllm serve` parser; each proxyattn config has a
dense twin that differs only in the attention backend (and the proxyattn settings)."""
from __future__ import annotations

import glob
import os

import pytest

pytest.importorskip("vllm")

from proxyattn_vllm.config import ProxyAttnConfig  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "serve_configs")
PROXY_CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*-proxyattn.yaml")))


def parse(path):
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return vars(make_arg_parser(FlexibleArgumentParser()).parse_args(["--config", path]))


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
