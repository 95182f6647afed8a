"""Files shared between DDP ranks (issue 21): a file one rank writes and another reads is written
atomically and read only after a barrier. A real two-rank gloo run from a fresh folder (the
demo cohort, splits, training, test predictions), and the order of writes, barrier and reads
in ``_shared_splits`` checked without processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from slide_helpers import rows

from ats_wsi.settings import parse, to_dict
from ats_wsi.slides import cohort as cohort_module
from ats_wsi.slides import trainer
from ats_wsi.slides.cohort import DemoCohortConfig, make_demo_cohort
from ats_wsi.slides.manifest import read_manifest
from ats_wsi.slides.settings import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
# About 9 slides of ~300 x 300 pixels (tests/slides/conftest.py's TINY_COHORT).
DEMO = {"n_cases": 6, "slides_per_case": [1, 2], "size": [256, 320], "hotspot_radius": [32, 40]}
TIMEOUT_S = 300  # the run takes ~30 s on 2 cores; a hang must fail, not stall CI


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def demo_config(tiny_config: Any, **train: Any) -> dict[str, Any]:
    """The tiny config on a tiny demo cohort that the run builds itself, as plain data."""
    cfg = tiny_config(None, device="cpu", **train)
    cfg.demo = dict(DEMO)
    cfg.baseline.enabled = False
    cfg.predict = replace(cfg.predict, heatmaps=False, zarr=False, geojson=False)
    return to_dict(cfg)


def torchrun(config: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m pipelines.train_slides`` on loopback, killed (the
    whole process group: launcher and ranks) after TIMEOUT_S."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "GLOO_SOCKET_IFNAME": "lo",  # CI has no network but loopback
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "pipelines.train_slides",
        "--config",
        str(config),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"two-rank run did not finish in {TIMEOUT_S} s:\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_two_ranks_fresh_folder_then_resume(tiny_config: Any, tmp_path: Path) -> None:
    cfg = demo_config(tiny_config)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"  # fresh: no cohort, no splits.csv
    done = torchrun(tmp_path / "c.yaml", out)
    assert done.returncode == 0, done.stderr[-3000:]

    # The split both ranks trained on is the one a single process makes and writes.
    single = tmp_path / "single"
    df, _, _ = trainer._load_data(parse(TrainConfig, cfg), single, 0, 1)
    assert (out / "splits.csv").read_bytes() == (single / "splits.csv").read_bytes()
    splits = rows(out / "splits.csv")
    cohort = read_manifest(out / "cohort" / "manifest.csv")
    assert sorted(r["slide_id"] for r in splits) == sorted(cohort.slide_id)
    assert all(r["split"] in ("train", "val", "test") for r in splits)

    (record,) = [json.loads(x) for x in (out / "ats_metrics.jsonl").read_text().splitlines()]
    assert record["world_size"] == 2
    assert record["train_n"] == sum(r["split"] == "train" for r in splits)
    for name in ("ats_last.pt", "ats_best.pt"):
        assert torch.load(out / name, weights_only=True)["epoch"] == 1
    n_test = sum(r["split"] == "test" for r in splits)
    assert len(rows(out / "predictions" / "predictions.csv")) == n_test > 0
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert results["test_ats"]["n"] == results["test_ats"]["n_labelled"] == n_test
    assert not list(out.rglob("*.tmp")), "a temp file was left behind"

    # Resume (splits.csv, cohort and checkpoints exist): every rank reads, nobody rewrites.
    stamp = (out / "splits.csv").stat().st_mtime_ns
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(demo_config(tiny_config, epochs=2)))
    done = torchrun(tmp_path / "c2.yaml", out, "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "splits.csv").stat().st_mtime_ns == stamp
    epochs = [json.loads(x)["epoch"] for x in (out / "ats_metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert torch.load(out / "ats_last.pt", weights_only=True)["epoch"] == 2


def fake_barrier(monkeypatch: pytest.MonkeyPatch, at_barrier: Any) -> list[str]:
    calls: list[str] = []

    def barrier() -> None:
        calls.append("barrier")
        at_barrier()

    monkeypatch.setattr(trainer.dist, "barrier", barrier)
    return calls


def test_splits_written_before_barrier_read_after(
    tiny_cohort: Path, tiny_config: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tiny_cohort)
    df = read_manifest(tiny_cohort)
    classes = list(df.attrs["classes"])
    path = tmp_path / "splits.csv"

    # Rank 0: the complete file exists when it reaches the barrier.
    seen: list[str] = []
    calls = fake_barrier(monkeypatch, lambda: seen.append(path.read_text()))
    split0 = trainer._shared_splits(df, path, cfg, classes, 0, 2)
    assert calls == ["barrier"] and seen == [path.read_text()]
    assert len(rows(path)) == len(df)
    written = path.read_text()

    # Rank 1: reads only after the barrier (here, rank 0 "writes" it while rank 1 waits).
    other = tmp_path / "other" / "splits.csv"
    other.parent.mkdir()
    fake_barrier(monkeypatch, lambda: other.write_text(written))
    split1 = trainer._shared_splits(df, other, cfg, classes, 1, 2)
    assert list(split1.split) == list(split0.split)
    assert list(split1.slide_id) == list(split0.slide_id)
    assert other.read_text() == written  # rank 1 never writes

    # Resume on rank 0: an unchanged split is not rewritten (others may be reading it).
    before = path.stat().st_mtime_ns
    fake_barrier(monkeypatch, lambda: None)
    again = trainer._shared_splits(df, path, cfg, classes, 0, 2)
    assert path.stat().st_mtime_ns == before and list(again.split) == list(split0.split)

    # A slide missing from the file on another rank is an error, not a second split.
    other.write_text("".join(written.splitlines(keepends=True)[:-1]))
    fake_barrier(monkeypatch, lambda: None)
    with pytest.raises(RuntimeError, match="without a split"):
        trainer._shared_splits(df, other, cfg, classes, 1, 2)


def test_interrupted_cohort_rebuild_is_not_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 0 rebuilding a cohort for a new config is killed midway: the old manifest must not
    # survive beside half-rewritten slides, or the next run would reuse a broken cohort.
    small = {"slides_per_case": (1, 1), "size": (128, 128), "hotspot_radius": (16, 20)}
    first = DemoCohortConfig(n_cases=2, seed=3, **small)
    manifest = make_demo_cohort(tmp_path, first)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cohort_module, "write_pyramidal_tiff", killed)
    with pytest.raises(KeyboardInterrupt):
        make_demo_cohort(tmp_path, replace(first, seed=4))
    assert not manifest.exists()
    monkeypatch.undo()
    assert make_demo_cohort(tmp_path, first) == manifest and len(rows(manifest)) == 2
    assert not list(tmp_path.glob(".*.tmp"))
