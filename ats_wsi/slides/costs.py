"""What one slide prediction looked at and what it cost: the zoom-in regions and level-1
attention (:class:`SlideZoom`), pixels read per level (:class:`SlideCost`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ats_wsi.model import ATSOutput

__all__ = ["SlideCost", "SlideZoom", "Stopwatch"]


@dataclass
class SlideZoom:
    """What zoom-in sampling looked at on one slide (R regions sampled, T tiles read; numpy,
    level-0 pixels).

    Attributes:
        regions_xywh: (R, 4) int64 level-0 box (x, y, w, h) of each sampled region, in draw
            order (boxes at the slide's bottom / right edge may reach past it).
        region_scores: (R,) level-0 probability of each sampled region.
        region_index: (R,) the region's flat index in the row-major ``region_grid``.
        region_attention: (R, side, side) level-1 attention over each region's cells,
            row-major like the region (``side`` = ``region_cells``; 0 off the tissue / grid).
        tile_region: (T,) which sampled region (0..R-1) each tile was drawn in.
        tile_cell: (T,) the tile's cell inside its region (flat index into ``side * side``).
        region_grid: (r_h, r_w) regions per axis.
        region_mpp: resolution the regions were read at (um/px).
    """

    regions_xywh: np.ndarray
    region_scores: np.ndarray
    region_index: np.ndarray
    region_attention: np.ndarray
    tile_region: np.ndarray
    tile_cell: np.ndarray
    region_grid: tuple[int, int]
    region_mpp: float

    @classmethod
    def of(cls, out: ATSOutput, region_mpp: float) -> SlideZoom:
        """From a zoom forward's :class:`~ats_wsi.model.ZoomOutput`."""
        z = out.zoom
        assert z is not None
        top_left = z.region_top_left.reshape(-1, 2).cpu().numpy().astype(np.int64)
        n = len(top_left)
        size = np.tile(np.array([z.region_box[1], z.region_box[0]], np.int64), (n, 1))
        side = int(round(z.cell_probs.shape[1] ** 0.5))
        regions = z.regions[0].cpu()
        return cls(
            regions_xywh=np.concatenate([top_left[:, ::-1], size], axis=1),
            region_scores=z.region_probs[0, regions].float().cpu().numpy(),
            region_index=regions.numpy().astype(np.int64),
            region_attention=z.cell_probs.float().cpu().numpy().reshape(n, side, side),
            tile_region=z.tile_region.cpu().numpy().astype(np.int64),
            tile_cell=z.tile_cell.cpu().numpy().astype(np.int64),
            region_grid=(int(z.region_grid[0]), int(z.region_grid[1])),
            region_mpp=float(region_mpp),
        )


@dataclass
class SlideCost:
    """What one prediction read and computed (pixels at each level's own resolution).

    Attributes:
        view_px: pixels of the low-res view the level-0 attention saw (h * w).
        region_px: pixels of the zoom-in region views (0 for one level).
        tile_px: pixels of the tiles read, ``tiles_read * p * p``.
        tiles_read: tiles read and encoded (distinct boxes with zoom: overlapping regions may
            draw a tile twice, it is read once).
        regions_read: zoom-in regions read (0 for one level).
        level1_attention_s: seconds in the level-1 attention net (None for one level).
        runtime_s: the whole prediction, reading the view included.
    """

    view_px: int
    region_px: int
    tile_px: int
    tiles_read: int
    regions_read: int
    level1_attention_s: float | None
    runtime_s: float

    @classmethod
    def of(
        cls,
        out: ATSOutput,
        view_shape: tuple[int, ...],
        patch_px: int,
        level1_attention_s: float | None = None,
        runtime_s: float = 0.0,
    ) -> SlideCost:
        """From a forward's output, the (h, w, ...) of its view and the tile side read."""
        locations = out.locations[0]
        # With zoom the model reads each distinct box once (overlapping regions).
        tiles = len(locations) if out.zoom is None else len(locations.unique(dim=0))
        return cls(
            view_px=int(view_shape[0] * view_shape[1]),
            region_px=0 if out.zoom is None else int(out.zoom.region_pixels),
            tile_px=tiles * patch_px * patch_px,
            tiles_read=tiles,
            regions_read=0 if out.zoom is None else int(out.zoom.regions.shape[1]),
            level1_attention_s=None if out.zoom is None else level1_attention_s,
            runtime_s=runtime_s,
        )


class Stopwatch:
    """Seconds spent in a module's forward, by hooks (no change to the module)."""

    def __init__(self, module: nn.Module | None) -> None:
        self.seconds = 0.0
        self._t = 0.0
        self._hooks: list[Any] = []
        if module is not None:
            self._hooks = [
                module.register_forward_pre_hook(self._start),
                module.register_forward_hook(self._stop),
            ]

    def _start(self, *_: Any) -> None:
        self._t = time.perf_counter()

    def _stop(self, *_: Any) -> None:
        self.seconds += time.perf_counter() - self._t

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
