"""Attention distributions over a whole attention map, and the entropy regulariser."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_distribution", "entropy_regulariser"]


def attention_distribution(
    logits: Tensor, mask: Tensor | None = None, smoothing: float = 0.0
) -> Tensor:
    """Softmax over all cells of each sample's map.

    Args:
        logits: (B, 1, h, w) or (B, h, w) attention scores.
        mask: optional bool (B, h, w); True marks cells that may be sampled. Masked cells get
            probability exactly 0 (smoothing is spread over allowed cells only).
        smoothing: eps in ``(1 - eps) a + eps / K_allowed``; keeps every allowed probability
            away from 0 so the estimators' ``1 / a`` terms stay finite.

    Returns:
        (B, h*w) probabilities; each row sums to 1.
    """
    if logits.dim() == 4:
        if logits.shape[1] != 1:
            raise ValueError(f"attention logits must have one channel, got {tuple(logits.shape)}")
        logits = logits[:, 0]
    if logits.dim() != 3:
        shape = tuple(logits.shape)
        raise ValueError(f"attention logits must be (B,1,h,w) or (B,h,w), got {shape}")
    flat = logits.flatten(1)
    if mask is None:
        probs = torch.softmax(flat, dim=1)
        if smoothing:
            probs = (1 - smoothing) * probs + smoothing / flat.shape[1]
        return probs
    allowed = mask.reshape(flat.shape).to(torch.bool)
    if not bool(allowed.any(dim=1).all()):
        raise ValueError("attention mask leaves a sample with no allowed cell")
    probs = torch.softmax(flat.masked_fill(~allowed, float("-inf")), dim=1)
    if smoothing:
        n_allowed = allowed.sum(dim=1, keepdim=True).to(probs.dtype)
        probs = (1 - smoothing) * probs + allowed.to(probs.dtype) * (smoothing / n_allowed)
    return probs


def entropy_regulariser(probs: Tensor) -> Tensor:
    """``sum_k a_k log(a_k + 1e-6) / B``: adding ``lambda *`` this to the loss raises entropy."""
    return (probs * torch.log(probs + 1e-6)).sum() / probs.shape[0]
