"""Attention distributions over a whole attention map, the entropy regulariser and the
score-distillation term."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["attention_distribution", "entropy_regulariser", "score_distillation", "tile_scores"]


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


def tile_scores(patch_logits: Tensor) -> Tensor:
    """How far each patch is from class 0 (the normal class): ``max_{c >= 1} z_c - z_0`` of the
    head's logits (..., C) on single patch features; the logit margin for two classes."""
    if patch_logits.shape[-1] < 2:
        raise ValueError(f"tile scores need at least two classes, got {patch_logits.shape[-1]}")
    return patch_logits[..., 1:].max(dim=-1).values - patch_logits[..., 0]


def score_distillation(probs: Tensor, indices: Tensor, scores: Tensor, beta: float = 2.0) -> Tensor:
    """Listwise loss pulling the attention of the sampled cells toward their patch scores.

    Over the N cells a sample drew, the target is ``softmax(beta * z)`` of the scores
    standardised within the sample (so only their order and spread matter), the prediction
    the attention renormalised over those cells; the loss is the cross-entropy between them,
    averaged over the batch. Scores are targets: pass them detached. Only the read patches
    are used, so the term costs no extra read.

    Args:
        probs: (B, K) attention distribution.
        indices: (B, N) sampled cells.
        scores: (B, N) a score per sampled patch (e.g. :func:`tile_scores` of the head).
        beta: sharpness of the target.
    """
    if indices.shape != scores.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and scores {tuple(scores.shape)} differ")
    if indices.shape[1] < 2:
        return probs.new_zeros(())
    z = (scores - scores.mean(1, keepdim=True)) / (scores.std(1, keepdim=True) + 1e-6)
    target = torch.softmax(beta * z, dim=1)
    picked = torch.log(probs.gather(1, indices) + 1e-12)
    return -(target * torch.log_softmax(picked, dim=1)).sum(1).mean()
