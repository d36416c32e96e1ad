"""Packaging and startup guards: nothing here is importable as a top-level ``kernels``, the
installed metadata names every entry point, and an unsupported vLLM is refused in one line."""
from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def proxyattn_log():
    """Records of the plugin's logger, however vLLM has set up logging."""
    logger, handler = logging.getLogger("vllm.proxyattn"), _Records()
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def test_import_kernels_from_the_repository_root_is_not_this_repository():
    """transformers imports the PyPI package ``kernels``; a ``kernels`` module or regular package
    of ours at the repository root would shadow it for anyone who runs Python there."""
    probe = (
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "print(json.dumps(None if spec is None else spec.origin))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    origin = None if out == "null" else out.strip('"')
    assert origin is None or not Path(origin).resolve().is_relative_to(ROOT), origin
    # The folder holds the package itself, so the import name is the folder name.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (ROOT / "kernels" / "proxyattn_kernels" / "__init__.py").exists()


def test_the_kernels_package_is_the_one_in_this_checkout():
    spec = importlib.util.find_spec("proxyattn_kernels")
    assert spec is not None and spec.origin is not None
    installed = Path(spec.origin).resolve()
    source = ROOT / "kernels" / "proxyattn_kernels" / "__init__.py"
    assert installed == source or installed.read_bytes() == source.read_bytes()


def test_pyproject_declares_the_plugin_scripts_and_extras():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["entry-points"]["vllm.general_plugins"] == {"proxyattn": "proxyattn_vllm:register"}
    assert set(meta["scripts"]) >= {"proxyattn-loadtest", "proxyattn-demo"}
    assert set(meta["optional-dependencies"]) >= {"vllm", "flashinfer", "test", "bench"}
    assert any(dep.startswith("aiohttp") for dep in meta["optional-dependencies"]["bench"])
    import proxyattn_vllm

    assert proxyattn_vllm.__version__ == meta["version"]


@pytest.mark.parametrize(
    "version, supported",
    [("0.26.0", True), ("0.26.3", True), ("0.26.0+cpu", True), ("0.26", True),
     ("0.32.0", True), ("0.32.0+cpu", True), ("0.33.0", True), ("0.33.2", True), ("0.34.0", True),
     ("0.34.1", True), ("0.25.1", False), ("0.27.0", False), ("0.31.2", False), ("0.260.0", False),
     ("0.320.0", False), ("0.330.0", False), ("0.35.0", False), ("1.26.0", False)],
)
def test_supported_vllm_versions(version, supported):
    from proxyattn_vllm.vllm_version import is_supported, unsupported_message

    assert is_supported(version) is supported
    message = unsupported_message(version)
    assert (message is None) is supported
    if message:
        assert "\n" not in message and version in message and "0.26.x, 0.32.x, 0.33.x, 0.34.x" in message
        assert "FLASH_ATTN" in message and "pip install" in message


def test_an_unsupported_vllm_is_refused_unless_overridden(monkeypatch):
    from proxyattn_vllm.vllm_version import (
        ALLOW_UNSUPPORTED_ENV,
        UnsupportedVLLMError,
        check_vllm_version,
    )

    monkeypatch.delenv(ALLOW_UNSUPPORTED_ENV, raising=False)
    with pytest.raises(UnsupportedVLLMError, match=r"vLLM 0\.99\.0 is not supported"):
        check_vllm_version("0.99.0")
    check_vllm_version("0.26.0")
    monkeypatch.setenv(ALLOW_UNSUPPORTED_ENV, "1")
    check_vllm_version("0.99.0")


def test_register_warns_once_on_an_unsupported_vllm(monkeypatch, proxyattn_log):
    pytest.importorskip("vllm")
    import proxyattn_vllm
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.99.0")
    proxyattn_vllm.register()
    lines = [r.getMessage() for r in proxyattn_log.records if "is not supported" in r.getMessage()]
    assert len(lines) == 1 and "vLLM 0.99.0" in lines[0], lines


def test_a_bad_config_is_logged_in_one_line_before_the_error(proxyattn_log):
    from types import SimpleNamespace

    from proxyattn_vllm.config import ProxyAttnConfigError, load_config

    bad = SimpleNamespace(additional_config={"proxyattn": 0.9}, model_config=None)
    with pytest.raises(ProxyAttnConfigError) as err:
        load_config(bad)
    assert '"proxyattn" takes a mapping' in str(err.value) and "0.9" in str(err.value)
    errors = [r.getMessage() for r in proxyattn_log.records if r.levelno == logging.ERROR]
    assert errors == [str(err.value)] and "\n" not in errors[0]
