"""Plain images as slides (strip / tiled TIFF, PNG, JPEG) and how a slide's mpp is chosen."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

import ats_wsi.io.images as images
from ats_wsi.io import (
    CorruptSlideError,
    ImageReader,
    MissingResolutionError,
    MppSpec,
    SlideTooLargeError,
    UnsupportedSlideError,
    open_slide,
)
from ats_wsi.io.images import ArrayReader
from ats_wsi.io.readers import backend_for


@pytest.fixture(scope="module")
def tissue(tcga_image: np.ndarray) -> np.ndarray:
    """901 x 1493 RGB of real tissue (the issue's plain TIFF size), mirrored from the PNG."""
    reps = np.concatenate([tcga_image, tcga_image[:, ::-1]], axis=1)
    return np.ascontiguousarray(reps[:901, :1493])


def test_issue_tiff_uncompressed_without_resolution(tissue: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    tifffile.imwrite(path, tissue, photometric="rgb")  # one strip, no resolution tags
    assert backend_for(path) == "image"
    with pytest.raises(MissingResolutionError, match=r"plain.tif.*--mpp"):
        open_slide(path)
    with open_slide(path, mpp=MppSpec(default=0.5)) as r:
        assert isinstance(r, ImageReader) and r.mpp_source == "cli"
        assert r.dimensions == (1493, 901) and r.level_count == 1
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (1493, 901)), tissue)
        # Views are built on the fly from level 0, like any reader's resampling.
        with ArrayReader(tissue, mpp=0.5) as ref:
            np.testing.assert_array_equal(r.thumbnail(4.0), ref.thumbnail(4.0))
        assert r.thumbnail(4.0).shape == (113, 187, 3)


@pytest.mark.parametrize(
    ("layout", "lazy"),
    [
        ({"rowsperstrip": 8}, True),
        ({"tile": (128, 128), "compression": "zlib"}, True),
        ({"tile": (128, 128), "compression": "jpeg"}, True),
        ({"photometric": "rgb", "planarconfig": "separate", "rowsperstrip": 16}, True),
        ({}, False),
    ],
)
def test_tiff_layouts_read_lazily_where_chunked(
    tissue: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, layout: dict, lazy: bool
) -> None:
    # Small images are decoded once; lower the bar so that this one is read chunk by chunk.
    monkeypatch.setattr(images, "EAGER_PIXELS", 1000)
    monkeypatch.setattr(images, "LAZY_CHUNK_PIXELS", 200_000)
    path = tmp_path / "img.tif"
    data = tissue.transpose(2, 0, 1).copy() if layout.get("planarconfig") else tissue
    tifffile.imwrite(path, data, **{"photometric": "rgb", **layout})
    # OpenSlide reads tiled TIFFs (lazily, tile by tile); the image backend reads them too.
    assert backend_for(path) == ("openslide" if "tile" in layout else "image")
    with open_slide(path, backend="image", mpp=0.5) as r:
        assert r.lazy is lazy
        region = r.read_region((700, 300), 0, (300, 200))
        if layout.get("compression") == "jpeg":
            assert np.abs(region.astype(int) - tissue[300:500, 700:1000]).mean() < 8
        else:
            np.testing.assert_array_equal(region, tissue[300:500, 700:1000])
        # Patches are read from several threads at once.
        boxes = [((x, y), (64, 64)) for x in range(0, 1400, 200) for y in range(0, 800, 200)]
        results: dict[int, np.ndarray] = {}

        def read(i: int) -> None:
            results[i] = r.read_region(*boxes[i][:1], 0, boxes[i][1])

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(boxes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, (loc, _) in enumerate(boxes):
            np.testing.assert_array_equal(results[i], r.read_region(loc, 0, (64, 64)))


def test_real_plain_images(slides_dir: Path, tcga_image: np.ndarray, tmp_path: Path) -> None:
    png = slides_dir / "TCGA-HE-7130-01Z-00-DX1-thumbnail.png"
    with open_slide(png, mpp=MppSpec(default=2.0)) as r:
        assert type(r).__name__ == "ImageReader" and r.mpp == (2.0, 2.0)
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (1000, 1000)), tcga_image)
    kather = slides_dir / "kather-tile-1.tif"
    # 72 dpi is a print resolution (353 um/px), not a microscope's: treated as none.
    assert tifffile.TiffFile(kather).pages[0].tags["XResolution"].value == (72, 1)
    with pytest.raises(MissingResolutionError, match="kather-tile-1.tif"):
        open_slide(kather)
    with open_slide(kather, mpp=0.5) as r, Image.open(kather) as im:
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (224, 224)), np.asarray(im))
    jpeg = tmp_path / "t.jpg"
    Image.fromarray(tcga_image).save(jpeg, quality=95)
    with open_slide(jpeg, mpp=1.0) as r, Image.open(jpeg) as im:
        np.testing.assert_array_equal(
            r.read_region((10, 20), 0, (50, 40)), np.asarray(im)[20:60, 10:60]
        )


def test_resolution_metadata_of_plain_images(tissue: np.ndarray, tmp_path: Path) -> None:
    cm = tmp_path / "cm.tif"
    tifffile.imwrite(
        cm, tissue, photometric="rgb", resolution=(40000, 40000), resolutionunit="CENTIMETER"
    )
    with open_slide(cm) as r:
        assert r.mpp == pytest.approx((0.25, 0.25)) and r.mpp_source == "metadata"
    ij = tmp_path / "ij.tif"
    tifffile.imwrite(
        ij, tissue[..., 0], imagej=True, resolution=(2.0, 2.0), metadata={"unit": "micron"}
    )
    with open_slide(ij) as r:
        assert r.mpp == pytest.approx((0.5, 0.5))
        assert (r.read_region((0, 0), 0, (5, 5)) == tissue[:5, :5, :1]).all()  # grey -> RGB
    png = tmp_path / "dpi.png"
    Image.fromarray(tissue).save(png, dpi=(50800, 50800))  # 0.5 um/px
    with open_slide(png) as r:
        assert r.mpp == pytest.approx((0.5, 0.5), rel=1e-3)


