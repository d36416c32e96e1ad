"""Prescribed per-head budgets for benchmarks: the ``budget_profile`` setting.

With random (dummy) weights every head's gamma budget hits the same cap, so a speed benchmark
on them never exercises what real attention does: heads with unequal budgets, layers that
differ, density that falls with context length. A density profile prescribes it. The profiles
(``benchmarks/profiles/profiles.json``, derived from budgets measured on real models; see
``benchmarks/profiles/README.md``) give, per layer ``l`` and query head ``h``, the share of a
chunk's key blocks the head keeps per row at context length ``L``::

    fraction[l, h](L) = scale(L) * head_ratio[l][h] * a[l] * L ** -b[l]

``scale(L)`` is the profile's ``scale``, or from ``scale_by_length`` (``{length: scale}``),
interpolated linearly in ``log L`` between its lengths and held constant outside them. The
budget of a chunk ending at token ``L`` is then ``ceil(fraction * key blocks)`` with the
configured minimum budget (``budget.naive.fraction_budgets``); the gamma budget is still
computed, so the selection costs what it costs without a profile. Not for serving: the
prescribed budgets ignore the attention.

Per layer, one device tensor (``a[l] * head_ratio[l]`` of the rank's heads) and, per chunk,
one multiplication by a host scalar: no host sync.
"""
from __future__ import annotations

import bisect
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ProxyAttnConfigError


def _bad_profile(file: str, name: str, problem: str) -> ProxyAttnConfigError:
    return ProxyAttnConfigError(
        f"proxyattn config: budget_profile={name!r} in budget_profile_file={file!r} {problem}; a profile "
        "holds per-layer lists 'a' and 'b', per-layer lists of per-head 'head_ratio', and 'scale' or "
        "'scale_by_length' (benchmarks/profiles/profiles.json writes them)."
    )


def _positive_numbers(values, count: int | None = None) -> bool:
    return (isinstance(values, list) and len(values) > 0 and (count is None or len(values) == count)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                    for v in values))


