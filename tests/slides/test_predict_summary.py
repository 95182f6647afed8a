"""The prediction summary: ``n`` counts the slides predicted, ``n_labelled`` those with a label,
and the metrics are over the labelled ones only (issue 21)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from slide_helpers import CLASSES, rows, untrained_checkpoint

from ats_wsi.slides.export import summarise_predictions
from ats_wsi.slides.manifest import read_manifest
from pipelines import predict_slides

FAST = ["--no-heatmaps", "--no-gallery", "--no-zarr"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "ats.pt")


def printed_summary(capsys: pytest.CaptureFixture[str]) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_mixed_labels_metrics_over_labelled_only(
    tiny_cohort: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cohort = read_manifest(tiny_cohort)
    assert set(cohort.label) == set(CLASSES)
    # Every third slide and the first of each class keep their label (both classes: an AUC).
    labelled = set(cohort.slide_id.iloc[::3])
    labelled |= {cohort[cohort.label == c].slide_id.iloc[0] for c in CLASSES}
    assert 0 < len(labelled) < len(cohort)
    lines = ["case_id,slide_id,label"]
    for r in cohort.itertuples():
        lines.append(f"{r.case_id},{r.slide_id},{r.label if r.slide_id in labelled else ''}")
    manifest = tmp_path / "mixed.csv"
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--slides", str(manifest), "--out", str(out)]
    argv += ["--slide-dir", str(tiny_cohort.parent / "slides"), *FAST]
    assert predict_slides.main(argv) == 0
    summary = printed_summary(capsys)

    table = rows(out / "predictions.csv")
    assert len(table) == len(cohort) and all(r["error"] == "" for r in table)
    assert summary["n"] == len(table) and summary["n_errors"] == 0
    assert summary["n_labelled"] == len(labelled)
    assert {r["slide_id"] for r in table if r["Y"] not in ("", "-1")} == labelled
    mine = [r for r in table if r["slide_id"] in labelled]
    y = np.array([int(r["Y"]) for r in mine])
    assert len(set(y)) == 2
    accuracy = float(np.mean(y == np.array([int(r["Y_hat"]) for r in mine])))
    auc = roc_auc_score(y, [float(r["p_1"]) for r in mine])
    assert summary["accuracy"] == pytest.approx(accuracy)
    assert summary["auc"] == pytest.approx(auc, abs=1e-5)  # p_1 is rounded in the CSV
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["n"], metrics["n_labelled"]) == (len(table), len(labelled))
    assert sum(map(sum, metrics["confusion_matrix"])) == len(labelled)


def test_unlabelled_folder_counts_rows(
    tiny_cohort: Path, checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slides = tmp_path / "slides"
    shutil.copytree(tiny_cohort.parent / "slides", slides)  # a folder: no labels at all
    out = tmp_path / "out"
    argv = ["--checkpoint", str(checkpoint), "--slides", str(slides), "--out", str(out), *FAST]
    assert predict_slides.main(argv) == 0
    summary = printed_summary(capsys)
    table = rows(out / "predictions.csv")
    assert len(table) == len(list(slides.glob("*.tif"))) > 0
    assert summary["n"] == len(table) and summary["n_labelled"] == 0
    assert summary["accuracy"] is None and summary["auc"] is None
    assert not (out / "metrics.json").exists()
    assert (out / "summary.html").exists()


def test_summarise_counts_errors_apart() -> None:
    def row(sid: str, y: str, y_hat: str, p1: float, error: str = "") -> dict[str, str]:
        return {
            "slide_id": sid,
            "Y": y,
            "Y_hat": y_hat,
            "p_0": str(1 - p1),
            "p_1": str(p1),
            "error": error,
        }

    table = [
        row("a", "1", "1", 0.9),
        row("b", "0", "1", 0.6),
        row("c", "", "0", 0.2),  # no label
        row("d", "-1", "1", 0.7),  # no label (CLAM's -1)
        {"slide_id": "e", "Y": "1", "error": "OSError: unreadable"},
    ]
    s = summarise_predictions(table, CLASSES)
    assert (s["n"], s["n_labelled"], s["n_errors"]) == (4, 2, 1)
    assert s["accuracy"] == 0.5 and s["auc"] == 1.0
    assert s["confusion_matrix"] == [[0, 1], [0, 1]]
    none = summarise_predictions(table[2:], CLASSES)
    assert (none["n"], none["n_labelled"], none["n_errors"]) == (2, 0, 1)
    assert "accuracy" not in none and "auc" not in none
