"""Write test and demo slides: pyramidal tiled TIFFs that OpenSlide reads, tile by tile.

:func:`write_pyramidal_tiff` never holds a level in memory: level-0 tiles come from an array-like
(numpy, ``np.memmap``, zarr) or a function, and each coarser level is accumulated, already halved,
in a temporary raw file next to the output while the finer level is written, one strip of rows
at a time. That is what lets a 100,000 x 100,000 pyramid be generated on a laptop (the temporary
files take a third of level 0's raw size on disk).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterator
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TileFn", "halve", "mirrored_mosaic", "write_pyramidal_tiff"]

TileFn = Callable[[int, int, int, int], np.ndarray]
"""``fn(y, x, height, width) -> (height, width, 3) uint8``: a level-0 region."""


def halve(block: np.ndarray) -> np.ndarray:
    """2 x 2 box mean of (h, w, c) uint8 (odd trailing row / column dropped), rounded."""
    h, w = block.shape[0] // 2 * 2, block.shape[1] // 2 * 2
    b = block[:h, :w].astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def mirrored_mosaic(image: np.ndarray) -> TileFn:
    """A :data:`TileFn` that tiles ``image`` over an unbounded plane, mirroring at the seams.

    Mirroring (period 2 x the image) keeps tissue continuous across the seams, so Otsu and
    morphology see plausible structures.
    """
    image = np.ascontiguousarray(image[..., :3])
    ih, iw = image.shape[:2]

    def fold(start: int, n: int, size: int) -> np.ndarray:
        idx = (start + np.arange(n)) % (2 * size)
        return np.where(idx < size, idx, 2 * size - 1 - idx)

    def tile(y: int, x: int, height: int, width: int) -> np.ndarray:
        return image[np.ix_(fold(y, height, ih), fold(x, width, iw))]

    return tile


def _default_levels(height: int, width: int, tile: int) -> int:
    # Halve until the coarsest level fits in one tile, as scanners do.
    return 1 + max(0, math.ceil(math.log2(max(height, width) / tile)))


def write_pyramidal_tiff(
    path: str | PathLike[str],
    image: np.ndarray | Any | TileFn,
    mpp: float | tuple[float, float] | None,
    *,
    shape: tuple[int, int] | None = None,
    tile: int = 256,
    levels: int | None = None,
    compression: str | None = "zlib",
) -> Path:
    """Write a tiled RGB pyramid (level 0 and 2x reductions) that OpenSlide reads as generic TIFF.

    Args:
        path: output ``.tif`` / ``.tiff``.
        image: (H, W, 3) uint8 array-like supporting slicing (numpy, memmap, zarr), or a
            :data:`TileFn` giving level-0 regions (then ``shape`` is required).
        mpp: level-0 microns per pixel, stored as resolution tags in pixels per centimetre;
            None writes no resolution unit, so readers report no mpp.
        shape: (H, W) of level 0 when ``image`` is a function.
        tile: tile side (a multiple of 16, as TIFF requires).
        levels: number of levels including level 0; default halves until one tile is left.
        compression: tifffile compression name ("zlib", "jpeg", None, ...).

    Returns:
        The output path.
    """
    import tifffile

    if tile % 16:
        raise ValueError(f"tile must be a multiple of 16, got {tile}")
    height, width, read0 = _level0_reader(image, shape)
    n_levels = levels if levels is not None else _default_levels(height, width, tile)
    n_levels = max(1, min(n_levels, 1 + int(math.log2(min(height, width)))))
    mpp_xy = _mpp_xy(mpp)
    path = Path(path)
    with (
        tempfile.TemporaryDirectory(dir=path.parent, prefix=".pyramid-") as tmp,
        tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as tif,
    ):
        read = read0
        for level in range(n_levels):
            h, w = height >> level, width >> level
            nxt = (
                _LevelFile(Path(tmp) / f"level{level + 1}.raw", w // 2)
                if level + 1 < n_levels
                else None
            )
            tif.write(
                _tiles(read, h, w, tile, nxt),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                subfiletype=1 if level else 0,
                metadata=None,
                **_resolution_tags(mpp_xy, level),
            )
            if nxt is not None:
                read = nxt.reader()
    return path


def _level0_reader(
    image: np.ndarray | Any | TileFn, shape: tuple[int, int] | None
) -> tuple[int, int, TileFn]:
    """Level 0's (height, width) and a :data:`TileFn` reading it from ``image``."""
    if callable(image):
        if shape is None:
            raise ValueError("shape=(H, W) is required when image is a function")
        return int(shape[0]), int(shape[1]), image

    def read0(y: int, x: int, h: int, w: int) -> np.ndarray:
        return np.asarray(image[y : y + h, x : x + w])[..., :3]

    return int(image.shape[0]), int(image.shape[1]), read0


