"""ProxyAttn configuration: a frozen, validated dataclass built from vLLM's ``additional_config``.

Users set it with ``--additional-config '{"proxyattn": {"gamma": 0.9}}'`` or, in a
``vllm serve --config`` YAML file, under ``additional-config: {proxyattn: {...}}``.
Every wrong value raises :class:`ProxyAttnConfigError` naming the key, the value and what is
accepted, so a bad deployment fails at startup and never reaches a kernel.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from proxyattn_kernels import ProxyAttnParams

_logger = logging.getLogger("vllm.proxyattn")
_LOGGED_CONFIGS: set[str] = set()
_LOGGED_ERRORS: set[str] = set()

ADDITIONAL_CONFIG_KEY = "proxyattn"
#: Values of ``sparse_kernel``: who computes the selected blocks of a long prefill chunk.
SPARSE_KERNELS = ("triton", "fa3", "flashinfer", "auto")

#: The kernel parameters :meth:`ProxyAttnConfig.kernel_params` computes from other settings
#: (per layer: the proxy groups depend on its head counts); every other field of
#: :class:`ProxyAttnParams` is the user setting of the same name.
RESOLVED_PARAMS = ("num_groups", "min_budget_blocks")


class ProxyAttnConfigError(ValueError):
    """A ProxyAttn setting is invalid; the message says which, why, and what is accepted."""


def _fail(key: str, value: Any, accepted: str) -> None:
    raise ProxyAttnConfigError(
        f"proxyattn config: {key}={value!r} is invalid; accepted: {accepted}. "
        f"Fix it in --additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": {{\"{key}\": ...}}}}'."
    )


def check_sparse_kernel(value: Any) -> None:
    """Raise :class:`ProxyAttnConfigError` unless ``value`` is one of :data:`SPARSE_KERNELS`."""
    if value not in SPARSE_KERNELS:
        quoted = [f'"{k}"' for k in SPARSE_KERNELS]
        _fail("sparse_kernel", value, ", ".join(quoted[:-1]) + " or " + quoted[-1])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_int(key: str, value: Any, lo: int, hi: int | None = None) -> None:
    span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        _fail(key, value, f"an integer {span}")


@dataclass(frozen=True)
class ProxyAttnConfig:
    """User-facing ProxyAttn settings (defaults follow the paper; see README's config table).

    Attributes:
        gamma: attention mass each head's budget must cover, in (0, 1]; lower is sparser.
        stride: sampling stride of the proxy scores (every ``stride``-th position).
        block_size: selection block size in tokens; a multiple of 16 and of ``stride``.
        num_proxy_groups: ``"auto"`` (1 when Hq/Hkv <= 4, else one per KV head) or an integer
            that divides the number of KV heads (per tensor-parallel rank).
        min_budget_tokens: every head keeps at least this many tokens' worth of blocks per row.
        sink_blocks: leading key blocks every row keeps.
        local_blocks: key blocks ending at the diagonal that every row keeps (>= 1).
        min_sparse_len: requests whose total length is below this run dense.
        max_density: benchmarking override: the most of a chunk's causal key blocks it
            computes, forced blocks and dense tail included (None = no cap); see
            ``ProxyAttnParams.budget_cap_blocks``.
        dense_layers: layer indices that always run dense.
        dense_tail_tokens: the query blocks holding each prefill chunk's last this-many tokens
            attend to every earlier block. In a prompt's last chunk these are the tokens
            generation starts from (usually the question), so retrieval does not hinge on one
            row's budget and proxy ranking. 0 turns it off.
        sparse_kernel: ``"triton"`` (the block-sparse kernel: each head computes exactly its
            own blocks), ``"fa3"`` (vLLM's FlashAttention over each query block's union of
            the selected blocks: every head computes the blocks any head selected),
            ``"flashinfer"`` (the same union through FlashInfer's paged prefill kernel; needs
            the ``[flashinfer]`` extra) or ``"auto"`` (per layer shape, the kernel measured
            fastest, from ``sparse/auto_table.json``; see ``sparse/choose.py``).
        budget_profile, budget_profile_file: benchmarking only: each head keeps the share of
            key blocks that profile ``budget_profile`` of the JSON file ``budget_profile_file``
            prescribes for its layer and the context length, instead of its gamma budget
            (``budget_profile.py``; the profiles: ``benchmarks/profiles/profiles.json``).
    """

    gamma: float = 0.95
    stride: int = 4
    block_size: int = 128
    num_proxy_groups: int | str = "auto"
    min_budget_tokens: int = 2048
    sink_blocks: int = 1
    local_blocks: int = 1
    min_sparse_len: int = 8192
    max_density: float | None = None
    dense_layers: tuple[int, ...] = ()
    dense_tail_tokens: int = 128
    sparse_kernel: str = "triton"
    budget_profile: str | None = None
    budget_profile_file: str | None = None

    def __post_init__(self) -> None:
        if not _is_number(self.gamma) or not 0.0 < self.gamma <= 1.0:
            _fail("gamma", self.gamma, "a number in (0, 1], e.g. 0.95 (default) or 0.90")
        _check_int("stride", self.stride, 1, 64)
        if not _is_int(self.block_size) or not 16 <= self.block_size <= 1024 or self.block_size % 16:
            _fail("block_size", self.block_size, "a multiple of 16 in [16, 1024], e.g. 128 (default)")
        if self.block_size % self.stride:
            _fail("stride", self.stride, f"a divisor of block_size={self.block_size}")
        if self.num_proxy_groups != "auto":
            _check_int("num_proxy_groups", self.num_proxy_groups, 1)
        _check_int("min_budget_tokens", self.min_budget_tokens, 0)
        _check_int("sink_blocks", self.sink_blocks, 0)
        _check_int("local_blocks", self.local_blocks, 1)
        _check_int("min_sparse_len", self.min_sparse_len, 0)
        _check_int("dense_tail_tokens", self.dense_tail_tokens, 0)
        if self.max_density is not None and (
            not _is_number(self.max_density) or not 0.0 < self.max_density <= 1.0
        ):
            _fail("max_density", self.max_density, "null or a number in (0, 1], e.g. 0.1")
        layers = self.dense_layers
        if not isinstance(layers, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in layers):
            _fail("dense_layers", layers, "a list of non-negative layer indices, e.g. [0, 1]")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))
        check_sparse_kernel(self.sparse_kernel)
        object.__setattr__(self, "gamma", float(self.gamma))
        if self.max_density is not None:
            object.__setattr__(self, "max_density", float(self.max_density))
        self._check_budget_profile()

    def _check_budget_profile(self) -> None:
        name, file = self.budget_profile, self.budget_profile_file
        if name is None and file is None:
            return
        if not isinstance(name, str) or not name:
            _fail("budget_profile", name, "a profile name of budget_profile_file, e.g. \"paper-llama8b-gamma0.95\"")
        if not isinstance(file, str) or not file:
            _fail("budget_profile_file", file, "the path of a profiles JSON, e.g. benchmarks/profiles/profiles.json")
        if self.max_density is not None:
            _fail("max_density", self.max_density, "null with budget_profile (the profile sets every budget)")
        self.load_budget_profile()

    def load_budget_profile(self):
        """The :class:`~proxyattn_vllm.budget_profile.BudgetProfile` of ``budget_profile``, or None."""
        if self.budget_profile is None:
            return None
        from .budget_profile import load_budget_profile  # imports this module

        return load_budget_profile(self.budget_profile_file, self.budget_profile)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "ProxyAttnConfig":
        """Build from the ``"proxyattn"`` mapping; unknown keys are an error."""
        if values is None:
            return cls()
        if not isinstance(values, Mapping):
            raise ProxyAttnConfigError(
                f"proxyattn config: \"{ADDITIONAL_CONFIG_KEY}\" takes a mapping of ProxyAttn "
                f"settings, not {values!r}; e.g. --additional-config "
                f"'{{\"{ADDITIONAL_CONFIG_KEY}\": {{\"gamma\": 0.9}}}}'."
            )
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                raise ProxyAttnConfigError(
                    f"proxyattn config: unknown key {key!r} (value {values[key]!r}); "
                    f"accepted keys: {', '.join(known)}."
                )
        return cls(**values)

    @classmethod
    def from_additional_config(cls, additional_config: Mapping[str, Any] | None) -> "ProxyAttnConfig":
        """Build from vLLM's ``additional_config`` (its ``"proxyattn"`` entry; missing = defaults)."""
        if not additional_config:
            return cls()
        return cls.from_dict(additional_config.get(ADDITIONAL_CONFIG_KEY))

    def resolve_num_groups(self, num_q_heads: int, num_kv_heads: int) -> int:
        """The number of proxy groups for a layer with these (per-rank) head counts."""
        if self.num_proxy_groups == "auto":
            return 1 if num_q_heads // num_kv_heads <= 4 else num_kv_heads
        if num_kv_heads % self.num_proxy_groups:
            divisors = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
            _fail(
                "num_proxy_groups",
                self.num_proxy_groups,
                f'"auto" or a divisor of the {num_kv_heads} KV heads per rank (the model\'s KV '
                f"heads divided by the tensor-parallel size, at least 1: vLLM replicates KV heads "
                f"when there are fewer than ranks): {divisors}",
            )
        return int(self.num_proxy_groups)

    def check_model(self, num_layers: int, num_q_heads: int | None = None) -> None:
        """Check the settings that depend on the model: ``dense_layers`` must name its layers
        (an index past the last layer would be ignored silently, most likely a typo); a
        ``budget_profile`` must have its shape (``num_q_heads``: all ranks' query heads)."""
        profile = self.load_budget_profile()
        if profile is not None and num_q_heads is not None:
            profile.check_model(num_layers, num_q_heads, self.budget_profile_file)
        outside = [i for i in self.dense_layers if i >= num_layers]
        if outside:
            _fail(
                "dense_layers",
                list(self.dense_layers),
                f"layer indices of this model, 0..{num_layers - 1} (not {outside})",
            )

    def kernel_params(self, num_q_heads: int, num_kv_heads: int) -> ProxyAttnParams:
        """Resolve into the parameters the kernels take, for one layer: every field of
        :class:`ProxyAttnParams` is the setting of the same name, except the two this method
        resolves (:data:`RESOLVED_PARAMS`)."""
        resolved = {
            "num_groups": self.resolve_num_groups(num_q_heads, num_kv_heads),
            "min_budget_blocks": max(1, math.ceil(self.min_budget_tokens / self.block_size)),
        }
        assert resolved.keys() == set(RESOLVED_PARAMS)
        same_name = {f.name: getattr(self, f.name) for f in fields(ProxyAttnParams) if f.name not in resolved}
        return ProxyAttnParams(**same_name, **resolved)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["dense_layers"] = list(self.dense_layers)
        return values

    def describe(self) -> str:
        """One line for the startup log."""
        return "ProxyAttn config: " + ", ".join(f"{k}={v}" for k, v in self.to_dict().items())


def load_config(vllm_config: Any | None) -> ProxyAttnConfig:
    """The :class:`ProxyAttnConfig` of ``vllm_config.additional_config["proxyattn"]``.

    Raises :class:`~proxyattn_vllm.config.ProxyAttnConfigError` for a bad value, including one
    that does not fit the model (at startup: builders and impls are created while the engine
    starts). Logs the resolved configuration once per process (one line, however many layers
    and builders ask).
    """
    additional = getattr(vllm_config, "additional_config", None) if vllm_config is not None else None
    if additional is not None and not isinstance(additional, Mapping):
        additional = None  # a non-dict additional_config belongs to some other plugin
    try:
        config = ProxyAttnConfig.from_additional_config(additional)
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is not None:
            text_config = getattr(model_config, "hf_text_config", None)
            config.check_model(model_config.get_total_num_hidden_layers(),
                               getattr(text_config, "num_attention_heads", None))
    except ProxyAttnConfigError as err:
        # vLLM prints the engine's startup failure as a long traceback: say the cause first, in
        # one line, so it is the line a user reads (logged once however many layers ask).
        if str(err) not in _LOGGED_ERRORS:
            _LOGGED_ERRORS.add(str(err))
            _logger.error("%s", err)
        raise
    line = config.describe()
    if line not in _LOGGED_CONFIGS:
        _LOGGED_CONFIGS.add(line)
        _logger.info("%s", line)
    return config
