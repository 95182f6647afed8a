"""A :class:`~ats_wsi.patches.PatchSource` over a slide, and the slide's low-resolution view.

Coordinates handed to :meth:`SlidePatchSource.extract` are level-0 (baseline) pixels, so a
:class:`~ats_wsi.mapping.GridMapping` built with ``high_size`` = level-0 (height, width) and a
low-resolution view of the whole slide gives boxes directly.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from ats_wsi.io.errors import SlideTooSmallError
from ats_wsi.io.readers import Closing, SlideReader

__all__ = ["SlidePatchSource", "low_res_view"]


def low_res_view(reader: SlideReader, mpp: float) -> tuple[Tensor, tuple[float, float]]:
    """The whole slide at about ``mpp`` as a float (1, 3, h, w) tensor in [0, 1].

    Returns:
        The view and its exact scale (sy, sx) in level-0 pixels per view pixel (H0 / h, W0 / w);
        rounding the view to whole pixels makes it differ slightly from ``mpp / mpp0``.

    Raises:
        SlideTooSmallError: the view would be empty.
    """
    image = reader.thumbnail(mpp)
    width, height = reader.dimensions
    view = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).unsqueeze(0)
    return view.float().div_(255), (height / image.shape[0], width / image.shape[1])


class SlidePatchSource(Closing):
    """Square patches of ``patch_size_px`` pixels at ``patch_mpp`` um/px, cut from one slide.

    Attributes:
        shape: level-0 (height, width).
        patch_size: box side in level-0 pixels, ``round(patch_size_px * patch_mpp / mpp0)``.
        patch_size_px: side ``p`` of the returned patches.

    Each box of ``patch_size`` level-0 pixels is resampled to ``p`` x ``p``; when ``patch_mpp``
    is a pyramid level's resolution the read is an exact copy of that level's pixels. All boxes
    of a call are read concurrently (OpenSlide and zarr release the GIL).
    """

    fill = 1.0  # white, like glass

    def __init__(
        self,
        reader: SlideReader,
        patch_size_px: int,
        patch_mpp: float,
        max_workers: int = 8,
    ) -> None:
        if patch_size_px <= 0 or patch_mpp <= 0:
            raise ValueError(
                f"patch_size_px and patch_mpp must be positive, got {patch_size_px}, {patch_mpp}"
            )
        self.reader = reader
        self.patch_size_px = int(patch_size_px)
        self.patch_mpp = float(patch_mpp)
        width, height = reader.dimensions
        self.shape: tuple[int, int] = (int(height), int(width))
        self.patch_size: int = max(1, round(self.patch_size_px * self.patch_mpp / reader.mpp[0]))
        if self.patch_size > min(self.shape):
            raise SlideTooSmallError(
                reader.path,
                f"slide of {width}x{height} level-0 pixels is smaller than one "
                f"{self.patch_size_px}px patch at {self.patch_mpp} um/px "
                f"({self.patch_size} level-0 pixels)",
            )
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="patches")
        self.reads = 0  # patches read so far (what a feature cache saves shows here)
        self.region_reads = 0  # zoom-in regions read (read_regions)
        self.region_pixels = 0  # their pixels at the region resolution

    def box_keys(self, top_left: Tensor) -> list[tuple[str, int, int, int, float]]:
        """(slide, x, y, level-0 size, patch mpp) of each (1, N, 2) (y, x) box: what identifies
        a patch for a feature cache."""
        corners = top_left.reshape(-1, 2).detach().to("cpu", torch.long).tolist()
        slide = str(self.reader.path)
        return [(slide, x, y, self.patch_size, self.patch_mpp) for y, x in corners]

    def read_patch(self, y: int, x: int) -> np.ndarray:
        """The (p, p, 3) uint8 patch whose level-0 box has top-left (y, x)."""
        self.reads += 1
        box = (self.patch_size, self.patch_size)
        return self.reader.read_box((x, y), box, (self.patch_size_px, self.patch_size_px))

    def extract(self, top_left: Tensor) -> Tensor:
        """int (1, N, 2) (y, x) level-0 corners -> float32 (1, N, 3, p, p) in [0, 1].

        The result is on ``top_left``'s device. Pixels outside the slide are white (1.0).
        """
        if top_left.dim() != 3 or top_left.shape[-1] != 2:
            raise ValueError(f"top_left must be (B, N, 2), got {tuple(top_left.shape)}")
        if top_left.shape[0] != 1:
            raise ValueError(
                f"a SlidePatchSource reads one slide: batch must be 1, got {top_left.shape[0]}"
            )
        corners = top_left[0].detach().to("cpu", torch.long).tolist()
        p = self.patch_size_px
        out = np.empty((1, len(corners), p, p, 3), dtype=np.uint8)
        for i, patch in enumerate(self._pool.map(lambda yx: self.read_patch(*yx), corners)):
            out[0, i] = patch
        patches = torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous()
        return patches.to(top_left.device).float().div_(255)

    @property
    def mpp(self) -> float:
        """Level-0 microns per pixel (x), the unit of ``read_regions``' output sizes."""
        return float(self.reader.mpp[0])

    def read_regions(
        self, top_left: Tensor, box: tuple[int, int], out_size: tuple[int, int]
    ) -> Tensor:
        """Level-0 boxes of ``box`` (h, w) at (1, N, 2) (y, x) corners, each resampled to
        ``out_size`` (h, w) from the nearest pyramid level -> float32 (1, N, 3, h, w) in [0, 1].

        One read per box (zoom-in regions: never the whole slide at that resolution);
        counted in ``region_reads`` and ``region_pixels``.
        """
        corners = top_left.reshape(-1, 2).detach().to("cpu", torch.long).tolist()
        (bh, bw), (oh, ow) = box, out_size

        def read(yx: list[int]) -> np.ndarray:
            return self.reader.read_box((yx[1], yx[0]), (bw, bh), (ow, oh))

        out = np.stack(list(self._pool.map(read, corners)))[None]
        self.region_reads += len(corners)
        self.region_pixels += len(corners) * oh * ow
        regions = torch.from_numpy(out).permute(0, 1, 4, 2, 3).contiguous()
        return regions.to(top_left.device).float().div_(255)

    def close(self) -> None:
        """Stop the reader threads (the reader itself belongs to the caller)."""
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return (
            f"SlidePatchSource({str(self.reader.path)!r}, shape={self.shape}, "
            f"patch_size={self.patch_size}, patch_size_px={self.patch_size_px}, "
            f"patch_mpp={self.patch_mpp})"
        )
