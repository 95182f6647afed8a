"""Plain images as slides: non-pyramidal TIFF, PNG, JPEG, and in-memory arrays.

TIFFs are read through tifffile: chunked layouts (tiles, or strips of a few rows) are read
lazily as a zarr array, chunk by chunk; a TIFF whose chunks are too big to read piecewise (one
strip for the whole image) is decoded whole. PNG and JPEG are always decoded whole by Pillow.
Decoding whole is limited to :data:`MAX_DECODED_PIXELS`; a lazily read image without a pyramid
to :data:`MAX_UNPYRAMIDAL_PIXELS` (every low-resolution view is computed from level 0 on the
fly). Larger images raise :class:`~ats_wsi.io.errors.SlideTooLargeError`, whose message names
the limit and how to make a pyramid.

Plain images rarely carry a microscope resolution: the DPI of screen and print images
(72 dpi = 353 um/px) is not one, so resolutions coarser than :data:`MAX_PLAUSIBLE_MPP` are
ignored and the user must give the mpp.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.io.base import TIFF_MAGIC, BaseSlideReader, composite_on_white
from ats_wsi.io.errors import (
    CorruptSlideError,
    SlideTooLargeError,
    UnsupportedSlideError,
)
from ats_wsi.io.mpp import PathLikeStr

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_DECODED_PIXELS",
    "MAX_PLAUSIBLE_MPP",
    "MAX_UNPYRAMIDAL_PIXELS",
    "ArrayReader",
    "ImageReader",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""File-name suffixes routed to this backend (plain TIFFs come by content: see backends.py)."""
