"""Shared fixtures: a tiny demo cohort and a tiny training config (seconds, not minutes)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from ats_wsi.slides.cohort import DemoCohortConfig, make_demo_cohort
from ats_wsi.slides.settings import TrainConfig
from ats_wsi.slides.trainer import default_config

TINY_COHORT = DemoCohortConfig(
    n_cases=6, slides_per_case=(1, 2), size=(256, 320), hotspot_radius=(32, 40), seed=3
)


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every slide test runs single-threaded (``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest of a 6-case demo cohort (about 9 slides of ~300 x 300 pixels)."""
    return make_demo_cohort(tmp_path_factory.mktemp("cohort"), TINY_COHORT)


@pytest.fixture(scope="session")
def tiny_config() -> Any:
    """Factory ``tiny_config(manifest=None, **train_overrides) -> TrainConfig``."""
    return _tiny_config


def _tiny_config(manifest: Path | None = None, **train: Any) -> TrainConfig:
    """A config that trains for one epoch on a handful of slides."""
    cfg = default_config()
    cfg.data.manifest = None if manifest is None else str(manifest)
    cfg.data.val_fraction = 0.2
    cfg.data.test_fraction = 0.3
    cfg.model.n_patches = 4
    cfg.model.feature_net = {"name": "histology", "width": 4}
    cfg.train = replace(cfg.train, epochs=1, prefetch_depth=2, progress=False, torch_threads=1)
    cfg.train = replace(cfg.train, **train)
    cfg.baseline.epochs = 1
    cfg.predict = replace(cfg.predict, gallery=False)
    return cfg
