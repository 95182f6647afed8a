"""Command lines: one-line errors naming the file, --debug, --help examples, ats-wsi, and the
mpp flags / manifest columns reaching every CSV row (real SVS, plain images)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from slide_helpers import rows, shared_slides, untrained_checkpoint

from ats_wsi.cli import main as ats_wsi_main
from ats_wsi.io import MissingResolutionError
from ats_wsi.slides.manifest import ManifestError
from pipelines import convert_slide, predict_slides, train_slides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "ats.pt")


def one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_expected_errors_are_one_line(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("case_id,label\nc1,tumor\n")  # no slide_id
    base = ["--checkpoint", str(checkpoint), "--out", str(tmp_path / "o")]
    assert predict_slides.main([*base, "--slides", str(bad)]) == 1
    one_error_line(capsys, str(bad), "line 1", "missing column(s) slide_id")
    with pytest.raises(ManifestError):  # --debug: the real exception, with its traceback
        predict_slides.main([*base, "--slides", str(bad), "--debug"])

    missing = tmp_path / "nope.pt"
    args = ["--checkpoint", str(missing), "--slides", str(tmp_path), "--out", str(tmp_path)]
    assert predict_slides.main(args) == 1
    one_error_line(capsys, str(missing), "checkpoint not found")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    args[1] = str(garbage)
    assert predict_slides.main(args) == 1
    one_error_line(capsys, str(garbage), "not a usable ats_wsi checkpoint")

    empty = tmp_path / "empty"
    empty.mkdir()
    assert predict_slides.main([*base, "--slides", str(empty)]) == 1
    one_error_line(capsys, str(empty), "no slide files")

    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  epochz: 3\n")
    assert train_slides.main(["--config", str(config), "--out", str(tmp_path / "t")]) == 1
    one_error_line(capsys, str(config), "unknown key 'train.epochz'")
    assert train_slides.main(["--config", str(tmp_path / "no.yaml")]) == 1
    one_error_line(capsys, "no.yaml", "No such file")
    slides_missing = tmp_path / "cohort.csv"
    slides_missing.write_text("case_id,slide_id,label\nc1,gone,tumor\n")
    config.write_text(f"data:\n  manifest: {slides_missing}\n")
    assert train_slides.main(["--config", str(config), "--out", str(tmp_path / "t")]) == 1
    one_error_line(capsys, str(slides_missing), "slide file not found for: gone (line 2)")

    damaged = tmp_path / "damaged.tif"
    damaged.write_bytes(b"II*\x00" + bytes(100))
    assert convert_slide.main([str(damaged), str(tmp_path / "d.zarr")]) == 1
    one_error_line(capsys, str(damaged), "damaged")

    with pytest.raises(SystemExit) as exit_:  # argparse: usage and the bad flag, status 2
        predict_slides.main([*base, "--slides", str(empty), "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for module in (predict_slides, train_slides, convert_slide):
        with pytest.raises(SystemExit) as exit_:
            module.main(["--help"])
        out = capsys.readouterr().out
        assert exit_.value.code == 0 and "examples:" in out and "--mpp" in out, module


def test_ats_wsi_console_script(capsys: pytest.CaptureFixture[str]) -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ats-wsi"] == "ats_wsi.cli:main"
    assert ats_wsi_main([]) == 2 and "predict" in capsys.readouterr().err
    assert ats_wsi_main(["nonesuch"]) == 2
    with pytest.raises(SystemExit):
        ats_wsi_main(["predict", "--help"])
    assert "usage: ats-wsi predict" in capsys.readouterr().out


@pytest.mark.slow
def test_ats_wsi_in_a_subprocess(tmp_path: Path) -> None:
    # The real entry point, as a user runs it: one line on stderr, status 1.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "ats_wsi.cli", "predict", "--checkpoint", str(tmp_path / "x.pt")]
    done = subprocess.run(
        [*cmd, "--slides", str(tmp_path), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert done.returncode == 1
    assert (
        done.stderr.strip() == f"ats-wsi predict: error: {tmp_path / 'x.pt'}: checkpoint not found"
    )


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real slides and images with and without a resolution, and a manifest over them."""
    slides_dir = shared_slides()
    folder = tmp_path_factory.mktemp("mixed")
    svs = (slides_dir / "CMU-1-Small-Region.svs").read_bytes()
    (folder / "nompp.svs").write_bytes(svs.replace(b"|MPP = 0.4990|", b"|XPP = 0.4990|"))
    (folder / "withmpp.svs").write_bytes(svs)
    (folder / "thumb.png").write_bytes(
        (slides_dir / "TCGA-HE-7130-01Z-00-DX1-thumbnail.png").read_bytes()
    )
    (folder / "kather.tif").write_bytes((slides_dir / "kather-tile-1.tif").read_bytes())
    # The plain TIFF: 1493 x 901, uncompressed, no resolution tags.
    from PIL import Image

    with Image.open(folder / "thumb.png") as im:
        tile = np.asarray(im.convert("RGB"))
    tifffile.imwrite(folder / "plain.tif", np.tile(tile, (1, 2, 1))[:901, :1493], photometric="rgb")
    return folder


