"""The benchmark CLI runs end to end in its quick setting and writes a complete JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    assert list(BENCHMARKS) == [
        *("core", "slide", "prefetch", "mnist", "encoders", "cohort", "camelyon")
    ]
    for name in BENCHMARKS:
        module = load(name)
        assert module.HELP and callable(module.add_arguments) and callable(module.run)
    args = build_parser().parse_args(["core", "--quick"])
    assert args.out is None  # resolved by main(): results/ or, with --quick, results/quick/
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


WORKER = '''
import resource
from ats_wsi.benchmarking import rss_peak_mb
from ats_wsi.benchmarks.workers import worker_main


def worker(cfg):
    return {"peak_mb": rss_peak_mb(), "ru_maxrss_mb": resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss / 2**10}


if __name__ == "__main__":
    raise SystemExit(worker_main(worker))
'''


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM is Linux's")
def test_worker_reports_its_own_peak_not_its_parents(tmp_path: Path, monkeypatch) -> None:
    """A worker started by a parent holding 2 GiB reports its own peak (a few hundred MB of
    imports), not the parent's: ``ru_maxrss`` is kept across exec, ``VmHWM`` is not."""
    from ats_wsi.benchmarking import rss_peak_mb
    from ats_wsi.benchmarks.workers import run_in_subprocess

    (tmp_path / "hwm_worker.py").write_text(WORKER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    ballast = np.ones(2 * 2**30, dtype=np.uint8)  # 2 GiB, every page touched
    assert rss_peak_mb() > 2048
    res = run_in_subprocess("hwm_worker", {})
    del ballast
    # The old meter inherited the parent's peak: this is what the test guards against.
    assert res["ru_maxrss_mb"] > 2048
    assert 50 < res["peak_mb"] < 1500


def test_quick_never_writes_over_a_full_result(tmp_path: Path, monkeypatch, capsys) -> None:
    from pipelines.benchmark import main

    full = tmp_path / "core.json"
    full.write_text(json.dumps({"benchmark": "core", "config": {"quick": False}}))
    before = full.read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["core", "--quick", "--out", str(full)])
    assert exc.value.code == 2
    assert "holds a full (not --quick) result" in capsys.readouterr().err
    assert full.read_bytes() == before
    # Without --out a quick run goes to the ignored results/quick/ folder.
    monkeypatch.chdir(tmp_path)
    assert main(["core", "--quick"]) == 0
    data = json.loads((tmp_path / "benchmarks/results/quick/core.json").read_text())
    assert data["quick"] is True
    assert not (tmp_path / "benchmarks/results/core.json").exists()


RESULT_RE = re.compile(r"benchmarks/results/[\w./-]+?\.json")


def _lost_results(text: str) -> set[str]:
    """The result files docs/benchmarks.md lists under its 'Results whose JSON is lost'."""
    section = text.split("## Results whose JSON is lost", 1)
    if len(section) == 1:
        return set()
    body = section[1].split("\n## ", 1)[0]
    return set(RESULT_RE.findall(body))


def test_every_result_the_docs_cite_is_in_the_repository() -> None:
    """A number nobody can re-read is not evidence: each ``benchmarks/results/*.json`` that
    the docs or the README name exists (the quick folder is not a result); the files the
    benchmarks page lists as lost do not, so that a re-run removes them from the list."""
    cited: set[str] = set()
    lost: set[str] = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text(encoding="utf-8")
        cited |= set(RESULT_RE.findall(text))
        lost |= _lost_results(text)
    cited = {c for c in cited if "/quick/" not in c}
    assert cited, "the docs cite no result file at all"
    missing = sorted(c for c in cited - lost if not (ROOT / c).is_file())
    assert not missing, f"cited but not in the repository: {missing}"
    back = sorted(c for c in lost if (ROOT / c).is_file())
    assert not back, f"listed as lost but present (remove them from the list): {back}"
