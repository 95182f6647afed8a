"""Whole-slide readers with explicit units.

Conventions shared by every reader:

* **baseline** coordinates are level-0 pixels, given as (x, y) / (width, height) like OpenSlide;
* resolutions are **microns per pixel** (mpp), level 0's as an (x, y) pair;
* pixels come back as ``(H, W, 3) uint8`` RGB, transparent pixels composited on white and
  pixels outside the slide white;
* ``read_region`` reads a native level, ``read_box`` / ``read_rect`` / ``thumbnail`` read the
  best level at or finer than the request and resample the rest (PIL Lanczos), identically for
  every backend.

:func:`open_slide` picks a backend from the path through a registry (:data:`BACKENDS` and
:data:`SUFFIX_BACKENDS`): OpenSlide by default, OME-Zarr for zarr stores, the plain-image reader
(:mod:`ats_wsi.io.images`) for PNG / JPEG and for TIFFs that OpenSlide does not recognise;
``backend="tiatoolbox"`` forces the tiatoolbox adapter, which is the only module that imports
tiatoolbox.

The level-0 resolution comes from the file's metadata unless the caller overrides it; an
:class:`MppSpec` says what to use when the file has none (a manifest column, a command-line
default) and whether the user's value should win anyway. Every reader :func:`open_slide`
returns carries ``mpp_source``: ``metadata``, ``manifest``, ``cli``, ``override`` or ``none``.
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import numpy as np
from PIL import Image

from ats_wsi.io.errors import (
    CorruptSlideError,
    MissingResolutionError,
    SlideNotFoundError,
    SlideTooSmallError,
    UnsupportedSlideError,
)

__all__ = [
    "BACKENDS",
    "SUFFIX_BACKENDS",
    "MPP_SOURCES",
    "NO_MPP_HELP",
    "BaseSlideReader",
    "MppSpec",
    "OpenSlideReader",
    "SlideReader",
    "ZarrReader",
    "composite_on_white",
    "open_slide",
    "register_backend",
    "resolve_mpp",
]

PathLikeStr = str | PathLike[str]

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


MPP_SOURCES = ("metadata", "manifest", "cli", "override", "none")
"""Where a reader's level-0 mpp came from (``none``: pixel units, for conversion only)."""

NO_MPP_HELP = (
    "no microns-per-pixel metadata; give the level-0 resolution with --mpp UM_PER_PX "
    "(command line), an 'mpp' or 'magnification' manifest column, or mpp=... (Python)"
)


def _positive(value: float, what: str, path: object) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{path}: {what} must be positive, got {value!r}")
    return v


def slide_key(path: PathLikeStr) -> str:
    """The key a per-slide table uses for ``path`` (absolute, normalised)."""
    return os.path.abspath(os.fspath(path))


@dataclass(frozen=True)
class MppSpec:
    """How :func:`open_slide` picks a slide's level-0 mpp when its file may lack one.

    The file's metadata wins, unless ``override`` is set and the user gave a value. The user's
    value is the slide's entry in ``per_slide`` (from a manifest), else ``default`` (e.g.
    ``--mpp``, reported as ``default_source``). ``allow_missing`` opens a slide that has
    neither in pixel units (mpp 1, ``mpp_source`` ``none``): conversion needs no microns.

    Attributes:
        default: mpp for slides without metadata or a per-slide value.
        override: the user's value replaces the metadata.
        per_slide: ``(slide_key(path), mpp)`` pairs.
        default_source: what ``mpp_source`` says when ``default`` is used.
        allow_missing: open slides without any mpp in pixel units instead of raising.
    """

    default: float | None = None
    override: bool = False
    per_slide: tuple[tuple[str, float], ...] = ()
    default_source: str = "cli"
    allow_missing: bool = False

    def __post_init__(self) -> None:
        if self.default is not None:
            _positive(self.default, "mpp", "<default>")
        for key, value in self.per_slide:
            _positive(value, "mpp", key)
        if self.default_source not in MPP_SOURCES:
            raise ValueError(f"default_source must be one of {MPP_SOURCES}")

    @cached_property
    def _table(self) -> dict[str, float]:
        return dict(self.per_slide)

    def user_value(self, path: PathLikeStr) -> tuple[float | None, str]:
        """(the user's mpp for ``path`` or None, and where it comes from)."""
        value = self._table.get(slide_key(path))
        if value is not None:
            return float(value), "manifest"
        if self.default is not None:
            return float(self.default), self.default_source
        return None, ""


