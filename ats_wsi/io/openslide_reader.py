"""The OpenSlide backend: SVS, NDPI, MRXS, generic tiled TIFF, DICOM, ... (the default).

openslide is imported on use, so ``import ats_wsi.io`` does not load it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ats_wsi.io.base import BaseSlideReader, composite_on_white, is_tiff
from ats_wsi.io.errors import CorruptSlideError
from ats_wsi.io.mpp import PathLikeStr

__all__ = ["OPENSLIDE_SUFFIXES", "OpenSlideReader", "is_plain_tiff"]

OPENSLIDE_SUFFIXES = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".dcm",
    ".ome.tif",
    ".ome.tiff",
)
"""File-name suffixes of the slides OpenSlide reads (TIFFs it does not read go to ``image``)."""


def is_plain_tiff(path: PathLikeStr) -> bool:
    """Whether ``path`` is a TIFF file that OpenSlide does not recognise (strip, OME, ...)."""
    p = Path(path)
    if not (p.is_file() and is_tiff(p)):
        return False
    import openslide

    return openslide.OpenSlide.detect_format(p) is None


class OpenSlideReader(BaseSlideReader):
    """Any format OpenSlide reads (SVS, NDPI, MRXS, generic tiled TIFF, DICOM, ...)."""

    def __init__(
        self,
        path: PathLikeStr,
        mpp: float | tuple[float, float] | None = None,
        objective_power: float | None = None,
    ) -> None:
        self._open_slide(path, mpp, objective_power)

    def _open(self) -> tuple[float, float] | None:
        import openslide

        with self._backend_errors(
            "OpenSlide",
            unsupported=(openslide.OpenSlideUnsupportedFormatError,),
            corrupt=(openslide.OpenSlideError, OSError),
        ):
            self._slide = openslide.OpenSlide(self.path)
        self._level_dimensions = tuple((int(w), int(h)) for w, h in self._slide.level_dimensions)
        self._level_downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        props = self._slide.properties
        try:
            return (
                float(props[openslide.PROPERTY_NAME_MPP_X]),
                float(props[openslide.PROPERTY_NAME_MPP_Y]),
            )
        except (KeyError, ValueError):
            return None

    def _missing_mpp_hint(self) -> str | None:
        import openslide

        power = self._slide.properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        if not power:
            return None
        # A hint, not a guess: scanners differ, so the user decides.
        return (
            f"the file gives objective power {power}x; at the usual "
            f"10x ~ 1 um/px that is --mpp {10 / float(power):g}"
        )

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
