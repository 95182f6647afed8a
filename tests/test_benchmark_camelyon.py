"""The ``camelyon`` benchmark: its pure helpers (extrapolation, goal verdict, stage timer) and,
in the slow set, ``python -m pipelines.benchmark camelyon --quick`` end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ats_wsi.benchmarks.camelyon import GOAL, _zoom_spec, goal_verdict
from ats_wsi.benchmarks.camelyon_worker import StageTimer, tile_pool
from ats_wsi.benchmarks.slide import extrapolate

ROOT = Path(__file__).resolve().parents[1]


def test_extrapolate_scales_tile_time_and_pixels_only() -> None:
    r = {
        "method": "exhaustive",
        "tiles": 10,
        "total_tiles": 1000,
        "measured_s": 12.0,
        "tiles_s": 10.0,
        "pixels_read": 5000 + 10 * 64**2,
    }
    extrapolate(r, 64)
    assert r["extrapolated"] is True
    assert r["seconds"] == pytest.approx(2.0 + 10.0 * 100)  # the mask's 2 s is not scaled
    assert r["pixels_read"] == 5000 + 1000 * 64**2
    full = extrapolate(
        {
            "method": "exhaustive",
            "tiles": 7,
            "total_tiles": 7,
            "measured_s": 3.0,
            "tiles_s": 2.0,
            "pixels_read": 9,
        },
        64,
    )
    assert full["extrapolated"] is False and full["seconds"] == 3.0 and full["pixels_read"] == 9
    ats = extrapolate({"method": "ats", "tiles": 16, "measured_s": 1.5, "pixels_read": 1}, 64)
    assert ats["extrapolated"] is False and ats["seconds"] == 1.5


def _rows(
    size: int,
    ats_s: float,
    ats_mb: float,
    ex_s: float,
    ex_tiles: int,
    floor_s: float,
    encode_s: float,
) -> list[dict[str, Any]]:
    key = {"size": size, "mpp": 0.5, "encoder": "efficientnet-lite0"}
    return [
        {
            **key,
            "method": "ats",
            "forwards": 16,
            "seconds": ats_s,
            "rss_peak_mb": ats_mb,
            "stages_s": {"encode": encode_s},
        },
        {
            **key,
            "method": "io_floor (ats)",
            "forwards": 0,
            "seconds": floor_s,
            "rss_peak_mb": 500.0,
        },
        {
            **key,
            "method": "exhaustive",
            "forwards": ex_tiles,
            "seconds": ex_s,
            "rss_peak_mb": 2000.0,
            "extrapolated": True,
        },
    ]


def _slides(*sizes: int, tissue: float = 0.25) -> list[dict[str, Any]]:
    return [{"size": s, "mpp": 0.5, "tissue_fraction": tissue} for s in sizes]


def test_goal_verdict_passes_and_fails_on_each_check() -> None:
    rows = _rows(10240, 3.0, 1100.0, 60.0, 400, 0.5, 2.0) + _rows(
        65536, 4.0, 1150.0, 4000.0, 16000, 1.0, 2.0
    )
    v = goal_verdict(rows, _slides(10240, 65536))
    by = {(c["check"], c["size"]): c for c in v["checks"]}
    assert v["met"] is True and not v["not_evaluated"]
    assert by[("forwards_x", 65536)]["value"] == pytest.approx(1000.0)
    assert by[("time_x", 65536)]["value"] == pytest.approx(1000.0)
    assert by[("time_x", 65536)]["extrapolated"] is True
    assert ("forwards_x", 10240) not in by  # a 10k slide does not qualify
    assert by[("overhead_x", 65536)]["target"] == pytest.approx(2 * (1.0 + 2.0))
    # Peak memory grows 30 % from 10k to 65k: not flat; too slow overhead; too few forwards.
    bad = _rows(10240, 3.0, 1000.0, 60.0, 400, 0.5, 2.0) + _rows(
        65536, 7.0, 1300.0, 1000.0, 4000, 1.0, 2.0
    )
    v = goal_verdict(bad, _slides(10240, 65536))
    failed = {c["check"] for c in v["checks"] if not c["pass"]}
    assert failed == {"flat_peak", "forwards_x", "time_x", "overhead_x"} and v["met"] is False
    over = goal_verdict(
        _rows(65536, 4.0, GOAL["peak_mb"] + 1, 4000.0, 16000, 1.0, 2.0), _slides(65536)
    )
    assert {c["check"] for c in over["checks"] if not c["pass"]} == {"peak_mb"}


def test_goal_verdict_says_what_it_could_not_evaluate() -> None:
    # Too little tissue: the big slide does not qualify; one size: flatness not evaluated.
    v = goal_verdict(_rows(65536, 4.0, 1100.0, 4000.0, 16000, 1.0, 2.0), _slides(65536, tissue=0.1))
    assert set(v["not_evaluated"]) == {"forwards_x", "time_x", "flat_peak"}
    assert v["met"] is None
    assert goal_verdict([], [])["met"] is None


def test_stage_timer_wraps_and_restores() -> None:
    class Thing:
        def work(self) -> int:
            time.sleep(0.01)
            return 7

    t, timer = Thing(), StageTimer()
    # The class first: the instance then wraps the (already wrapped) bound method.
    with timer.wrap(Thing, "work", "cls"), timer.wrap(t, "work", "w"):
        assert t.work() == 7
    assert timer.seconds["w"] >= 0.01 and timer.seconds["cls"] >= 0.01
    assert "work" not in vars(t) and Thing.work.__name__ == "work"
    net = torch.nn.Linear(2, 2)
    with timer.module(net, "net"):
        net(torch.zeros(1, 2))
    assert timer.seconds["net"] > 0 and not net._forward_hooks and not net._forward_pre_hooks


def test_tile_pool_and_zoom_spec_reject_bad_input() -> None:
    assert tile_pool(256, 0.5, 16.0) == 8 and tile_pool(256, 0.5, 4.0) == 32
    with pytest.raises(ValueError, match="whole number"):
        tile_pool(256, 0.5, 3.0)
    assert _zoom_spec("4x4") == [4, 4] and _zoom_spec("none") is None
    with pytest.raises(ValueError, match="N0xN1"):
        _zoom_spec("four")


@pytest.mark.slow
def test_camelyon_quick(tmp_path: Path) -> None:
    out = tmp_path / "camelyon.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.benchmark",
            "camelyon",
            "--quick",
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert {"ats", "zoom", "io_floor (ats)", "io_floor (zoom)", "exhaustive"} <= set(rows)
    ats, floor, ex = rows["ats"], rows["io_floor (ats)"], rows["exhaustive"]
    assert ats["forwards"] == data["config"]["n_patches"] == len(ats["locations_yx"])
    assert rows["zoom"]["forwards"] <= 4 and len(rows["zoom"]["regions_xywh"]) == 2
    stages = ats["stages_s"]
    assert stages["encode"] > 0 and stages["view_read"] > 0 and stages["tile_reads"] > 0
    assert sum(stages.values()) == pytest.approx(ats["seconds"], rel=1e-6)
    # The floor reads what ATS read (view + the same tiles), so the same pixels.
    assert floor["pixels_read"] == ats["pixels_read"] and floor["tiles"] == ats["tiles"]
    assert ex["extrapolated"] is True and ex["total_tiles"] > ex["tiles"]
    assert ex["total_tiles"] == ats["tissue_cells"]
    assert ex["time_vs_ats"] > 1 and ex["forwards_vs_ats"] == ex["total_tiles"] / 4
    (slide,) = data["slides"]
    assert slide["n_lesions"] >= 1 and 0.15 <= slide["tissue_fraction"] <= 0.4
    assert data["verdict"]["met"] is None and "time_x" in data["verdict"]["not_evaluated"]
