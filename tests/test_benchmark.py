"""The benchmark CLI runs end to end in its quick setting and writes a complete JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ats_wsi.benchmarking import describe_machine, time_interleaved
from ats_wsi.benchmarks import BENCHMARKS, load
from ats_wsi.benchmarks.core import extract_patches_loop
from pipelines.benchmark import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_core_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "core.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.benchmark", "core", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "speedup" in proc.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "core"
    machine = data["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "gpus", "python"):
        assert key in machine
    assert data["config"]["quick"] is True
    rows = data["results"]
    assert [(r["N"], r["P"]) for r in rows] == [(4, 8), (16, 8)]
    for r in rows:
        assert r["gather_ms"] > 0 and r["loop_ms"] > 0
        assert r["speedup"] == pytest.approx(r["loop_ms"] / r["gather_ms"])
        assert r["timings"]["gather"]["repeats"] == 2


def test_loop_baseline_matches_gather() -> None:
    from ats_wsi.patches import extract_patches

    x = torch.rand(2, 3, 20, 20)
    top_left = torch.tensor([[[-4, 0], [16, 16]], [[3, -2], [10, 5]]])
    assert torch.equal(extract_patches_loop(x, top_left, 8), extract_patches(x, top_left, 8))


def test_registry_and_helpers() -> None:
    assert list(BENCHMARKS) == ["core", "slide", "prefetch", "mnist", "encoders", "cohort"]
    for name in BENCHMARKS:
        module = load(name)
        assert module.HELP and callable(module.add_arguments) and callable(module.run)
    args = build_parser().parse_args(["core", "--quick"])
    assert args.out == "benchmarks/results/core.json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["unknown"])
    calls: list[str] = []
    t = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1)
    assert calls == ["a", "b"] * 4  # warm-up round, then alternating
    assert set(t) == {"a", "b"} and t["a"]["repeats"] == 3
    assert describe_machine()["cpu_count"] >= 1


def test_benchmarks_import_without_pipelines() -> None:
    """The library's benchmarks need nothing from pipelines/ (no registry by import side effect)."""
    code = (
        "import importlib, sys\n"
        "from ats_wsi.benchmarks import BENCHMARKS\n"
        "for m in BENCHMARKS.values():\n"
        "    importlib.import_module(m)\n"
        "importlib.import_module('ats_wsi.benchmarks.slide_worker')\n"
        "assert not [k for k in sys.modules if k.split('.')[0] == 'pipelines'], sys.modules\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