@pytest.mark.slow
def test_mpp_sources_in_rows(checkpoint: Path, cohort: Path, tmp_path: Path) -> None:
    base = ["--checkpoint", str(checkpoint), "--no-gallery", "--no-zarr", "--no-heatmaps"]
    # No --mpp: files without a resolution are error rows saying how to give one.
    assert predict_slides.main([*base, "--slides", str(cohort), "--out", str(tmp_path / "a")]) == 0
    table = {r["slide_id"]: r for r in rows(tmp_path / "a" / "predictions.csv")}
    assert table["withmpp"]["error"] == ""
    assert (table["withmpp"]["mpp"], table["withmpp"]["mpp_source"]) == ("0.499", "metadata")
    for sid in ("nompp", "thumb", "kather", "plain"):
        assert "MissingResolutionError" in table[sid]["error"] and "--mpp" in table[sid]["error"]
    assert "objective power 20" in table["nompp"]["error"]

    # --mpp fills in where the file has none; the metadata still wins elsewhere.
    argv = [*base, "--slides", str(cohort), "--out", str(tmp_path / "b"), "--mpp", "0.5"]
    assert predict_slides.main(argv) == 0
    table = {r["slide_id"]: r for r in rows(tmp_path / "b" / "predictions.csv")}
    # The Kather tile is read, but is tissue from edge to edge: Otsu finds no glass.
    assert table.pop("kather")["error"].startswith("NoTissueError")
    assert all(r["error"] == "" for r in table.values()), table
    assert {s: (r["mpp"], r["mpp_source"]) for s, r in table.items()} == {
        "withmpp": ("0.499", "metadata"),
        "nompp": ("0.5", "cli"),
        "thumb": ("0.5", "cli"),
        "plain": ("0.5", "cli"),
    }

    # A manifest's mpp / magnification per slide; --mpp-override makes them win.
    manifest = cohort / "m.csv"
    manifest.write_text(
        "case_id,slide_id,label,path,mpp,magnification\n"
        "c1,nompp,tumor,nompp.svs,,20\n"
        "c2,withmpp,normal,withmpp.svs,0.25,\n"
        "c3,thumb,normal,thumb.png,2,\n"
        "c4,plain,normal,plain.tif,,\n"
    )
    argv = [*base, "--slides", str(manifest), "--mpp", "1"]
    assert predict_slides.main([*argv, "--out", str(tmp_path / "c")]) == 0
    table = {r["slide_id"]: r for r in rows(tmp_path / "c" / "predictions.csv")}
    assert {s: (r["mpp"], r["mpp_source"]) for s, r in table.items()} == {
        "nompp": ("0.5", "manifest"),
        "withmpp": ("0.499", "metadata"),
        "thumb": ("2", "manifest"),
        "plain": ("1", "cli"),
    }
    assert predict_slides.main([*argv, "--mpp-override", "--out", str(tmp_path / "d")]) == 0
    table = {r["slide_id"]: r for r in rows(tmp_path / "d" / "predictions.csv")}
    assert (table["withmpp"]["mpp"], table["withmpp"]["mpp_source"]) == ("0.25", "override")
    assert (table["plain"]["mpp"], table["plain"]["mpp_source"]) == ("1", "override")


@pytest.mark.slow
def test_train_with_per_slide_mpp(tiny_cohort: Path, tiny_config, tmp_path: Path) -> None:
    """Slides without a resolution train when the manifest gives one per slide; the test
    split's rows say where it came from, and the config default covers the rest."""
    import pandas as pd

    from ats_wsi.slides.trainer import train

    df = pd.read_csv(tiny_cohort)
    (tmp_path / "slides").mkdir()
    for sid in df.slide_id:
        dst = tmp_path / "slides" / f"{sid}.tif"
        dst.write_bytes((tiny_cohort.parent / "slides" / f"{sid}.tif").read_bytes())
        with tifffile.TiffFile(dst, mode="r+") as tif:
            for page in tif.pages:  # resolution unit "none": OpenSlide reports no mpp
                page.tags["ResolutionUnit"].overwrite(1)
    df["mpp"] = [0.5 if i % 2 == 0 else "" for i in range(len(df))]
    df.drop(columns=[c for c in ("path",) if c in df.columns]).to_csv(
        tmp_path / "m.csv", index=False
    )
    cfg = tiny_config(tmp_path / "m.csv")
    cfg.baseline.enabled = False
    cfg.predict = replace(cfg.predict, heatmaps=False, zarr=False, geojson=False)
    with pytest.raises(MissingResolutionError):
        train(cfg, tmp_path / "run0")  # the odd slides have no mpp anywhere
    cfg.data.mpp = 0.5
    train(cfg, tmp_path / "run")
    table = rows(tmp_path / "run" / "predictions" / "predictions.csv")
    by_id = dict(zip(df.slide_id, df.mpp, strict=True))
    assert table and all(r["error"] == "" and r["mpp"] == "0.5" for r in table)
    for r in table:
        assert r["mpp_source"] == ("manifest" if by_id[r["slide_id"]] == 0.5 else "cli")


def test_record_mpp_spec_order() -> None:
    from ats_wsi.io.readers import MppSpec
    from ats_wsi.slides.engine import SlideSettings
    from ats_wsi.slides.inference import PredictOptions, record_mpp_spec

    plain, legacy = SlideSettings(), SlideSettings(slide_mpp=0.3)
    opts = PredictOptions(mpp=1.0, mpp_override=True)
    rec = {"slide_id": "s", "path": "/x/s.svs", "mpp": float("nan"), "magnification": 40.0}
    assert record_mpp_spec(rec, opts, plain) == MppSpec(
        default=0.25, override=True, default_source="manifest"
    )
    assert record_mpp_spec({"slide_id": "s"}, opts, plain) == MppSpec(default=1.0, override=True)
    # Without any user value, a training config's slide_mpp still overrides, as it did.
    assert record_mpp_spec({"slide_id": "s"}, PredictOptions(), legacy) == 0.3
    assert record_mpp_spec({"slide_id": "s"}, PredictOptions(), plain) == MppSpec()
