"""The demo (`python -m pipelines.train_slides` with no arguments): ATS must beat the
low-res-only baseline, which must stay near chance because the lesion is invisible at the
attention resolution. Minutes of CPU: marked slow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ats_wsi.slides.trainer import load_config, train

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "slides_demo.yaml"


@pytest.mark.slow
def test_demo_ats_beats_low_res_baseline(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    cfg["predict"].update({"gallery": False, "geojson": False})
    results = train(cfg, tmp_path)
    ats, base = results["test_ats"], results["test_baseline"]
    assert ats["n_errors"] == 0 and ats["n"] >= 16
    assert ats["accuracy"] >= 0.75 and ats["auc"] >= 0.8, ats
    # The baseline sees only the view: chance level (a small test set allows some spread).
    assert base["balanced_accuracy"] <= 0.65, base
    assert ats["balanced_accuracy"] >= base["balanced_accuracy"] + 0.2
