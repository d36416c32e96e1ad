"""The ``budget_profile`` setting: loading and checking a profile, its fractions per layer, head
and length, and their agreement with the benchmark's definition (benchmarks/profiles)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.profiles import density_profiles as dp
from proxyattn_vllm.budget_profile import BudgetProfile
from proxyattn_vllm.config import ProxyAttnConfig, ProxyAttnConfigError

PROFILES = str(dp.PROFILES_JSON)
PAPER = "paper-llama8b-gamma0.95"


def write_profile(tmp_path, **overrides) -> str:
    profile = {"a": [0.5, 2.0], "b": [0.1, 0.3], "head_ratio": [[0.5, 1.5, 1.0], [1.0, 1.0, 1.0]],
               "scale_by_length": {"1000": 1.0, "4000": 2.0}}
    profile.update(overrides)
    path = tmp_path / "profiles.json"
    path.write_text(json.dumps({"profiles": {"p": profile}}))
    return str(path)


def test_fractions_follow_the_power_law_and_the_scale_between_lengths(tmp_path):
    prof = BudgetProfile.load(write_profile(tmp_path), "p")
    assert (prof.num_layers, prof.num_heads) == (2, 3)
    # scale: stored at 1000 and 4000, linear in log L between (2000 is half-way), held outside.
    assert prof.scale_at(1000) == 1.0 and prof.scale_at(4000) == 2.0
    assert prof.scale_at(2000) == pytest.approx(1.5)
    assert prof.scale_at(10) == 1.0 and prof.scale_at(10**6) == 2.0
    assert prof.fraction(1, 2, 2000) == pytest.approx(1.5 * 2.0 * 2000**-0.3)
    # One rank's part of a layer: heads 1..2 of layer 0, on the device of the layer.
    layer = prof.for_layer(0, 1, 2, torch.device("cpu"))
    expected = torch.tensor([prof.fraction(0, h, 3000) for h in (1, 2)], dtype=torch.float32)
    torch.testing.assert_close(layer.fractions(3000), expected)


def test_a_constant_scale(tmp_path):
    prof = BudgetProfile.load(write_profile(tmp_path, scale=0.5, scale_by_length={}), "p")
    assert prof.scale_at(7) == prof.scale_at(10**6) == 0.5


@pytest.mark.parametrize("length", dp.PROFILE_LENGTHS)
@pytest.mark.parametrize("name", ["measured-qwen05b-gamma0.95", PAPER])
def test_the_backend_reads_the_profiles_as_the_benchmark_defines_them(name, length):
    """At the profile lengths, the backend's fractions are ``head_fractions`` of the benchmark
    (clipped to 1 there; the budget clamps the same way), and a prefill served with the paper
    profile has the paper's mean density."""
    backend = BudgetProfile.load(PROFILES, name)
    bench = dp.head_fractions(dp.load_profile(name), length)
    ours = torch.tensor([[backend.fraction(layer, h, length) for h in range(backend.num_heads)]
                         for layer in range(backend.num_layers)], dtype=torch.float64)
    torch.testing.assert_close(ours.clamp(1e-6, 1.0), bench, rtol=1e-9, atol=0)
    if name == PAPER:  # calibrated on one unchunked prefill of each profile length
        assert dp.served_prefill_density(name, length, chunk=length) == pytest.approx(0.31, abs=1e-3)


@pytest.mark.parametrize("overrides,message", [
    ({"a": [0.5]}, "'a' and 'b' lists of equal length"),
    ({"b": "x"}, "'a' and 'b' lists of equal length"),
    ({"head_ratio": [[1.0, 1.0], [1.0]]}, "'head_ratio' list of 2 per-head lists"),
    ({"head_ratio": [[1.0, -1.0], [1.0, 1.0]]}, "'head_ratio' list of 2 per-head lists"),
    ({"scale_by_length": {}}, "neither 'scale' nor 'scale_by_length'"),
    ({"scale_by_length": {"1000": 0.0}}, "non-positive scale"),
])
def test_malformed_profiles_fail_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ProxyAttnConfigError, match=message) as err:
        BudgetProfile.load(write_profile(tmp_path, **overrides), "p")
    assert "\n" not in str(err.value) and "budget_profile='p'" in str(err.value)


def test_config_checks_the_profile_at_startup(tmp_path):
    path = write_profile(tmp_path)
    config = ProxyAttnConfig(budget_profile="p", budget_profile_file=path)
    assert config.load_budget_profile().num_heads == 3 and "budget_profile=p" in config.describe()
    config.check_model(2, 3)
    with pytest.raises(ProxyAttnConfigError, match=r"describes 2 layers x 3 query heads; this model has 32 x 32"):
        config.check_model(32, 32)
    with pytest.raises(ProxyAttnConfigError, match=r"budget_profile='q' is not in .*; accepted: 'p'"):
        ProxyAttnConfig(budget_profile="q", budget_profile_file=path)
    with pytest.raises(ProxyAttnConfigError, match="budget_profile_file=None is invalid"):
        ProxyAttnConfig(budget_profile="p")
    with pytest.raises(ProxyAttnConfigError, match="budget_profile=None is invalid"):
        ProxyAttnConfig(budget_profile_file=path)
    with pytest.raises(ProxyAttnConfigError, match="max_density=0.1 is invalid; accepted: null with budget_profile"):
        ProxyAttnConfig(budget_profile="p", budget_profile_file=path, max_density=0.1)
    with pytest.raises(ProxyAttnConfigError, match="cannot be read as JSON"):
        ProxyAttnConfig(budget_profile="p", budget_profile_file=str(tmp_path / "missing.json"))


def test_served_density_counts_each_chunk_at_its_own_length():
    """A chunked prefill: early chunks use the fractions of their shorter context (higher), so
    the whole prompt is denser than its last chunk, and the density falls with length."""
    chunked = [dp.served_prefill_density(PAPER, n) for n in (65536, 131072, 262144)]
    assert chunked[0] > chunked[1] > chunked[2] > 0.05
    prof = dp.load_profile(PAPER)
    last = float(dp.last_chunk_density(dp.head_fractions(prof, 131072), 131072).mean())
    assert chunked[1] > last
    assert math.isclose(last, prof["summary"]["131072"]["mean_density_last_chunk"], abs_tol=1e-3)


def test_a_profile_of_another_shape_fails_at_startup(tmp_path):
    """The engine's config check: the profile must have the model's layers and query heads."""
    pytest.importorskip("vllm")
    from proxyattn_vllm.config import load_config
    from proxyattn_vllm.testing import make_vllm_config, write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "tiny")
    setting = {"budget_profile": PAPER, "budget_profile_file": PROFILES}
    with pytest.raises(ProxyAttnConfigError, match=r"describes 32 layers x 32 query heads; this model has \d+ x \d+"):
        load_config(make_vllm_config(model_dir, setting))
