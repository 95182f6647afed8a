"""Patch sources: where full-resolution patches come from.

A :class:`PatchSource` turns top-left corners (from :class:`ats_wsi.mapping.GridMapping`) into
patches. :class:`TensorPatchSource` cuts them from an in-memory (B, C, H, W) tensor with
batched gathers; slide-backed sources live in ``ats_wsi.io``.
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
    """Cut ``size`` x ``size`` boxes out of ``x`` with batched gathers (no loop, no padding).

    Args:
        x: (B, C, H, W) frames.
        top_left: integer (B, N, 2) (y, x) corners; boxes may reach outside the frame.
        size: box side in pixels.
        fill: value of pixels outside the frame.

    Returns:
        (B, N, C, size, size) patches, same dtype and device as ``x``; differentiable with
        respect to ``x``. May be a non-contiguous view (channels gathered as the outer axis).

    Two strategies, same result. The general one is a per-pixel gather: index grids
    ``y0 + arange(P)`` and ``x0 + arange(P)``, clamped into the frame, one advanced index, then
    ``fill`` where the grid left the frame. It is used on accelerators (memory-bound there, and
    free of host synchronisation) and whenever ``x`` needs a gradient. On CPU it costs index
    arithmetic per output pixel, which made it slower than a Python loop of slices for large
    patches; there, boxes inside the frame are instead read with one advanced index per box
    into a strided window view of ``x`` (whole rows copied, no padding copy), and only boxes
    that reach outside go through the per-pixel gather. The window view is not used with
    gradients because its backward would allocate ``B*C*H*W*P*P`` elements.
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
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()) or min(h, w) < size:
        if x.stride(-1) == 1 and x.stride(-2) == w:
            return _gather_grid(x, top_left, size, fill)
        batch = torch.arange(b, device=x.device).repeat_interleave(n)
        return _gather_pixels(x, batch, top_left.reshape(-1, 2), size, fill).view(
            b, n, c, size, size
        )
    y0 = top_left[..., 0].clamp(0, h - size)
    x0 = top_left[..., 1].clamp(0, w - size)
    # (B, C, H-P+1, W-P+1, P, P) view: element [b, :, y, x] is the box at (y, x). No copy.
    windows = x.unfold(2, size, 1).unfold(3, size, 1)
    batch = torch.arange(b, device=x.device).view(b, 1).expand(b, n)
    patches = windows[batch, :, y0, x0]  # (B, N, C, P, P)
    outside = (y0 != top_left[..., 0]) | (x0 != top_left[..., 1])
    if bool(outside.any()):
        bi, ni = outside.nonzero(as_tuple=True)
        patches[bi, ni] = _gather_pixels(x, bi, top_left[bi, ni], size, fill)
    return patches


def _grids(top_left: Tensor, size: int, h: int, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """Clamped row and column grids (..., P) and the in-frame mask (..., P, P)."""
    offsets = torch.arange(size, device=top_left.device)
    rows = top_left[..., 0, None] + offsets
    cols = top_left[..., 1, None] + offsets
    valid = ((rows >= 0) & (rows < h))[..., :, None] & ((cols >= 0) & (cols < w))[..., None, :]
    # Clamped indices read some in-frame pixel; callers overwrite those with `fill` via `valid`.
    return rows.clamp(0, h - 1), cols.clamp(0, w - 1), valid


def _gather_grid(x: Tensor, top_left: Tensor, size: int, fill: float) -> Tensor:
    """Per-pixel gather of (B, N) boxes from ``x`` whose (H, W) planes are contiguous.

    One flat index per box pixel, shared by all channels (expanded, not copied); measured
    faster than a four-tensor advanced index on both CPU and GPU.
    """
    b, c, h, w = x.shape
    n = top_left.shape[1]
    rows, cols, valid = _grids(top_left, size, h, w)
    flat = (rows[..., :, None] * w + cols[..., None, :]).reshape(b, 1, n * size * size)
    patches = torch.gather(x.reshape(b, c, h * w), 2, flat.expand(b, c, -1))
    patches = patches.view(b, c, n, size, size).permute(0, 2, 1, 3, 4)
    # In place is safe: gather's backward does not need its output.
    return patches.masked_fill_(~valid[:, :, None], fill)


def _gather_pixels(x: Tensor, batch: Tensor, top_left: Tensor, size: int, fill: float) -> Tensor:
    """Per-pixel gather of M boxes: ``batch`` (M,), ``top_left`` (M, 2) -> (M, C, P, P).

    Broadcast index tensors: works for any strides of ``x`` and any mix of samples.
    """
    _, c, h, w = x.shape
    rows, cols, valid = _grids(top_left, size, h, w)
    channels = torch.arange(c, device=x.device)
    patches = x[
        batch[:, None, None, None],
        channels[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    # In place is safe: indexing's backward does not need its output.
    return patches.masked_fill_(~valid[:, None], fill)


class TensorPatchSource:
    """:class:`PatchSource` over an in-memory (B, C, H, W) tensor.

    A uint8 image stays bytes; only the cut patches become float in [0, 1], so the full
    image is never materialised as floats (4x its size), the point of attention sampling.
    """

    mpp = 1.0  # one unit per pixel: zoom-in region resolutions are in pixels of ``x_high``

    def __init__(self, x_high: Tensor, patch_size: int, fill: float = 0.0) -> None:
        if x_high.dim() != 4:
            raise ValueError(f"x_high must be (B, C, H, W), got {tuple(x_high.shape)}")
        self.x = x_high
        self.patch_size = int(patch_size)
        self.fill = float(fill)
        self.shape: tuple[int, int] = (int(x_high.shape[-2]), int(x_high.shape[-1]))

    def extract(self, top_left: Tensor) -> Tensor:
        """(B, N, 2) top-left corners -> (B, N, C, patch_size, patch_size) patches."""
        patches = extract_patches(self.x, top_left, self.patch_size, self.fill)
        return patches.float().div_(255.0) if patches.dtype == torch.uint8 else patches

    def read_regions(
        self, top_left: Tensor, box: tuple[int, int], out_size: tuple[int, int]
    ) -> Tensor:
        """(B, N, 2) corners of ``box`` (h, w) boxes, each area-resampled to ``out_size`` (h, w)
        -> float (B, N, C, h, w): the region views of zoom-in sampling."""
        side = max(box)
        crops = extract_patches(self.x, top_left, side, self.fill)[..., : box[0], : box[1]]
        crops = crops.float().div_(255.0) if crops.dtype == torch.uint8 else crops.float()
        b, n = crops.shape[:2]
        flat = torch.nn.functional.interpolate(crops.flatten(0, 1), size=out_size, mode="area")
        return flat.view(b, n, *flat.shape[1:])

    def __repr__(self) -> str:
        return (
            f"TensorPatchSource(shape={tuple(self.x.shape)}, patch_size={self.patch_size}, "
            f"fill={self.fill})"
        )
