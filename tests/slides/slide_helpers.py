"""Helpers for the slide tests: a checkpoint without training, CSV rows."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ats_wsi.checkpoint import save_checkpoint
from ats_wsi.settings import to_dict
from ats_wsi.slides.engine import build_model
from ats_wsi.slides.trainer import default_config

CLASSES = ["normal", "tumor"]


def untrained_checkpoint(path: Path, **slides: Any) -> Path:
    """A seeded, untrained model of the default slide config (4 patches, narrow feature
    net) saved as a training checkpoint: prediction plumbing needs no trained weights."""
    torch.manual_seed(0)
    cfg = default_config()
    cfg.model.n_patches = 4
    cfg.model.feature_net = {"name": "histology", "width": 4}
    cfg.slides = replace(cfg.slides, **slides)
    model = build_model(cfg.model, len(CLASSES), cfg.slides.patch_size)
    return save_checkpoint(
        path, model=model, epoch=1, config=to_dict(cfg), extra={"classes": CLASSES}
    )


def rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV as dicts."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


SLIDES_DIR = Path(__file__).parents[2].parent / "shared" / "data" / "slides"


def shared_slides() -> Path:
    """The shared real-slide folder (the test is skipped without it)."""
    import pytest

    if not SLIDES_DIR.is_dir():
        pytest.skip(f"shared slide fixtures not found at {SLIDES_DIR}")
    return SLIDES_DIR