@dataclass(frozen=True)
class BudgetProfile:
    """One density profile: per-layer power laws of the budget fraction, per-head ratios.

    Attributes:
        name: the profile's name.
        a, b: ``[layers]`` the layer's mean fraction is ``a * L ** -b``.
        head_ratio: ``[layers][heads]`` each head's fraction relative to its layer's mean.
        scale_points: ``((length, scale), ...)`` sorted by length (one point: a constant scale).
    """

    name: str
    a: tuple[float, ...]
    b: tuple[float, ...]
    head_ratio: tuple[tuple[float, ...], ...]
    scale_points: tuple[tuple[int, float], ...]

    @property
    def num_layers(self) -> int:
        return len(self.a)

    @property
    def num_heads(self) -> int:
        return len(self.head_ratio[0])

    @classmethod
    def load(cls, file: str, name: str) -> "BudgetProfile":
        """Profile ``name`` of the JSON ``file`` (``{"profiles": {name: profile}}`` as
        ``profiles.json``, or one profile object). Raises :class:`ProxyAttnConfigError` naming
        what is missing or malformed."""
        try:
            doc = json.loads(Path(file).read_text())
        except (OSError, ValueError) as exc:
            raise ProxyAttnConfigError(
                f"proxyattn config: budget_profile_file={file!r} cannot be read as JSON ({exc}); give the "
                "path of a profiles file, e.g. benchmarks/profiles/profiles.json."
            ) from None
        profiles = doc.get("profiles") if isinstance(doc, dict) else None
        if isinstance(profiles, dict):
            if name not in profiles:
                raise ProxyAttnConfigError(
                    f"proxyattn config: budget_profile={name!r} is not in {file!r}; accepted: "
                    f"{', '.join(repr(k) for k in profiles)}."
                )
            doc = profiles[name]
        if not isinstance(doc, dict):
            raise _bad_profile(file, name, "is not a JSON object")
        a, b, ratio = doc.get("a"), doc.get("b"), doc.get("head_ratio")
        if not _positive_numbers(a) or not _positive_numbers(b, len(a)):
            raise _bad_profile(file, name, "has no per-layer 'a' and 'b' lists of equal length")
        if (not isinstance(ratio, list) or len(ratio) != len(a) or not ratio
                or not all(_positive_numbers(row, len(ratio[0])) for row in ratio)):
            raise _bad_profile(file, name, f"has no 'head_ratio' list of {len(a)} per-head lists of equal length")
        if isinstance(doc.get("scale_by_length"), dict) and doc["scale_by_length"]:
            points = sorted((int(k), float(v)) for k, v in doc["scale_by_length"].items())
        elif isinstance(doc.get("scale"), (int, float)):
            points = [(1, float(doc["scale"]))]
        else:
            raise _bad_profile(file, name, "has neither 'scale' nor 'scale_by_length'")
        if any(length < 1 or not math.isfinite(s) or s <= 0 for length, s in points):
            raise _bad_profile(file, name, f"has a non-positive scale or length in {points}")
        return cls(name, tuple(map(float, a)), tuple(map(float, b)),
                   tuple(tuple(map(float, row)) for row in ratio), tuple(points))

    def check_model(self, num_layers: int, num_q_heads: int, file: str) -> None:
        """The profile must describe this model's shape (all ranks' query heads)."""
        if (self.num_layers, self.num_heads) != (num_layers, num_q_heads):
            raise ProxyAttnConfigError(
                f"proxyattn config: budget_profile={self.name!r} of {file!r} describes {self.num_layers} layers "
                f"x {self.num_heads} query heads; this model has {num_layers} x {num_q_heads}. Use a profile "
                "made for this shape (benchmarks/profiles/density_profiles.py maps one onto any shape)."
            )

    def scale_at(self, length: int) -> float:
        """``scale(L)``: log-linear between the stored lengths, constant outside them."""
        points = self.scale_points
        lengths = [p[0] for p in points]
        i = bisect.bisect_left(lengths, length)
        if i == 0:
            return points[0][1]
        if i == len(points):
            return points[-1][1]
        (l0, s0), (l1, s1) = points[i - 1], points[i]
        w = (math.log(length) - math.log(l0)) / (math.log(l1) - math.log(l0))
        return s0 + w * (s1 - s0)

    def fraction(self, layer: int, head: int, length: int) -> float:
        """One head's budget fraction at context ``length`` (host float; for tests and reports)."""
        return self.scale_at(length) * self.head_ratio[layer][head] * self.a[layer] * float(length) ** -self.b[layer]

    def for_layer(self, layer: int, head_start: int, num_heads: int, device: torch.device) -> "LayerBudgetProfile":
        """The part of one layer a rank needs: its query heads ``[head_start, head_start + num_heads)``."""
        weights = [self.a[layer] * r for r in self.head_ratio[layer][head_start : head_start + num_heads]]
        return LayerBudgetProfile(self, self.b[layer], torch.tensor(weights, dtype=torch.float32, device=device))


@dataclass(frozen=True)
class LayerBudgetProfile:
    """One layer's prescribed fractions on one rank.

    Attributes:
        profile: the whole profile (for ``scale(L)``).
        b: the layer's length exponent.
        head_weight: ``[Hq]`` float32 on the layer's device, ``a * head_ratio`` of the rank's heads.
    """

    profile: BudgetProfile
    b: float
    head_weight: torch.Tensor

    def fractions(self, length: int) -> torch.Tensor:
        """``[Hq]`` float32 budget fractions of a chunk ending at token ``length`` (one launch)."""
        return self.head_weight * (self.profile.scale_at(length) * float(length) ** -self.b)


@functools.lru_cache(maxsize=8)  # every layer's impl and builder asks; read the file once
def load_budget_profile(file: str, name: str) -> BudgetProfile:
    """:meth:`BudgetProfile.load`, once per ``(file, name)`` and process."""
    return BudgetProfile.load(file, name)