def resolve_mpp(
    path: PathLikeStr | None,
    metadata_mpp: tuple[float, float] | None,
    mpp: float | tuple[float, float] | None = None,
    objective_power: float | None = None,
) -> tuple[float, float]:
    """Level-0 (x, y) microns per pixel from the user's values or the file's metadata.

    What the user passes wins: ``mpp`` first, then ``objective_power`` (mpp = 10 / power, the
    usual 10x ~ 1 um/px convention), then the file's metadata.

    Raises:
        MissingResolutionError: none of the three is available.
        ValueError: a given value is not a positive finite number.
    """
    if mpp is not None:
        pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
        if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
            raise ValueError(f"{path}: mpp must be positive, got {mpp!r}")
        return (pair[0], pair[1])
    if objective_power is not None:
        if not (math.isfinite(objective_power) and objective_power > 0):
            raise ValueError(f"{path}: objective_power must be positive, got {objective_power!r}")
        value = 10.0 / float(objective_power)
        return (value, value)
    if metadata_mpp is not None and all(math.isfinite(v) and v > 0 for v in metadata_mpp):
        return (float(metadata_mpp[0]), float(metadata_mpp[1]))
    raise MissingResolutionError(path, NO_MPP_HELP)


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
    implement :meth:`_read_level`, which only ever sees rectangles inside the level.
    """

    path: Path
    _level_dimensions: tuple[tuple[int, int], ...]
    _level_downsamples: tuple[float, ...]
    _mpp: tuple[float, float]
    # Set by open_slide; a reader built directly took its mpp from metadata or its caller.
    mpp_source: str = "metadata"

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


_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _head(path: Path, n: int = 4) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def is_tiff(path: PathLikeStr) -> bool:
    """Whether the file starts with a TIFF (or BigTIFF) signature."""
    return _head(Path(path)) in _TIFF_MAGIC


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


def _existing(path: PathLikeStr) -> Path:
    p = Path(path)
    if not p.exists():
        raise SlideNotFoundError(p, "no such file or directory")
    return p


class OpenSlideReader(BaseSlideReader):
    """Any format OpenSlide reads (SVS, NDPI, MRXS, generic tiled TIFF, DICOM, ...)."""

    def __init__(
        self,
        path: PathLikeStr,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
    ) -> None:
        import openslide

        self.path = _existing(path)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError as e:
            raise unreadable_error(self.path, f"OpenSlide cannot read it ({e})") from e
        except (openslide.OpenSlideError, OSError) as e:
            raise CorruptSlideError(self.path, f"OpenSlide failed to open it: {e}") from e
        props = self._slide.properties
        try:
            meta = (
                float(props[openslide.PROPERTY_NAME_MPP_X]),
                float(props[openslide.PROPERTY_NAME_MPP_Y]),
            )
        except (KeyError, ValueError):
            meta = None
        try:
            self._mpp = resolve_mpp(self.path, meta, mpp, objective_power)
        except MissingResolutionError as e:
            power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
            self._slide.close()
            if power:
                # A hint, not a guess: scanners differ, so the user decides.
                raise MissingResolutionError(
                    self.path,
                    f"{e.problem} (the file gives objective power {power}x; at the usual "
                    f"10x ~ 1 um/px that is --mpp {10 / float(power):g})",
                ) from None
            raise
        except BaseException:
            self._slide.close()
            raise
        self._level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide's metadata properties."""
        return dict(self._slide.properties)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        import openslide

        ds = self._level_downsamples[level]
        try:
            rgba = self._slide.read_region((round(x * ds), round(y * ds)), level, (width, height))
        except openslide.OpenSlideError as e:
            raise CorruptSlideError(
                self.path, f"reading level {level} at ({x}, {y}) size ({width}, {height}): {e}"
            ) from e
        return composite_on_white(np.asarray(rgba))

    def close(self) -> None:
        """Close the OpenSlide handle."""
        self._slide.close()


_UNIT_TO_MICRONS = {
    "micrometer": 1.0,
    "micron": 1.0,
    "nanometer": 1e-3,
    "millimeter": 1e3,
    "centimeter": 1e4,
    "meter": 1e6,
}


