"""The cohort benchmark: MIL heads, the tile-grid attention, the feature cache, the metrics;
``--quick`` end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ats_wsi.benchmarks import cohort as bc
from ats_wsi.benchmarks import cohort_tasks as ct
from ats_wsi.mil import GatedAttentionMIL, MeanPoolMIL, fit_mil, predict_mil


def _bags(n_bags: int, size: int, seed: int) -> tuple[list[torch.Tensor], list[int]]:
    """Bags of noise; a positive bag holds ONE instance shifted along dimension 0."""
    g = torch.Generator().manual_seed(seed)
    bags, labels = [], []
    for i in range(n_bags):
        bag = torch.randn(size, 8, generator=g)
        y = i % 2
        if y:
            bag[int(torch.randint(size, (1,), generator=g))] += torch.tensor([6.0] + [0.0] * 7)
        bags.append(bag)
        labels.append(y)
    return bags, labels


def test_abmil_attention_is_a_distribution_and_order_free() -> None:
    torch.manual_seed(0)
    model = GatedAttentionMIL(8, hidden=16, attention_dim=8).eval()
    bag = torch.randn(30, 8)
    out = model(bag)
    assert out.logits.shape == (1, 2)
    assert torch.allclose(out.attention.sum(), torch.tensor(1.0))
    perm = torch.randperm(30)
    again = model(bag[perm])
    assert torch.allclose(again.logits, out.logits, atol=1e-6)
    assert torch.allclose(again.attention, out.attention[perm], atol=1e-6)
    mean = MeanPoolMIL(8)(bag)
    assert torch.allclose(mean.attention, torch.full((30,), 1 / 30))


@pytest.mark.slow
def test_abmil_finds_one_positive_instance_mean_pooling_does_not() -> None:
    train, y_train = _bags(60, 64, 0)
    test, y_test = _bags(40, 64, 1)
    accs = {}
    for name, model, lr in (
        ("abmil", GatedAttentionMIL(8, hidden=16, attention_dim=8, dropout=0.0), 5e-3),
        ("mean", MeanPoolMIL(8), 5e-2),
    ):
        torch.manual_seed(0)
        fit_mil(model, train, y_train, epochs=15, lr=lr, seed=0)
        probs, att = predict_mil(model, test)
        accs[name] = float(((probs[:, 1] > 0.5) == np.array(y_test)).mean())
        if name == "abmil":
            # Attention peaks on the shifted instance of positive bags.
            peaks = [int(a.argmax()) for a, y in zip(att, y_test, strict=True) if y]
            shifted = [int(b[:, 0].argmax()) for b, y in zip(test, y_test, strict=True) if y]
            assert np.mean(np.array(peaks) == np.array(shifted)) > 0.8
    assert accs["abmil"] >= 0.9
    assert accs["mean"] < accs["abmil"] - 0.2


def test_tile_grid_cells_are_the_tiles() -> None:
    from ats_wsi.mapping import GridMapping
    from ats_wsi.nets import build_attention_net

    net = build_attention_net("tile_pool", width=4)
    view = torch.rand(1, 3, 24, 40)  # a 768 x 1280 px slide at 16 um/px vs 0.5 um/px
    logits = net(view)
    assert logits.shape == (1, 1, 3, 5)
    assert build_attention_net("uniform_tiles")(view).abs().sum() == 0
    mapping = GridMapping(
        low_size=(24, 40),
        high_size=(768, 1280),
        attention_size=(3, 5),
        receptive_field=0,
        patch_size=ct.TILE_PX,
    )
    tl = mapping.top_left(torch.arange(15)[None])[0]
    assert tl.tolist() == [[256 * (i // 5), 256 * (i % 5)] for i in range(15)]


def test_attention_view_sets_the_tile_grid_and_the_feature_key() -> None:
    assert ct._pool(16.0) == 8 and ct._pool(8.0) == 16  # a 128 um tile in view pixels
    for bad in (5.0, 256.0):
        with pytest.raises(ValueError, match="must divide"):
            ct._pool(bad)
    cfg = {"encoder": "efficientnet-lite0", "encoder_size": 112, "bf16": True, "min_tissue": 0.5}
    keys = {m: ct._encoder_key({**cfg, "attention_mpp": m}) for m in (16.0, 8.0)}
    # The view's tissue mask decides the grid, so another view gets its own feature folder.
    assert keys[16.0] != keys[8.0]
    assert keys[16.0] == ct._encoder_key({**cfg, "attention_mpp": 16.0})


def test_feature_cache_serves_the_model_without_reads(tmp_path: Path) -> None:
    """The extracted features are keyed as ATSModel looks them up: no read, no encode."""
    from ats_wsi.io import SlidePatchSource
    from ats_wsi.io.readers import open_slide
    from ats_wsi.slides.engine import build_model
    from ats_wsi.slides.realistic_cohort import default_source_dir
    from ats_wsi.slides.settings import ModelSettings

    slide = default_source_dir() / "CMU-1-Small-Region.svs"
    if not slide.exists():
        pytest.skip("shared slide fixtures not found")
    cfg = {"encoder": "efficientnet-lite0", "encoder_size": 32}
    encoder = ct._build_encoder(cfg)
    top_left = torch.tensor([[[0, 0], [256, 512]]])
    with open_slide(slide) as reader, SlidePatchSource(reader, ct.TILE_PX, ct.PATCH_MPP) as src:
        feats = ct._encode(encoder, src.extract(top_left)[0], bf16=False)
        box = src.patch_size  # 257: this slide is at 0.499 um/px, not 0.5
        np.savez(tmp_path / "s.npz", features=feats.numpy(), top_left=top_left[0].numpy(), box=box)
    records = [{"slide_id": "s", "path": str(slide)}]
    cache = bc.feature_cache({"records": records, "feature_dir": str(tmp_path)}, encoder)
    model = build_model(
        ModelSettings(
            attention_net="uniform_tiles", feature_net=ct._feature_spec(cfg), n_patches=2
        ),
        2,
        ct.TILE_PX,
    )
    assert model.feature_net.encoder_id == encoder.encoder_id  # built twice, same key
    with open_slide(slide) as reader, SlidePatchSource(reader, ct.TILE_PX, ct.PATCH_MPP) as src:
        got = model._cached_features(src, top_left, cache)
        assert src.reads == 0
    assert cache.misses == 0 and cache.hits == 2
    torch.testing.assert_close(got, feats)


def test_bootstrap_ci() -> None:
    y = [0, 0, 0, 1, 1, 1]
    perfect = bc.bootstrap_ci(y, [0.1, 0.2, 0.3, 0.7, 0.8, 0.9], n_boot=200)
    assert perfect["auc"] == 1.0 and perfect["auc_ci"] == [1.0, 1.0]
    assert perfect["balanced_accuracy"] == 1.0
    noisy = bc.bootstrap_ci(y, [0.1, 0.8, 0.3, 0.7, 0.2, 0.9], n_boot=200)
    assert noisy["auc_ci"][0] < noisy["auc"] < noisy["auc_ci"][1] or noisy["auc_ci"][0] == 0


def test_lesion_size_auc_splits_positives_by_largest_lesion() -> None:
    rows = [
        {"slide_id": "n0", "y": 0, "p": 0.1},
        {"slide_id": "n1", "y": 0, "p": 0.6},
        {"slide_id": "s0", "y": 1, "p": 0.5},  # largest lesion 250 um: small
        {"slide_id": "l0", "y": 1, "p": 0.9},  # 250 and 400 um: large
        {"slide_id": "l1", "y": 1, "p": 0.7},
    ]
    diam = {"n0": [], "n1": [], "s0": [250.0], "l0": [250.0, 400.0], "l1": [300.0]}
    out = bc.lesion_size_auc(rows, diam, threshold_um=300.0)
    # small: 0.5 beats 0.1, loses to 0.6 -> 1/2; large: 0.9 and 0.7 beat both negatives.
    assert out == {"threshold_um": 300.0, "small": 0.5, "n_small": 1, "large": 1.0, "n_large": 2}
    none = bc.lesion_size_auc(rows[:2] + rows[3:], diam)
    assert none["small"] is None and none["n_small"] == 0 and none["large"] == 1.0


@pytest.mark.slow
def test_quick_end_to_end(tmp_path: Path) -> None:
    """``python -m pipelines.benchmark cohort --quick``: every method runs and is reported."""
    from ats_wsi.slides.realistic_cohort import default_source_dir
    from pipelines.benchmark import main

    if not default_source_dir().is_dir():
        pytest.skip("shared slide sources not found")
    out = tmp_path / "cohort.json"
    argv = ["cohort", "--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert main([*argv, "--figures", str(tmp_path / "figs")]) == 0
    payload = json.loads(out.read_text())
    methods = {r["method"] for r in payload["results"]}
    assert methods == {
        "ats", "ats-plain", "random", "zoom", "zoom-plain", "abmil", "abmil-lr2e-3", "mean",
        "lowres",
    }
    assert {g["N"] for g in payload["goal"]["per_n"]} == {4}
    assert [z["name"] for z in payload["goal"]["zoom"]] == ["zoom_2x2"]
    for r in payload["results"]:
        assert 0.0 <= r["auc"] <= 1.0 and r["peak_rss_mb"] > 0
    ats = next(r for r in payload["results"] if r["method"] == "ats")
    assert ats["tiles_per_slide"] == 4 and ats["tile_fraction"] < 1
    # Training and test looked every sampled tile up in the extracted features: no read.
    raw = payload["raw"]["0"]
    assert raw["ats_4"]["cache_misses"] == {"train": 0, "test": 0}
    # Zoom reads its regions from the slide, but every tile it samples is an extracted one.
    assert raw["zoom_2x2"]["cache_misses"] == {"train": 0, "test": 0}
    zoom = next(r for r in payload["results"] if r["method"] == "zoom")
    assert zoom["N"] == 4 and 0 < zoom["tiles_per_slide"] <= 4
    assert 0 < zoom["zoom"]["region_tissue_fraction_max"] <= 1
    assert zoom["pixel_fraction"] < 1 and zoom["zoom"]["region_px_per_slide"] > 0
    assert set(zoom["auc_by_stratum"]) >= {"<200", "200-300", "300-1000"}
    assert (tmp_path / "figs" / "cohort_auc_vs_tiles.png").exists()


def test_lesion_strata_auc_bins_positives_by_largest_lesion() -> None:
    from ats_wsi.benchmarks.cohort_stats import lesion_strata_auc

    rows = [
        {"slide_id": "n0", "y": 0, "p": 0.1},
        {"slide_id": "n1", "y": 0, "p": 0.6},
        {"slide_id": "a", "y": 1, "p": 0.5},  # 150 um: < 200
        {"slide_id": "b", "y": 1, "p": 0.9},  # 250 um: 200-300
        {"slide_id": "c", "y": 1, "p": 0.7},  # 120 and 300 um: 300-1000
    ]
    diam = {"n0": [], "n1": [], "a": [150.0], "b": [250.0], "c": [120.0, 300.0]}
    out = lesion_strata_auc(rows, diam)
    assert out == {
        "<200": 0.5, "n_<200": 1, "200-300": 1.0, "n_200-300": 1, "300-1000": 1.0,
        "n_300-1000": 1,
    }
    assert lesion_strata_auc(rows[:2] + rows[3:], diam)["<200"] is None


def test_aggregate_seeds_means_and_spreads() -> None:
    def row(auc: float, cover: float) -> dict:
        return {
            "name": "zoom_4x4", "method": "zoom", "N": 16, "auc": auc, "auc_ci": [0, 1],
            **{k: 1.0 for k in bc._SEED_MEAN if k != "auc"},
            "lesion_hit_fraction": None,
            "auc_by_stratum": {"<200": auc, "n_<200": 3}, "auc_by_lesion_size": {"small": None},
            "zoom": {"region_tissue_fraction_max": cover, "region_px_per_slide": 10.0},
        }

    out = bc.aggregate_seeds([[row(0.8, 0.2)], [row(0.9, 0.3)], [row(1.0, 0.1)]])
    (agg,) = out
    assert agg["auc"] == pytest.approx(0.9) and agg["auc_sd"] == pytest.approx(0.1)
    assert agg["auc_per_seed"] == [0.8, 0.9, 1.0] and agg["n_seeds"] == 3
    assert agg["auc_by_stratum"]["<200"] == pytest.approx(0.9)
    assert agg["auc_by_lesion_size"]["small"] is None and agg["lesion_hit_fraction"] is None
    assert agg["zoom"]["region_tissue_fraction_max"] == 0.3  # the worst seed, not the mean
    with pytest.raises(ValueError, match="same methods"):
        bc.aggregate_seeds([[row(0.8, 0.2)], [{**row(0.8, 0.2), "name": "ats_16"}]])
