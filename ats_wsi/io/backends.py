"""The built-in slide backends join the registry here, one line each.

``import ats_wsi.io`` imports this module. Adding a format: write its reader module (a
:class:`~ats_wsi.io.base.BaseSlideReader` subclass) and add its registration line below; see
docs/slides.md.
"""

from __future__ import annotations

from typing import Any

from ats_wsi.io.base import SlideReader
from ats_wsi.io.images import IMAGE_SUFFIXES, ImageReader
from ats_wsi.io.mpp import PathLikeStr
from ats_wsi.io.openslide_reader import OPENSLIDE_SUFFIXES, OpenSlideReader, is_plain_tiff
from ats_wsi.io.registry import register_backend
from ats_wsi.io.zarr_reader import ZARR_SUFFIXES, ZarrReader, is_zarr_store

__all__: list[str] = []


def _open_tiatoolbox(path: PathLikeStr, **kwargs: Any) -> SlideReader:
    # Imported on use: the adapter is the only module that touches tiatoolbox, a large
    # dependency tree that `import ats_wsi.io` must not pull in.
    from ats_wsi.io.tiatoolbox_reader import TiatoolboxReader

    return TiatoolboxReader(path, **kwargs)


register_backend("openslide", OpenSlideReader, OPENSLIDE_SUFFIXES)  # the default backend
register_backend("zarr", ZarrReader, ZARR_SUFFIXES, detect=is_zarr_store)
register_backend("image", ImageReader, IMAGE_SUFFIXES, detect=is_plain_tiff)
register_backend("tiatoolbox", _open_tiatoolbox)  # only when asked for by name
