"""Samplers that draw attention cells from a distribution ``a`` of shape (B, K).

Every sampler returns int64 indices (B, N) in draw order and never needs gradients.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SAMPLERS", "sample", "register_sampler"]

Sampler = Callable[[Tensor, int, "torch.Generator | None"], Tensor]
SAMPLERS: dict[str, Sampler] = {}


def register_sampler(name: str) -> Callable[[Sampler], Sampler]:
    """Register a sampler under ``name`` (used by configs and :func:`sample`)."""

    def wrap(fn: Sampler) -> Sampler:
        SAMPLERS[name] = fn
        return fn

    return wrap


@register_sampler("with_replacement")
def sample_with_replacement(probs: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """N independent categorical draws."""
    return torch.multinomial(probs, n, replacement=True, generator=generator)


@register_sampler("without_replacement")
def sample_without_replacement(probs: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Gumbel-top-k: indices sorted by perturbed key are sequential draws without replacement."""
    u = torch.rand(probs.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    # Clamp keeps log(-log u) finite when u hits 0 or 1 in float32.
    tiny = torch.finfo(probs.dtype).tiny
    gumbel = -torch.log(-torch.log(u.clamp(tiny, 1 - 1e-7)))
    keys = torch.log(probs) + gumbel  # log(0) = -inf: zero-probability cells are never drawn
    return torch.topk(keys, n, dim=1, sorted=True).indices


@register_sampler("topk")
def sample_topk(probs: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """Deterministic: the N most probable cells, most probable first (inference only)."""
    return torch.topk(probs, n, dim=1, sorted=True).indices


def sample(
    probs: Tensor,
    n: int,
    mode: str = "without_replacement",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``n`` cells per row of ``probs`` (B, K) with the sampler named ``mode``."""
    try:
        fn = SAMPLERS[mode]
    except KeyError:
        raise ValueError(f"unknown sampler {mode!r}; available: {sorted(SAMPLERS)}") from None
    if mode != "with_replacement":
        allowed = int((probs > 0).sum(dim=1).min())
        if n > allowed:
            raise ValueError(f"cannot draw {n} distinct cells: a sample has only {allowed} allowed")
    with torch.no_grad():
        return fn(probs.detach(), n, generator)
