"""ATS as a tiatoolbox model and engine, against the installed tiatoolbox.

The engine must give what the project's own ``predict_slides`` code gives for the same
checkpoint and seed; slides are real files from ``../shared/data/slides`` (skipped when absent)
and a generated demo slide.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("tiatoolbox")

from tiatoolbox.wsicore.wsireader import VirtualWSIReader, WSIReader  # noqa: E402

from ats_wsi.checkpoint import save_checkpoint  # noqa: E402
from ats_wsi.settings import to_dict  # noqa: E402
from ats_wsi.slides.cohort import DemoCohortConfig, make_demo_cohort  # noqa: E402
from ats_wsi.slides.engine import build_model  # noqa: E402
from ats_wsi.slides.inference import PredictOptions, predict_record  # noqa: E402
from ats_wsi.slides.trainer import default_config  # noqa: E402
from ats_wsi.tiatoolbox_model import ATSEngine, ATSTiatoolboxModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"
SVS = SLIDES / "CMU-1-Small-Region.svs"
PNG = SLIDES / "TCGA-HE-7130-01Z-00-DX1-thumbnail.png"
CLASSES = ["normal", "tumor"]
needs_slides = pytest.mark.skipif(not SVS.exists() or not PNG.exists(), reason="no shared slides")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project checkpoint of a (seeded, untrained) default-config model: no training needed
    to compare two inference paths."""
    torch.manual_seed(0)
    cfg = default_config()
    model = build_model(cfg.model, 2, cfg.slides.patch_size)
    path = tmp_path_factory.mktemp("ckpt") / "ats_best.pt"
    return save_checkpoint(
        path, model=model, epoch=1, config=to_dict(cfg), extra={"classes": CLASSES}
    )


@pytest.fixture(scope="module")
def engine(checkpoint: Path) -> ATSEngine:
    return ATSEngine(checkpoint)


def _project(
    checkpoint: Path, path: Path, out: Path, slide_id: str, **opts: Any
) -> tuple[dict, Any]:
    """The project's own prediction of one slide: its CSV row and its zarr group."""
    import zarr

    options = PredictOptions(heatmaps=False, gallery=False, zarr=True, **opts)
    row = predict_record(
        {"slide_id": slide_id, "path": str(path)}, str(checkpoint), str(out), options
    )
    assert not row.get("error"), row
    return row, zarr.open_group(out / "zarr" / f"{slide_id}.zarr", mode="r")


def _probs(row: dict) -> np.ndarray:
    return np.array([row[f"p_{i}"] for i in range(len(CLASSES))])


