"""The OME-Zarr backend: NGFF 0.4 (zarr v2) and 0.5 (zarr v3) multiscale images.

zarr is imported on use, so ``import ats_wsi.io`` does not load it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.io.base import BaseSlideReader, composite_on_white
from ats_wsi.io.errors import CorruptSlideError, UnsupportedSlideError
from ats_wsi.io.mpp import PathLikeStr

__all__ = ["ZARR_SUFFIXES", "ZarrReader", "is_zarr_store"]

ZARR_SUFFIXES = (".zarr", ".ome.zarr")
"""File-name suffixes of OME-Zarr stores."""


def is_zarr_store(path: PathLikeStr) -> bool:
    """Whether ``path`` is a directory holding zarr v3 or v2 metadata (whatever its name)."""
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in ("zarr.json", ".zattrs", ".zgroup"))


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
        self._open_slide(path, mpp, objective_power)

    def _open(self) -> tuple[float, float] | None:
        import zarr

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
        return meta

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
