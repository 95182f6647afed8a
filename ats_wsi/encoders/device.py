"""CUDA helpers for encoders: bf16 autocast and channels_last; no-ops on CPU."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

__all__ = ["cuda_autocast", "prepare_for_device"]


def cuda_autocast(
    device: torch.device | str, enabled: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA devices that support it; a no-op context elsewhere (CPU unchanged)."""
    dev = torch.device(device)
    if enabled and dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_for_device(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``module`` to ``device``; on CUDA also convert it to channels_last (conv speed)."""
    dev = torch.device(device)
    module = module.to(dev)
    if dev.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module