def test_alpha_is_composited_on_white(tissue: np.ndarray, tmp_path: Path) -> None:
    rgba = np.dstack([tissue[:100, :100], np.zeros((100, 100), np.uint8)])
    rgba[:50, :, 3] = 255
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    with open_slide(path, mpp=1.0) as r:
        region = r.read_region((0, 0), 0, (100, 100))
    np.testing.assert_array_equal(region[:50], tissue[:50, :100])
    assert (region[50:] == 255).all()


def test_error_classes_tell_problems_apart(
    tissue: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = tmp_path / "notes.tif"
    text.write_text("not an image at all")
    with pytest.raises(UnsupportedSlideError, match=r"notes.tif: not a slide format"):
        open_slide(text)
    png = tmp_path / "cut.png"
    Image.fromarray(tissue).save(png)
    png.write_bytes(png.read_bytes()[:5000])
    with pytest.raises(CorruptSlideError, match=r"cut.png.*truncated or damaged"):
        open_slide(png, mpp=1.0)
    tif = tmp_path / "cut.tif"
    tifffile.imwrite(tif, tissue, photometric="rgb", tile=(128, 128), compression="zlib")
    tif.write_bytes(tif.read_bytes()[:2000])
    with pytest.raises(CorruptSlideError, match="cut.tif"):
        with open_slide(tif, mpp=1.0) as r:
            r.read_region((0, 0), 0, (1493, 901))
    ok = tmp_path / "big.png"
    Image.fromarray(tissue).save(ok)
    with pytest.raises(SlideTooLargeError, match=r"1,345,193 pixels.*limit of 1,000,000") as err:
        ImageReader(ok, mpp=1.0, max_decoded_pixels=1_000_000)
    assert err.value.limit == 1_000_000
    monkeypatch.setattr(images, "MAX_DECODED_PIXELS", 10_000)
    with pytest.raises(SlideTooLargeError, match="pyramid"):
        open_slide(ok, mpp=1.0)
    sixteen = tmp_path / "u16.tif"
    tifffile.imwrite(sixteen, tissue.astype(np.uint16) * 256, photometric="rgb")
    with pytest.raises(UnsupportedSlideError, match="only 8-bit"):
        open_slide(sixteen, mpp=1.0)


@pytest.fixture(scope="module")
def svs_without_mpp(cmu_svs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CMU SVS with its 'MPP = ' key renamed: an Aperio file without a resolution,
    as some TCGA slides are (AppMag = 20 is still there)."""
    data = cmu_svs.read_bytes()
    assert data.count(b"|MPP = 0.4990|") >= 1
    path = tmp_path_factory.mktemp("nompp") / "TCGA-nompp.svs"
    path.write_bytes(data.replace(b"|MPP = 0.4990|", b"|XPP = 0.4990|"))
    return path


def test_svs_without_mpp_and_where_the_mpp_comes_from(svs_without_mpp: Path, cmu_svs: Path) -> None:
    with pytest.raises(MissingResolutionError, match=r"TCGA-nompp.svs.*objective power 20") as e:
        open_slide(svs_without_mpp)
    assert "--mpp 0.5" in str(e.value)
    cases = [
        (svs_without_mpp, MppSpec(default=0.25), (0.25, "cli")),
        (svs_without_mpp, MppSpec(default=0.25, default_source="manifest"), (0.25, "manifest")),
        (cmu_svs, MppSpec(default=0.25), (0.499, "metadata")),  # metadata wins...
        (cmu_svs, MppSpec(default=0.25, override=True), (0.25, "override")),  # ...unless told
        (cmu_svs, MppSpec(override=True), (0.499, "metadata")),  # nothing to override with
        (cmu_svs, None, (0.499, "metadata")),
        (cmu_svs, 0.3, (0.3, "override")),  # a plain mpp= replaces the metadata, as before
        (svs_without_mpp, MppSpec(allow_missing=True), (1.0, "none")),
    ]
    for path, spec, (mpp, source) in cases:
        with open_slide(path, mpp=spec) as r:
            assert (r.mpp[0], r.mpp_source) == (pytest.approx(mpp), source), (path, spec)
    table = MppSpec(per_slide=((str(svs_without_mpp.resolve()), 0.7),), default=0.25)
    with open_slide(svs_without_mpp, mpp=table) as r:
        assert (r.mpp, r.mpp_source) == ((0.7, 0.7), "manifest")
    with pytest.raises(MissingResolutionError):
        open_slide(svs_without_mpp, mpp=MppSpec(per_slide=(("/elsewhere.svs", 0.7),)))
    with pytest.raises(ValueError, match="positive"):
        MppSpec(default=-1.0)


def test_low_res_loader_takes_a_spec(svs_without_mpp: Path) -> None:
    from ats_wsi.io import LowResLoader

    item = LowResLoader(mpp=16.0, slide_mpp=MppSpec(default=0.5))(svs_without_mpp)
    assert item.mpp == (0.5, 0.5) and item.image.shape[:2] == (93, 69)
