"""Whole-slide readers with explicit units: the names of the reader modules in one place.

The code lives in :mod:`ats_wsi.io.base` (the :class:`SlideReader` contract and
:class:`BaseSlideReader`), :mod:`ats_wsi.io.mpp` (the resolution policy, :class:`MppSpec`),
:mod:`ats_wsi.io.registry` (:func:`open_slide` and the backend registry) and one module per
backend: :mod:`ats_wsi.io.openslide_reader`, :mod:`ats_wsi.io.zarr_reader`,
:mod:`ats_wsi.io.images`, :mod:`ats_wsi.io.tiatoolbox_reader` (the only module that imports
tiatoolbox, on use). This module re-exports them so that ``from ats_wsi.io.readers import ...``
keeps working; module constants (``THUMBNAIL_BLOCK``...) are read where they are defined, so
patch them there.
"""

from __future__ import annotations

from ats_wsi.io.base import (
    LEVEL_TOLERANCE,
    THUMBNAIL_BLOCK,
    BaseSlideReader,
    Closing,
    SlideReader,
    composite_on_white,
    existing_path,
    is_tiff,
    unreadable_error,
)
from ats_wsi.io.mpp import (
    MPP_SOURCES,
    NO_MPP_HELP,
    MppSpec,
    PathLikeStr,
    resolve_mpp,
    slide_key,
)
from ats_wsi.io.openslide_reader import OpenSlideReader
from ats_wsi.io.registry import (
    BACKENDS,
    DEFAULT_BACKEND,
    SUFFIX_BACKENDS,
    SlideFactory,
    backend_for,
    open_slide,
    register_backend,
    slide_suffixes,
    unregister_backend,
)
from ats_wsi.io.zarr_reader import ZarrReader

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "LEVEL_TOLERANCE",
    "MPP_SOURCES",
    "NO_MPP_HELP",
    "SUFFIX_BACKENDS",
    "THUMBNAIL_BLOCK",
    "BaseSlideReader",
    "Closing",
    "MppSpec",
    "OpenSlideReader",
    "PathLikeStr",
    "SlideFactory",
    "SlideReader",
    "ZarrReader",
    "backend_for",
    "composite_on_white",
    "existing_path",
    "is_tiff",
    "open_slide",
    "register_backend",
    "resolve_mpp",
    "slide_key",
    "slide_suffixes",
    "unreadable_error",
    "unregister_backend",
]
