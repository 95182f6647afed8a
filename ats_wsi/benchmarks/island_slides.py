"""Synthetic whole slides for the benchmarks: real H&E tissue islands on blank glass.

Islands are crops of tiatoolbox's 1000 x 1000 ``target_image.png``
(:func:`ats_wsi.slides.cohort.tissue_image`) scattered one per ``CELL`` at most, written tile by
tile with :func:`ats_wsi.io.write_pyramidal_tiff` and cached by size and seed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.slides.cohort import tissue_image

__all__ = ["CELL", "GLASS", "SLIDE_MPP", "island_tile_fn", "make_slide"]

SLIDE_MPP = 0.5  # level-0 microns per pixel (a 20x scan)
GLASS = 242  # constant background: blank tiles compress to almost nothing
CELL = 2048  # each cell of this side holds at most one tissue island
_VERSION = 1  # bump when the generator changes, so cached slides are regenerated


def island_tile_fn(
    size: int, seed: int = 0, density: float = 0.25, source: np.ndarray | None = None
) -> tuple[Callable[[int, int, int, int], np.ndarray], dict[str, Any]]:
    """A level-0 tile function: tissue islands on glass, and a summary of the layout.

    The slide is cut into ``CELL`` x ``CELL`` cells; each holds, with probability ``density``,
    one island: a random crop (512 to 1000 px a side) of the H&E image under one of its 8
    rotations / flips, at a random place inside the cell. Islands are stored as parameters
    (views of the source), never as pixels, so a 100k slide's layout costs kilobytes.
    """
    src = tissue_image() if source is None else source
    variants = [np.rot90(v, k) for v in (src, src[:, ::-1]) for k in range(4)]
    rng = np.random.default_rng([seed, size, _VERSION])
    n_cells = -(-size // CELL)
    islands: dict[tuple[int, int], tuple[int, int, np.ndarray]] = {}
    area = 0
    for k in range(n_cells * n_cells):
        cy, cx = divmod(k, n_cells)
        # Cell 0 always holds an island so that even a tiny (CI) slide has tissue.
        if rng.random() >= density and k:
            continue
        h, w = (int(v) for v in rng.integers(512, 1001, 2))
        var = variants[int(rng.integers(8))]
        sy, sx = (
            int(rng.integers(0, var.shape[0] - h + 1)),
            int(rng.integers(0, var.shape[1] - w + 1)),
        )
        room_y = min(CELL, size - cy * CELL) - h
        room_x = min(CELL, size - cx * CELL) - w
        if room_y < 0 or room_x < 0:
            continue  # a partial cell at the slide's edge too small for this island
        y0 = cy * CELL + int(rng.integers(0, room_y + 1))
        x0 = cx * CELL + int(rng.integers(0, room_x + 1))
        islands[(cy, cx)] = (y0, x0, var[sy : sy + h, sx : sx + w])
        area += h * w

    def tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), GLASS, dtype=np.uint8)
        for cy in range(y // CELL, (y + h - 1) // CELL + 1):
            for cx in range(x // CELL, (x + w - 1) // CELL + 1):
                isl = islands.get((cy, cx))
                if isl is None:
                    continue
                y0, x0, img = isl
                iy0, ix0 = max(y, y0), max(x, x0)
                iy1, ix1 = min(y + h, y0 + img.shape[0]), min(x + w, x0 + img.shape[1])
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = img[
                        iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0
                    ]
        return out

    info = {"islands": len(islands), "island_fraction": area / size**2}
    return tile, info


def make_slide(cache_dir: str | Path, size: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """The cached ``size`` x ``size`` island pyramid (generated on first use) and its summary.

    Written to a temporary name and renamed, so an interrupted run never leaves a truncated
    slide in the cache.
    """
    from ats_wsi.io.synthetic import write_pyramidal_tiff

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"islands_v{_VERSION}_{size}_s{seed}.tif"
    tile_fn, info = island_tile_fn(size, seed)
    info = {**info, "generate_s": 0.0, "cached": path.exists()}
    if not path.exists():
        t0 = time.perf_counter()
        tmp = cache / f".{path.name}.{os.getpid()}.tmp.tif"
        try:
            write_pyramidal_tiff(tmp, tile_fn, SLIDE_MPP, shape=(size, size), tile=256)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        info["generate_s"] = time.perf_counter() - t0
    info["file_mb"] = path.stat().st_size / 2**20
    return path, info
