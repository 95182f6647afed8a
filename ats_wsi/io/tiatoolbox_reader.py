"""Adapter from a tiatoolbox ``WSIReader`` to :class:`ats_wsi.io.base.SlideReader`.

This is the only module of the package that imports tiatoolbox, and only inside the
constructor: tiatoolbox pulls in a large dependency tree that plain OpenSlide / zarr users should
not pay for at ``import ats_wsi.io``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.io.base import BaseSlideReader
from ats_wsi.io.errors import CorruptSlideError
from ats_wsi.io.mpp import PathLikeStr

__all__ = ["TiatoolboxReader"]


def _open_wsi(path: Path) -> Any:
    """``WSIReader.open``, except that multi-page generic tiled TIFFs go to OpenSlide.

    tiatoolbox 2.1's TIFFWSIReader only takes single-page generic TIFFs and falls back to a
    VirtualWSIReader, which decodes the whole of level 0 into memory; OpenSlide reads those
    pyramids tile by tile.
    """
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader, WSIReader

    if path.suffix.lower() in (".tif", ".tiff"):
        import openslide
        import tifffile

        if openslide.OpenSlide.detect_format(path) == "generic-tiff":
            with tifffile.TiffFile(path) as tif:
                plain_pyramid = not (tif.is_ome or tif.is_svs) and len(tif.pages) > 1
            if plain_pyramid:
                return OpenSlideWSIReader(path)
    return WSIReader.open(path)


def _openslide_info_without_mpp(wsi: Any) -> Any:
    """Metadata for an OpenSlide-backed reader whose tiatoolbox ``info`` failed, else None.

    tiatoolbox 2.1 raises on TIFFs whose ResolutionUnit is "none" (it converts the resolution
    tags without checking the unit); such slides simply have no mpp.
    """
    handle = getattr(wsi, "openslide_wsi", None)
    if handle is None:
        return None
    from tiatoolbox.wsicore.wsimeta import WSIMeta

    power = handle.properties.get("openslide.objective-power")
    meta = WSIMeta(
        file_path=wsi.input_path,
        axes="YXS",
        slide_dimensions=handle.dimensions,
        level_dimensions=handle.level_dimensions,
        level_downsamples=handle.level_downsamples,
        objective_power=float(power) if power else None,
        vendor=handle.properties.get("openslide.vendor"),
        mpp=None,
        raw=dict(handle.properties),
    )
    wsi.info = meta
    return meta


class TiatoolboxReader(BaseSlideReader):
    """Any slide tiatoolbox opens (its OpenSlide, TIFF, JP2, DICOM, NGFF, virtual readers).

    Native levels are read through ``WSIReader.read_rect(..., units="level")`` (no resampling
    there); resampling to other resolutions is done by :class:`BaseSlideReader`, so results
    match the other backends pixel for pixel.

    Args:
        source: a path, or an already open tiatoolbox ``WSIReader`` (e.g. a ``VirtualWSIReader``
            over an in-memory array).
        mpp: level-0 microns per pixel, overriding metadata (plain images have none).
        objective_power: used as mpp = 10 / power when ``mpp`` is not given.
    """

    def __init__(
        self,
        source: PathLikeStr | Any,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
    ) -> None:
        from tiatoolbox.wsicore.wsireader import WSIReader

        if isinstance(source, WSIReader):
            self._wsi = source
            self._owns = False
            self.path = (
                Path(source.input_path) if source.input_path is not None else Path("<array>")
            )
            self._resolve_mpp(self._read_info(), mpp, objective_power)
        else:
            self._owns = True
            self._open_slide(source, mpp, objective_power)

    def _open(self) -> tuple[float, float] | None:
        import openslide
        from tiatoolbox.utils.exceptions import FileNotSupportedError

        with self._backend_errors(
            "tiatoolbox",
            unsupported=(FileNotSupportedError, openslide.OpenSlideUnsupportedFormatError),
            corrupt=(Exception,),  # tiatoolbox surfaces decoder failures as many types
        ):
            self._wsi = _open_wsi(self.path)
        return self._read_info()

    def _read_info(self) -> tuple[float, float] | None:
        """Set the levels from the reader's metadata; return its level-0 mpp, if any."""
        try:
            info = self._wsi.info
        except Exception as e:
            info = _openslide_info_without_mpp(self._wsi)
            if info is None:
                raise CorruptSlideError(
                    self.path, f"tiatoolbox cannot read the metadata: {e}"
                ) from e
        self._level_dimensions = tuple((int(w), int(h)) for w, h in info.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in info.level_downsamples)
        if info.mpp is None:
            return None
        return (float(info.mpp[0]), float(info.mpp[1]))

    @property
    def wsi(self) -> Any:
        """The wrapped tiatoolbox ``WSIReader``."""
        return self._wsi

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        ds = self._level_downsamples[level]
        try:
            region = self._wsi.read_rect(
                (round(x * ds), round(y * ds)),
                (width, height),
                resolution=level,
                units="level",
                pad_mode="constant",
                pad_constant_values=255,
            )
        except Exception as e:
            raise CorruptSlideError(
                self.path, f"reading level {level} at ({x}, {y}) size ({width}, {height}): {e}"
            ) from e
        region = np.asarray(region)
        if region.ndim == 2:
            region = np.repeat(region[..., None], 3, axis=2)
        if region.dtype != np.uint8:
            region = np.clip(region, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(region[..., :3])

    def close(self) -> None:
        """Close the underlying reader if this adapter opened it (not one passed in)."""
        if not self._owns:
            return
        handle = getattr(self._wsi, "openslide_wsi", None)
        if handle is not None:
            handle.close()
