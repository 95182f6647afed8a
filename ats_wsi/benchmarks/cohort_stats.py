"""Metrics of the ``cohort`` benchmark (:mod:`ats_wsi.benchmarks.cohort`): ROC AUC and balanced
accuracy with bootstrap intervals, AUC by lesion size, and how many of the tiles a method
reads fall inside a lesion."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.benchmarks.cohort_tasks import TILE_PX

__all__ = ["LESION_TILE", "SMALL_LESION_UM", "bootstrap_ci", "lesion_size_auc"]

# Largest lesion below this: at most ~2 tiles (128 um) across, under 19 view pixels at 16 um/px.
SMALL_LESION_UM = 300.0
LESION_TILE = 0.1  # a tile counts as lesion when at least this fraction of it is tumour


def bootstrap_ci(
    y: Sequence[int], p: Sequence[float], n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """ROC AUC and balanced accuracy (threshold 0.5) with percentile 95 % bootstrap intervals
    over slides (resamples holding one class only are redrawn)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y_arr, p_arr = np.asarray(y), np.asarray(p, dtype=np.float64)
    rng = np.random.default_rng(seed)
    aucs, baccs = [], []
    while len(aucs) < n_boot:
        i = rng.integers(0, len(y_arr), len(y_arr))
        if len(np.unique(y_arr[i])) < 2:
            continue
        aucs.append(roc_auc_score(y_arr[i], p_arr[i]))
        baccs.append(balanced_accuracy_score(y_arr[i], p_arr[i] >= 0.5))
    return {
        "auc": float(roc_auc_score(y_arr, p_arr)),
        "auc_ci": [float(v) for v in np.percentile(aucs, [2.5, 97.5])],
        "balanced_accuracy": float(balanced_accuracy_score(y_arr, p_arr >= 0.5)),
        "balanced_accuracy_ci": [float(v) for v in np.percentile(baccs, [2.5, 97.5])],
        "n": len(y_arr),
        "n_positive": int(y_arr.sum()),
    }


def lesion_size_auc(
    rows: Sequence[dict[str, Any]],
    diameters_um: dict[str, Sequence[float]],
    threshold_um: float = SMALL_LESION_UM,
) -> dict[str, Any]:
    """ROC AUC of all negative slides against the positive slides whose largest lesion is
    below ``threshold_um`` ("small") and against the rest ("large"); None for an empty side.

    ``rows`` hold ``slide_id``, ``y`` and ``p``; ``diameters_um`` maps a slide to its lesion
    diameters. CAMELYON reports micro- and macro-metastases apart for the same reason: a
    slide-level AUC over mostly large lesions hides how a method does on small ones.
    """
    from sklearn.metrics import roc_auc_score

    neg = [r["p"] for r in rows if r["y"] == 0]
    pos = {"small": [], "large": []}
    for r in rows:
        if r["y"] == 1:
            big = max(diameters_um[r["slide_id"]], default=0.0)
            pos["small" if big < threshold_um else "large"].append(r["p"])
    out: dict[str, Any] = {"threshold_um": threshold_um}
    for k, ps in pos.items():
        ok = bool(ps) and bool(neg)
        y = [0] * len(neg) + [1] * len(ps)
        out[k] = float(roc_auc_score(y, neg + ps)) if ok else None
        out[f"n_{k}"] = len(ps)
    return out


STRATA_UM = (200.0, 300.0, 1000.0)  # CAMELYON-like: ITC-sized, small micro, larger


def lesion_strata_auc(
    rows: Sequence[dict[str, Any]],
    diameters_um: dict[str, Sequence[float]],
    edges_um: Sequence[float] = STRATA_UM,
) -> dict[str, Any]:
    """ROC AUC of all negative slides against the positive slides whose largest lesion falls
    in each stratum ``[0, e0)``, ``[e0, e1)``, ... (keys like ``"<200"``, ``"200-300"``);
    ``n_<key>`` counts the positives. None for an empty stratum."""
    from sklearn.metrics import roc_auc_score

    neg = [r["p"] for r in rows if r["y"] == 0]
    bounds = [0.0, *edges_um]
    keys = [f"<{edges_um[0]:.0f}"] + [
        f"{lo:.0f}-{hi:.0f}" for lo, hi in zip(edges_um[:-1], edges_um[1:], strict=True)
    ]
    out: dict[str, Any] = {}
    for key, lo, hi in zip(keys, bounds[:-1], bounds[1:], strict=True):
        ps = [
            r["p"]
            for r in rows
            if r["y"] == 1 and lo <= max(diameters_um[r["slide_id"]], default=0.0) < hi
        ]
        y = [0] * len(neg) + [1] * len(ps)
        out[key] = float(roc_auc_score(y, neg + ps)) if ps and neg else None
        out[f"n_{key}"] = len(ps)
    return out


def _localisation(rows: list[dict[str, Any]], cohort: Any, k: int | None = None) -> dict:
    """Fraction of a method's read tiles (first ``k``) inside a lesion, on positive slides."""
    from ats_wsi.slides.realistic_cohort import lesion_geometry, tile_lesion_fraction

    fracs = []
    for r in rows:
        if r["y"] != 1 or "top_left" not in r:
            continue
        geom = lesion_geometry(cohort.lesion_path(r["slide_id"]))
        yx = np.asarray(r["top_left"][:k] if k else r["top_left"], dtype=np.float64)
        cover = tile_lesion_fraction(geom, yx[:, ::-1], TILE_PX)
        fracs.append(float((cover >= LESION_TILE).mean()))
    return {"mean": float(np.mean(fracs)) if fracs else None, "per_slide": fracs}


def _base_rate(cohort: Any, feature_dir: Path, slide_ids: list[str]) -> dict[str, Any]:
    """Per positive slide: fraction of its tissue tiles that are lesion tiles."""
    from ats_wsi.slides.realistic_cohort import lesion_geometry, tile_lesion_fraction

    out = {}
    for sid in slide_ids:
        geom = lesion_geometry(cohort.lesion_path(sid))
        with np.load(feature_dir / f"{sid}.npz") as z:
            yx = z["top_left"].astype(np.float64)
        out[sid] = float((tile_lesion_fraction(geom, yx[:, ::-1], TILE_PX) >= LESION_TILE).mean())
    return out
