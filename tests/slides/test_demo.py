"""The demo (`python -m pipelines.train_slides` with no arguments): ATS must beat the
low-res-only baseline, which must stay near chance because the lesion is invisible at the
attention resolution. Minutes of CPU: marked slow."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ats_wsi.slides.trainer import load_config, train

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "slides_demo.yaml"


@pytest.mark.slow
def test_demo_ats_beats_low_res_baseline(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    cfg = load_config(CONFIG)
    cfg.predict = replace(cfg.predict, gallery=False, geojson=False)
    results = train(cfg, tmp_path)
    ats, base = results["test_ats"], results["test_baseline"]
    assert ats["n_errors"] == 0 and ats["n"] >= 16
    assert ats["accuracy"] >= 0.75 and ats["auc"] >= 0.8, ats
    # The baseline sees only the view, where the lesion is bit-for-bit absent
    # (test_lesion_is_invisible_at_attention_resolution): a chance classifier. On n_pos + n_neg
    # test slides its balanced accuracy spreads by sd = sqrt(1/n_pos + 1/n_neg) / 4 (0.086 at
    # 17 + 17; more in practice, as the slides of one case share a label), so a fixed bound
    # like 0.65 fails on some honest splits: allow 3.5 sd above 0.5.
    n_per_class = [sum(row) for row in ats["confusion_matrix"]]
    sd = (1 / n_per_class[0] + 1 / n_per_class[1]) ** 0.5 / 4
    assert base["balanced_accuracy"] <= 0.5 + 3.5 * sd, (base, n_per_class)
    assert ats["balanced_accuracy"] >= base["balanced_accuracy"] + 0.15, (ats, base)