def _mpp_xy(mpp: float | tuple[float, float] | None) -> tuple[float, float] | None:
    """``mpp`` as an (x, y) pair of floats (None stays None)."""
    if mpp is None:
        return None
    if np.isscalar(mpp):
        return (float(mpp), float(mpp))
    return (float(mpp[0]), float(mpp[1]))


def _resolution_tags(mpp_xy: tuple[float, float] | None, level: int) -> dict[str, Any]:
    """tifffile's resolution arguments for ``level`` (no unit without an mpp)."""
    if mpp_xy is None:
        return {"resolutionunit": "NONE"}
    # TIFF resolution is pixels per unit; 1 cm = 1e4 um.
    ds = 2**level
    return {
        "resolution": (1e4 / (mpp_xy[0] * ds), 1e4 / (mpp_xy[1] * ds)),
        "resolutionunit": "CENTIMETER",
    }


class _LevelFile:
    """A coarser level written strip by strip to a raw file and read back strip by strip.

    Only one strip of rows is in memory at a time; a memory map would count every page touched
    in the writer's resident memory (a 100k px slide's level 1 is 7 GB).
    """

    def __init__(self, path: Path, width: int) -> None:
        self.path, self.width = path, width
        self._file = open(path, "wb")  # closed by reader()

    def append(self, rows: np.ndarray) -> None:
        self._file.write(np.ascontiguousarray(rows, dtype=np.uint8).tobytes())

    def reader(self) -> TileFn:
        """A :data:`TileFn` over the finished level (reads a strip once, in row-major order)."""
        self._file.close()
        row_bytes = self.width * 3
        strip: dict[tuple[int, int], np.ndarray] = {}

        def read(y: int, x: int, hh: int, ww: int) -> np.ndarray:
            if (y, hh) not in strip:
                strip.clear()
                with open(self.path, "rb") as f:
                    f.seek(y * row_bytes)
                    data = np.fromfile(f, dtype=np.uint8, count=hh * row_bytes)
                strip[(y, hh)] = data.reshape(hh, self.width, 3)
            return strip[(y, hh)][:, x : x + ww]

        return read


def _tiles(
    read: TileFn, height: int, width: int, tile: int, coarser: _LevelFile | None
) -> Iterator[np.ndarray]:
    """Full-size (tile, tile, 3) tiles in row-major order; appends ``coarser``'s rows as a side
    effect (one halved strip per row of tiles)."""
    for y in range(0, height, tile):
        th = min(tile, height - y)
        # tile is even, so each row of tiles maps onto whole rows of the next level.
        strip = np.zeros((th // 2, width // 2, 3), np.uint8) if coarser is not None else None
        for x in range(0, width, tile):
            tw = min(tile, width - x)
            block = np.asarray(read(y, x, th, tw), dtype=np.uint8)
            if block.shape != (th, tw, 3):
                raise ValueError(
                    f"tile at ({y}, {x}) has shape {block.shape}, expected {(th, tw, 3)}"
                )
            if strip is not None:
                small = halve(block)
                strip[:, x // 2 : x // 2 + small.shape[1]] = small
                if x + tile >= width:
                    # Before the yield: tifffile stops pulling after the last tile.
                    coarser.append(strip)
            if th == tile and tw == tile:
                yield block
            else:
                padded = np.zeros((tile, tile, 3), dtype=np.uint8)
                padded[:th, :tw] = block
                yield padded
