"""Fixtures for slide I/O tests: the shared real slides, and pyramids built from their tissue.

The real files are read in place from ``<repo>/../shared/data/slides`` (never copied into the
repository). Larger multi-level slides are generated per session under ``tmp_path_factory`` with
:func:`ats_wsi.io.synthetic.write_pyramidal_tiff`. The builders below are plain functions so that
pipeline tests can reuse them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ats_wsi.io.synthetic import TileFn, mirrored_mosaic, write_pyramidal_tiff

SLIDES_DIR = Path(__file__).parents[2].parent / "shared" / "data" / "slides"
TCGA_PNG = "TCGA-HE-7130-01Z-00-DX1-thumbnail.png"
CMU_SVS = "CMU-1-Small-Region.svs"

# Generated pyramid: (height, width) deliberately non-square to catch x/y swaps.
PYRAMID_SHAPE = (4000, 3840)
PYRAMID_MPP = 0.5
# Tissue islands (y0, x0, y1, x1) in level-0 pixels; the rest is glass.
TISSUE_BOXES = ((600, 500, 2600, 2300), (2900, 2600, 3600, 3400))
GLASS = 242


@pytest.fixture(scope="session")
def pyramid_spec() -> dict[str, object]:
    """Geometry of ``pyramid_tiff``: shape (h, w), mpp, tissue boxes (y0, x0, y1, x1), glass."""
    return {"shape": PYRAMID_SHAPE, "mpp": PYRAMID_MPP, "boxes": TISSUE_BOXES, "glass": GLASS}


@pytest.fixture(scope="session")
def slides_dir() -> Path:
    """The shared real-slide directory; skips the test when it is missing."""
    if not SLIDES_DIR.is_dir():
        pytest.skip(f"shared slide fixtures not found at {SLIDES_DIR}")
    return SLIDES_DIR


@pytest.fixture(scope="session")
def cmu_svs(slides_dir: Path) -> Path:
    """Aperio SVS, 2220 x 2967, one level, 0.499 um/px."""
    return slides_dir / CMU_SVS


@pytest.fixture(scope="session")
def tcga_image(slides_dir: Path) -> np.ndarray:
    """1000 x 1000 RGB H&E image (real tissue everywhere)."""
    with Image.open(slides_dir / TCGA_PNG) as im:
        return np.asarray(im.convert("RGB"))


def glass(y: int, x: int, h: int, w: int, level: int = GLASS, noise: int = 2) -> np.ndarray:
    """Slide background: near-white glass with a little position-seeded noise."""
    rng = np.random.default_rng((y, x))
    values = level + rng.integers(-noise, noise + 1, size=(h, w, 1))
    return np.repeat(values, 3, axis=2).astype(np.uint8)


def tissue_on_glass(
    tissue: TileFn, boxes: tuple[tuple[int, int, int, int], ...] = TISSUE_BOXES
) -> TileFn:
    """A :data:`TileFn` with ``tissue`` inside ``boxes`` (y0, x0, y1, x1) and glass elsewhere."""

    def tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = glass(y, x, h, w)
        for y0, x0, y1, x1 in boxes:
            ya, yb, xa, xb = max(y, y0), min(y + h, y1), max(x, x0), min(x + w, x1)
            if ya < yb and xa < xb:
                out[ya - y : yb - y, xa - x : xb - x] = tissue(ya, xa, yb - ya, xb - xa)
        return out

    return tile


def build_tissue_pyramid(
    path: Path,
    image: np.ndarray,
    shape: tuple[int, int] = PYRAMID_SHAPE,
    mpp: float | None = PYRAMID_MPP,
    **kwargs: object,
) -> Path:
    """Pyramidal TIFF of mirrored ``image`` tissue islands on glass."""
    fn = tissue_on_glass(mirrored_mosaic(image))
    return write_pyramidal_tiff(path, fn, mpp, shape=shape, **kwargs)


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory: pytest.TempPathFactory, tcga_image: np.ndarray) -> Path:
    """4000 x 3840 tiled TIFF, 5 levels (2x), 0.5 um/px, tissue islands of real H&E on glass.

    Uncompressed, so every reader and the zarr copy hold identical pixels at every level.
    """
    path = tmp_path_factory.mktemp("pyramid") / "tissue.tif"
    return build_tissue_pyramid(path, tcga_image, compression=None)


@pytest.fixture(scope="session")
def pyramid_zarr(tmp_path_factory: pytest.TempPathFactory, pyramid_tiff: Path) -> Path:
    """``pyramid_tiff`` converted with ``python -m pipelines.convert_slide`` (NGFF 0.5)."""
    from pipelines.convert_slide import main

    dst = tmp_path_factory.mktemp("zarr") / "tissue.zarr"
    assert main([str(pyramid_tiff), str(dst), "--chunk", "512"]) == 0
    return dst


@pytest.fixture(scope="session")
def pyramid_zarr_v2(tmp_path_factory: pytest.TempPathFactory, pyramid_tiff: Path) -> Path:
    """``pyramid_tiff`` as NGFF 0.4 on zarr v2, 3 levels."""
    from pipelines.convert_slide import main

    dst = tmp_path_factory.mktemp("zarr2") / "tissue.zarr"
    argv = [str(pyramid_tiff), str(dst), "--chunk", "1024", "--levels", "3", "--ngff", "0.4"]
    assert main(argv) == 0
    return dst


@pytest.fixture(scope="session")
def blank_tiff(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1024 x 1024 glass-only slide (no tissue), 0.5 um/px."""
    path = tmp_path_factory.mktemp("blank") / "blank.tif"
    return write_pyramidal_tiff(path, glass, PYRAMID_MPP, shape=(1024, 1024), compression=None)


@pytest.fixture
def make_pyramid(tcga_image: np.ndarray, tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_pyramid(name, shape=..., mpp=..., **write_kwargs) -> Path``."""

    def make(name: str = "slide.tif", **kwargs: object) -> Path:
        return build_tissue_pyramid(tmp_path / name, tcga_image, **kwargs)

    return make
