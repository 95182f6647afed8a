"""Whole-slide I/O: readers with explicit units, tissue masks, a slide patch source, prefetch.

Importing this package registers the built-in slide backends (:mod:`ats_wsi.io.backends`). It
does not import tiatoolbox (only ``ats_wsi.io.tiatoolbox_reader`` does, when a tiatoolbox-backed
reader is opened), nor openslide, zarr or dask until they are used.
"""

from ats_wsi.io import backends  # noqa: F401 - registers the built-in backends
from ats_wsi.io.base import SlideReader
from ats_wsi.io.convert import write_ome_zarr
from ats_wsi.io.errors import (
    CorruptSlideError,
    MissingResolutionError,
    NoTissueError,
    SlideError,
    SlideNotFoundError,
    SlideTooLargeError,
    SlideTooSmallError,
    UnsupportedSlideError,
)
from ats_wsi.io.images import ArrayReader, ImageReader
from ats_wsi.io.mpp import MppSpec
from ats_wsi.io.openslide_reader import OpenSlideReader
from ats_wsi.io.prefetch import LowResItem, LowResLoader, Prefetcher
from ats_wsi.io.registry import (
    BACKENDS,
    backend_for,
    open_slide,
    register_backend,
    slide_suffixes,
    unregister_backend,
)
from ats_wsi.io.slide_source import SlidePatchSource, low_res_view
from ats_wsi.io.synthetic import mirrored_mosaic, write_pyramidal_tiff
from ats_wsi.io.tissue import load_mask, mask_to_grid, tissue_mask
from ats_wsi.io.zarr_reader import ZarrReader

__all__ = [
    "BACKENDS",
    "ArrayReader",
    "ImageReader",
    "MppSpec",
    "CorruptSlideError",
    "LowResItem",
    "LowResLoader",
    "MissingResolutionError",
    "NoTissueError",
    "OpenSlideReader",
    "Prefetcher",
    "SlideError",
    "SlideNotFoundError",
    "SlidePatchSource",
    "SlideReader",
    "SlideTooLargeError",
    "SlideTooSmallError",
    "UnsupportedSlideError",
    "ZarrReader",
    "backend_for",
    "load_mask",
    "low_res_view",
    "mask_to_grid",
    "mirrored_mosaic",
    "open_slide",
    "register_backend",
    "slide_suffixes",
    "tissue_mask",
    "unregister_backend",
    "write_ome_zarr",
    "write_pyramidal_tiff",
]
