"""Training from TRIDENT / CLAM feature h5 files (``data.features_dir``): the files hold the
features of the configured frozen encoder (the bundled EfficientNet-Lite0, run here on every
tile of the demo slides), so training reads and encodes no tile; bad files fail or fall back."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from ats_wsi.io import SlidePatchSource
from ats_wsi.io.readers import open_slide
from ats_wsi.settings import parse
from ats_wsi.slides.engine import SlideRecord, SlideSettings, build_model, slide_forward
from ats_wsi.slides.features_h5 import FeaturesH5Error, SlideFeatures, h5_feature_cache
from ats_wsi.slides.interop import write_patch_h5
from ats_wsi.slides.manifest import read_manifest
from ats_wsi.slides.settings import ModelSettings

LITE0 = {"name": "timm", "preset": "efficientnet-lite0", "input_size": 32}
TILE = 64  # px at 0.5 um/px = level-0 px of the demo slides; 2 view px at 16 um/px
SETTINGS = SlideSettings(attention_mpp=16.0, patch_mpp=0.5, patch_size=TILE, read_workers=2)
MODEL = {
    "attention_net": {"name": "tile_pool", "width": 4, "pool": 2},  # one cell per tile
    "feature_net": LITE0,
    "n_patches": 4,
}


def _model() -> Any:
    torch.manual_seed(0)
    return build_model(parse(ModelSettings, MODEL), 2, TILE)


def _records(manifest: Path) -> list[SlideRecord]:
    df = read_manifest(manifest)
    return [SlideRecord(r.slide_id, r.path, 0) for r in df.itertuples()]


@pytest.fixture(scope="module")
def features(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every tile of a regular 64 px grid of each demo slide (TRIDENT's / CLAM's tiling)
    through the frozen encoder, written as TRIDENT ``features_<encoder>/`` and CLAM
    ``h5_files/`` feature files."""
    root = tmp_path_factory.mktemp("features")
    trident = root / "trident" / "features_efficientnet-lite0"
    clam = root / "clam" / "h5_files"
    clam.mkdir(parents=True)
    encoder = _model().feature_net.eval()
    for rec in _records(tiny_cohort):
        with open_slide(rec.path) as reader, SlidePatchSource(reader, TILE, 0.5, 2) as src:
            width, height = reader.dimensions
            xy = np.array([(x, y) for y in range(0, height - TILE + 1, TILE)
                           for x in range(0, width - TILE + 1, TILE)], dtype=np.int64)
            with torch.no_grad():
                feats = encoder(src.extract(torch.from_numpy(xy[None, :, ::-1].copy()))[0])
            write_patch_h5(trident / f"{rec.slide_id}.h5", xy, patch_size=TILE,
                           patch_size_level0=TILE, level0_mpp=reader.mpp[0], patch_mpp=0.5,
                           name=rec.slide_id, dimensions=(width, height),
                           features=feats.numpy())
        with h5py.File(clam / f"{rec.slide_id}.h5", "w") as f:  # CLAM: no attributes
            f["features"] = feats.numpy()
            f["coords"] = xy
    return {"trident": trident, "clam": clam}


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter of the tiles every SlidePatchSource reads (the real reads still happen)."""
    count = [0]
    original = SlidePatchSource.read_patch

    def counted(self: SlidePatchSource, y: int, x: int) -> np.ndarray:
        count[0] += 1
        return original(self, y, x)

    monkeypatch.setattr(SlidePatchSource, "read_patch", counted)
    return count


def _config(tiny_config: Any, manifest: Path, features_dir: Path | None, epochs: int) -> Any:
    cfg = tiny_config(manifest, epochs=epochs)
    cfg.model = parse(ModelSettings, MODEL)
    cfg.slides = replace(cfg.slides, patch_size=TILE, read_workers=2)
    cfg.data.features_dir = None if features_dir is None else str(features_dir)
    cfg.baseline.enabled = False
    cfg.predict.enabled = False
    return cfg


def test_cache_hits_are_the_features_the_encoder_gives(tiny_cohort: Path, features: Any) -> None:
    model = _model().train()
    recs = _records(tiny_cohort)[:1]
    cache = h5_feature_cache(features["trident"], recs, SETTINGS, model, spec=LITE0)
    item = SETTINGS.loader()(recs[0].path)
    gen = [torch.Generator().manual_seed(1) for _ in range(2)]
    plain, _ = slide_forward(model, item, recs[0].path, SETTINGS, torch.device("cpu"),
                             generator=gen[0])
    cached, _ = slide_forward(model, item, recs[0].path, SETTINGS, torch.device("cpu"),
                              generator=gen[1], feature_cache=cache)
    assert cached.patches is None and (cache.h5_hits, cache.misses) == (4, 0)
    assert torch.equal(cached.indices, plain.indices)
    torch.testing.assert_close(cached.features, plain.features, rtol=0, atol=1e-5)


@pytest.mark.parametrize("layout", ["trident", "clam"])
def test_train_from_feature_h5_reads_and_encodes_no_tile(
    layout: str, tiny_cohort: Path, tiny_config: Any, features: Any, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ats_wsi.slides.inference import PredictOptions, predict_many
    from ats_wsi.slides.trainer import train

    reads = _count_reads(monkeypatch)
    # The parent folder: the features_<encoder>/ or h5_files/ inside it is found.
    cfg = _config(tiny_config, tiny_cohort, features[layout].parent, epochs=2)
    results = train(cfg, tmp_path)
    log = [json.loads(x) for x in (tmp_path / "ats_metrics.jsonl").read_text().splitlines()]
    assert reads[0] == 0  # training and validation: every sampled tile came from the h5s
    assert [r["feature_cache_misses"] for r in log] == [0, 0]
    assert 0 < log[0]["feature_h5_hits"] < log[1]["feature_h5_hits"]
    n_fit = results["n_slides"]["train"] + results["n_slides"]["val"]
    assert results["features_h5"]["slides"] == n_fit and not results["features_h5"]["skipped"]
    # New slides: the checkpoint reads (and encodes) just the tiles it samples.
    test = read_manifest(tmp_path / "splits.csv", slide_dir=str(tiny_cohort.parent / "slides"))
    test = test[test.split == "test"]
    options = PredictOptions(heatmaps=False, gallery=False, zarr=False, torch_threads=1)
    records = [{"slide_id": r.slide_id, "path": r.path} for r in test.itertuples()]
    summary = predict_many(records, tmp_path / "ats_best.pt", tmp_path / "pred", options)
    assert summary["n"] == len(records) > 0 and summary["n_errors"] == 0
    assert reads[0] == 4 * len(records)


def test_missing_and_truncated_files_warn_and_their_slides_read_tiles(
    tiny_cohort: Path, features: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "h5_files"
    folder.mkdir()
    recs = _records(tiny_cohort)[:3]
    for rec in recs[1:]:
        (folder / f"{rec.slide_id}.h5").write_bytes((features["clam"] / f"{rec.slide_id}.h5")
                                                    .read_bytes())
    cut = folder / f"{recs[2].slide_id}.h5"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with pytest.warns(UserWarning) as caught:
        cache = h5_feature_cache(tmp_path, recs, SETTINGS, _model(), spec=LITE0)
    lines = [str(w.message) for w in caught]
    assert any(f"{recs[0].slide_id}.h5: no such feature file" in m for m in lines)
    assert any(str(cut) in m and "not a readable HDF5 file" in m for m in lines)
    assert all("\n" not in m for m in lines)
    assert sorted(cache.summary["skipped"]) == sorted(r.slide_id for r in (recs[0], recs[2]))
    assert cache.summary["slides"] == 1
    # A skipped slide still trains: its sampled tiles are misses, read and encoded.
    model = _model().train()
    item = SETTINGS.loader()(recs[0].path)
    out, _ = slide_forward(model, item, recs[0].path, SETTINGS, torch.device("cpu"),
                           feature_cache=cache)
    assert cache.misses == 4 and cache.h5_hits == 0 and out.features.shape == (1, 4, 1280)


def _one_file(src: Path, dst: Path, edit: Any) -> Path:
    dst.mkdir(parents=True)
    (dst / src.name).write_bytes(src.read_bytes())
    with h5py.File(dst / src.name, "a") as f:
        edit(f)
    return dst / src.name


def _error(folder: Path, tiny_cohort: Path) -> str:
    with pytest.raises(FeaturesH5Error) as e:
        h5_feature_cache(folder, _records(tiny_cohort)[:1], SETTINGS, _model(), spec=LITE0)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_dimension_mismatch_is_one_line(tiny_cohort: Path, features: Any, tmp_path: Path) -> None:
    slide_id = _records(tiny_cohort)[0].slide_id

    def narrow(f: Any) -> None:
        n = len(f["coords"])
        del f["features"]
        f["features"] = np.zeros((n, 8), np.float32)

    file = _one_file(features["clam"] / f"{slide_id}.h5", tmp_path / "h5_files", narrow)
    msg = _error(tmp_path, tiny_cohort)
    assert msg.startswith(str(file)) and "dimension 8" in msg and "gives 1280" in msg


def test_encoder_name_mismatch_is_one_line(
    tiny_cohort: Path, features: Any, tmp_path: Path
) -> None:
    slide_id = _records(tiny_cohort)[0].slide_id
    src = features["trident"] / f"{slide_id}.h5"

    def uni(f: Any) -> None:
        f["features"].attrs["encoder"] = "uni_v1"  # TRIDENT records its encoder here

    file = _one_file(src, tmp_path / "a" / "features_efficientnet-lite0", uni)
    msg = _error(file.parent, tiny_cohort)
    assert msg.startswith(str(file)) and "'uni_v1'" in msg and "efficientnet-lite0" in msg
    file = _one_file(src, tmp_path / "b" / "features_conch_v15", lambda f: None)
    assert "'conch_v15'" in _error(file.parent, tiny_cohort)


def test_tile_size_mismatch_is_one_line(tiny_cohort: Path, features: Any, tmp_path: Path) -> None:
    slide_id = _records(tiny_cohort)[0].slide_id

    def bigger(f: Any) -> None:
        f["coords"].attrs["patch_size_level0"] = 128

    file = _one_file(features["trident"] / f"{slide_id}.h5", tmp_path / "t", bigger)
    msg = _error(file.parent, tiny_cohort)
    assert msg.startswith(str(file)) and "tiles of 128 level-0 px" in msg and "is 64" in msg

    def elsewhere(f: Any) -> None:
        f["coords"][0] = (10_000, 0)

    file = _one_file(features["clam"] / f"{slide_id}.h5", tmp_path / "c", elsewhere)
    assert "outside the slide" in _error(file.parent, tiny_cohort)


def test_boxes_find_the_tile_containing_their_centre(tmp_path: Path) -> None:
    # A grid offset from the model's boxes: each box takes the tile its centre falls in.
    coords = np.array([(5, 3), (69, 3), (5, 67)], dtype=np.int64)
    sf = SlideFeatures(tmp_path / "x.h5", "s", 64, 64.0, coords, False)
    assert [sf.row(0, 0), sf.row(64, 0), sf.row(0, 64), sf.row(64, 64)] == [0, 1, 2, None]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sf.row(-40, -40) is None


def test_the_configured_encoders_folder_is_picked(tmp_path: Path) -> None:
    from ats_wsi.slides.features_h5 import features_folder

    for name in ("features_uni_v1", "features_efficientnet-lite0"):
        (tmp_path / name).mkdir()
    assert features_folder(tmp_path, {"efficientnetlite0"}).name == "features_efficientnet-lite0"
    assert features_folder(tmp_path, {"uni"}).name == "features_uni_v1"  # TRIDENT's name
    with pytest.raises(FeaturesH5Error, match="features_efficientnet-lite0, features_uni_v1"):
        features_folder(tmp_path, {"virchow2"})
