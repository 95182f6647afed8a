"""Speed limits: STS annotation rules on fixtures, the stand-in, and the pipeline end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ats_wsi.datasets.speed_limits import (
    CLASSES,
    Sign,
    SpeedLimits,
    SpeedLimitsStandIn,
    STSFormatError,
    label_for,
    load_speed_limits,
    parse_annotations,
)
from ats_wsi.experiments import speed_limits as experiment
from pipelines import speed_limits as pipe

ROOT = Path(__file__).resolve().parents[1]


def _sign(vis: str, name: str, size: float = 10.0, x: float = 0.0) -> str:
    return f"{vis}, {x + size}, {size}, {x}, 0.0, PROHIBITORY, {name}"


ANNOTATIONS = {
    "empty.jpg": "",
    "fifty.jpg": _sign("VISIBLE", "50_SIGN"),
    # visibility wins over area: the small VISIBLE 70 beats the big BLURRED 80
    "vis_first.jpg": f"{_sign('BLURRED', '80_SIGN', 50)};{_sign('VISIBLE', '70_SIGN', 5)}",
    # same visibility: the larger one decides
    "larger.jpg": f"{_sign('VISIBLE', '50_SIGN', 5)};{_sign('VISIBLE', '80_SIGN', 9)};",
    # best speed sign not VISIBLE: dropped
    "occluded.jpg": _sign("OCCLUDED", "70_SIGN"),
    # only other signs: dropped
    "other.jpg": _sign("VISIBLE", "PEDESTRIAN_CROSSING"),
    # other signs do not compete with speed limits
    "mixed.jpg": f"{_sign('VISIBLE', 'GIVE_WAY', 99)};{_sign('SIDE_ROAD', '50_SIGN')};"
    f"{_sign('VISIBLE', '80_SIGN', 2)}",
    # MISC_SIGNS entries are skipped; with nothing else left the image is EMPTY
    "misc.jpg": "MISC_SIGNS;",
    "misc_and_70.jpg": f"MISC_SIGNS, whatever;{_sign('VISIBLE', '70_SIGN')}",
    # tolerant floats: trailing junk after a number
    "junk.jpg": "VISIBLE, 12.5l, 10.0, 2.0, 0.0x, PROHIBITORY, 80_SIGN",
}
EXPECTED = {
    "empty.jpg": "EMPTY",
    "fifty.jpg": "50_SIGN",
    "vis_first.jpg": "70_SIGN",
    "larger.jpg": "80_SIGN",
    "mixed.jpg": "80_SIGN",
    "misc.jpg": "EMPTY",
    "misc_and_70.jpg": "70_SIGN",
    "junk.jpg": "80_SIGN",
}


def _write_set(folder: Path, annotations: dict[str, str], images: bool = True) -> None:
    folder.mkdir(parents=True)
    lines = [f"{name}:{signs}" for name, signs in annotations.items()]
    (folder / "annotations.txt").write_text("\n".join(lines) + "\n\n")
    if images:
        for k, name in enumerate(annotations):
            arr = np.full((960, 1280, 3), k, np.uint8)
            Image.fromarray(arr).save(folder / name, quality=95)


def test_labelling_rules(tmp_path: Path) -> None:
    _write_set(tmp_path / "Set1", ANNOTATIONS)
    _write_set(tmp_path / "Set2", {"fifty.jpg": ANNOTATIONS["fifty.jpg"]})
    items = load_speed_limits(tmp_path, "train")
    got = {p.name: CLASSES[y] for p, y in items}
    assert got == EXPECTED
    assert [p.name for p, _ in load_speed_limits(tmp_path, "test")] == ["fifty.jpg"]
    ds = SpeedLimits(tmp_path, "train")
    x, y = ds[0]
    assert x.shape == (3, 960, 1280) and x.dtype == torch.uint8 and CLASSES[y] == "EMPTY"
    assert "Set1" in ds.source


def test_parse_values(tmp_path: Path) -> None:
    p = tmp_path / "annotations.txt"
    p.write_text("a.jpg:VISIBLE, 12.5l, 10.0, 2.0, 0.0x, PROHIBITORY, 80_SIGN\n")
    ((name, (sign,)),) = parse_annotations(p)
    assert name == "a.jpg"
    assert sign == Sign("VISIBLE", 12.5, 10.0, 2.0, 0.0, "PROHIBITORY", "80_SIGN")
    assert sign.area == pytest.approx(105.0)
    assert label_for([]) == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("no_colon.jpg VISIBLE, 1, 1, 0, 0, T, 50_SIGN", "expected '<file>:<signs>'"),
        ("a.jpg:VISIBLE, 1, 1, 0, 0, 50_SIGN", "7 comma-separated fields"),
        ("a.jpg:SHINY, 1, 1, 0, 0, T, 50_SIGN", "unknown visibility 'SHINY'"),
        ("a.jpg:VISIBLE, abc, 1, 0, 0, T, 50_SIGN", "not a number"),
        (":VISIBLE, 1, 1, 0, 0, T, 50_SIGN", "empty file name"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "annotations.txt"
    p.write_text(f"ok.jpg:\n\n{line}\n")
    with pytest.raises(STSFormatError) as info:
        parse_annotations(p)
    assert f"{p}:3:" in str(info.value) and message in str(info.value)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="annotations"):
        load_speed_limits(tmp_path, "train")
    _write_set(tmp_path / "Set1", {"gone.jpg": ""}, images=False)
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        load_speed_limits(tmp_path, "train")


def test_stand_in_is_deterministic_and_lazy() -> None:
    a, b = SpeedLimitsStandIn(6, seed=3), SpeedLimitsStandIn(6, seed=3)
    x, y = a[4]
    assert x.shape == (3, 960, 1280) and x.dtype == torch.uint8
    assert torch.equal(x, b[4][0]) and y == b[4][1] == a.label(4)
    assert not torch.equal(x, SpeedLimitsStandIn(6, seed=4)[4][0])
    labels = SpeedLimitsStandIn(400, seed=0).labels
    assert set(labels) == {0, 1, 2, 3} and min(np.bincount(labels)) > 60
    assert len(__import__("pickle").dumps(SpeedLimitsStandIn(10**6))) < 2000


def test_stand_in_smaller_scene_keeps_sign_geometry() -> None:
    ds = SpeedLimitsStandIn(40, seed=1, image_size=(360, 480), n_clutter=10)
    x, _ = ds[0]
    assert x.shape == (3, 360, 480)
    for i in range(40):
        lay = ds.layout(i)
        if lay.sign_centre is None:
            continue
        (cy, cx), d = lay.sign_centre, lay.sign_diameter
        assert 18 <= d <= 30 and d <= cx <= 480 - d and 0.25 * 360 <= cy < 0.6 * 360
    with pytest.raises(ValueError, match="too small"):
        SpeedLimitsStandIn(1, image_size=(100, 480))


@pytest.mark.parametrize(
    ("image_size", "sign_diameter", "scale", "low_size"),
    [
        ((960, 1280), (18, 30), 0.3, (288, 384)),  # the paper's geometry
        ((180, 240), (30, 40), 0.2, (36, 48)),  # configs/speed_limits_small.yaml
    ],
)
def test_stand_in_number_readable_only_at_full_resolution(
    image_size: tuple[int, int],
    sign_diameter: tuple[int, int],
    scale: float,
    low_size: tuple[int, int],
) -> None:
    ds = SpeedLimitsStandIn(30, seed=0, image_size=image_size, sign_diameter=sign_diameter)
    i = next(k for k in range(30) if ds.layout(k).label != 0)
    lay = ds.layout(i)
    fifty, eighty = ds.render(i, 1), ds.render(i, 3)
    diff = np.abs(fifty.astype(int) - eighty.astype(int)).max(axis=2)
    ys, xs = np.nonzero(diff)
    cy, cx = lay.sign_centre
    # The numbers differ only inside the sign...
    assert np.all(np.abs(ys - cy) <= lay.sign_diameter) and np.all(
        np.abs(xs - cx) <= lay.sign_diameter
    )

    def low(img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
        return experiment.low_res_view(t, scale)

    # ...and in the low-res view the strongest per-pixel difference drops to under a third of
    # the full-resolution one (measured 0.15-0.28 of it over 50 signs at 0.3): a faint blur.
    hi = diff.max() / 255
    lo = float((low(fifty) - low(eighty)).abs().max())
    assert lo < 0.33 * hi
    assert low(fifty).shape[-2:] == low_size


def test_augment_shapes_and_ranges() -> None:
    cfg = {"contrast": [0.8, 1.2], "brightness": [-0.1, 0.1], "pan_px": 100}
    x = torch.rand(3, 3, 50, 60)
    out = experiment.augment(x, cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    big = torch.ones(2, 1, 400, 400)
    panned = experiment.augment(
        big, {**cfg, "contrast": [1, 1], "brightness": [0, 0]}, torch.Generator().manual_seed(1)
    )
    zeros = (panned == 0).float().mean(dim=(1, 2, 3))
    assert torch.all(zeros <= 1 - (300 / 400) ** 2 + 1e-6)  # at most 100 px off each axis
    x_low = experiment.low_res_view(torch.rand(1, 3, 960, 1280), 0.3)
    assert x_low.shape == (1, 3, 288, 384)


def test_pipeline_end_to_end(tmp_path: Path) -> None:
    tiny = {
        "device": "cpu",
        "data": {"n_train": 6, "n_test": 4},
        "model": {"feature_net_args": {"width": 8, "strides": [2, 2, 2, 2]}, "n_patches": 2},
        "train": {"epochs": 2, "batch_size": 3, "lr_decay_epochs": [1]},
        "baselines": {"low_res_cnn": {"width": 8, "depth": 2, "epochs": 1}},
        "report": {"n_figures": 1, "cost_batch_size": 2, "cost_repeats": 1},
    }
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(tiny))
    out = tmp_path / "run"
    assert pipe.main(["--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"ats", "low_res_cnn"}
    assert "stand-in" in res["data"]["train_source"]
    assert res["models"]["ats"]["epochs_completed"] == 2
    assert (out / res["models"]["ats"]["figures"][0]).exists()
    ckpt = torch.load(out / "ats_checkpoint.pt", weights_only=True)
    assert ckpt["scheduler"]["milestones"] == {1: 1}  # MultiStepLR state survived
    tiny["train"]["epochs"] = 3
    cfg.write_text(yaml.safe_dump(tiny))
    assert pipe.main(["--config", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 0
    epochs = [json.loads(s)["epoch"] for s in (out / "ats_metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("train", {"epochs": 1, "contrast": [0.8]}, "'train.contrast' must be 2 numbers"),
        ("data", {"class_prob": [1, 0, 0, 0]}, "unknown key 'data.class_prob'"),
        ("model", {"sampler": "magic"}, "'model.sampler' must be one of"),
    ],
)
def test_config_errors(tmp_path: Path, capsys, section: str, value: dict, message: str) -> None:
    cfg = {"train": {"epochs": 1}, section: value}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert pipe.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


@pytest.mark.parametrize("name", ["speed_limits.yaml", "speed_limits_small.yaml"])
def test_shipped_configs_validate(name: str) -> None:
    cfg = experiment.load_config(str(ROOT / "configs" / name))
    if name == "speed_limits.yaml":  # the paper's protocol (ATS_SPEC 2.2)
        m, t = cfg["model"], cfg["train"]
        assert (cfg["data"]["scale"], m["n_patches"], m["patch_size"]) == (0.3, 5, 100)
        assert (m["attention_net"], m["feature_net"]) == ("sts", "sts_resnet")
        assert (t["lr"], t["batch_size"], t["epochs"], t["lr_decay_epochs"]) == (
            1e-3,
            32,
            500,
            [250],
        )
        assert t["class_balanced"] and t["augment"] and t["pan_px"] == 100


@pytest.mark.slow
def test_small_config_learns_above_chance(tmp_path: Path) -> None:
    """The shipped small config, end to end on the stand-in (about 5 minutes on 2 cores)."""
    config = ROOT / "configs" / "speed_limits_small.yaml"
    assert pipe.main(["--config", str(config), "--out", str(tmp_path), "--no-progress"]) == 0
    models = json.loads((tmp_path / "results.json").read_text())["models"]
    # Chance is 75 % error. Measured with this seed on 2 threads: ATS 2.0 %, low-res CNN 60 %;
    # ATS first went under 40 % at epoch 6 of 12 (docs/speed_limits.md).
    assert models["ats"]["test_error"] <= 0.40, models["ats"]
    assert models["ats"]["test_error"] <= models["low_res_cnn"]["test_error"] - 0.2, models
