"""TRIDENT and CLAM patch files (HDF5), read and written without importing either tool.

Both tools keep one h5 per slide with a ``coords`` dataset of (N, 2) level-0 top-left (x, y)
patch corners, created as TRIDENT's ``save_h5`` / CLAM's ``save_hdf5`` do (chunks of one row,
unlimited first axis) with the patching parameters as attributes of ``coords``:

* TRIDENT (``<job_dir>/<mag>x_<size>px_<overlap>px_overlap/patches/<name>_patches.h5``):
  ``patch_size`` (pixels at the target magnification), ``patch_size_level0``,
  ``level0_magnification``, ``target_magnification``, ``overlap``, ``name``, ``savetodir``.
  Its feature files (``features_<encoder>/<name>.h5``) add a ``features`` (N, D) dataset with
  ``name``, ``savetodir`` (and ``encoder``) attributes, and copy the coords attributes.
* CLAM (``patches/<slide_id>.h5``): ``patch_size`` (pixels at ``patch_level``),
  ``patch_level``, ``downsample`` (that level's (x, y) downsample), ``downsampled_level_dim``,
  ``level_dim``, ``name``, ``save_path``. Its feature files (``h5_files/<slide_id>.h5``) hold
  ``features`` and ``coords`` without attributes.

:func:`read_patch_coords` reads either, :func:`read_features_h5` a feature file (for
exhaustive baselines), :func:`tiles_to_view_mask` turns tiles into a tissue mask on the
attention view (their segmentation instead of ours), and :func:`write_patch_h5` writes the
patches ATS sampled, with their features and attention, in either layout.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "FeatureBag",
    "PatchCoords",
    "PatchFileError",
    "find_patch_h5",
    "read_features_h5",
    "read_patch_coords",
    "tiles_to_view_mask",
    "write_patch_h5",
]

Layout = Literal["trident", "clam"]


class PatchFileError(ValueError):
    """An h5 that is not a TRIDENT / CLAM patch file, or lacks what is needed; names the file."""


@dataclass(frozen=True)
class PatchCoords:
    """Patches of one slide: level-0 top-left ``coords_xy`` (N, 2) and their level-0 side.

    ``layout`` is ``trident`` or ``clam`` (from the attributes), ``attrs`` the raw attributes.
    """

    coords_xy: np.ndarray
    patch_size_level0: float
    layout: str
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureBag:
    """A feature file: ``coords_xy`` (N, 2), ``features`` (N, D), the attributes of both."""

    coords_xy: np.ndarray
    features: np.ndarray
    attrs: dict[str, Any]
    patch_size_level0: float | None


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim else value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _level0_size(attrs: Mapping[str, Any], path: Path) -> tuple[float | None, str]:
    """(level-0 patch side, layout) from TRIDENT or CLAM attributes."""
    if "patch_size_level0" in attrs:
        return float(attrs["patch_size_level0"]), "trident"
    if "patch_size" in attrs and ("patch_level" in attrs or "downsample" in attrs):
        down = np.atleast_1d(np.asarray(attrs.get("downsample", 1.0), dtype=np.float64))
        if down.size and not np.allclose(down, down[0], rtol=1e-3):
            raise PatchFileError(f"{path}: anisotropic downsample {down.tolist()} is not supported")
        return float(attrs["patch_size"]) * float(down[0] if down.size else 1.0), "clam"
    return None, ""


def _coords(f: Any, path: Path) -> np.ndarray:
    if "coords" not in f:
        raise PatchFileError(f"{path}: no 'coords' dataset (found: {', '.join(f.keys())})")
    coords = np.asarray(f["coords"][:])
    coords = coords.reshape(-1, 2) if coords.size else np.zeros((0, 2), np.int64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise PatchFileError(f"{path}: 'coords' must be (N, 2), got {coords.shape}")
    return coords.astype(np.int64)


def read_patch_coords(
    path: str | os.PathLike[str], patch_size_level0: float | None = None
) -> PatchCoords:
    """The patches of a TRIDENT or CLAM coords (or feature) h5.

    ``patch_size_level0`` is needed only for files whose attributes do not give it (CLAM
    feature files); it overrides the attributes otherwise.
    """
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            coords = _coords(f, p)
            attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
    except OSError as e:
        raise PatchFileError(f"{p}: not a readable HDF5 file ({e})") from e
    size, layout = _level0_size(attrs, p)
    if patch_size_level0 is not None:
        size = float(patch_size_level0)
    if size is None or size <= 0:
        raise PatchFileError(
            f"{p}: 'coords' attributes give no patch size (patch_size_level0, or patch_size with "
            "patch_level / downsample); pass patch_size_level0"
        )
    return PatchCoords(coords, size, layout or "unknown", attrs)


def read_features_h5(
    path: str | os.PathLike[str], patch_size_level0: float | None = None
) -> FeatureBag:
    """A TRIDENT or CLAM feature file: coords, features and the attributes of both datasets
    (features' first, then coords'), for baselines that look at every patch."""
    import h5py

    p = Path(path)
    try:
        with h5py.File(p, "r") as f:
            if "features" not in f:
                raise PatchFileError(f"{p}: no 'features' dataset (found: {', '.join(f.keys())})")
            features = np.asarray(f["features"][:])
            coords = _coords(f, p)
            attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
            attrs.update({k: _plain(v) for k, v in f["coords"].attrs.items()})
    except OSError as e:
        raise PatchFileError(f"{p}: not a readable HDF5 file ({e})") from e
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]  # some CLAM forks keep a batch axis
    if features.ndim != 2 or len(features) != len(coords):
        raise PatchFileError(
            f"{p}: 'features' {features.shape} does not match 'coords' {coords.shape}"
        )
    size, _ = _level0_size(attrs, p)
    return FeatureBag(coords, features, attrs, patch_size_level0 or size)


def find_patch_h5(folder: str | os.PathLike[str], slide_id: str) -> Path | None:
    """``<slide_id>.h5`` (CLAM) or ``<slide_id>_patches.h5`` (TRIDENT) in ``folder`` or its
    ``patches/`` subfolder."""
    base = Path(folder)
    for sub in (base, base / "patches"):
        for name in (f"{slide_id}.h5", f"{slide_id}_patches.h5"):
            if (sub / name).is_file():
                return sub / name
    return None


def tiles_to_view_mask(
    coords_xy: np.ndarray,
    patch_size_level0: float,
    view_shape: tuple[int, int],
    dimensions: tuple[int, int],
) -> np.ndarray:
    """Boolean (h, w) mask of the view pixels whose centre lies in a tile.

    The view covers the whole slide (``dimensions`` level-0 (width, height)); tiles are
    level-0 squares of ``patch_size_level0`` at ``coords_xy``. Drawn with a 2-D difference
    array, so the cost is one pass over the view whatever the number of tiles.
    """
    h, w = int(view_shape[0]), int(view_shape[1])
    sx, sy = w / dimensions[0], h / dimensions[1]
    xy = np.asarray(coords_xy, dtype=np.float64).reshape(-1, 2)
    # Pixel j's centre (j + 0.5) / s is in [x, x + size) for j in [ceil(x s - 0.5), ...).
    x0 = np.clip(np.ceil(xy[:, 0] * sx - 0.5), 0, w).astype(np.int64)
    x1 = np.clip(np.ceil((xy[:, 0] + patch_size_level0) * sx - 0.5), 0, w).astype(np.int64)
    y0 = np.clip(np.ceil(xy[:, 1] * sy - 0.5), 0, h).astype(np.int64)
    y1 = np.clip(np.ceil((xy[:, 1] + patch_size_level0) * sy - 0.5), 0, h).astype(np.int64)
    keep = (x1 > x0) & (y1 > y0)
    diff = np.zeros((h + 1, w + 1), np.int64)
    np.add.at(diff, (y0[keep], x0[keep]), 1)
    np.add.at(diff, (y0[keep], x1[keep]), -1)
    np.add.at(diff, (y1[keep], x0[keep]), -1)
    np.add.at(diff, (y1[keep], x1[keep]), 1)
    return diff.cumsum(0).cumsum(1)[:h, :w] > 0


def write_patch_h5(
    path: str | os.PathLike[str],
    coords_xy: np.ndarray,
    *,
    patch_size: int,
    patch_size_level0: int,
    level0_mpp: float,
    patch_mpp: float,
    name: str,
    dimensions: tuple[int, int],
    features: np.ndarray | None = None,
    attention: np.ndarray | None = None,
    layout: Layout = "trident",
    extra_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """The sampled patches of one slide as a TRIDENT (default) or CLAM patch/feature h5.

    ``coords`` (N, 2) int64 level-0 top-left (x, y) in draw order, ``features`` (N, D)
    float32 and ``attention`` (N,) float32 (each patch's attention probability; neither tool
    reads it, both ignore it). Magnifications are written as 10 / mpp (10x ~ 1 um/px) next to
    the mpp themselves. CLAM's layout describes the patches as read at level 0
    (``patch_level`` 0, ``patch_size`` = the level-0 side), which CLAM's readers then resize.
    """
    import h5py

    if layout not in ("trident", "clam"):
        raise ValueError(f"layout must be 'trident' or 'clam', got {layout!r}")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    coords = np.asarray(coords_xy, dtype=np.int64).reshape(-1, 2)
    if layout == "trident":
        coords_attrs: dict[str, Any] = {
            "patch_size": int(patch_size),
            "patch_size_level0": int(patch_size_level0),
            "level0_magnification": 10.0 / level0_mpp,
            "target_magnification": 10.0 / patch_mpp,
            "overlap": 0,
            "name": name,
            "savetodir": str(p.parent),
        }
    else:
        coords_attrs = {
            "patch_size": int(patch_size_level0),
            "patch_level": 0,
            "downsample": np.array([1.0, 1.0]),
            "downsampled_level_dim": np.array(dimensions, dtype=np.int64),
            "level_dim": np.array(dimensions, dtype=np.int64),
            "name": name,
            "save_path": str(p.parent),
        }
    coords_attrs.update(level0_mpp=float(level0_mpp), target_mpp=float(patch_mpp))
    coords_attrs.update(dict(extra_attrs or {}))
    assets: dict[str, tuple[np.ndarray, dict[str, Any]]] = {"coords": (coords, coords_attrs)}
    if features is not None:
        feats = np.asarray(features, dtype=np.float32).reshape(len(coords), -1)
        assets["features"] = (feats, {"name": name, "savetodir": str(p.parent)})
    if attention is not None:
        att = np.asarray(attention, dtype=np.float32).reshape(len(coords))
        assets["attention"] = (att, {"description": "attention probability of each patch"})
    tmp = p.with_name(f".{p.name}.tmp")
    with h5py.File(tmp, "w") as f:
        for key, (data, attrs) in assets.items():
            # As TRIDENT's save_h5 / CLAM's save_hdf5: one-row chunks, appendable first axis.
            dset = f.create_dataset(
                key,
                shape=data.shape,
                maxshape=(None, *data.shape[1:]),
                chunks=(1, *data.shape[1:]),
                dtype=data.dtype,
            )
            if len(data):
                dset[:] = data
            for k, v in attrs.items():
                dset.attrs[k] = v
    os.replace(tmp, p)
    return p