def _ngff_multiscale(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """First multiscale entry of NGFF 0.5 (under "ome") or 0.4 (top level) attributes."""
    for holder in (attrs.get("ome", {}), attrs):
        multiscales = holder.get("multiscales") if isinstance(holder, dict) else None
        if multiscales:
            return multiscales[0]
    return None


def _scale_of(transforms: Sequence[dict[str, Any]] | None, ndim: int) -> list[float]:
    scale = [1.0] * ndim
    for t in transforms or ():
        if t.get("type") == "scale" and "scale" in t:
            scale = [a * float(b) for a, b in zip(scale, t["scale"], strict=False)]
    return scale


class ZarrReader(BaseSlideReader):
    """OME-Zarr multiscale images: NGFF 0.4 (zarr v2) and 0.5 (zarr v3).

    Arrays may be (c, y, x), (t, c, z, y, x) or any axis order the ``axes`` metadata names;
    t and z take index 0. Level 0's mpp comes from the scale transforms of x and y when their
    unit is a length (micrometer, nanometer, ...).
    """

    def __init__(
        self,
        path: PathLikeStr,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
    ) -> None:
        import zarr

        self.path = _existing(path)
        try:
            group = zarr.open_group(self.path, mode="r")
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise UnsupportedSlideError(self.path, f"not a zarr group: {e}") from e
        except Exception as e:  # zarr raises a variety of errors on damaged metadata
            raise CorruptSlideError(self.path, f"cannot open the zarr group: {e}") from e
        multiscale = _ngff_multiscale(group.attrs.asdict())
        if multiscale is None:
            raise UnsupportedSlideError(self.path, "no OME-NGFF 'multiscales' metadata")
        axes = [a if isinstance(a, dict) else {"name": a} for a in multiscale.get("axes", [])]
        names = [a["name"] for a in axes]
        if "x" not in names or "y" not in names:
            raise UnsupportedSlideError(self.path, f"multiscale axes {names} lack y and x")
        try:
            self._arrays = [group[d["path"]] for d in multiscale["datasets"]]
        except (KeyError, TypeError) as e:
            raise CorruptSlideError(self.path, f"multiscale dataset missing: {e}") from e
        ndim = len(names)
        self._axis = {n: i for i, n in enumerate(names)}
        channels = self._arrays[0].shape[self._axis["c"]] if "c" in self._axis else 1
        if channels not in (1, 3, 4):
            raise UnsupportedSlideError(self.path, f"{channels} channels; expected 1, 3 or 4")
        if self._arrays[0].dtype != np.uint8:
            raise UnsupportedSlideError(
                self.path, f"dtype {self._arrays[0].dtype}; only uint8 RGB(A) is supported"
            )
        self._channels = channels
        global_scale = _scale_of(multiscale.get("coordinateTransformations"), ndim)
        scales = [
            [
                a * b
                for a, b in zip(
                    _scale_of(d.get("coordinateTransformations"), ndim), global_scale, strict=True
                )
            ]
            for d in multiscale["datasets"]
        ]
        ix, iy = self._axis["x"], self._axis["y"]
        self._level_dimensions = tuple((int(a.shape[ix]), int(a.shape[iy])) for a in self._arrays)
        if all(s[ix] > 0 and s[iy] > 0 for s in scales):
            # Physical scales are what NGFF defines; dimension ratios drift with odd sizes.
            self._level_downsamples = tuple(
                ((s[ix] / scales[0][ix]) + (s[iy] / scales[0][iy])) / 2 for s in scales
            )
        else:
            w0, h0 = self._level_dimensions[0]
            self._level_downsamples = tuple(
                (w0 / w + h0 / h) / 2 for w, h in self._level_dimensions
            )
        meta = None
        units = [_UNIT_TO_MICRONS.get(str(axes[i].get("unit", "")).lower()) for i in (ix, iy)]
        if units[0] is not None and units[1] is not None:
            meta = (scales[0][ix] * units[0], scales[0][iy] * units[1])
        self._mpp = resolve_mpp(self.path, meta, mpp, objective_power)

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        array = self._arrays[level]
        index: list[int | slice] = [0] * array.ndim
        index[self._axis["y"]] = slice(y, y + height)
        index[self._axis["x"]] = slice(x, x + width)
        if "c" in self._axis:
            index[self._axis["c"]] = slice(None)
        try:
            block = np.asarray(array[tuple(index)])
        except Exception as e:  # a missing or undecodable chunk
            raise CorruptSlideError(
                self.path, f"reading level {level} at ({x}, {y}) size ({width}, {height}): {e}"
            ) from e
        # Remaining axes are in metadata order; bring them to (y, x, c).
        kept = [n for n in self._axis if n in ("y", "x", "c")]
        order = [kept.index(n) for n in ("y", "x", "c") if n in kept]
        block = block.transpose(order)
        if self._channels == 1:
            return np.repeat(block.reshape(height, width, 1), 3, axis=2)
        if self._channels == 4:
            return composite_on_white(block)
        return np.ascontiguousarray(block)


SlideFactory = Callable[..., SlideReader]


def _open_tiatoolbox(path: PathLikeStr, **kwargs: Any) -> SlideReader:
    # Imported here so that `import ats_wsi.io` never imports tiatoolbox.
    from ats_wsi.io.tiatoolbox_reader import TiatoolboxReader

    return TiatoolboxReader(path, **kwargs)


def _open_image(path: PathLikeStr, **kwargs: Any) -> SlideReader:
    from ats_wsi.io.images import ImageReader

    return ImageReader(path, **kwargs)


BACKENDS: dict[str, SlideFactory] = {
    "openslide": OpenSlideReader,
    "zarr": ZarrReader,
    "image": _open_image,
    "tiatoolbox": _open_tiatoolbox,
}
"""Backend name -> factory ``(path, mpp=None, objective_power=None) -> SlideReader``."""

SUFFIX_BACKENDS: dict[str, str] = {
    ".zarr": "zarr",
    ".png": "image",
    ".jpg": "image",
    ".jpeg": "image",
}
"""Lower-case name suffix -> backend; anything else goes to :data:`DEFAULT_BACKEND`."""

DEFAULT_BACKEND = "openslide"


def register_backend(name: str, factory: SlideFactory, suffixes: Sequence[str] = ()) -> None:
    """Add (or replace) a backend and the file-name suffixes it handles by default."""
    BACKENDS[name] = factory
    for suffix in suffixes:
        SUFFIX_BACKENDS[suffix.lower()] = name


def backend_for(path: PathLikeStr) -> str:
    """Backend name :func:`open_slide` would use for ``path``."""
    p = Path(path)
    name = p.name.lower()
    # Longest suffix first so ".ome.zarr"-style entries beat ".zarr".
    for suffix in sorted(SUFFIX_BACKENDS, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIX_BACKENDS[suffix]
    if p.is_dir() and any((p / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup")):
        return "zarr"
    if DEFAULT_BACKEND == "openslide" and p.is_file() and is_tiff(p):
        import openslide

        # Plain (strip, non-pyramidal, OME) TIFFs are not OpenSlide formats.
        if openslide.OpenSlide.detect_format(p) is None:
            return "image"
    return DEFAULT_BACKEND


def _tagged(reader: SlideReader, source: str) -> SlideReader:
    reader.mpp_source = source  # type: ignore[attr-defined] - every BaseSlideReader has it
    return reader


def open_slide(
    path: PathLikeStr,
    backend: str | None = None,
    mpp: float | tuple[float, float] | MppSpec | None = None,
    objective_power: float | None = None,
) -> SlideReader:
    """Open a slide with the backend registered for its path (or the one named).

    Args:
        path: slide file, or OME-Zarr directory.
        backend: a key of :data:`BACKENDS`; None picks one from the path.
        mpp: level-0 microns per pixel overriding the file's metadata, or an :class:`MppSpec`
            (metadata first, the user's value as fallback or, with ``override``, instead).
        objective_power: used as mpp = 10 / power when ``mpp`` is not given.

    Raises:
        SlideNotFoundError, UnsupportedSlideError, CorruptSlideError, MissingResolutionError,
        SlideTooLargeError.
    """
    p = _existing(path)
    name = backend if backend is not None else backend_for(p)
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UnsupportedSlideError(
            p, f"unknown backend {name!r}; known: {sorted(BACKENDS)}"
        ) from None
    if not isinstance(mpp, MppSpec):
        given = mpp is not None or objective_power is not None
        reader = factory(p, mpp=mpp, objective_power=objective_power)
        return _tagged(reader, "override" if given else "metadata")
    value, source = mpp.user_value(p)
    if value is not None and mpp.override:
        return _tagged(factory(p, mpp=value), "override")
    try:
        return _tagged(factory(p), "metadata")
    except MissingResolutionError:
        # Only slides without metadata pay for this second open.
        if value is not None:
            return _tagged(factory(p, mpp=value), source)
        if mpp.allow_missing:
            return _tagged(factory(p, mpp=1.0), "none")
        raise
