"""Facts about the device a kernel launches on, read once per device."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 0 for any other device (CPU, the interpreter)."""
    if device.type != "cuda":
        return 0
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_tma(device: torch.device | str) -> bool:
    """Whether the device copies tiles with TMA (tensor memory accelerator): CUDA compute
    capability 9.0 (Hopper) or newer. False for any other device (CPU, the interpreter)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _cuda_capability(device.index if device.index is not None else torch.cuda.current_device()) >= (9, 0)
