"""Tissue masks on real tissue, user masks, and masks on the attention grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ats_wsi.io import NoTissueError, load_mask, mask_to_grid, open_slide, tissue_mask
from ats_wsi.io.tissue import ellipse_kernel

VIEW_MPP = 8.0


@pytest.fixture(scope="module")
def view_and_truth(pyramid_tiff: Path, pyramid_spec: dict) -> tuple[np.ndarray, np.ndarray]:
    """The pyramid at 8 um/px and the true tissue boxes drawn at that resolution."""
    with open_slide(pyramid_tiff) as r:
        view = r.thumbnail(VIEW_MPP)
        scale = r.mpp[0] / VIEW_MPP
    truth = np.zeros(view.shape[:2], dtype=bool)
    for y0, x0, y1, x1 in pyramid_spec["boxes"]:
        truth[round(y0 * scale) : round(y1 * scale), round(x0 * scale) : round(x1 * scale)] = True
    return view, truth


def test_mask_finds_tissue_not_glass(view_and_truth: tuple[np.ndarray, np.ndarray]) -> None:
    view, truth = view_and_truth
    mask = tissue_mask(view, VIEW_MPP)
    assert mask.shape == view.shape[:2] and mask.dtype == bool
    assert mask[truth].mean() > 0.97
    # Away from the islands (the 4 px dilation kernel aside) the glass stays background.
    from scipy import ndimage

    far = ~ndimage.binary_dilation(truth, iterations=6)
    assert mask[far].mean() < 0.01


def _tiatoolbox_masker() -> type:
    """tiatoolbox's MorphologicalMasker, loaded from its file.

    ``import tiatoolbox.tools.tissuemask`` first imports the whole ``tiatoolbox.tools`` package
    (registration, graphs, ...), which costs ~15 s; the module itself only needs cv2 and skimage.
    """
    import importlib.util

    spec = importlib.util.find_spec("tiatoolbox")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "tools" / "tissuemask.py"
    module_spec = importlib.util.spec_from_file_location("_tiatoolbox_tissuemask", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.MorphologicalMasker


def test_matches_tiatoolbox_morphological_masker(tcga_image: np.ndarray) -> None:
    import cv2

    MorphologicalMasker = _tiatoolbox_masker()  # noqa: N806 - a class

    for size in [(1, 1), (4, 4), (5, 3), (9, 9)]:
        ref = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, size).astype(bool)
        np.testing.assert_array_equal(ellipse_kernel(size), ref)
    for mpp in (4.0, 8.0, 10.0):
        ref = MorphologicalMasker(mpp=mpp).fit_transform([tcga_image])[0]
        np.testing.assert_array_equal(tissue_mask(tcga_image, mpp), ref)


def test_blank_slide_has_no_tissue(blank_tiff: Path) -> None:
    with open_slide(blank_tiff) as r:
        view = r.thumbnail(VIEW_MPP)
    with pytest.raises(NoTissueError, match="blank.tif"):
        tissue_mask(view, VIEW_MPP, slide=blank_tiff)
    assert not tissue_mask(view, VIEW_MPP, raise_if_empty=False).any()
    with pytest.raises(NoTissueError):
        tissue_mask(np.full((50, 60, 3), 255, np.uint8))


def test_load_user_masks(tmp_path: Path, view_and_truth: tuple[np.ndarray, np.ndarray]) -> None:
    import zarr

    _, truth = view_and_truth
    h, w = truth.shape
    # A mask at 4x the view's resolution, in three file formats.
    big = np.kron(truth, np.ones((4, 4), dtype=bool))
    Image.fromarray(big.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    np.save(tmp_path / "mask.npy", big)
    zarr.create_array(tmp_path / "mask.zarr", data=big.astype(np.uint8), chunks=(256, 256))
    for name in ("mask.png", "mask.npy", "mask.zarr"):
        loaded = load_mask(tmp_path / name, (h, w))
        np.testing.assert_array_equal(loaded, truth, err_msg=name)
    # Coarser than the grid: nearest upsampling.
    np.testing.assert_array_equal(
        load_mask(truth[::2, ::2], (h // 2 * 2, w // 2 * 2))[::2, ::2], truth[::2, ::2]
    )
    with pytest.raises(NoTissueError, match="empty.npy"):
        np.save(tmp_path / "empty.npy", np.zeros((10, 10), bool))
        load_mask(tmp_path / "empty.npy", (5, 5))
    with pytest.raises(NoTissueError, match="slide.svs"):
        load_mask(np.zeros((10, 10)), (5, 5), slide="slide.svs")


def test_mask_to_grid() -> None:
    mask = np.zeros((100, 120), dtype=bool)
    mask[:50, :60] = True  # top-left quarter
    grid = mask_to_grid(mask, (4, 4), min_fraction=0.5)
    expected = np.zeros((4, 4), dtype=bool)
    expected[:2, :2] = True
    np.testing.assert_array_equal(grid, expected)
    # Uneven cells use area fractions: thirds of 100 rows, tissue in half the columns, so the
    # fractions are 0.5, 0.25 and 0.
    fractions_kept = mask_to_grid(mask, (3, 1), min_fraction=0.2)
    np.testing.assert_array_equal(fractions_kept[:, 0], [True, True, False])
    assert mask_to_grid(mask, (3, 1), min_fraction=0.3)[:, 0].tolist() == [True, False, False]
    # The receptive field trims the border the attention map does not cover.
    ring = np.zeros((40, 40), dtype=bool)
    ring[:4] = True
    assert not mask_to_grid(ring, (4, 4), 0.01, receptive_field=8, raise_if_empty=False).any()
    assert mask_to_grid(ring, (4, 4), 0.01)[0].all()
    with pytest.raises(NoTissueError, match="s.svs"):
        mask_to_grid(np.zeros((8, 8), bool), (2, 2), slide="s.svs")


def test_banded_grid_and_grey_equal_the_one_piece_formulas() -> None:
    """mask_to_grid (bands of 512 mask columns) and the grey conversion (bands of 256 rows)
    give exactly what the whole-array expressions give, on views wider and taller than a band
    and cells that split pixels."""
    from ats_wsi.io.tissue import _coverage, _grey

    rng = np.random.default_rng(3)
    for mh, mw, gh, gw, rf in [(1300, 1700, 131, 240, 3), (600, 1030, 75, 129, 0)]:
        mask = rng.random((mh, mw)) < 0.3
        ry = _coverage(mh, gh, rf / 2, mh - rf)
        rx = _coverage(mw, gw, rf / 2, mw - rf)
        area = ry.sum(1)[:, None] * rx.sum(1)[None, :]
        fraction = (ry @ mask.astype(np.float64) @ rx.T) / np.maximum(area, 1e-12)
        expected = (fraction >= 0.1) & (fraction > 0)
        got = mask_to_grid(mask, (gh, gw), 0.1, receptive_field=rf)
        assert np.array_equal(got, expected)
        image = rng.integers(0, 256, (mh, mw, 3), dtype=np.uint8)
        rgb = image.astype(np.float32)
        grey = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        assert np.array_equal(_grey(image), np.clip(np.rint(grey), 0, 255).astype(np.uint8))
