"""The real H&E images the realistic cohort is quilted from ("sources"), and where they are.

Normal tissue comes from the skin of ``CMU-1-Small-Region.svs`` (its glass left out) and the
stroma Kather tile; tumour from the TCGA carcinoma, tiatoolbox's ``target_image.png``
(resampled x0.5 to about 0.5 um/px by nuclear size) and the epithelium Kather tile.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from os import PathLike
from pathlib import Path

import numpy as np

__all__ = ["NORMAL_SOURCES", "TUMOUR_SOURCES", "Source", "default_source_dir", "load_sources"]

NORMAL_SOURCES = ("cmu_skin", "kather_stroma")
TUMOUR_SOURCES = ("tcga_carcinoma", "tia_carcinoma", "kather_epithelium")


def default_source_dir() -> Path:
    """``$ATS_WSI_SLIDE_DATA``, else ``<repo>/../shared/data/slides``."""
    env = os.environ.get("ATS_WSI_SLIDE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "slides"


@dataclass(frozen=True)
class Source:
    """A real H&E image at ~0.5 um/px and the crop centres allowed in it."""

    name: str
    image: np.ndarray  # (h, w, 3) uint8
    stamp: int  # stamp side in pixels
    valid: np.ndarray  # (k, 2) allowed crop centres (y, x)


def _read_rgb(path: Path) -> np.ndarray:
    import tifffile
    from PIL import Image

    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        arr = tifffile.imread(path, key=0)
    else:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(arr[..., :3])


def _tiatoolbox_target() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (importing tiatoolbox is slow).
    spec = importlib.util.find_spec("tiatoolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tiatoolbox is not installed; its data/target_image.png is needed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "target_image.png"


def _valid_centres(tissue: np.ndarray, half: int, min_fraction: float) -> np.ndarray:
    """Centres of ``2 half`` squares holding at least ``min_fraction`` tissue."""
    import cv2

    frac = cv2.boxFilter(tissue.astype(np.float32), -1, (2 * half + 1, 2 * half + 1))
    ok = frac >= min_fraction
    ok[:half] = ok[-half:] = False
    ok[:, :half] = ok[:, -half:] = False
    centres = np.argwhere(ok)
    if not len(centres):
        raise ValueError("no crop of the source is tissue enough")
    return centres[:: max(1, len(centres) // 20000)]


@lru_cache(maxsize=2)
def _load_sources_cached(source_dir: str) -> dict[str, Source]:
    import cv2

    d = Path(source_dir)
    out: dict[str, Source] = {}

    def add(name: str, image: np.ndarray, stamp: int, min_fraction: float) -> None:
        # Glass is bright and unsaturated; tissue is not (a fixed threshold suffices here).
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        tissue = (hsv[..., 1] > 25) & (hsv[..., 2] < 240)
        # Centres where a crop rotated by any angle (side stamp * sqrt 2) stays inside.
        half = min(int(math.ceil(stamp / math.sqrt(2))) + 1, min(image.shape[:2]) // 2 - 1)
        step = max(1, min(image.shape[:2]) // 500)
        small = tissue[::step, ::step]
        centres = _valid_centres(small, max(1, half // step), min_fraction) * step
        out[name] = Source(name, image, stamp, centres)

    cmu = _read_rgb(d / "CMU-1-Small-Region.svs")
    add("cmu_skin", cmu, 320, 0.8)
    add("kather_stroma", _read_rgb(d / "kather-tile-1.tif"), 150, 0.0)
    add("tcga_carcinoma", _read_rgb(d / "TCGA-HE-7130-01Z-00-DX1-thumbnail.png"), 320, 0.0)
    target = _read_rgb(_tiatoolbox_target())
    # Nuclei in the target image are about twice their size in the 0.5 um/px images.
    target = cv2.resize(target, (target.shape[1] // 2, target.shape[0] // 2), cv2.INTER_AREA)
    add("tia_carcinoma", target, 240, 0.7)
    add("kather_epithelium", _read_rgb(d / "kather-tile-2.tif"), 150, 0.0)
    return out


def load_sources(source_dir: str | PathLike[str] | None = None) -> dict[str, Source]:
    """The real images the cohort is quilted from, keyed by source name (cached per process)."""
    d = Path(source_dir) if source_dir is not None else default_source_dir()
    if not d.is_dir():
        raise FileNotFoundError(f"slide sources not found: {d} (set ATS_WSI_SLIDE_DATA)")
    return _load_sources_cached(str(d.resolve()))