MAX_DECODED_PIXELS = 2**28
"""Largest image (pixels) decoded whole into memory: 268 M pixels, 805 MB as RGB."""
MAX_UNPYRAMIDAL_PIXELS = 2**32
"""Largest chunked TIFF read without a pyramid (views are computed from level 0)."""
LAZY_CHUNK_PIXELS = 2**22
"""Chunks up to this many pixels are read one by one; bigger ones mean decoding it whole."""
EAGER_PIXELS = 2**24
"""Levels up to this size (48 MB as RGB) are decoded once and kept: cheaper than re-reading."""
MAX_PLAUSIBLE_MPP = 100.0
"""Resolutions coarser than this (um/px) are print/screen DPI, not a microscope scale."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def _to_rgb(block: np.ndarray, path: Path) -> np.ndarray:
    """(h, w[, c]) uint8 -> (h, w, 3) uint8, alpha composited on white."""
    if block.ndim == 2:
        return np.repeat(block[..., None], 3, axis=2)
    channels = block.shape[2]
    if channels == 1:
        return np.repeat(block, 3, axis=2)
    if channels == 2:  # grey + alpha
        grey = np.repeat(block[..., :1], 3, axis=2)
        return composite_on_white(np.concatenate([grey, block[..., 1:2]], axis=2))
    if channels == 3:
        return np.ascontiguousarray(block)
    if channels == 4:
        return composite_on_white(block)
    raise UnsupportedSlideError(path, f"{channels} channels; expected 1 to 4")


def _plausible(mpp: tuple[float, float] | None) -> tuple[float, float] | None:
    if mpp is None or not all(math.isfinite(v) and 0 < v <= MAX_PLAUSIBLE_MPP for v in mpp):
        return None
    return mpp


class ArrayReader(BaseSlideReader):
    """An (h, w[, c]) uint8 array as a one-level slide (tests, overlays, decoded images)."""

    def __init__(
        self,
        image: np.ndarray,
        mpp: float | tuple[float, float] | None = None,
        path: PathLikeStr = "<array>",
        metadata_mpp: tuple[float, float] | None = None,
    ) -> None:
        self.path = Path(path)
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise UnsupportedSlideError(
                self.path, f"expected an (h, w[, c]) uint8 image, got {image.dtype} {image.shape}"
            )
        self._image = _to_rgb(image, self.path)
        height, width = self._image.shape[:2]
        self._level_dimensions = ((int(width), int(height)),)
        self._level_downsamples = (1.0,)
        self._resolve_mpp(metadata_mpp, mpp)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return self._image[y : y + height, x : x + width]


def _tiff_mpp(tif: Any) -> tuple[float, float] | None:
    """Level-0 mpp from OME PhysicalSize, ImageJ 'unit=micron' or the resolution tags."""
    if tif.is_ome and tif.ome_metadata:
        sizes = {}
        for axis in ("X", "Y"):
            m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', tif.ome_metadata)
            unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', tif.ome_metadata)
            scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(
                unit.group(1) if unit else "µm"
            )
            if m and scale:
                sizes[axis] = float(m.group(1)) * scale
        if len(sizes) == 2:
            return _plausible((sizes["X"], sizes["Y"]))
    page = tif.pages[0]
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None

    def ratio(v: Any) -> float:
        num, den = v if isinstance(v, tuple) else (v, 1)
        return float(num) / float(den) if den else 0.0

    xres, yres = ratio(tags["XResolution"].value), ratio(tags["YResolution"].value)
    if xres <= 0 or yres <= 0:
        return None
    unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2
    if unit == 2:  # inch
        um = 25400.0
    elif unit == 3:  # centimetre
        um = 10000.0
    else:
        meta = tif.imagej_metadata or {}
        if str(meta.get("unit", "")).lower() not in ("micron", "um", "µm", "\\u00b5m"):
            return None
        um = 1.0
    return _plausible((um / xres, um / yres))


class ImageReader(BaseSlideReader):
    """Plain TIFF (strips or tiles, a tifffile series and its levels), PNG or JPEG.

    Args:
        path: the image.
        mpp: level-0 microns per pixel (plain images usually have none).
        objective_power: used as mpp = 10 / power when ``mpp`` is not given.
        max_decoded_pixels: limit for images decoded whole (default
            :data:`MAX_DECODED_PIXELS`).
        max_unpyramidal_pixels: limit for chunked TIFFs without a pyramid (default
            :data:`MAX_UNPYRAMIDAL_PIXELS`).

    Raises:
        UnsupportedSlideError: not a TIFF, PNG or JPEG, or not 8-bit.
        CorruptSlideError: the header or the data cannot be decoded.
        SlideTooLargeError: over a limit.
        MissingResolutionError: no plausible resolution in the file and none given.
    """

    def __init__(
        self,
        path: PathLikeStr,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
        *,
        max_decoded_pixels: int | None = None,
        max_unpyramidal_pixels: int | None = None,
    ) -> None:
        # Looked up at call time so that the module limits can be changed for a whole run.
        self._max_decoded = max_decoded_pixels or MAX_DECODED_PIXELS
        self._max_unpyramidal = max_unpyramidal_pixels or MAX_UNPYRAMIDAL_PIXELS
        # zarr-over-tifffile shares one file handle; patch reads come from several threads.
        self._lock = threading.Lock()
        self._tif: Any = None
        self._open_slide(path, mpp, objective_power)

    # -- opening -------------------------------------------------------------------------------
    def _open(self) -> tuple[float, float] | None:
        with open(self.path, "rb") as fh:
            head = fh.read(8)
        if head[:4] in TIFF_MAGIC:
            return self._open_tiff()
        if head.startswith(_PNG_MAGIC) or head.startswith(_JPEG_MAGIC):
            return self._open_pillow()
        raise UnsupportedSlideError(
            self.path, "not a TIFF, PNG or JPEG image (unknown file signature)"
        )

    def _too_large(self, pixels: int, limit: int, what: str) -> SlideTooLargeError:
        return SlideTooLargeError(
            self.path,
            f"{pixels:,} pixels is over the limit of {limit:,} for {what}; convert it to a "
            "pyramid first (e.g. with vips tiffsave --tile --pyramid, or bfconvert)",
            limit,
        )

    def _open_tiff(self) -> tuple[float, float] | None:
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
            levels = list(series.levels)
        except Exception as e:  # tifffile raises TiffFileError, IndexError, struct.error...
            self.close()
            raise CorruptSlideError(
                self.path, f"TIFF header but unreadable, truncated or damaged ({e})"
            ) from e
        try:
            if series.dtype != np.uint8:
                raise UnsupportedSlideError(
                    self.path, f"{series.dtype} pixels; only 8-bit images are read"
                )
            axes = series.axes
            if "Y" not in axes or "X" not in axes:
                raise UnsupportedSlideError(self.path, f"TIFF series axes {axes!r} lack Y and X")
            self._axes = axes
            self._arrays: list[Any] = []
            dims = []
            for i, level in enumerate(levels):
                shape = dict(zip(axes, level.shape, strict=True))
                w, h = int(shape["X"]), int(shape["Y"])
                chunk = level.keyframe.chunks
                chunk_px = int(np.prod(chunk[:2])) if len(chunk) >= 2 else w * h
                lazy = chunk_px <= LAZY_CHUNK_PIXELS and w * h > EAGER_PIXELS
                if i == 0:
                    if len(levels) == 1 and lazy and w * h > self._max_unpyramidal:
                        raise self._too_large(
                            w * h, self._max_unpyramidal, "an image without a pyramid"
                        )
                    if not lazy and w * h > self._max_decoded:
                        raise self._too_large(
                            w * h, self._max_decoded, "a TIFF that must be decoded whole"
                        )
                if lazy:
                    self._arrays.append(zarr.open(level.aszarr(), mode="r"))
                else:
                    self._arrays.append(level.asarray())
                dims.append((w, h))
        except (UnsupportedSlideError, SlideTooLargeError):
            self.close()
            raise
        except Exception as e:
            self.close()
            raise CorruptSlideError(self.path, f"cannot decode the TIFF: {e}") from e
        self._level_dimensions = tuple(dims)
        w0, h0 = dims[0]
        self._level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in dims)
        return _tiff_mpp(self._tif)

    def _open_pillow(self) -> tuple[float, float] | None:
        from PIL import Image

        try:
            with warnings.catch_warnings():
                # Our own limit applies; Pillow's bomb warning would only repeat it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(self.path) as im:
                    w, h = im.size
                    if w * h > self._max_decoded:
                        raise self._too_large(w * h, self._max_decoded, "a PNG or JPEG")
                    dpi = im.info.get("dpi")
                    im.load()
                    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                        image = np.asarray(im.convert("RGBA"))
                    else:
                        image = np.asarray(im.convert("RGB"))
        except Image.DecompressionBombError as e:
            raise self._too_large(0, self._max_decoded, "a PNG or JPEG") from e
        except SlideTooLargeError:
            raise
        except Exception as e:  # truncated data, bad CRC, unidentified image...
            raise CorruptSlideError(
                self.path, f"image header but undecodable, truncated or damaged? ({e})"
            ) from e
        self._axes = "YXS"
        self._arrays = [_to_rgb(image, self.path)]
        self._level_dimensions = ((int(w), int(h)),)
        self._level_downsamples = (1.0,)
        if dpi:
            return _plausible((25400.0 / float(dpi[0]), 25400.0 / float(dpi[1])))
        return None

    # -- reading -------------------------------------------------------------------------------
    @property
    def lazy(self) -> bool:
        """True when level 0 is read chunk by chunk rather than held decoded in memory."""
        return not isinstance(self._arrays[0], np.ndarray)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        array = self._arrays[level]
        index: list[int | slice] = []
        for axis in self._axes:
            if axis == "Y":
                index.append(slice(y, y + height))
            elif axis == "X":
                index.append(slice(x, x + width))
            elif axis in "SC" and array.shape[len(index)] <= 4:
                index.append(slice(None))
            else:
                index.append(0)
        try:
            if isinstance(array, np.ndarray):
                block = array[tuple(index)]
            else:
                with self._lock:
                    block = np.asarray(array[tuple(index)])
        except Exception as e:  # an undecodable chunk
            raise CorruptSlideError(
                self.path, f"reading level {level} at ({x}, {y}) size ({width}, {height}): {e}"
            ) from e
        kept = [a for a, i in zip(self._axes, index, strict=False) if isinstance(i, slice)]
        if kept and kept[0] in "SC":  # planar (c, y, x) -> (y, x, c)
            block = np.moveaxis(block, 0, -1)
        return _to_rgb(block, self.path)

    def close(self) -> None:
        """Close the TIFF file handle (decoded images are simply dropped)."""
        if self._tif is not None:
            self._tif.close()
            self._tif = None
