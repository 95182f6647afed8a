"""TRIDENT / CLAM h5 in and out, on files written the way those tools write them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
from slide_helpers import shared_slides, untrained_checkpoint

from ats_wsi.slides.inference import PredictOptions, predict_record
from ats_wsi.slides.interop import (
    PatchFileError,
    find_patch_h5,
    read_features_h5,
    read_patch_coords,
    tiles_to_view_mask,
    write_patch_h5,
)


def save_like_the_tools(path: Path, assets: dict, attributes: dict | None = None) -> None:
    """TRIDENT's ``trident.IO.save_h5`` / CLAM's ``wsi_utils.save_hdf5`` (mode 'w'): one
    dataset per asset, one-row chunks, unlimited first axis, attributes on the dataset."""
    with h5py.File(path, "w") as file:
        for key, val in assets.items():
            dset = file.create_dataset(
                key,
                shape=val.shape,
                maxshape=(None,) + val.shape[1:],
                chunks=(1,) + val.shape[1:],
                dtype=val.dtype,
            )
            dset[:] = val
            for attr_key, attr_val in (attributes or {}).get(key, {}).items():
                if isinstance(attr_val, dict):
                    attr_val = json.dumps(attr_val)  # as TRIDENT serialises dicts
                elif attr_val is None:
                    attr_val = "None"
                dset.attrs[attr_key] = attr_val


def trident_coords(folder: Path, name: str, coords: np.ndarray, size: int = 256) -> Path:
    """``WSI.extract_tissue_coords`` output: 256 px at 20x from a 40x slide."""
    (folder / "patches").mkdir(parents=True, exist_ok=True)
    path = folder / "patches" / f"{name}_patches.h5"
    attrs = {
        "patch_size": size,
        "patch_size_level0": size * 40 // 20,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": name,
        "savetodir": str(folder),
    }
    save_like_the_tools(path, {"coords": coords}, {"coords": attrs})
    return path


def clam_coords(folder: Path, name: str, coords: np.ndarray) -> Path:
    """``WholeSlideImage.process_contour`` output: 256 px patches at level 1 (downsample 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.h5"
    attrs = {
        "patch_size": 256,
        "patch_level": 1,
        "downsample": (2.0, 2.0),
        "downsampled_level_dim": (5000, 4000),
        "level_dim": (5000, 4000),
        "name": name,
        "save_path": str(folder),
    }
    save_like_the_tools(path, {"coords": coords}, {"coords": attrs})
    return path


COORDS = np.array([[0, 0], [512, 0], [1024, 512]], dtype=np.int64)


def test_read_trident_and_clam_coords(tmp_path: Path) -> None:
    t = read_patch_coords(trident_coords(tmp_path / "t", "s1", COORDS))
    assert t.layout == "trident" and t.patch_size_level0 == 512
    np.testing.assert_array_equal(t.coords_xy, COORDS)
    assert t.attrs["target_magnification"] == 20 and t.attrs["name"] == "s1"
    c = read_patch_coords(clam_coords(tmp_path / "c", "s1", COORDS))
    assert c.layout == "clam" and c.patch_size_level0 == 512  # 256 px at downsample 2
    assert find_patch_h5(tmp_path / "t", "s1") == tmp_path / "t" / "patches" / "s1_patches.h5"
    assert find_patch_h5(tmp_path / "c", "s1") == tmp_path / "c" / "s1.h5"
    assert find_patch_h5(tmp_path, "nope") is None
    bad = tmp_path / "bad.h5"
    save_like_the_tools(bad, {"coords": COORDS})
    with pytest.raises(PatchFileError, match=r"bad.h5.*patch_size_level0"):
        read_patch_coords(bad)
    assert read_patch_coords(bad, patch_size_level0=100).patch_size_level0 == 100
    (tmp_path / "junk.h5").write_bytes(b"junk")
    with pytest.raises(PatchFileError, match="junk.h5"):
        read_patch_coords(tmp_path / "junk.h5")


def test_read_feature_files(tmp_path: Path) -> None:
    feats = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    # TRIDENT: WSI.extract_patch_features copies the coords attributes.
    path = tmp_path / "trident.h5"
    save_like_the_tools(
        path,
        {"features": feats, "coords": COORDS},
        {
            "features": {"name": "s1", "savetodir": str(tmp_path), "encoder": "uni_v1"},
            "coords": {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 40,
                "target_magnification": 20,
                "overlap": 0,
                "name": "s1",
            },
        },
    )
    bag = read_features_h5(path)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords_xy, COORDS)
    assert bag.attrs["encoder"] == "uni_v1" and bag.patch_size_level0 == 512
    # CLAM: extract_features_fp.py writes features and coords without attributes.
    path = tmp_path / "clam.h5"
    save_like_the_tools(path, {"features": feats, "coords": COORDS})
    bag = read_features_h5(path)
    assert bag.patch_size_level0 is None and bag.features.shape == (3, 8)
    assert read_features_h5(path, patch_size_level0=512).patch_size_level0 == 512
    save_like_the_tools(tmp_path / "short.h5", {"features": feats[:2], "coords": COORDS})
    with pytest.raises(PatchFileError, match="does not match"):
        read_features_h5(tmp_path / "short.h5")


