"""train_slides / predict_slides end to end on a tiny cohort: files, resume, crash-safe CSV,
error rows, dask scale-out and two-process DDP training."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ats_wsi.settings import to_dict
from ats_wsi.slides.export import prediction_columns
from ats_wsi.slides.inference import PredictOptions, predict_many, records_from_frame
from ats_wsi.slides.manifest import read_manifest
from ats_wsi.slides.trainer import train
from pipelines import predict_slides

ROOT = Path(__file__).resolve().parents[2]


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(tiny_cohort: Path, tiny_config: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    threads = torch.get_num_threads()  # a module fixture runs outside one_thread: restore it
    torch.set_num_threads(1)
    try:
        train(tiny_config(tiny_cohort), out)
    finally:
        torch.set_num_threads(threads)
    return out


def test_train_writes_metrics_checkpoints_predictions(trained: Path) -> None:
    for name in ("ats_best.pt", "ats_last.pt", "baseline_best.pt", "splits.csv", "results.json"):
        assert (trained / name).exists(), name
    (record,) = [json.loads(x) for x in (trained / "ats_metrics.jsonl").read_text().splitlines()]
    for key in ("train_loss", "train_accuracy", "train_balanced_accuracy", "val_loss", "val_auc"):
        assert key in record
    ckpt = torch.load(trained / "ats_best.pt", weights_only=True)
    assert ckpt["extra"]["classes"] == ["normal", "tumor"] and "torch" in ckpt["versions"]
    splits = rows(trained / "splits.csv")
    by_case: dict[str, set[str]] = {}
    for r in splits:
        by_case.setdefault(r["case_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_case.values())
    results = json.loads((trained / "results.json").read_text())
    assert results["test_ats"]["n"] == sum(r["split"] == "test" for r in splits)
    assert "test_baseline" in results


def test_resume_continues_without_duplicate_lines(
    tiny_cohort: Path, tiny_config: Any, trained: Path
) -> None:
    cfg = tiny_config(tiny_cohort, epochs=2)
    cfg.baseline.enabled = False
    cfg.predict.enabled = False
    out = trained.parent / "resumed"
    shutil.copytree(trained, out)
    train(cfg, out, resume_run=True)
    epochs = [json.loads(x)["epoch"] for x in (out / "ats_metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert torch.load(out / "ats_last.pt", weights_only=True)["epoch"] == 2


def test_predict_cli_columns_artefacts_and_rerun(
    tiny_cohort: Path, trained: Path, tmp_path: Path
) -> None:
    argv = [
        "--checkpoint",
        str(trained / "ats_best.pt"),
        "--slides",
        str(tiny_cohort),
        "--out",
        str(tmp_path),
        "--no-gallery",
        "--geojson",
    ]
    assert predict_slides.main(argv) == 0
    table = rows(tmp_path / "predictions.csv")
    n = len(read_manifest(tiny_cohort))
    assert len(table) == n
    assert list(table[0]) == prediction_columns(["normal", "tumor"])
    assert all(r["error"] == "" and r["n_patches"] == "4" for r in table)
    for r in table:
        assert abs(float(r["p_0"]) + float(r["p_1"]) - 1) < 1e-4
        assert int(r["Y_hat"]) == int(float(r["p_1"]) > float(r["p_0"]))
    sid = table[0]["slide_id"]
    for sub, ext in (("heatmaps", "png"), ("zarr", "zarr"), ("geojson", "geojson")):
        assert (tmp_path / sub / f"{sid}.{ext}").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n"] == n and "auc" in metrics

    # Kill simulation: the last row is cut in the middle; the rerun repairs and redoes only it.
    text = (tmp_path / "predictions.csv").read_text()
    cut = text.rstrip("\n").rfind("\n") + 12
    (tmp_path / "predictions.csv").write_text(text[:cut])
    seen: list[str] = []
    predict_many(
        records_from_frame(read_manifest(tiny_cohort)),
        trained / "ats_best.pt",
        tmp_path,
        PredictOptions(gallery=False, heatmaps=False, zarr=False),
        on_row=lambda r: seen.append(r["slide_id"]),
    )
    assert seen == [table[-1]["slide_id"]]
    again = rows(tmp_path / "predictions.csv")
    assert [r["slide_id"] for r in again] == [r["slide_id"] for r in table]
    assert predict_slides.main(argv) == 0  # nothing left to do: no duplicates
    assert len(rows(tmp_path / "predictions.csv")) == n


def test_unreadable_slides_become_error_rows(
    tiny_cohort: Path, trained: Path, tmp_path: Path
) -> None:
    good = sorted((tiny_cohort.parent / "slides").glob("*.tif"))[0]
    shutil.copy(good, tmp_path / "good.tif")
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(2000))
    (tmp_path / "m.csv").write_text(
        "case_id,slide_id,label\nc1,good,tumor\nc2,corrupt,normal\nc3,missing,normal\n"
    )
    summary = predict_many(
        records_from_frame(read_manifest(tmp_path / "m.csv", slide_dir=tmp_path)),
        trained / "ats_best.pt",
        tmp_path / "out",
        PredictOptions(gallery=False),
    )
    table = {r["slide_id"]: r for r in rows(tmp_path / "out" / "predictions.csv")}
    assert table["good"]["error"] == "" and table["good"]["Y_hat"] in ("0", "1")
    assert "Slide" in table["corrupt"]["error"] or "Error" in table["corrupt"]["error"]
    assert "not found" in table["missing"]["error"]
    assert summary["n_errors"] == 2 and summary["n"] == 1


@pytest.mark.slow
def test_localcluster_rows_match_local(tiny_cohort: Path, trained: Path, tmp_path: Path) -> None:
    records = records_from_frame(read_manifest(tiny_cohort))
    opts = PredictOptions(sampler="without_replacement", gallery=False, zarr=False, seed=5)
    predict_many(records, trained / "ats_best.pt", tmp_path / "local", opts)
    predict_many(
        records, trained / "ats_best.pt", tmp_path / "dask", opts, workers=2, processes=False
    )
    local = {r["slide_id"]: r for r in rows(tmp_path / "local" / "predictions.csv")}
    dist = {r["slide_id"]: r for r in rows(tmp_path / "dask" / "predictions.csv")}
    assert local.keys() == dist.keys()
    for sid, r in local.items():
        assert r["Y_hat"] == dist[sid]["Y_hat"] and r["error"] == dist[sid]["error"] == ""
        np.testing.assert_allclose(float(r["p_1"]), float(dist[sid]["p_1"]), atol=1e-5)
        assert (tmp_path / "dask" / "heatmaps" / f"{sid}.png").exists()


@pytest.mark.slow
def test_two_process_gloo_training(tiny_cohort: Path, tiny_config: Any, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_cohort)
    cfg.baseline.enabled = False
    cfg.predict.enabled = False
    cfg.train.device = "cpu"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",  # a free local port; "--master_port 0" hangs the rendezvous
        "-m",
        "pipelines.train_slides",
        "--config",
        str(tmp_path / "c.yaml"),
        "--out",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = [
        json.loads(x) for x in (tmp_path / "run" / "ats_metrics.jsonl").read_text().splitlines()
    ]
    n_train = sum(r["split"] == "train" for r in rows(tmp_path / "run" / "splits.csv"))
    assert record["world_size"] == 2 and record["train_n"] == n_train
    assert torch.load(tmp_path / "run" / "ats_last.pt", weights_only=True)["epoch"] == 1
