"""Tissue masks on the low-resolution view, user masks, and masks on the attention grid.

:func:`tissue_mask` follows tiatoolbox's ``OtsuTissueMasker`` / ``MorphologicalMasker``
conventions (ITU-R 601 grey, Otsu threshold, tissue = darker than the threshold, removal of
8-connected regions smaller than the kernel's area, dilation by an elliptical kernel of
``32 / mpp`` pixels) with scikit-image / scipy, so this module does not import tiatoolbox.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.io.errors import NoTissueError

__all__ = ["ellipse_kernel", "load_mask", "mask_to_grid", "resize_nearest", "tissue_mask"]


def _grey(image: np.ndarray) -> np.ndarray:
    """uint8 grey with OpenCV's RGB2GRAY weights (what tiatoolbox thresholds)."""
    if image.ndim == 2:
        return image.astype(np.uint8, copy=False)
    out = np.empty(image.shape[:2], np.uint8)
    # In bands of rows: a float copy of a 100k px slide's whole view would be 113 MB.
    for y in range(0, image.shape[0], 256):
        rgb = image[y : y + 256, :, :3].astype(np.float32)
        grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        out[y : y + 256] = np.clip(np.rint(grey), 0, 255)
    return out


def ellipse_kernel(size_xy: tuple[int, int]) -> np.ndarray:
    """Boolean elliptical structuring element of (width, height), as OpenCV's MORPH_ELLIPSE."""
    width, height = int(size_xy[0]), int(size_xy[1])
    kernel = np.zeros((height, width), dtype=bool)
    r, c = height // 2, width // 2
    if r == 0 or c == 0:
        # OpenCV degenerates to a full rectangle when one side is a single pixel.
        kernel[:] = True
        return kernel
    inv_r2 = 1.0 / (r * r)
    for i in range(height):
        dy = i - r
        if abs(dy) <= r:
            dx = int(round(c * np.sqrt((r * r - dy * dy) * inv_r2)))
            kernel[i, max(c - dx, 0) : min(c + dx + 1, width)] = True
    return kernel


def tissue_mask(
    image: np.ndarray,
    mpp: float | None = None,
    *,
    kernel_size: int | tuple[int, int] | None = None,
    min_region_size: int | None = None,
    min_contrast: float = 15.0,
    slide: str | PathLike[str] | None = None,
    raise_if_empty: bool = True,
) -> np.ndarray:
    """Boolean (h, w) tissue mask of a low-resolution RGB view.

    Args:
        image: (h, w, 3) uint8 RGB (or (h, w) grey).
        mpp: microns per pixel of ``image``; sets the kernel to ``max(32 / mpp, 1)`` pixels as
            tiatoolbox does. Without it (and without ``kernel_size``) no morphology is applied.
        kernel_size: explicit kernel (width, height) in pixels, instead of ``mpp``.
        min_region_size: smallest kept 8-connected region in pixels; default the kernel area.
        min_contrast: grey levels between the mean of the two Otsu classes below which the view
            is taken as blank (Otsu always splits, even pure noise on white glass).
        slide: the slide's path, for the error message.
        raise_if_empty: raise :class:`NoTissueError` instead of returning an empty mask.
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    if mpp is not None and kernel_size is not None:
        raise ValueError("give mpp or kernel_size, not both")
    grey = _grey(np.asarray(image))
    mask = np.zeros(grey.shape, dtype=bool)
    if grey.size and grey.min() != grey.max():
        threshold = threshold_otsu(grey)
        dark = grey < threshold
        if dark.any() and (~dark).any():
            contrast = float(grey[~dark].mean()) - float(grey[dark].mean())
            if contrast >= min_contrast:
                mask = dark
    if mask.any():
        if kernel_size is None:
            kernel_size = max(32.0 / mpp, 1.0) if mpp is not None else 1
        kx, ky = (kernel_size, kernel_size) if np.isscalar(kernel_size) else kernel_size
        kernel = ellipse_kernel((max(1, round(kx)), max(1, round(ky))))
        if min_region_size is None:
            min_region_size = int(kernel.sum())
        labels, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_region_size
        keep[0] = False
        mask = keep[labels]
        if kernel.size > 1:
            # maximum_filter centres the footprint at size // 2, like OpenCV's default anchor.
            mask = ndimage.maximum_filter(mask, footprint=kernel, mode="constant", cval=0)
    if raise_if_empty and not mask.any():
        raise NoTissueError(slide, "no tissue found in the low-resolution view (blank slide?)")
    return mask


def resize_nearest(mask: Any, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D array-like (numpy, memmap, zarr) to ``shape`` (h, w).

    Only the sampled rows and columns are read, so a full-resolution mask on disk is never
    loaded whole.
    """
    src_h, src_w = int(mask.shape[0]), int(mask.shape[1])
    h, w = int(shape[0]), int(shape[1])
    # Centre of each output pixel, mapped to the source pixel that contains it.
    rows = np.minimum(((np.arange(h) + 0.5) * src_h / h).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * src_w / w).astype(np.int64), src_w - 1)
    if hasattr(mask, "get_orthogonal_selection"):  # zarr
        return np.asarray(mask.get_orthogonal_selection((rows, cols)))
    # On a memmap, fancy indexing reads only the pages holding the sampled rows.
    return np.asarray(mask[np.ix_(rows, cols)])


