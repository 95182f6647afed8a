"""Crash-safe predictions CSV, GeoJSON / zarr exports, and the demo cohort's invisibility."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ats_wsi.io import open_slide, write_pyramidal_tiff
from ats_wsi.slides.cohort import (
    DemoCohortConfig,
    lesion_perturbation,
    render_demo_slide,
    tissue_image,
)
from ats_wsi.slides.export import (
    PredictionsCSV,
    prediction_columns,
    save_attention_zarr,
    save_geojson,
)

COLS = prediction_columns(["normal", "tumor"])


def test_csv_header_once_rows_durable_and_skipped(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    table = PredictionsCSV(path, COLS)
    table.write({"slide_id": "a", "Y": 1, "Y_hat": 1, "p_0": 0.25, "p_1": 0.75})
    table.write({"slide_id": "b", "error": "CorruptSlideError: boom"})
    again = PredictionsCSV(path, COLS)
    assert set(again.done) == {"a", "b"}
    assert path.read_text().count("slide_id,") == 1
    assert again.done["a"]["p_1"] == "0.75"
    # retry_errors forgets the failed slide (and removes its row so it is not duplicated).
    retry = PredictionsCSV(path, COLS, retry_errors=True)
    assert set(retry.done) == {"a"} and "b," not in path.read_text()


def test_truncated_last_line_is_repaired(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    table = PredictionsCSV(path, COLS)
    table.write({"slide_id": "a", "Y": 0, "Y_hat": 0})
    with open(path, "a") as fh:
        fh.write("b,1,1,0.2")  # killed mid-row: no newline
    table = PredictionsCSV(path, COLS)
    assert set(table.done) == {"a"}
    table.write({"slide_id": "b", "Y": 1, "Y_hat": 1})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[2].startswith("b,1,1,")


def test_csv_with_another_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("slide_id,score\n")
    with pytest.raises(ValueError, match="header"):
        PredictionsCSV(path, COLS)


def test_geojson_is_a_qupath_feature_collection(tmp_path: Path) -> None:
    p = save_geojson(
        tmp_path / "a.geojson", np.array([[10, 20], [30, 40]]), np.array([0.6, 0.4]), 8
    )
    data = json.loads(p.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 2
    f = data["features"][0]
    assert f["geometry"]["type"] == "Polygon"
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] == [10, 20] and [18, 28] in ring
    assert f["properties"]["objectType"] == "annotation" and f["properties"]["rank"] == 0


def test_zarr_holds_attention_and_coordinates(tmp_path: Path) -> None:
    import zarr

    att = np.random.default_rng(0).random((4, 5)).astype(np.float32)
    save_attention_zarr(tmp_path / "s.zarr", att, np.array([[1, 2]]), np.array([0.5]), patch_size=8)
    g = zarr.open_group(tmp_path / "s.zarr", mode="r")
    np.testing.assert_array_equal(g["attention"][:], att)
    assert g["coords"][:].tolist() == [[1, 2]] and g.attrs["patch_size_level0"] == 8


def test_lesion_keeps_every_2x2_block_sum() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = lesion_perturbation(base, np.ones((16, 16), bool), 40)
    assert (out != base).any()
    blocks = lambda a: a.astype(int).reshape(8, 2, 8, 2, 3).sum((1, 3))  # noqa: E731
    np.testing.assert_array_equal(blocks(out), blocks(base))


def test_lesion_is_invisible_at_attention_resolution(tmp_path: Path) -> None:
    """A positive slide and its lesion-free twin, written as pyramids and read back through
    OpenSlide: identical at 16 um/px (the attention view), different at level 0."""
    cfg = DemoCohortConfig(size=(256, 320), hotspot_radius=(32, 40))
    src = tissue_image()
    pos = render_demo_slide(np.random.default_rng([9, 1]), src, cfg, positive=True)
    twin = render_demo_slide(np.random.default_rng([9, 1]), src, cfg, positive=True, lesion=False)
    assert pos.lesion_box is not None
    paths = []
    for name, s in (("pos", pos), ("twin", twin)):
        paths.append(write_pyramidal_tiff(tmp_path / f"{name}.tif", s.image, 0.5, tile=64))
    with open_slide(paths[0]) as a, open_slide(paths[1]) as b:
        assert a.mpp == (0.5, 0.5)
        for mpp in (1.0, 8.0, 16.0, 32.0):
            np.testing.assert_array_equal(a.thumbnail(mpp), b.thumbnail(mpp))
        x, y, w, h = pos.lesion_box
        diff = np.abs(
            a.read_region((x, y), 0, (w, h)).astype(int) - b.read_region((x, y), 0, (w, h))
        )
        assert diff.max() > 30  # plainly visible at full resolution


def test_low_res_views_of_both_classes_are_indistinguishable() -> None:
    """Colour statistics of the 16 um/px views do not separate the classes (rank-sum test)."""
    from scipy.stats import mannwhitneyu

    from ats_wsi.io.synthetic import halve

    cfg = DemoCohortConfig(size=(256, 320), hotspot_radius=(32, 40))
    src = tissue_image()
    stats: dict[bool, list[np.ndarray]] = {True: [], False: []}
    for i in range(24):
        positive = bool(i % 2)
        s = render_demo_slide(np.random.default_rng([11, i]), src, cfg, positive=positive)
        view = s.image
        for _ in range(5):  # 32x box reduction, as the pyramid builds it
            view = halve(view)
        tissue = view.mean(2) < 220
        stats[positive].append(np.r_[view[tissue].mean(0), view[tissue].std(0)])
    pos, neg = np.array(stats[True]), np.array(stats[False])
    for k in range(pos.shape[1]):
        assert mannwhitneyu(pos[:, k], neg[:, k]).pvalue > 0.01
