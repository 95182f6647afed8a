"""The slide, prefetch and mnist benchmarks run end to end in their quick setting.

Each test runs ``python -m pipelines.benchmark <name> --quick`` in a subprocess (the way CI and
users run it) and checks the JSON it writes. Generated slides go to a temporary cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MACHINE_KEYS = ("cpu_model", "cpu_count", "cpu_usable", "torch", "python", "gpus")


def _run(name: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.benchmark", name, "--quick", "--out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["benchmark"] == name
    assert all(k in data["machine"] for k in MACHINE_KEYS)
    for payload in data.get("encoders", {"": data}).values():
        assert payload["config"]["quick"] is True
    return data


@pytest.mark.slow
def test_slide_quick(tmp_path: Path) -> None:
    data = _run("slide", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"ats", "exhaustive"}
    for r in rows.values():
        for key in ("seconds", "pixels_read", "rss_peak_mb", "extrapolated", "tiles"):
            assert key in r
        assert r["seconds"] > 0 and r["pixels_read"] > 0
        assert r["rss_peak_mb"] >= data["baseline"]["rss_peak_mb"] * 0.5
    assert rows["ats"]["tiles"] == data["config"]["n_patches"]
    ex = rows["exhaustive"]
    # The quick slide has more tissue tiles than --max-tiles: a subset is run, extrapolated.
    assert ex["total_tiles"] > ex["tiles"] == data["config"]["max_tiles"]
    assert ex["extrapolated"] is True and ex["seconds"] > ex["tiles_s"]
    assert len(rows["ats"]["probs"]) == 2 and sum(rows["ats"]["probs"]) == pytest.approx(1.0)
    (slide,) = data["slides"].values()
    assert slide["islands"] >= 1 and Path(slide["path"]).exists()


@pytest.mark.slow
def test_encoders_quick(tmp_path: Path) -> None:
    data = _run(
        "encoders",
        tmp_path,
        "--cache-dir",
        str(tmp_path / "cache"),
        "--encoders",
        "efficientnet-lite0",
    )
    (payload,) = data["encoders"].values()
    assert payload["config"]["feature_net"] == "efficientnet-lite0"
    rows = {r["method"]: r for r in payload["results"]}
    # The same encoder: ATS encodes N patches, exhaustive tiling every tissue tile.
    assert rows["ats"]["tiles"] == payload["config"]["n_patches"]
    assert rows["exhaustive"]["total_tiles"] > 10 * rows["ats"]["tiles"]
    assert rows["exhaustive"]["pixels_read"] > rows["ats"]["pixels_read"]


def test_prefetch_quick(tmp_path: Path) -> None:
    data = _run("prefetch", tmp_path, "--cache-dir", str(tmp_path / "cache"))
    rows = data["results"]
    assert {r["loop"] for r in rows} == {"inference", "training"}
    for r in rows:
        assert r["sequential_slides_per_s"] > 0 and r["prefetch_slides_per_s"] > 0
        assert r["speedup"] == pytest.approx(r["sequential_s"] / r["prefetch_s"])


def test_mnist_quick(tmp_path: Path) -> None:
    data = _run("mnist", tmp_path)
    rows = {r["model"]: r for r in data["results"]}
    assert set(rows) == {"ats", "cnn_full", "cnn_low"}
    for r in rows.values():
        assert r["size"] == 750
        for key in ("forward_ms_per_sample", "train_ms_per_sample", "train_tensor_mb_per_sample"):
            assert r[key] > 0
        assert "train_rss_mb_per_sample" in r
    assert rows["ats"]["train_ms_per_sample_vs_ats"] == pytest.approx(1.0)
    # The full-res CNN holds the whole canvas as floats; ATS only its patches.
    assert (
        rows["cnn_full"]["train_tensor_mb_per_sample"] > rows["ats"]["train_tensor_mb_per_sample"]
    )


def test_island_slides_are_deterministic_and_mostly_glass() -> None:
    from ats_wsi.benchmarks.island_slides import GLASS, island_tile_fn

    source = np.full((1000, 1000, 3), 100, dtype=np.uint8)
    fn_a, info_a = island_tile_fn(4096, seed=3, source=source)
    fn_b, info_b = island_tile_fn(4096, seed=3, source=source)
    assert info_a == info_b and info_a["islands"] >= 1
    assert 0 < info_a["island_fraction"] < 0.2
    a = fn_a(0, 0, 4096, 4096)
    np.testing.assert_array_equal(a[::7, ::7], fn_b(0, 0, 4096, 4096)[::7, ::7])
    tissue = (a[..., 0] != GLASS).mean()
    assert tissue == pytest.approx(info_a["island_fraction"], rel=1e-6)
    # Tiles agree with the whole: the tile function is position-exact.
    np.testing.assert_array_equal(fn_a(2000, 1000, 300, 500), a[2000:2300, 1000:1500])
