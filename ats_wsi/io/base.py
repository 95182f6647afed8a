"""The reader contract and what every backend shares.

Conventions shared by every reader:

* **baseline** coordinates are level-0 pixels, given as (x, y) / (width, height) like OpenSlide;
* resolutions are **microns per pixel** (mpp), level 0's as an (x, y) pair;
* pixels come back as ``(H, W, 3) uint8`` RGB, transparent pixels composited on white and
  pixels outside the slide white;
* ``read_region`` reads a native level, ``read_box`` / ``read_rect`` / ``thumbnail`` read the
  best level at or finer than the request and resample the rest (PIL Lanczos), identically for
  every backend.

A backend subclasses :class:`BaseSlideReader`: it implements :meth:`BaseSlideReader._open`
(open the file, set the levels, return the metadata mpp) and
:meth:`BaseSlideReader._read_level`, and calls :meth:`BaseSlideReader._open_slide`, which holds
the opening sequence every backend shares (existence check, error mapping, mpp resolution).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import numpy as np
from PIL import Image

from ats_wsi.io.errors import (
    CorruptSlideError,
    MissingResolutionError,
    SlideError,
    SlideNotFoundError,
    SlideTooSmallError,
    UnsupportedSlideError,
)
from ats_wsi.io.mpp import PathLikeStr, resolve_mpp

__all__ = [
    "LEVEL_TOLERANCE",
    "THUMBNAIL_BLOCK",
    "TIFF_MAGIC",
    "BaseSlideReader",
    "Closing",
    "SlideReader",
    "composite_on_white",
    "existing_path",
    "is_tiff",
    "unreadable_error",
]

# A pyramid level is accepted for a requested downsample when it is at most this much larger
# (relative): Aperio levels are 4.0002x, 16.007x... and should still serve a 4x / 16x request.
LEVEL_TOLERANCE = 5e-3
# Output blocks of this many pixels per side bound the memory of a thumbnail read.
THUMBNAIL_BLOCK = 2048
# Lanczos (PIL's former ANTIALIAS) has a support of 3 source pixels per output pixel.
_LANCZOS_SUPPORT = 3


@runtime_checkable
class SlideReader(Protocol):
    """What the rest of the project needs from a slide.

    Attributes:
        path: the slide file or directory.
        dimensions: level-0 (width, height) in baseline pixels.
        level_dimensions: (width, height) of every pyramid level, level 0 first.
        level_downsamples: baseline pixels per level pixel, level 0 first (1.0).
        mpp: level-0 microns per pixel, (x, y).
    """

    path: Path

    @property
    def dimensions(self) -> tuple[int, int]: ...

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]: ...

    @property
    def level_downsamples(self) -> tuple[float, ...]: ...

    @property
    def mpp(self) -> tuple[float, float]: ...

    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """(w, h) level pixels whose top-left is at baseline ``location`` -> (h, w, 3) uint8."""
        ...

    def read_box(
        self,
        location: tuple[float, float],
        box_size: tuple[float, float],
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """Baseline box (x, y, w, h) resampled to ``out_size`` (w, h) -> (h, w, 3) uint8."""
        ...

    def read_rect(
        self, location: tuple[float, float], size: tuple[int, int], mpp: float
    ) -> np.ndarray:
        """(w, h) pixels at ``mpp`` from baseline ``location`` -> (h, w, 3) uint8."""
        ...

    def level_for_mpp(self, mpp: float) -> int:
        """Finest level whose resolution is not finer than needed for ``mpp``."""
        ...

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` -> (h, w, 3) uint8."""
        ...

    def close(self) -> None: ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) straight-alpha uint8 -> (h, w, 3) uint8 over a white background."""
    rgb = rgba[..., :3].astype(np.uint16)
    alpha = rgba[..., 3:4].astype(np.uint16)
    # Integer blend with rounding; 255*255 fits in uint16 with room for the +127.
    out = (rgb * alpha + 255 * (255 - alpha) + 127) // 255
    return out.astype(np.uint8)


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
"""First four bytes of a TIFF or BigTIFF, either byte order."""


def _head(path: Path, n: int = 4) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_tiff(path: PathLikeStr) -> bool:
    """Whether the file starts with a TIFF (or BigTIFF) signature."""
    return _head(Path(path)) in TIFF_MAGIC


def unreadable_error(path: Path, problem: str) -> UnsupportedSlideError | CorruptSlideError:
    """The error for a file a backend could not open.

    A TIFF that tifffile cannot parse either is damaged (nearly all slide formats are TIFF
    based); one it parses is a plain TIFF for the ``image`` backend; anything else is not a
    slide format.
    """
    if is_tiff(path):
        try:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                tif.series[0].shape  # noqa: B018 - parses the first IFD chain
        except Exception as e:
            return CorruptSlideError(
                path, f"TIFF header but unreadable, truncated or damaged ({problem}; {e})"
            )
        return UnsupportedSlideError(
            path, f"a plain TIFF this backend does not read ({problem}); use backend='image'"
        )
    return UnsupportedSlideError(
        path,
        f"not a slide format: {problem}; readable are OpenSlide formats (SVS, NDPI, MRXS, "
        "tiled TIFF, ...), OME-Zarr, and plain TIFF / PNG / JPEG images",
    )


def existing_path(path: PathLikeStr) -> Path:
    """``path`` as a Path; raises :class:`SlideNotFoundError` when nothing is there."""
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(p, "no such file or directory")
    return p


class Closing:
    """Context-manager mixin: ``with obj: ...`` calls ``obj.close()`` on exit."""

    def close(self) -> None:  # noqa: B027 - optional hook, overridden where a handle exists
        """Release held resources."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BaseSlideReader(Closing, ABC):
    """Resampling, level choice, thumbnails and white fill on top of one primitive.

    Subclasses set ``path``, ``_level_dimensions``, ``_level_downsamples`` and ``_mpp`` and
    implement :meth:`_read_level`, which only ever sees rectangles inside the level. A reader
    of files does that by calling :meth:`_open_slide` from its constructor and implementing
    :meth:`_open`; other readers (an in-memory array) set ``path`` and the levels themselves
    and call :meth:`_resolve_mpp`.
    """

    path: Path
    _level_dimensions: tuple[tuple[int, int], ...]
    _level_downsamples: tuple[float, ...]
    _mpp: tuple[float, float]
    # "metadata" or "override" from _resolve_mpp; open_slide sets the finer MppSpec sources.
    mpp_source: str = "metadata"

    # -- opening -------------------------------------------------------------------------------
    def _open_slide(
        self,
        path: PathLikeStr,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
    ) -> None:
        """The opening sequence of every file-backed reader.

        Sets ``path`` (raising :class:`SlideNotFoundError` when nothing is there), runs the
        backend's :meth:`_open`, then resolves level-0 mpp from the user's values and the
        metadata it returned (closing the reader if that fails).
        """
        self.path = existing_path(path)
        metadata_mpp = self._open()
        self._resolve_mpp(metadata_mpp, mpp, objective_power)

    def _open(self) -> tuple[float, float] | None:
        """Open ``self.path``: set the levels and return the metadata's level-0 mpp, if any.

        Raise the named errors of :mod:`ats_wsi.io.errors` (see :meth:`_backend_errors`).
        """
        raise NotImplementedError(f"{type(self).__name__} does not open files")

    @contextmanager
    def _backend_errors(
        self,
        backend: str,
        unsupported: tuple[type[BaseException], ...] = (),
        corrupt: tuple[type[BaseException], ...] = (),
    ) -> Iterator[None]:
        """Map a backend's exceptions while it opens ``self.path`` to the named errors.

        ``unsupported`` ones (the backend does not know the format) go through
        :func:`unreadable_error`; ``corrupt`` ones (it knows it but fails) become
        :class:`CorruptSlideError`. Named errors pass unchanged.
        """
        try:
            yield
        except SlideError:
            raise
        except unsupported as e:
            raise unreadable_error(self.path, f"{backend} cannot read it ({e})") from e
        except corrupt as e:
            raise CorruptSlideError(self.path, f"{backend} failed to open it: {e}") from e

    def _resolve_mpp(
        self,
        metadata_mpp: tuple[float, float] | None,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
    ) -> None:
        """Set ``_mpp`` (:func:`~ats_wsi.io.mpp.resolve_mpp`) and ``mpp_source``.

        On failure the reader is closed; a missing resolution gets :meth:`_missing_mpp_hint`.
        """
        try:
            self._mpp = resolve_mpp(self.path, metadata_mpp, mpp, objective_power)
        except MissingResolutionError as e:
            try:
                hint = self._missing_mpp_hint()
            finally:
                self.close()
            if hint:
                raise MissingResolutionError(self.path, f"{e.problem} ({hint})") from None
            raise
        except BaseException:
            self.close()
            raise
        given = mpp is not None or objective_power is not None
        self.mpp_source = "override" if given else "metadata"

    def _missing_mpp_hint(self) -> str | None:
        """Extra advice for a slide without mpp (e.g. what its objective power suggests)."""
        return None

    # -- metadata ------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in baseline pixels."""
        return self._level_dimensions[0]

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) per level, level 0 first."""
        return self._level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Baseline pixels per level pixel, level 0 first."""
        return self._level_downsamples

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self._level_dimensions)

    @property
    def mpp(self) -> tuple[float, float]:
        """Level-0 microns per pixel (x, y)."""
        return self._mpp

    # -- the primitive -------------------------------------------------------------------------
    @abstractmethod
    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Level pixels [y, y+height) x [x, x+width), all inside the level -> (h, w, 3) uint8."""

    def _read_level_padded(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Like :meth:`_read_level` but the rectangle may leave the level; outside is white."""
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        level_w, level_h = self._level_dimensions[level]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, level_w), min(y + height, level_h)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._read_level(
                level, x0, y0, x1 - x0, y1 - y0
            )
        return out

    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} outside [0, {self.level_count})")

    # -- public reads --------------------------------------------------------------------------
    def read_region(
        self, location: tuple[int, int], level: int, size: tuple[int, int]
    ) -> np.ndarray:
        """``size`` (w, h) pixels of ``level`` starting at baseline ``location`` (x, y).

        The location is snapped to the nearest level pixel (exact for integer downsamples) so
        that every backend returns the same pixels; OpenSlide itself would interpolate between
        level pixels for a non-multiple location.
        """
        self._check_level(level)
        width, height = int(size[0]), int(size[1])
        if width <= 0 or height <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}")
        ds = self._level_downsamples[level]
        x = math.floor(location[0] / ds + 0.5)
        y = math.floor(location[1] / ds + 0.5)
        return self._read_level_padded(level, x, y, width, height)

    def level_for_downsample(self, downsample: float) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (0 if none)."""
        best = 0
        for level, ds in enumerate(self._level_downsamples):
            if ds <= downsample * (1 + LEVEL_TOLERANCE) and ds >= self._level_downsamples[best]:
                best = level
        return best

    def level_for_mpp(self, mpp: float) -> int:
        """Coarsest level at least as fine as ``mpp`` (level 0 when ``mpp`` is finer than it)."""
        if mpp <= 0:
            raise ValueError(f"{self.path}: mpp must be positive, got {mpp}")
        return self.level_for_downsample(mpp / max(self._mpp))

    def read_box(
        self,
        location: tuple[float, float],
        box_size: tuple[float, float],
        out_size: tuple[int, int],
    ) -> np.ndarray:
        """Baseline box at ``location`` (x, y) of ``box_size`` (w, h), resampled to ``out_size``.

        Reads the coarsest level that is still at least as fine as the output, then resamples
        the remainder with Lanczos (antialiased when shrinking). When the box falls exactly on
        that level's pixels no resampling happens, so patches are bit-exact copies.
        """
        out_w, out_h = int(out_size[0]), int(out_size[1])
        box_w, box_h = float(box_size[0]), float(box_size[1])
        if out_w <= 0 or out_h <= 0 or box_w <= 0 or box_h <= 0:
            raise ValueError(f"{self.path}: box {box_size} and output {out_size} must be positive")
        level = self.level_for_downsample(min(box_w / out_w, box_h / out_h))
        ds = self._level_downsamples[level]
        fx0, fy0 = location[0] / ds, location[1] / ds
        fw, fh = box_w / ds, box_h / ds
        ix0, iy0 = round(fx0), round(fy0)
        if (
            abs(fx0 - ix0) < 1e-6
            and abs(fy0 - iy0) < 1e-6
            and abs(fw - out_w) < 1e-6
            and abs(fh - out_h) < 1e-6
        ):
            return self._read_level_padded(level, ix0, iy0, out_w, out_h)
        # Read a margin around the box so the filter sees real neighbours (outside the slide:
        # white), which makes block-wise reads seamless.
        margin = _LANCZOS_SUPPORT * max(1, math.ceil(max(fw / out_w, fh / out_h))) + 1
        x0, y0 = math.floor(fx0) - margin, math.floor(fy0) - margin
        x1, y1 = math.ceil(fx0 + fw) + margin, math.ceil(fy0 + fh) + margin
        region = self._read_level_padded(level, x0, y0, x1 - x0, y1 - y0)
        image = Image.fromarray(region).resize(
            (out_w, out_h),
            Image.Resampling.LANCZOS,
            box=(fx0 - x0, fy0 - y0, fx0 - x0 + fw, fy0 - y0 + fh),
        )
        return np.asarray(image)

    def read_rect(
        self, location: tuple[float, float], size: tuple[int, int], mpp: float
    ) -> np.ndarray:
        """``size`` (w, h) pixels at ``mpp`` microns per pixel from baseline ``location``."""
        if mpp <= 0:
            raise ValueError(f"{self.path}: mpp must be positive, got {mpp}")
        box = (size[0] * mpp / self._mpp[0], size[1] * mpp / self._mpp[1])
        return self.read_box(location, box, size)

    def thumbnail_size(self, mpp: float) -> tuple[int, int]:
        """(w, h) of the whole-slide view at ``mpp``."""
        if mpp <= 0:
            raise ValueError(f"{self.path}: mpp must be positive, got {mpp}")
        width, height = self.dimensions
        return (round(width * self._mpp[0] / mpp), round(height * self._mpp[1] / mpp))

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp`` (each axis rounded to whole pixels), read block by block.

        Raises:
            SlideTooSmallError: the view would have no pixels.
        """
        out_w, out_h = self.thumbnail_size(mpp)
        if out_w < 1 or out_h < 1:
            raise SlideTooSmallError(
                self.path, f"{self.dimensions} pixels at {self._mpp} um/px is empty at {mpp} um/px"
            )
        width, height = self.dimensions
        # Exact per-axis scale so the blocks tile the whole slide (the rounding of the output
        # size makes it differ slightly from mpp / mpp0).
        sx, sy = width / out_w, height / out_h
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for by in range(0, out_h, THUMBNAIL_BLOCK):
            bh = min(THUMBNAIL_BLOCK, out_h - by)
            for bx in range(0, out_w, THUMBNAIL_BLOCK):
                bw = min(THUMBNAIL_BLOCK, out_w - bx)
                out[by : by + bh, bx : bx + bw] = self.read_box(
                    (bx * sx, by * sy), (bw * sx, bh * sy), (bw, bh)
                )
        return out

    # -- lifetime ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, "
            f"levels={self.level_count}, mpp={self._mpp})"
        )
