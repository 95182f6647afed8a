"""The :class:`PatchEncoder` protocol: what the rest of ats_wsi asks of a pretrained encoder,
and the helpers that find encoders inside a model (optimizer groups, checkpoints).

A pretrained patch encoder is an ``nn.Module`` feature net (ATS_SPEC 1: (M, 3, p, p) [0, 1]
RGB patches -> (M, out_dim) features) that also says how it treats its input, whether it
trains, what identifies it, and how a checkpoint stores it. ``ATSModel``, the slide trainer,
the benchmarks and :mod:`ats_wsi.checkpoint` ask these members instead of probing attributes
or types. The check is structural (``isinstance(net, PatchEncoder)``); the member names
(``encoder_id``, ``checkpoint_state``, ...) are ones plain feature nets do not have.

This module imports no timm and no torchvision, so asking it is cheap for any model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PatchEncoder",
    "encoder_modules",
    "encoder_parameters",
    "encoder_state_for_checkpoint",
    "load_encoder_state",
    "strip_encoder_tensors",
]

ENCODER_STATE_FORMAT = "ats_wsi.encoder/1"
"""``format`` of a :meth:`PatchEncoder.checkpoint_state` blob."""


@runtime_checkable
class PatchEncoder(Protocol):
    """A pretrained patch encoder usable as an ATS feature net.

    Members:
        out_dim: the feature dimension D of ``forward``'s (M, D) output.
        normalizes_input: True when the encoder takes [0, 1] RGB patches of any size and
            resizes / normalises them itself (``ATSModel`` then hands it the raw patches).
        fully_frozen: no parameter trains: its features of a patch never change, so they may
            be cached (:class:`~ats_wsi.encoders.FeatureCache`).
        encoder_id: identity of the function the encoder computes (architecture, input size,
            weights hash); feature caches and checkpoints key on it.
        checkpoint_state(): plain data + tensors for an ATS checkpoint; a frozen encoder built
            from a weights file is referenced by ``{"path", "sha256"}``, not copied.
        load_checkpoint_state(state): apply such a blob to an encoder built from the same
            config (checks the weights hash, loads stored tensors).
        trainable_parameters(): the parameters fine-tuning updates (empty when fully frozen).
    """

    out_dim: int
    normalizes_input: bool
    fully_frozen: bool
    encoder_id: str

    def __call__(self, x: Tensor) -> Tensor: ...

    def checkpoint_state(self) -> dict[str, Any]: ...

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None: ...

    def trainable_parameters(self) -> list[nn.Parameter]: ...


def prepare_input(
    x: Tensor, size: int | None, mean: Tensor, std: Tensor, who: str = "encoder"
) -> Tensor:
    """What an encoder does with its [0, 1] (or uint8) RGB patches: resize to ``size``
    (bilinear, antialiased; None keeps the size) and normalise with ``mean`` / ``std``."""
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{who} takes (M, 3, p, p) RGB patches, got {tuple(x.shape)}")
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return (x - mean.to(x.dtype)) / std.to(x.dtype)


def encoder_modules(model: nn.Module) -> dict[str, Any]:
    """Every :class:`PatchEncoder` inside ``model``, by module name ('' for the model itself)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PatchEncoder)}


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the pretrained encoders inside ``model`` (for their own lr).

    The trainer gives these one param group and the rest (``p`` not in this list) another.
    """
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for enc in encoder_modules(model).values():
        for p in enc.trainable_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def encoder_state_for_checkpoint(net: PatchEncoder) -> dict[str, Any]:
    """What an ATS checkpoint stores for an encoder: ``net.checkpoint_state()``.

    For :class:`~ats_wsi.encoders.TimmEncoder`: a fully frozen encoder built from a weights
    file is *referenced* (config + path + sha256, no tensors); a (partly) trainable one stores
    its trainable parameters and all buffers on top of that reference; a randomly initialised
    one its whole state dict.
    """
    return net.checkpoint_state()


def load_encoder_state(net: Any, state: Mapping[str, Any]) -> Any:
    """Apply a :func:`encoder_state_for_checkpoint` result to an already built ``net``
    (``net.load_checkpoint_state(state)``) and return ``net``.

    The weights file ``net`` was built from must have the recorded sha256
    (:class:`~ats_wsi.encoders.EncoderHashMismatchError` naming the file otherwise).
    """
    net.load_checkpoint_state(state)
    return net


def strip_encoder_tensors(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` of ``model`` without the tensors of its :class:`PatchEncoder` modules
    (they travel in :func:`encoder_state_for_checkpoint` blobs instead)."""
    prefixes = tuple(f"{name}." if name else "" for name in encoder_modules(model))
    if "" in prefixes:
        return {}
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}
