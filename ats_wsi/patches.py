"""Patch sources: where full-resolution patches come from.

A :class:`PatchSource` turns top-left corners (from :class:`ats_wsi.mapping.GridMapping`) into
patches. :class:`TensorPatchSource` cuts them from an in-memory (B, C, H, W) tensor with one
batched gather; slide-backed sources live in ``ats_wsi.io``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["PatchSource", "TensorPatchSource", "extract_patches"]


@runtime_checkable
class PatchSource(Protocol):
    """Anything that can cut square boxes out of a batch of full-resolution frames.

    Attributes:
        shape: (H, W) of the full-resolution frame in the source's own pixel units (level-0
            baseline pixels for slides). Coordinates passed to :meth:`extract` use these units.
        patch_size: side of the box, in the same units.
    """

    shape: tuple[int, int]
    patch_size: int

    def extract(self, top_left: Tensor) -> Tensor:
        """int64 (B, N, 2) (y, x) top-left corners -> float (B, N, C, p, p) patches.

        ``p`` may differ from ``patch_size`` (a slide source may read the box at a coarser
        resolution). Pixels outside the frame take the source's fill value.
        """
        ...


def extract_patches(x: Tensor, top_left: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Cut ``size`` x ``size`` boxes out of ``x`` with one batched gather.

    Args:
        x: (B, C, H, W) frames.
        top_left: integer (B, N, 2) (y, x) corners; boxes may reach outside the frame.
        size: box side in pixels.
        fill: value of pixels outside the frame.

    Returns:
        (B, N, C, size, size) patches, same dtype and device as ``x``; differentiable with
        respect to ``x``. The result may be a non-contiguous view (channels are gathered as
        the outer dimension because that is the fastest layout on CPU).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got {tuple(x.shape)}")
    if top_left.dim() != 3 or top_left.shape[-1] != 2 or top_left.shape[0] != x.shape[0]:
        raise ValueError(
            f"top_left must be (B, N, 2) with B={x.shape[0]}, got {tuple(top_left.shape)}"
        )
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    b, c, h, w = x.shape
    n = top_left.shape[1]
    top_left = top_left.to(device=x.device, dtype=torch.long)
    offsets = torch.arange(size, device=x.device)
    rows = top_left[..., 0, None] + offsets  # (B, N, P)
    cols = top_left[..., 1, None] + offsets
    valid = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]
    # Clamped indices read some in-frame pixel; the mask below overwrites them with `fill`.
    flat = rows.clamp(0, h - 1)[..., :, None] * w + cols.clamp(0, w - 1)[..., None, :]
    # One flat index shared by all channels (expand is a view, not a copy).
    index = flat.reshape(b, 1, n * size * size).expand(b, c, -1)
    patches = torch.gather(x.reshape(b, c, h * w), 2, index)
    patches = patches.view(b, c, n, size, size).permute(0, 2, 1, 3, 4)
    # In place is safe: gather's backward does not need its output.
    return patches.masked_fill_(~valid[:, :, None], fill)


class TensorPatchSource:
    """:class:`PatchSource` over an in-memory (B, C, H, W) tensor."""

    def __init__(self, x_high: Tensor, patch_size: int, fill: float = 0.0) -> None:
        if x_high.dim() != 4:
            raise ValueError(f"x_high must be (B, C, H, W), got {tuple(x_high.shape)}")
        self.x = x_high
        self.patch_size = int(patch_size)
        self.fill = float(fill)
        self.shape: tuple[int, int] = (int(x_high.shape[-2]), int(x_high.shape[-1]))

    def extract(self, top_left: Tensor) -> Tensor:
        """(B, N, 2) top-left corners -> (B, N, C, patch_size, patch_size) patches."""
        return extract_patches(self.x, top_left, self.patch_size, self.fill)

    def __repr__(self) -> str:
        return (
            f"TensorPatchSource(shape={tuple(self.x.shape)}, patch_size={self.patch_size}, "
            f"fill={self.fill})"
        )
