"""SlidePatchSource: same pixels as direct reads, white outside, the GridMapping round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ats_wsi.io import SlidePatchSource, SlideTooSmallError, low_res_view, open_slide
from ats_wsi.patches import PatchSource


@pytest.fixture(scope="module")
def reader(pyramid_tiff: Path):
    with open_slide(pyramid_tiff) as r:
        yield r


def _as_uint8(patches: torch.Tensor) -> np.ndarray:
    """(1, N, 3, p, p) float in [0, 1] -> (N, p, p, 3) uint8."""
    return (patches[0].permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()


def test_extract_equals_direct_reads(reader) -> None:
    corners = torch.tensor([[[0, 0], [1000, 700], [3900, 3800], [-50, 2000]]])
    with SlidePatchSource(reader, patch_size_px=64, patch_mpp=0.5, max_workers=4) as source:
        assert isinstance(source, PatchSource)
        assert source.shape == (4000, 3840) and source.patch_size == 64
        patches = source.extract(corners)
        assert patches.shape == (1, 4, 3, 64, 64) and patches.dtype == torch.float32
        assert 0.0 <= float(patches.min()) and float(patches.max()) <= 1.0
        got = _as_uint8(patches)
        for i, (y, x) in enumerate(corners[0].tolist()):
            np.testing.assert_array_equal(got[i], reader.read_region((x, y), 0, (64, 64)))
        # Out-of-slide parts are white (1.0).
        assert float(patches[0, 2, :, :, 40:].min()) == 1.0
        assert float(patches[0, 3, :, :50, :].min()) == 1.0


def test_extract_coarser_resolution(reader) -> None:
    corners = torch.tensor([[[1200, 800], [2000, 2400]]])
    # 1 um/px is level 1: the 128-pixel level-0 box comes back as level 1's 64 pixels.
    with SlidePatchSource(reader, patch_size_px=64, patch_mpp=1.0) as source:
        assert source.patch_size == 128
        got = _as_uint8(source.extract(corners))
    for i, (y, x) in enumerate(corners[0].tolist()):
        np.testing.assert_array_equal(got[i], reader.read_region((x, y), 1, (64, 64)))
        np.testing.assert_array_equal(got[i], reader.read_rect((x, y), (64, 64), 1.0))
    # A resolution between levels is resampled, and matches read_rect where box sizes agree.
    with SlidePatchSource(reader, patch_size_px=50, patch_mpp=1.5) as source:
        assert source.patch_size == 150
        got = _as_uint8(source.extract(corners))
    np.testing.assert_array_equal(got[1], reader.read_rect((2400, 2000), (50, 50), 1.5))


def test_grid_mapping_round_trip(reader) -> None:
    from ats_wsi.mapping import GridMapping

    view, scale = low_res_view(reader, 8.0)
    assert view.shape == (1, 3, 250, 240) and scale == pytest.approx((16.0, 16.0))
    with SlidePatchSource(reader, patch_size_px=32, patch_mpp=2.0) as source:
        mapping = GridMapping(
            low_size=view.shape[-2:],
            high_size=source.shape,
            attention_size=(25, 24),
            patch_size=source.patch_size,
        )
        indices = torch.tensor([[0, 300, 599]])
        top_left = mapping.top_left(indices)
        patches = source.extract(top_left)
        assert patches.shape == (1, 3, 3, 32, 32)
        # Each patch shows the region its cell covers: compare to the view's cell, averaged.
        for k, cell in enumerate(indices[0].tolist()):
            cy, cx = divmod(cell, 24)
            cell_view = view[0, :, cy * 10 : cy * 10 + 10, cx * 10 : cx * 10 + 10]
            centre = patches[0, k, :, 8:24, 8:24]
            assert abs(float(cell_view.mean()) - float(centre.mean())) < 0.1


def test_errors(reader, slides_dir: Path) -> None:
    with SlidePatchSource(reader, 16, 0.5) as source:
        with pytest.raises(ValueError, match="batch must be 1"):
            source.extract(torch.zeros((2, 3, 2), dtype=torch.long))
    with open_slide(slides_dir / "small.svs", mpp=0.25) as small:
        with pytest.raises(SlideTooSmallError, match="small.svs"):
            SlidePatchSource(small, patch_size_px=224, patch_mpp=0.5)
        with pytest.raises(SlideTooSmallError, match="small.svs"):
            low_res_view(small, 64.0)
