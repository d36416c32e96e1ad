"""Facts about the device a kernel launches on, read once per device."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cuda_properties(index: int):
    return torch.cuda.get_device_properties(index)


def _cuda_index(device: torch.device | str) -> int | None:
    """The CUDA device index of ``device`` (the current one for a bare "cuda"), None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def sm_count(device: torch.device | str) -> int:
    """Streaming multiprocessors of a CUDA device; 0 for any other device (CPU, the interpreter)."""
    index = _cuda_index(device)
    return 0 if index is None else _cuda_properties(index).multi_processor_count


def has_tma(device: torch.device | str) -> bool:
    """Whether the device copies tiles with TMA (tensor memory accelerator): CUDA compute
    capability 9.0 (Hopper) or newer. False for any other device (CPU, the interpreter)."""
    index = _cuda_index(device)
    return index is not None and (_cuda_properties(index).major, _cuda_properties(index).minor) >= (9, 0)