@needs_slides
def test_engine_matches_project_pipeline_topk(
    engine: ATSEngine, checkpoint: Path, tmp_path: Path
) -> None:
    row, group = _project(checkpoint, SVS, tmp_path, SVS.stem)
    res = engine.run([SVS])[SVS.stem]
    np.testing.assert_allclose(res["probabilities"], _probs(row), atol=1e-6, rtol=0)
    assert res["predictions"] == row["Y_hat"] and res["pred_label"] == row["pred_label"]
    np.testing.assert_array_equal(res["locations_xy"], group["coords"][:])
    np.testing.assert_allclose(res["attention"], group["attention"][:], atol=1e-6)
    side = res["patch_size_level0"]
    np.testing.assert_array_equal(res["coordinates"][:, 2:] - res["coordinates"][:, :2], side)
    # An open tiatoolbox reader gives the same result as the path.
    again = engine.run([WSIReader.open(SVS)])[SVS.stem]
    np.testing.assert_allclose(again["probabilities"], res["probabilities"], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(again["locations_xy"], res["locations_xy"])


def test_engine_matches_project_pipeline_seeded_sampler(checkpoint: Path, tmp_path: Path) -> None:
    manifest = make_demo_cohort(
        tmp_path / "cohort",
        DemoCohortConfig(
            n_cases=1, slides_per_case=(1, 1), size=(256, 320), hotspot_radius=(32, 40), seed=3
        ),
    )
    (slide,) = sorted((manifest.parent / "slides").glob("*.tif"))
    eng = ATSEngine(checkpoint, seed=7)
    for sampler in ("topk", "without_replacement"):
        row, group = _project(
            checkpoint, slide, tmp_path / sampler, slide.stem, sampler=sampler, seed=7
        )
        res = eng.run([slide], sampler=sampler)[slide.stem]
        np.testing.assert_allclose(res["probabilities"], _probs(row), atol=1e-6, rtol=0)
        np.testing.assert_array_equal(res["locations_xy"], group["coords"][:])


@needs_slides
def test_virtual_reader_on_plain_image(engine: ATSEngine) -> None:
    from PIL import Image

    img = np.asarray(Image.open(PNG).convert("RGB"))
    virtual = engine.run([VirtualWSIReader(img, mpp=(0.5, 0.5))])["slide_0"]
    by_path = engine.run([PNG], mpp=0.5)[PNG.stem]
    np.testing.assert_allclose(virtual["probabilities"], by_path["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(virtual["locations_xy"], by_path["locations_xy"])
    assert virtual["dimensions"] == (1000, 1000) and virtual["mpp"] == (0.5, 0.5)
    assert virtual["probabilities"].sum() == pytest.approx(1, abs=1e-5)


@needs_slides
def test_user_mask_is_respected(engine: ATSEngine) -> None:
    mask = np.zeros((1000, 1000), dtype=np.uint8)
    mask[:, :400] = 1  # left 40% only
    as_array = engine.run([PNG], [mask], mpp=0.5)[PNG.stem]
    as_reader = engine.run([PNG], [VirtualWSIReader(mask * 255, mode="bool")], mpp=0.5)
    xy = as_array["locations_xy"]
    assert len(xy) > 0 and (xy[:, 0] < 400).all()
    grid = as_array["mask"]
    assert grid[:, : grid.shape[1] // 3].any() and not grid[:, -grid.shape[1] // 2 :].any()
    assert (as_array["attention"][~grid] == 0).all()
    np.testing.assert_array_equal(as_reader[PNG.stem]["locations_xy"], xy)
    unmasked = engine.run([PNG], mpp=0.5)[PNG.stem]
    assert (unmasked["locations_xy"][:, 0] >= 400).any()


@needs_slides
def test_zarr_output_and_csv(engine: ATSEngine, tmp_path: Path) -> None:
    import zarr

    images = [SVS, VirtualWSIReader(np.full((600, 600, 3), 255, np.uint8), mpp=(0.5, 0.5))]
    mask = np.ones((600, 600), dtype=bool)
    out = engine.run(
        images, [None, mask], save_dir=tmp_path, output_type="zarr", slide_ids=["a", "b"]
    )
    assert set(out) == {"a", "b"}
    expected = engine.run([SVS])[SVS.stem]
    group = zarr.open_group(out["a"], mode="r")
    np.testing.assert_allclose(group["probabilities"][:], expected["probabilities"], atol=1e-6)
    np.testing.assert_array_equal(group["coords"][:], expected["locations_xy"])
    assert group.attrs["classes"] == CLASSES and group.attrs["slide_id"] == "a"
    with open(tmp_path / "predictions.csv", newline="") as fh:
        rows = {r["slide_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == {"a", "b"} and not rows["a"]["error"]
    assert float(rows["a"]["p_1"]) == pytest.approx(float(expected["probabilities"][1]), abs=1e-6)
    assert int(rows["a"]["n_patches"]) == len(expected["locations_xy"])
    with pytest.raises(FileExistsError):
        engine.run([SVS], save_dir=tmp_path, output_type="zarr")
    engine.run([SVS], save_dir=tmp_path, output_type="zarr", overwrite=True)


def test_import_ats_wsi_does_not_import_tiatoolbox() -> None:
    code = (
        "import sys, ats_wsi, ats_wsi.io, ats_wsi.slides.inference; "
        "assert 'ats_wsi.tiatoolbox_model' not in sys.modules; "
        "assert 'tiatoolbox' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_modelabc_interface(checkpoint: Path) -> None:
    model = ATSTiatoolboxModel.from_checkpoint(checkpoint)
    assert model.class_dict == {0: "normal", 1: "tumor"}
    assert model.to("cpu") is model
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 512, 512, 3), dtype=np.uint8)
    probs = ATSTiatoolboxModel.infer_batch(model, model.preproc_func(batch), device="cpu")
    assert probs.shape == (2, 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    np.testing.assert_array_equal(model.postproc_func(probs), probs.argmax(1))
    # Weights from a project checkpoint, loaded with weights_only=True into a fresh model.
    cfg = default_config()
    fresh = ATSTiatoolboxModel(
        build_model(cfg.model, 2, 32)
    )
    assert fresh.class_dict == {0: "0", 1: "1"}
    fresh.load_weights_from_file(checkpoint)
    assert fresh.class_dict == model.class_dict
    np.testing.assert_allclose(
        ATSTiatoolboxModel.infer_batch(fresh, batch, device="cpu"), probs, atol=1e-6
    )
