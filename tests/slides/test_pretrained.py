"""A frozen pretrained encoder behind the sampler: feature cache, checkpoints, optimizer groups,
and the trainer / predictor end to end (the bundled ImageNet EfficientNet-Lite0)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ats_wsi.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from ats_wsi.encoders import FeatureCache
from ats_wsi.settings import parse
from ats_wsi.slides.engine import SlideSettings, build_model, slide_forward, slide_generator
from ats_wsi.slides.settings import ModelSettings
from ats_wsi.training import param_groups

LITE0 = {"name": "timm", "preset": "efficientnet-lite0", "input_size": 64}
SETTINGS = SlideSettings(attention_mpp=16.0, patch_mpp=0.5, patch_size=32, read_workers=2)


def _model(freeze: Any = True) -> Any:
    torch.manual_seed(0)
    cfg = {
        "attention_net": {"name": "histology", "width": 4},
        "feature_net": {**LITE0, "freeze": freeze},
        "n_patches": 4,
        "sampler": "without_replacement",
    }
    return build_model(parse(ModelSettings, cfg), 2, SETTINGS.patch_size)


def _slide(tiny_cohort: Path) -> str:
    with open(tiny_cohort, newline="") as fh:
        slide_id = next(csv.DictReader(fh))["slide_id"]
    (path,) = (tiny_cohort.parent / "slides").glob(f"{slide_id}.*")
    return str(path)


def test_feature_cache_skips_reads_and_gives_the_same_forward(tiny_cohort: Path) -> None:
    model = _model().train()
    path = _slide(tiny_cohort)
    item = SETTINGS.loader()(path)
    cache = FeatureCache(max_bytes=1 << 24)

    def run(feature_cache: Any) -> Any:
        gen = slide_generator(0, "s", 1)
        out, _ = slide_forward(
            model,
            item,
            path,
            SETTINGS,
            torch.device("cpu"),
            generator=gen,
            feature_cache=feature_cache,
        )
        return out

    plain = run(None)
    first = run(cache)
    assert (cache.hits, cache.misses) == (0, 4)
    second = run(cache)
    assert (cache.hits, cache.misses) == (4, 4) and cache.hit_rate == 0.5
    assert second.patches is None  # nothing was read the second time
    for out in (first, second):
        assert torch.equal(out.indices, plain.indices)
        torch.testing.assert_close(out.features, plain.features, rtol=0, atol=1e-6)
    # The attention net still gets its gradient through the estimator.
    second.logits.sum().backward()
    assert model.attention_net[0][0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.feature_net.parameters())


def test_checkpoint_references_a_frozen_encoder_and_restores_it(tmp_path: Path) -> None:
    model = _model()
    path = save_checkpoint(tmp_path / "c.pt", model=model, epoch=1)
    ckpt = load_checkpoint(path)
    (blob,) = ckpt["encoders"].values()
    assert blob["state_dict"] is None and blob["weights"]["sha256"]
    assert not any(k.startswith("feature_net.") for k in ckpt["model"])
    assert path.stat().st_size < 1 << 20  # the 13 MB encoder is referenced, not copied
    other = _model()
    torch.nn.init.zeros_(other.head.weight)
    load_model_state(other, ckpt)
    torch.testing.assert_close(other.head.weight, model.head.weight, rtol=0, atol=0)
    ckpt["model"]["head.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_model_state(other, ckpt)


def test_fine_tuned_blocks_get_their_own_learning_rate() -> None:
    model = _model(freeze=1)
    groups = param_groups(model, 1e-3, 30.0, encoder_lr=1e-5)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(3e-2), 1e-5]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable tensor once, frozen ones never
    encoder = {id(p) for p in model.feature_net.parameters() if p.requires_grad}
    assert encoder and {id(p) for p in groups[2]["params"]} == encoder


def test_train_and_predict_with_a_frozen_pretrained_encoder(
    tiny_cohort: Path, tiny_config: Any, tmp_path: Path
) -> None:
    from ats_wsi.slides.trainer import train

    cfg = tiny_config(tiny_cohort, epochs=2)
    cfg.model.feature_net = dict(LITE0)
    cfg.baseline.enabled = False
    results = train(cfg, tmp_path)
    log = [json.loads(x) for x in (tmp_path / "ats_metrics.jsonl").read_text().splitlines()]
    # Epoch 2 reads the cache epoch 1 filled (the same slides, some of the same boxes).
    assert log[0]["feature_cache_hit_rate"] < log[1]["feature_cache_hit_rate"]
    assert results["test_ats"]["n"] > 0 and results["test_ats"]["n_errors"] == 0
    assert load_checkpoint(tmp_path / "ats_best.pt")["encoders"]