def test_tiles_to_view_mask_matches_brute_force() -> None:
    rng = np.random.default_rng(1)
    dims, view = (3000, 2000), (61, 93)
    coords = rng.integers(-200, 3000, size=(40, 2))
    size = 173.0
    mask = tiles_to_view_mask(coords, size, view, dims)
    ys = (np.arange(view[0]) + 0.5) * dims[1] / view[0]
    xs = (np.arange(view[1]) + 0.5) * dims[0] / view[1]
    ref = np.zeros(view, bool)
    for x, y in coords:
        ref |= ((ys >= y) & (ys < y + size))[:, None] & ((xs >= x) & (xs < x + size))[None, :]
    np.testing.assert_array_equal(mask, ref)
    assert not tiles_to_view_mask(np.zeros((0, 2)), size, view, dims).any()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "ats.pt")


def test_their_tiles_restrict_attention_and_h5_out(checkpoint: Path, tmp_path: Path) -> None:
    svs = shared_slides() / "CMU-1-Small-Region.svs"  # 2220 x 2967 at 0.499 um/px
    # TRIDENT kept only tiles in the bottom-right quarter (as if the rest were not tissue).
    grid = [(x, y) for x in range(1200, 2220 - 256, 256) for y in range(1600, 2967 - 256, 256)]
    trident_coords(tmp_path / "trident", "cmu", np.array(grid, dtype=np.int64), size=128)
    record = {"slide_id": "cmu", "path": str(svs)}
    opts = PredictOptions(heatmaps=False, gallery=False, zarr=True, h5="trident")
    free = predict_record(record, str(checkpoint), str(tmp_path / "free"), opts)
    tiled = predict_record(
        record,
        str(checkpoint),
        str(tmp_path / "tiled"),
        replace(opts, tiles_dir=str(tmp_path / "trident")),
    )
    assert not free.get("error") and not tiled.get("error"), (free, tiled)
    out = read_patch_coords(tmp_path / "tiled" / "h5" / "cmu.h5")
    centres = out.coords_xy + out.patch_size_level0 / 2
    x0, y0 = np.array(grid).min(0)
    x1, y1 = np.array(grid).max(0) + 256
    assert ((centres >= [x0, y0]) & (centres <= [x1, y1])).all(), out.coords_xy
    unrestricted = read_patch_coords(tmp_path / "free" / "h5" / "cmu.h5").coords_xy
    assert not ((unrestricted >= [x0, y0]).all(1)).all()  # our own mask looks elsewhere too

    # The h5 is a TRIDENT feature file: coords + features + attention, TRIDENT's attributes.
    with h5py.File(tmp_path / "tiled" / "h5" / "cmu.h5", "r") as f:
        assert set(f) == {"coords", "features", "attention"}
        attrs = dict(f["coords"].attrs)
        assert f["coords"].chunks == (1, 2) and f["coords"].maxshape == (None, 2)
        assert f["features"].shape[0] == 4 and f["features"].attrs["name"] == "cmu"
        scores = f["attention"][:]
    assert attrs["patch_size"] == 32 and attrs["patch_size_level0"] == 32  # 32 px at 0.5 um
    assert attrs["target_magnification"] == pytest.approx(20.0)
    assert attrs["level0_magnification"] == pytest.approx(10 / 0.499)
    import zarr

    group = zarr.open_group(tmp_path / "tiled" / "zarr" / "cmu.zarr", mode="r")
    np.testing.assert_array_equal(out.coords_xy, group["coords"][:])
    np.testing.assert_allclose(scores, group["scores"][:])
    missing = predict_record(
        {"slide_id": "other", "path": str(svs)},
        str(checkpoint),
        str(tmp_path / "x"),
        PredictOptions(tiles_dir=str(tmp_path)),
    )
    assert "no other.h5 or other_patches.h5" in missing["error"]


def test_clam_layout_reads_the_same_boxes(tmp_path: Path) -> None:
    path = write_patch_h5(
        tmp_path / "s.h5",
        COORDS,
        patch_size=256,
        patch_size_level0=512,
        level0_mpp=0.25,
        patch_mpp=0.5,
        name="s",
        dimensions=(5000, 4000),
        features=np.ones((3, 4)),
        attention=np.full(3, 0.1),
        layout="clam",
    )
    with h5py.File(path, "r") as f:
        attrs = dict(f["coords"].attrs)
    # CLAM reads wsi.read_region(coord, patch_level, (patch_size, patch_size)): at level 0,
    # the same 512-pixel boxes ATS read.
    assert attrs["patch_level"] == 0 and attrs["patch_size"] == 512
    assert list(attrs["downsample"]) == [1.0, 1.0] and list(attrs["level_dim"]) == [5000, 4000]
    back = read_patch_coords(path)
    assert back.layout == "clam" and back.patch_size_level0 == 512
    bag = read_features_h5(path)
    assert bag.features.shape == (3, 4) and bag.features.dtype == np.float32
