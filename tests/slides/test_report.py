"""Outputs a person reads: heatmap over the slide, QuPath tiles, pyramidal overlay, summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from slide_helpers import rows, untrained_checkpoint

from ats_wsi.io import open_slide
from ats_wsi.mapping import GridMapping
from ats_wsi.slides.report import (
    HEATMAP_MARGIN_PX,
    HEATMAP_TITLE_PX,
    cell_edges,
    display_mpp,
    save_attention_heatmap,
    save_attention_overlay,
    save_attention_tiles_geojson,
    write_summary_html,
)
from pipelines import predict_slides

DIMS = (3000, 2000)  # level-0 (width, height)
VIEW = (125, 187)  # (h, w) of the attention view
GRID = (10, 16)  # (a_h, a_w)
RF = 7


@pytest.fixture
def attention() -> tuple[np.ndarray, np.ndarray]:
    att = np.full(GRID, 1.0)
    att[4, 11] = 50.0  # one hot cell
    att /= att.sum()
    mask = np.ones(GRID, dtype=bool)
    mask[:, :3] = False  # glass on the left
    return att, mask


def test_cell_edges_follow_the_models_geometry() -> None:
    xs, ys = cell_edges(GRID, VIEW, DIMS, RF)
    assert len(xs) == GRID[1] + 1 and len(ys) == GRID[0] + 1
    mapping = GridMapping(VIEW, DIMS[::-1], GRID, RF, patch_size=10)
    idx = torch.arange(GRID[0] * GRID[1])[None]
    centres = mapping.top_left(idx)[0].double() + 5  # (K, 2) (y, x) patch centres
    yy, xx = np.meshgrid((ys[:-1] + ys[1:]) / 2, (xs[:-1] + xs[1:]) / 2, indexing="ij")
    np.testing.assert_allclose(centres[:, 0].numpy(), yy.ravel(), atol=1)
    np.testing.assert_allclose(centres[:, 1].numpy(), xx.ravel(), atol=1)


def test_heatmap_shows_the_attended_cell_at_a_readable_size(attention, tmp_path: Path) -> None:
    att, mask = attention
    mpp = display_mpp(DIMS, (0.5, 0.5))
    assert mpp == pytest.approx(1500 * 0.5 / 1500 * 2)  # 3000 px at 0.5 um -> 1500 px
    w, h = 1500, 1000
    image = np.full((h, w, 3), 200, np.uint8)
    xs, ys = cell_edges(GRID, VIEW, DIMS, RF)
    hot_xy = np.array([[int(xs[11]), int(ys[4])]])
    path = save_attention_heatmap(
        tmp_path / "h.png",
        image,
        att,
        mask,
        (xs, ys),
        DIMS,
        locations_xy=hot_xy,
        patch_size=int(xs[12] - xs[11]),
        title="slide: tumor",
    )
    png = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert png.shape[1] >= w and png.shape[0] >= h  # the slide at 1 image px per PNG px
    top, left = HEATMAP_TITLE_PX, HEATMAP_MARGIN_PX  # where the image is drawn

    def at(x0: float, y0: float) -> np.ndarray:  # level-0 point -> PNG pixel
        return png[top + int(y0 * h / DIMS[1]), left + int(x0 * w / DIMS[0])]

    hot = at((xs[11] + xs[12]) / 2, (ys[4] + ys[5]) / 2)
    cold = at((xs[8] + xs[9]) / 2, (ys[7] + ys[8]) / 2)
    glass = at((xs[1] + xs[2]) / 2, (ys[7] + ys[8]) / 2)
    assert hot[0] > 140 and hot[0] - hot[2] > 60  # turbo's red end, strongly blended
    assert np.abs(cold - 200).max() < 60  # faint tint
    assert (glass == 200).all()  # off the tissue: the slide as it is
    # The colour bar on the right spans the colormap.
    bar = png[:, left + w :]
    assert (np.abs(bar - [122, 4, 3]).sum(axis=-1) < 20).any()  # turbo's top colour
    assert (np.abs(bar - [48, 18, 59]).sum(axis=-1) < 20).any()  # and its bottom one
    # The sampled box: white drawn inside black around the hot cell.
    x0 = left + int(xs[11] * w / DIMS[0])
    y_mid = top + int((ys[4] + ys[5]) / 2 * h / DIMS[1])
    assert (png[y_mid, x0 - 2 : x0 + 3] == 255).all(axis=-1).any()


def test_qupath_tiles(attention, tmp_path: Path) -> None:
    att, mask = attention
    xs, ys = cell_edges(GRID, VIEW, DIMS, RF)
    path = save_attention_tiles_geojson(tmp_path / "t.geojson", att, mask, (xs, ys))
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == mask.sum()
    f = max(doc["features"], key=lambda f: f["properties"]["measurements"]["attention"])
    props = f["properties"]
    assert props["objectType"] == "tile"
    assert props["measurements"]["attention_rel"] == 1.0
    assert (props["measurements"]["row"], props["measurements"]["col"]) == (4, 11)
    ring = np.array(f["geometry"]["coordinates"][0])
    assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
    np.testing.assert_allclose(ring.min(0), [xs[11], ys[4]])
    np.testing.assert_allclose(ring.max(0), [xs[12], ys[5]])
    total = sum(f["properties"]["measurements"]["attention"] for f in doc["features"])
    assert total == pytest.approx(att[mask].sum())


def test_overlay_is_a_pyramid_aligned_in_microns(attention, tmp_path: Path) -> None:
    att, mask = attention
    xs, ys = cell_edges(GRID, VIEW, DIMS, RF)
    path = save_attention_overlay(tmp_path / "o.ome.zarr", att, mask, (xs, ys), DIMS, (0.5, 0.5))
    with open_slide(path) as r:
        assert r.dimensions == (2048, 1365) and len(r.level_dimensions) >= 3
        assert r.mpp[0] * 2048 == pytest.approx(DIMS[0] * 0.5)  # same physical extent
        hot = r.read_region(
            (
                int((xs[11] + xs[12]) / 2 * 2048 / DIMS[0]),
                int((ys[4] + ys[5]) / 2 * 1365 / DIMS[1]),
            ),
            0,
            (1, 1),
        )[0, 0]
        glass = r.read_region((int(xs[1] * 2048 / DIMS[0]) + 5, 600), 0, (1, 1))[0, 0]
    assert hot[0] > 100 and hot[2] < 30 and (glass == 255).all()


def test_summary_html(tmp_path: Path) -> None:
    (tmp_path / "heatmaps").mkdir()
    (tmp_path / "heatmaps" / "a.png").write_bytes(b"")
    table = [
        {
            "slide_id": "a",
            "pred_label": "tumor",
            "p_0": 0.2,
            "p_1": 0.8,
            "mpp": 0.5,
            "mpp_source": "cli",
            "runtime_s": 1.5,
            "error": "",
        },
        {"slide_id": "b<x>", "error": "MissingResolutionError: b: no <mpp>"},
    ]
    text = write_summary_html(tmp_path / "summary.html", table, ["normal", "tumor"]).read_text()
    assert "2 slides, 1 with errors" in text and "<img src='heatmaps/a.png'" in text
    assert "tumor: 0.800" in text and "0.5 (cli)" in text
    assert "b&lt;x&gt;" in text and "no &lt;mpp&gt;" in text and "<x>" not in text


@pytest.mark.slow
def test_predict_writes_every_output(tiny_cohort: Path, tmp_path: Path) -> None:
    ckpt = untrained_checkpoint(tmp_path / "ats.pt")
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        str(ckpt),
        "--slides",
        str(tiny_cohort),
        "--out",
        str(out),
        "--no-gallery",
        "--no-zarr",
        "--geojson",
        "--overlay",
    ]
    assert predict_slides.main(argv) == 0
    table = rows(out / "predictions.csv")
    sid = table[0]["slide_id"]
    with Image.open(out / "heatmaps" / f"{sid}.png") as im:
        assert max(im.size) >= 1000  # a 320-pixel demo slide still gives a readable figure
    tiles = json.loads((out / "geojson" / f"{sid}.attention.geojson").read_text())
    assert tiles["features"] and tiles["features"][0]["properties"]["objectType"] == "tile"
    patches = json.loads((out / "geojson" / f"{sid}.geojson").read_text())["features"]
    assert [f["properties"]["measurements"]["rank"] for f in patches] == [0, 1, 2, 3]
    slide = next((tiny_cohort.parent / "slides").glob(f"{sid}.*"))
    with open_slide(out / "overlay" / f"{sid}.ome.zarr") as r, open_slide(slide) as s:
        assert r.mpp[0] * r.dimensions[0] == pytest.approx(s.mpp[0] * s.dimensions[0], rel=0.01)
    html = (out / "summary.html").read_text()
    assert all(r["slide_id"] in html for r in table)
