"""Slide readers: same pixels across backends, resampling, levels, mpp, white fill, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ats_wsi.io.base as base
from ats_wsi.io import (
    CorruptSlideError,
    MissingResolutionError,
    OpenSlideReader,
    SlideNotFoundError,
    SlideReader,
    SlideTooSmallError,
    UnsupportedSlideError,
    ZarrReader,
    open_slide,
    write_ome_zarr,
)
from ats_wsi.io.readers import backend_for

PYRAMID_SHAPE = (4000, 3840)  # matches conftest's pyramid_spec (checked below)
PYRAMID_MPP = 0.5


def _all_readers(*paths_and_backends: tuple[Path, str | None]) -> list[SlideReader]:
    return [open_slide(p, backend=b) for p, b in paths_and_backends]


@pytest.fixture(scope="module")
def pyramid_readers(pyramid_tiff: Path, pyramid_zarr: Path, pyramid_zarr_v2: Path):
    opened = _all_readers(
        (pyramid_tiff, None),
        (pyramid_zarr, None),
        (pyramid_zarr_v2, None),
        (pyramid_tiff, "tiatoolbox"),
    )
    yield opened
    for r in opened:
        r.close()


def test_backend_choice(pyramid_readers: list[SlideReader]) -> None:
    kinds = [type(r).__name__ for r in pyramid_readers]
    assert kinds == ["OpenSlideReader", "ZarrReader", "ZarrReader", "TiatoolboxReader"]
    assert all(isinstance(r, SlideReader) for r in pyramid_readers)
    assert backend_for("a/b.ZARR") == "zarr"
    assert backend_for("a/b.svs") == "openslide"
    assert backend_for("a/b.png") == "image"


def test_metadata_agrees(pyramid_readers: list[SlideReader], pyramid_spec: dict) -> None:
    assert pyramid_spec["shape"] == PYRAMID_SHAPE and pyramid_spec["mpp"] == PYRAMID_MPP
    height, width = PYRAMID_SHAPE
    for r in pyramid_readers:
        assert r.dimensions == (width, height), r
        assert r.mpp == pytest.approx((PYRAMID_MPP, PYRAMID_MPP)), r
        assert r.level_dimensions[:3] == ((3840, 4000), (1920, 2000), (960, 1000)), r
        assert r.level_downsamples[:3] == pytest.approx((1.0, 2.0, 4.0)), r
    assert len(pyramid_readers[0].level_dimensions) == 5  # tiff: down to one 256 tile
    assert len(pyramid_readers[2].level_dimensions) == 3  # --levels 3


@pytest.mark.parametrize("level", [0, 1, 2])
def test_same_pixels_on_generated_pyramid(pyramid_readers: list[SlideReader], level: int) -> None:
    ds = 2**level
    locations = [(0, 0), (1000, 700), (3840 - 150 * ds, 4000 - 90 * ds), (-40 * ds, -30 * ds)]
    for loc in locations:
        ref = pyramid_readers[0].read_region(loc, level, (300, 200))
        assert ref.shape == (200, 300, 3) and ref.dtype == np.uint8
        for r in pyramid_readers[1:]:
            np.testing.assert_array_equal(
                r.read_region(loc, level, (300, 200)), ref, err_msg=repr(r)
            )


def test_same_pixels_on_svs(cmu_svs: Path, tmp_path: Path) -> None:
    with OpenSlideReader(cmu_svs) as o:
        dst = write_ome_zarr(o, tmp_path / "cmu.zarr", chunk=1024, levels=1)
        with open_slide(dst) as z, open_slide(cmu_svs, backend="tiatoolbox") as t:
            assert o.dimensions == z.dimensions == t.dimensions == (2220, 2967)
            assert o.mpp == z.mpp == t.mpp == pytest.approx((0.499, 0.499))
            for loc in [(0, 0), (1500, 2500), (2100, 2900)]:
                ref = o.read_region(loc, 0, (256, 192))
                np.testing.assert_array_equal(z.read_region(loc, 0, (256, 192)), ref)
                np.testing.assert_array_equal(t.read_region(loc, 0, (256, 192)), ref)
            # Resampled reads go through the same code path, so they agree as well.
            np.testing.assert_array_equal(z.thumbnail(8.0), o.thumbnail(8.0))
            np.testing.assert_array_equal(
                t.read_rect((100, 100), (64, 48), 1.7), o.read_rect((100, 100), (64, 48), 1.7)
            )


def test_level_choice(pyramid_readers: list[SlideReader]) -> None:
    r = pyramid_readers[0]
    assert r.level_for_mpp(0.25) == 0
    assert r.level_for_mpp(0.5) == 0
    assert r.level_for_mpp(0.99) == 0
    assert r.level_for_mpp(1.0) == 1
    assert r.level_for_mpp(2.0) == 2
    assert r.level_for_mpp(3.0) == 2
    assert r.level_for_mpp(1000.0) == 4
    # Aperio-style near-integer downsamples still count as the level.
    assert r.level_for_downsample(4.0 / 1.001) == 2


def test_read_rect_exact_level_is_a_copy(pyramid_readers: list[SlideReader]) -> None:
    r = pyramid_readers[0]
    # 2 um/px is level 2 exactly: no resampling, bit-identical to the level's pixels.
    np.testing.assert_array_equal(
        r.read_rect((800, 1200), (120, 80), 2.0), r.read_region((800, 1200), 2, (120, 80))
    )


def test_read_rect_resamples(pyramid_readers: list[SlideReader]) -> None:
    r = pyramid_readers[0]
    x, y = 640, 1000
    out = r.read_rect((x, y), (100, 60), 3.0)  # 6x from level 0, so 1.5x from level 2
    assert out.shape == (60, 100, 3)
    full = r.read_region((x, y), 0, (600, 360))
    ref = np.asarray(Image.fromarray(full).resize((100, 60), Image.Resampling.LANCZOS))
    # Reading level 2 then shrinking 1.5x approximates shrinking level 0 6x.
    assert np.abs(out.astype(int) - ref).mean() < 3.0
    up = r.read_rect((x, y), (80, 40), 0.25)  # finer than level 0: upsampled 2x
    assert up.shape == (40, 80, 3)
    nearest = np.repeat(np.repeat(r.read_region((x, y), 0, (40, 20)), 2, 0), 2, 1)
    assert np.abs(up.astype(int) - nearest).mean() < 12.0
    # Every backend resamples identically.
    for other in pyramid_readers[1:]:
        np.testing.assert_array_equal(other.read_rect((x, y), (100, 60), 3.0), out)


def test_thumbnail_and_blocks(
    pyramid_readers: list[SlideReader], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = pyramid_readers[0]
    thumb = r.thumbnail(4.0)  # 8x: level 3 exactly
    assert thumb.shape == (500, 480, 3)
    np.testing.assert_array_equal(thumb, r.read_region((0, 0), 3, (480, 500)))
    odd = r.thumbnail(3.3)
    assert odd.shape == (round(4000 * 0.5 / 3.3), round(3840 * 0.5 / 3.3), 3)
    monkeypatch.setattr(base, "THUMBNAIL_BLOCK", 64)
    # Block-wise reads are seamless: only fixed-point rounding in PIL's filter differs.
    assert np.abs(r.thumbnail(3.3).astype(int) - odd).max() <= 1


def test_white_outside(pyramid_readers: list[SlideReader]) -> None:
    for r in pyramid_readers:
        assert (r.read_region((-500, -500), 0, (100, 100)) == 255).all()
        assert (r.read_region((5000, 100), 1, (50, 50)) == 255).all()
        part = r.read_region((3840 - 10, 4000 - 20), 0, (30, 40))
        assert (part[20:] == 255).all() and (part[:, 10:] == 255).all()
        assert (part[:20, :10] != 255).any()
        edge = r.read_rect((3840 - 100, 0), (50, 50), 4.0)  # resampled across the edge
        assert (edge[:, 20:] == 255).all()


def test_tissue_is_where_it_was_written(
    pyramid_readers: list[SlideReader], pyramid_spec: dict
) -> None:
    y0, x0, y1, x1 = pyramid_spec["boxes"][0]
    r = pyramid_readers[0]
    inside = r.read_region((x0 + 100, y0 + 100), 0, (64, 64))
    outside = r.read_region((x1 + 200, y0), 0, (64, 64))
    assert inside.mean() < 200 and outside.min() >= 239


def test_mpp_handling(make_pyramid, tmp_path: Path) -> None:
    nores = make_pyramid("nores.tif", shape=(512, 768), mpp=None, compression="jpeg")
    with pytest.raises(MissingResolutionError, match="nores.tif"):
        open_slide(nores)
    with pytest.raises(MissingResolutionError, match="nores.tif"):
        open_slide(nores, backend="tiatoolbox")
    with open_slide(nores, mpp=0.25) as r:
        assert r.mpp == (0.25, 0.25)
    with open_slide(nores, objective_power=40) as r:
        assert r.mpp == pytest.approx((0.25, 0.25))
    with open_slide(nores, mpp=(0.3, 0.4)) as r:
        assert r.mpp == (0.3, 0.4)
    withres = make_pyramid("res.tif", shape=(512, 768), mpp=0.25, compression="jpeg")
    with open_slide(withres) as r:
        assert r.mpp == pytest.approx((0.25, 0.25))
    with open_slide(withres, mpp=1.0) as r:  # what the user passes wins
        assert r.mpp == (1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        open_slide(withres, mpp=-1.0)


def test_plain_image_through_tiatoolbox(slides_dir: Path, tcga_image: np.ndarray) -> None:
    png = slides_dir / "TCGA-HE-7130-01Z-00-DX1-thumbnail.png"
    with pytest.raises(MissingResolutionError, match="thumbnail.png"):
        open_slide(png)
    with open_slide(png, backend="tiatoolbox", mpp=2.0) as r:
        assert type(r).__name__ == "TiatoolboxReader"
        assert r.dimensions == (1000, 1000)
        np.testing.assert_array_equal(
            r.read_region((100, 200), 0, (50, 40)), tcga_image[200:240, 100:150]
        )
        assert (r.read_region((990, 0), 0, (20, 5))[:, 10:] == 255).all()


def test_tiatoolbox_adapter_accepts_a_wsireader(tcga_image: np.ndarray) -> None:
    from tiatoolbox.wsicore.wsireader import VirtualWSIReader

    from ats_wsi.io.tiatoolbox_reader import TiatoolboxReader

    wsi = VirtualWSIReader(tcga_image[:300, :400].copy())
    with TiatoolboxReader(wsi, mpp=0.5) as r:
        assert r.dimensions == (400, 300) and r.mpp == (0.5, 0.5)
        np.testing.assert_array_equal(
            r.read_region((10, 20), 0, (30, 30)), tcga_image[20:50, 10:40]
        )
        assert r.thumbnail(1.0).shape == (150, 200, 3)


def test_zarr_five_dimensional_nanometres(cmu_svs: Path, tmp_path: Path) -> None:
    import zarr

    with OpenSlideReader(cmu_svs) as o:
        region = o.read_region((300, 400), 0, (512, 384))  # (384, 512, 3)
    group = zarr.open_group(tmp_path / "tczyx.zarr", mode="w")
    group.create_array("0", data=region.transpose(2, 0, 1)[None, :, None])
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [
                    {"name": "t", "type": "time"},
                    {"name": "c", "type": "channel"},
                    {"name": "z", "type": "space", "unit": "nanometer"},
                    {"name": "y", "type": "space", "unit": "nanometer"},
                    {"name": "x", "type": "space", "unit": "nanometer"},
                ],
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1, 1, 1, 499, 499]}
                        ],
                    }
                ],
            }
        ],
    }
    with ZarrReader(tmp_path / "tczyx.zarr") as z:
        assert z.dimensions == (512, 384) and z.mpp == pytest.approx((0.499, 0.499))
        np.testing.assert_array_equal(z.read_region((0, 0), 0, (512, 384)), region)


def test_errors_name_the_file(tmp_path: Path, cmu_svs: Path, pyramid_tiff: Path) -> None:
    missing = tmp_path / "nope.svs"
    with pytest.raises(SlideNotFoundError, match="nope.svs") as info:
        open_slide(missing)
    assert isinstance(info.value, FileNotFoundError) and info.value.path == str(missing)

    garbage = tmp_path / "garbage.svs"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(UnsupportedSlideError, match="garbage.svs"):
        open_slide(garbage)

    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(cmu_svs.read_bytes()[:1_000_000])
    for backend in (None, "tiatoolbox"):
        with pytest.raises(CorruptSlideError, match="truncated.svs"):
            open_slide(truncated, backend=backend)

    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(UnsupportedSlideError, match="empty.zarr"):
        open_slide(tmp_path / "empty.zarr")
    with pytest.raises(UnsupportedSlideError, match="unknown backend"):
        open_slide(cmu_svs, backend="nonesuch")


def test_damaged_tiles_raise_corrupt_on_read(make_pyramid, tmp_path: Path) -> None:
    import tifffile

    path = make_pyramid("damaged.tif", shape=(1024, 1024), compression="zlib")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[5], page.databytecounts[5]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = b"\x00" * count
    path.write_bytes(bytes(data))
    with open_slide(path) as r:  # metadata is intact
        r.read_region((0, 0), 0, (64, 64))  # an intact tile reads
        with pytest.raises(CorruptSlideError, match="damaged.tif"):
            r.read_region((256, 256), 0, (64, 64))  # tile 5 of a 4-tile-wide level


def test_too_small(slides_dir: Path) -> None:
    with open_slide(slides_dir / "small.svs", mpp=0.5) as r:
        assert r.dimensions == (16, 16)
        with pytest.raises(SlideTooSmallError, match="small.svs"):
            r.thumbnail(100.0)


def test_import_does_not_pull_tiatoolbox() -> None:
    code = "import sys, ats_wsi, ats_wsi.io; print('tiatoolbox' in sys.modules)"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "False"
