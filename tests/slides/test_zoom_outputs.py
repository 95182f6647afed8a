"""What slide inference writes for a zoom-in model (two levels) and, unchanged, for one level:
the SlideResult's regions, level-1 attention and cost record, then the CSV's cost columns, the
h5 / GeoJSON / zarr region data, and the zoom demo config end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from slide_helpers import CLASSES, rows

from ats_wsi.checkpoint import save_checkpoint
from ats_wsi.settings import to_dict
from ats_wsi.slides.engine import build_model, predict_slide
from ats_wsi.slides.export import COST_COLUMNS, PredictionsCSV, prediction_columns
from ats_wsi.slides.inference import PredictOptions, predict_many, records_from_frame
from ats_wsi.slides.manifest import read_manifest
from ats_wsi.slides.settings import TrainConfig, ZoomSettings
from ats_wsi.slides.trainer import default_config

ROOT = Path(__file__).resolve().parents[2]
ZOOM = ZoomSettings(n_regions=2, region_cells=3, region_mpp=2.0)


def _config(zoom: ZoomSettings | None) -> TrainConfig:
    cfg = default_config()
    cfg.model.n_patches = 3
    cfg.model.feature_net = {"name": "histology", "width": 4}
    if zoom is not None:
        cfg.model.zoom = zoom
    return cfg


def _model(zoom: ZoomSettings | None) -> tuple[torch.nn.Module, TrainConfig]:
    torch.manual_seed(0)
    cfg = _config(zoom)
    return build_model(cfg.model, len(CLASSES), cfg.slides.patch_size), cfg


def _checkpoint(path: Path, zoom: ZoomSettings | None) -> Path:
    model, cfg = _model(zoom)
    return save_checkpoint(
        path, model=model, epoch=1, config=to_dict(cfg), extra={"classes": CLASSES}
    )


@pytest.fixture(scope="module")
def slide(tiny_cohort: Path) -> Path:
    return sorted((tiny_cohort.parent / "slides").glob("*.tif"))[0]


def test_zoom_result_regions_tiles_and_cost(slide: Path) -> None:
    model, cfg = _model(ZOOM)
    res = predict_slide(model, slide, cfg.slides, slide_id="s")
    z = res.zoom
    assert z is not None and z.region_mpp == 2.0
    n_regions = len(z.regions_xywh)
    assert n_regions == 2 and z.regions_xywh.shape == (2, 4)
    width, height = res.dimensions
    for x, y, w, h in z.regions_xywh:
        assert w == h > 0
        assert x < width and y < height and x + w > 0 and y + h > 0  # overlaps the slide
    # Every tile lies in the box of the region it was drawn in (its centre, to the pixel).
    half = res.patch_size_level0 / 2
    for (tx, ty), r in zip(res.locations_xy, z.tile_region, strict=True):
        x, y, w, h = z.regions_xywh[r]
        assert x - 1 <= tx + half <= x + w + 1 and y - 1 <= ty + half <= y + h + 1
    assert z.region_attention.shape == (2, 3, 3)
    np.testing.assert_allclose(z.region_attention.sum((1, 2)), 1, atol=1e-5)
    assert len(z.tile_region) == len(res.locations_xy) == 2 * 3
    # Scores are the nested probability a_0(region) * a_1(tile | region).
    inner = z.region_attention.reshape(2, -1)[z.tile_region, z.tile_cell]
    np.testing.assert_allclose(res.scores, z.region_scores[z.tile_region] * inner, rtol=1e-5)
    assert (z.region_scores > 0).all() and z.region_scores.sum() <= 1 + 1e-6
    c = res.cost
    assert c is not None and c.tiles_read == 6 and c.regions_read == 2
    assert c.view_px == res.thumbnail.shape[0] * res.thumbnail.shape[1]
    box = round(z.regions_xywh[0, 2] * res.mpp[0] / 2.0)
    assert c.region_px == 2 * box * box
    assert c.tile_px == 6 * cfg.slides.patch_size**2
    assert c.level1_attention_s is not None and 0 < c.level1_attention_s < c.runtime_s
    assert res.summary()["regions"] == 2


def test_zoom_topk_is_deterministic_and_sampling_seeded(slide: Path) -> None:
    model, cfg = _model(ZOOM)

    def run(**kw: object) -> tuple[np.ndarray, ...]:
        res = predict_slide(model, slide, cfg.slides, slide_id="s", **kw)
        assert res.zoom is not None
        return res.locations_xy, res.scores, res.zoom.regions_xywh, res.zoom.region_attention

    for a, b in zip(run(), run(), strict=True):
        np.testing.assert_array_equal(a, b)
    seeded = {"sampler": "without_replacement", "seed": 4}
    for a, b in zip(run(**seeded), run(**seeded), strict=True):
        np.testing.assert_array_equal(a, b)
    draws = {run(sampler="without_replacement", seed=s)[0].tobytes() for s in range(4)}
    assert len(draws) > 1  # the seed matters


def test_single_level_result_has_no_zoom_and_a_cost(slide: Path) -> None:
    model, cfg = _model(None)
    res = predict_slide(model, slide, cfg.slides)
    assert res.zoom is None and "regions" not in res.summary()
    c = res.cost
    assert c is not None and c.tiles_read == len(res.locations_xy) == 3
    assert c.regions_read == c.region_px == 0 and c.level1_attention_s is None
    assert c.tile_px == 3 * cfg.slides.patch_size**2


def _predict(tiny_cohort: Path, tmp_path: Path, zoom: ZoomSettings | None) -> Path:
    ckpt = _checkpoint(tmp_path / "ats.pt", zoom)
    records = records_from_frame(read_manifest(tiny_cohort))[:2]
    opts = PredictOptions(gallery=False, geojson=True, h5="trident", zarr=True)
    predict_many(records, ckpt, tmp_path / "out", opts, progress=False)
    return tmp_path / "out"


def test_zoom_outputs_hold_the_regions(tiny_cohort: Path, tmp_path: Path) -> None:
    import zarr

    out = _predict(tiny_cohort, tmp_path, ZOOM)
    table = rows(out / "predictions.csv")
    assert list(table[0]) == prediction_columns(CLASSES)
    for r in table:
        assert r["error"] == "" and r["n_patches"] == "6"
        assert (r["tiles_read"], r["regions_read"], r["tile_px"]) == ("6", "2", str(6 * 32 * 32))
        assert int(r["view_px"]) > 0 and int(r["region_px"]) > 0
        assert float(r["level1_attention_s"]) >= 0
    sid = table[0]["slide_id"]
    with h5py.File(out / "h5" / f"{sid}.h5", "r") as f:
        assert f["coords"].shape == (6, 2) and f["features"].shape[0] == 6
        regions, tile_region = f["regions"][:], f["tile_region"][:]
        assert regions.shape == (2, 4) and f["region_scores"].shape == (2,)
        assert f["region_attention"].shape == (2, 3, 3) and f["tile_cell"].shape == (6,)
        assert sorted(set(tile_region.tolist())) == [0, 1]
        assert f["regions"].attrs["region_mpp"] == 2.0
        assert f["regions"].attrs["regions_order"] == "x,y,w,h"
    assert not list((out / "h5").glob(".*"))  # no temporary file left
    feats = json.loads((out / "geojson" / f"{sid}.geojson").read_text())["features"]
    regions_gj = [f for f in feats if f["properties"]["classification"]["name"] == "ATS region"]
    tiles_gj = [f for f in feats if f["properties"]["classification"]["name"] == "ATS patch"]
    assert len(regions_gj) == 2 and len(tiles_gj) == 6
    x, y, w, h = regions.tolist()[0]
    ring = regions_gj[0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] == [x, y] and [x + w, y + h] in ring
    props = regions_gj[0]["properties"]
    assert props["level"] == 0 and 0 < props["probability"] <= 1
    assert [t["properties"]["region"] for t in tiles_gj] == tile_region.tolist()
    assert all(t["properties"]["level"] == 1 for t in tiles_gj)
    g = zarr.open_group(out / "zarr" / f"{sid}.zarr", mode="r")
    np.testing.assert_array_equal(g["regions"][:], regions)
    assert g.attrs["region_grid"] and (out / "heatmaps" / f"{sid}.png").exists()


def test_single_level_outputs_have_no_zoom_keys(tiny_cohort: Path, tmp_path: Path) -> None:
    import zarr

    out = _predict(tiny_cohort, tmp_path, None)
    table = rows(out / "predictions.csv")
    for r in table:
        assert r["error"] == "" and r["n_patches"] == "3"
        assert (r["tiles_read"], r["regions_read"], r["region_px"]) == ("3", "0", "0")
        assert r["level1_attention_s"] == ""
    sid = table[0]["slide_id"]
    with h5py.File(out / "h5" / f"{sid}.h5", "r") as f:
        assert sorted(f) == ["attention", "coords", "features"]
    feats = json.loads((out / "geojson" / f"{sid}.geojson").read_text())["features"]
    assert len(feats) == 3
    assert all(
        set(f["properties"])
        == {"objectType", "name", "classification", "attention", "rank", "measurements"}
        for f in feats
    )
    g = zarr.open_group(out / "zarr" / f"{sid}.zarr", mode="r")
    assert sorted(g.array_keys()) == ["attention", "coords", "probabilities", "scores"]


def test_csv_from_before_the_cost_columns_is_upgraded(tmp_path: Path) -> None:
    cols = prediction_columns(CLASSES)
    old = cols[: -len(COST_COLUMNS)]
    path = tmp_path / "p.csv"
    path.write_text(",".join(old) + "\n" + "a,1,1" + "," * (len(old) - 3) + "\n")
    table = PredictionsCSV(path, cols)
    assert set(table.done) == {"a"} and table.done["a"]["tiles_read"] == ""
    table.write({"slide_id": "b", "Y": 0, "tiles_read": 4})
    again = rows(path)
    assert list(again[0]) == cols and [r["slide_id"] for r in again] == ["a", "b"]
    assert again[1]["tiles_read"] == "4"
    # Another header is still refused, even when it is a prefix of ours.
    path.write_text("slide_id,Y\n")
    with pytest.raises(ValueError, match="header"):
        PredictionsCSV(path, cols)


@pytest.mark.slow
def test_zoom_demo_config_trains_and_predicts(tmp_path: Path) -> None:
    cfg = yaml.safe_load((ROOT / "configs" / "slides_demo_zoom.yaml").read_text())
    assert cfg["model"]["zoom"]["n_regions"] > 0
    cmd = [
        sys.executable, "-m", "pipelines.train_slides",
        "--config", str(ROOT / "configs" / "slides_demo_zoom.yaml"),
        "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = rows(tmp_path / "run" / "predictions" / "predictions.csv")
    zoom = cfg["model"]["zoom"]
    tiles = zoom["n_regions"] * cfg["model"]["n_patches"]
    assert table and all(r["error"] == "" for r in table)
    for r in table:
        assert int(r["regions_read"]) == zoom["n_regions"] and int(r["tiles_read"]) <= tiles
        assert int(r["region_px"]) > 0 and int(r["tile_px"]) > 0 and int(r["view_px"]) > 0
    sid = table[0]["slide_id"]
    geojson = tmp_path / "run" / "predictions" / "geojson" / f"{sid}.geojson"
    names = [
        f["properties"]["classification"]["name"]
        for f in json.loads(geojson.read_text())["features"]
    ]
    assert names.count("ATS region") == zoom["n_regions"]
