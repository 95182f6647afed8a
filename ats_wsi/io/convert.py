"""Convert any readable slide to an OME-Zarr pyramid, chunk by chunk.

Level 0 is copied from the reader one chunk at a time; each coarser level is a 2 x 2 box mean of
the level above, read back from the zarr store one chunk's footprint at a time. Memory stays at
a few chunks per worker whatever the slide size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from ats_wsi.io.readers import SlideReader
from ats_wsi.io.synthetic import halve

__all__ = ["ngff_multiscales", "write_ome_zarr"]

NgffVersion = Literal["0.4", "0.5"]


def ngff_multiscales(
    levels: int,
    mpp: tuple[float, float] | None,
    name: str = "image",
    version: NgffVersion = "0.5",
) -> dict[str, Any]:
    """The ``multiscales`` entry of a (c, y, x) pyramid with 2x reductions, in micrometres;
    ``mpp`` None writes pixel units (no ``unit`` on the axes, level-0 scale 1)."""
    unit = {} if mpp is None else {"unit": "micrometer"}
    mpp = (1.0, 1.0) if mpp is None else mpp
    entry: dict[str, Any] = {
        "name": name,
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", **unit},
            {"name": "x", "type": "space", **unit},
        ],
        "datasets": [
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": [1.0, mpp[1] * 2**level, mpp[0] * 2**level]}
                ],
            }
            for level in range(levels)
        ],
        "type": "mean",
    }
    if version == "0.4":
        # 0.4 keeps the version inside each multiscale; 0.5 moves it to the "ome" envelope.
        entry["version"] = "0.4"
    return entry


def _blocks(height: int, width: int, chunk: int) -> Iterable[tuple[int, int, int, int]]:
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            yield y, x, min(chunk, height - y), min(chunk, width - x)


def write_ome_zarr(
    reader: SlideReader,
    dst: str | PathLike[str],
    *,
    chunk: int = 512,
    levels: int | None = None,
    version: NgffVersion = "0.5",
    max_workers: int = 4,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``reader``'s slide as an OME-Zarr pyramid (uint8, (c, y, x), RGB).

    Args:
        reader: any :class:`~ats_wsi.io.readers.SlideReader`.
        dst: output directory (conventionally ``*.zarr``).
        chunk: chunk side in pixels (each chunk holds the 3 channels).
        levels: number of levels including level 0; default halves until one chunk is left.
        version: NGFF "0.5" (zarr v3) or "0.4" (zarr v2).
        max_workers: threads reading and encoding chunks concurrently.
        overwrite: replace an existing ``dst``.
        progress: called as ``progress(level, chunks_done)`` after each chunk.

    Returns:
        The output path. A reader with ``mpp_source == "none"`` (opened with
        ``MppSpec(allow_missing=True)``) gives a pyramid in pixel units.
    """
    import zarr

    if version not in ("0.4", "0.5"):
        raise ValueError(f"version must be '0.4' or '0.5', got {version!r}")
    dst = Path(dst)
    width, height = reader.dimensions
    if levels is None:
        levels = 1 + max(0, math.ceil(math.log2(max(width, height) / chunk)))
    levels = max(1, min(levels, 1 + int(math.log2(min(width, height)))))
    zarr_format = 3 if version == "0.5" else 2
    group = zarr.open_group(dst, mode="w" if overwrite else "w-", zarr_format=zarr_format)
    arrays = []
    for level in range(levels):
        kwargs: dict[str, Any] = {}
        if zarr_format == 3:
            kwargs["dimension_names"] = ["c", "y", "x"]
        arrays.append(
            group.create_array(
                str(level),
                shape=(3, height >> level, width >> level),
                chunks=(3, chunk, chunk),
                dtype="uint8",
                fill_value=255,
                **kwargs,
            )
        )

    def copy0(block: tuple[int, int, int, int]) -> None:
        y, x, h, w = block
        arrays[0][:, y : y + h, x : x + w] = reader.read_region((x, y), 0, (w, h)).transpose(
            2, 0, 1
        )

    def reduce(level: int, block: tuple[int, int, int, int]) -> None:
        y, x, h, w = block
        src = arrays[level - 1][:, 2 * y : 2 * (y + h), 2 * x : 2 * (x + w)]
        arrays[level][:, y : y + h, x : x + w] = halve(src.transpose(1, 2, 0)).transpose(2, 0, 1)

    # Chunk-aligned blocks: concurrent writers never touch the same chunk.
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        for level, array in enumerate(arrays):
            _, h, w = array.shape
            if level == 0:
                jobs = pool.map(copy0, _blocks(h, w, chunk))
            else:
                jobs = pool.map(lambda b, lv=level: reduce(lv, b), _blocks(h, w, chunk))
            for done, _ in enumerate(jobs, 1):
                if progress is not None:
                    progress(level, done)

    # A reader opened without any resolution (mpp_source "none") is written in pixel units.
    mpp = None if getattr(reader, "mpp_source", "") == "none" else reader.mpp
    multiscale = ngff_multiscales(levels, mpp, name=Path(reader.path).name, version=version)
    if version == "0.5":
        group.attrs["ome"] = {"version": "0.5", "multiscales": [multiscale]}
    else:
        group.attrs["multiscales"] = [multiscale]
    return dst