def _zarr_mask(path: Path) -> Any:
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return node
    attrs = node.attrs.asdict()
    multiscales = attrs.get("ome", {}).get("multiscales") or attrs.get("multiscales")
    if not multiscales:
        raise ValueError(f"{path}: zarr group without OME-NGFF multiscales")
    # The coarsest level is enough for an attention grid and cheapest to read.
    return node[multiscales[0]["datasets"][-1]["path"]]


def _squeeze_2d(mask: Any, path: object) -> Any:
    if mask.ndim == 2:
        return mask
    if mask.ndim == 3:
        # (h, w, c) images or (c, h, w) zarr; channel axis is the short one.
        return mask[..., 0] if mask.shape[-1] <= 4 else mask[0]
    if mask.ndim > 3:
        return mask[(0,) * (mask.ndim - 2)]
    raise ValueError(f"{path}: mask must be 2-D, got shape {mask.shape}")


def load_mask(
    path_or_array: str | PathLike[str] | np.ndarray,
    shape: tuple[int, int],
    *,
    slide: str | PathLike[str] | None = None,
    raise_if_empty: bool = True,
) -> np.ndarray:
    """A user mask at any resolution -> boolean (h, w), nearest-resized to ``shape``.

    Accepts an array, an image file (PNG, TIFF, JPEG; non-zero = tissue), a ``.npy`` file
    (memory-mapped) or a zarr array / OME-Zarr group (coarsest level). Resolution is not checked:
    the mask is assumed to cover the whole slide.
    """
    if isinstance(path_or_array, np.ndarray):
        mask, where = path_or_array, slide
    else:
        p = Path(path_or_array)
        where = p
        if not p.exists():
            raise FileNotFoundError(f"{p}: mask file not found")
        if p.suffix.lower() == ".npy":
            mask = np.load(p, mmap_mode="r")
        elif p.is_dir() or p.suffix.lower() == ".zarr":
            mask = _zarr_mask(p)
        else:
            from PIL import Image

            with Image.open(p) as im:
                mask = np.asarray(im.convert("L") if im.mode not in ("1", "L", "I", "F") else im)
    mask = _squeeze_2d(mask, where)
    out = resize_nearest(mask, shape) != 0
    if raise_if_empty and not out.any():
        raise NoTissueError(slide if slide is not None else where, "the user mask is empty")
    return out


def _coverage(n_src: int, n_out: int, offset: float, span: float) -> np.ndarray:
    """(n_out, n_src) fraction of each source pixel inside each output cell along one axis."""
    edges = offset + np.arange(n_out + 1) * (span / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_src)[None, :]
    return np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None)


def mask_to_grid(
    mask: np.ndarray,
    grid_shape: tuple[int, int],
    min_fraction: float = 0.1,
    *,
    receptive_field: int = 0,
    low_size: tuple[int, int] | None = None,
    slide: str | PathLike[str] | None = None,
    raise_if_empty: bool = True,
) -> np.ndarray:
    """Which attention cells hold enough tissue: boolean (a_h, a_w).

    A cell is kept when the area fraction of tissue inside it is at least ``min_fraction`` (and
    not zero). Cells cover the low-resolution view minus ``receptive_field / 2`` low-res pixels
    on each side, as in ATS_SPEC 1.4; ``low_size`` is the view's (h, w) when the mask has another
    size (default: the mask's own).
    """
    mask = np.asarray(mask, dtype=bool)
    mh, mw = mask.shape
    lh, lw = low_size if low_size is not None else (mh, mw)
    gh, gw = int(grid_shape[0]), int(grid_shape[1])
    sy, sx = mh / lh, mw / lw
    ry = _coverage(mh, gh, receptive_field / 2 * sy, (lh - receptive_field) * sy)
    rx = _coverage(mw, gw, receptive_field / 2 * sx, (lw - receptive_field) * sx)
    area = ry.sum(1)[:, None] * rx.sum(1)[None, :]
    # ry @ mask in bands of mask columns: the same dot products as in one piece, without a
    # float64 copy of the whole mask (75 MB for a 100k px slide's view).
    left = np.empty((gh, mw))
    for c in range(0, mw, 512):
        left[:, c : c + 512] = ry @ mask[:, c : c + 512].astype(np.float64)
    fraction = (left @ rx.T) / np.maximum(area, 1e-12)
    grid = (fraction >= min_fraction) & (fraction > 0)
    if raise_if_empty and not grid.any():
        raise NoTissueError(
            slide, f"no attention cell of the {gh}x{gw} grid has {min_fraction:.0%} tissue"
        )
    return grid
