"""Several jobs on one output folder: claims, stale claims, the locked CSV, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from slide_helpers import rows, untrained_checkpoint

from ats_wsi.slides import inference
from ats_wsi.slides.export import PredictionsCSV, prediction_columns
from ats_wsi.slides.inference import PredictOptions, predict_many, records_from_frame
from ats_wsi.slides.locks import SlideClaims, lock_name
from ats_wsi.slides.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
COLS = prediction_columns(["normal", "tumor"])


def test_a_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    a, b = SlideClaims(tmp_path), SlideClaims(tmp_path)
    assert a.claim("s1") and a.claim("s1")  # re-claiming one's own is fine
    assert not b.claim("s1")
    owner = json.loads((tmp_path / "locks" / "s1.lock").read_text())
    assert owner["pid"] == os.getpid() and owner["slide_id"] == "s1"
    a.release("s1")
    assert not (tmp_path / "locks" / "s1.lock").exists()
    assert b.claim("s1")
    b.release_all()
    assert lock_name("../x/y") == "_x_y.lock"  # ids never escape the folder


def test_stale_claims_are_taken_over_and_never_deleted_by_the_loser(tmp_path: Path) -> None:
    a, b = SlideClaims(tmp_path, stale_after_s=60), SlideClaims(tmp_path, stale_after_s=60)
    assert a.claim("s1")
    lock = tmp_path / "locks" / "s1.lock"
    old = time.time() - 120
    os.utime(lock, (old, old))  # a job whose heartbeat stopped two minutes ago
    assert b.claim("s1")
    a.release("s1")  # the old holder must not remove the new holder's claim
    assert lock.exists() and b.owns("s1")
    b.release_all()


def test_claims_of_dead_processes_and_clear_stale(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(done.stdout)
    locks = tmp_path / "locks"
    locks.mkdir()
    (locks / "dead.lock").write_text(
        json.dumps({"slide_id": "dead", "host": os.uname().nodename, "pid": dead_pid})
    )
    (locks / "other.lock").write_text(json.dumps({"slide_id": "other", "host": "elsewhere"}))
    live = SlideClaims(tmp_path)
    assert live.claim("live")
    claims = SlideClaims(tmp_path, stale_after_s=600)
    assert claims.is_stale("dead") and not claims.is_stale("other")
    assert not claims.is_stale("live")
    assert claims.clear_stale() == ["dead"]
    assert sorted(p.name for p in locks.glob("*.lock")) == ["live.lock", "other.lock"]
    old = time.time() - 3600
    os.utime(locks / "other.lock", (old, old))
    assert claims.clear_stale() == ["other"]
    live.release_all()


def test_heartbeat_keeps_a_claim_fresh(tmp_path: Path) -> None:
    claims = SlideClaims(tmp_path, stale_after_s=1.0, heartbeat_s=0.05)
    assert claims.claim("s1")
    lock = tmp_path / "locks" / "s1.lock"
    old = time.time() - 10
    os.utime(lock, (old, old))
    time.sleep(0.3)
    assert time.time() - lock.stat().st_mtime < 1.0
    assert not SlideClaims(tmp_path, stale_after_s=1.0).claim("s1")
    claims.release_all()


def test_locked_csv_one_row_per_slide_from_many_writers(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    ids = [f"s{i}" for i in range(30)]
    written: list[str] = []

    def job(order: list[str]) -> None:
        table = PredictionsCSV(path, COLS)
        for sid in order:
            if table.write_new({"slide_id": sid, "Y": 0, "error": ""}):
                written.append(sid)

    threads = [threading.Thread(target=job, args=(ids[k:] + ids[:k],)) for k in (0, 10, 20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = rows(path)
    assert sorted(r["slide_id"] for r in table) == sorted(ids) and sorted(written) == sorted(ids)
    assert path.read_text().count("slide_id,") == 1  # one header


def test_torn_tail_left_by_a_killed_writer_is_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    first, second = PredictionsCSV(path, COLS), PredictionsCSV(path, COLS)
    first.write({"slide_id": "a", "Y": 1})
    with open(path, "a") as fh:
        fh.write("b,1,0,0.3")  # a writer killed mid-row
    second.write({"slide_id": "c", "Y": 0})
    assert [r["slide_id"] for r in rows(path)] == ["a", "c"]
    assert second.has("a") and first.has("c")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "ats.pt")


def test_threads_predicting_one_folder_write_each_slide_once(
    tiny_cohort: Path, checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = records_from_frame(read_manifest(tiny_cohort))
    opts = PredictOptions(heatmaps=False, gallery=False, zarr=False)
    seen: list[str] = []
    predicted: list[str] = []
    original = inference.predict_record

    def counted(record: dict, *args: object) -> dict:
        predicted.append(record["slide_id"])
        time.sleep(0.05)  # long enough for the other jobs to reach the same slide
        return original(record, *args)

    monkeypatch.setattr(inference, "predict_record", counted)

    def job() -> None:
        predict_many(
            records, checkpoint, tmp_path, opts, on_row=lambda r: seen.append(r["slide_id"])
        )

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    table = rows(tmp_path / "predictions.csv")
    assert sorted(r["slide_id"] for r in table) == sorted(r["slide_id"] for r in records)
    assert sorted(seen) == sorted(r["slide_id"] for r in records)
    assert sorted(predicted) == sorted(seen)  # claims: no slide was predicted twice
    assert not list((tmp_path / "locks").glob("*.lock"))


@pytest.mark.slow
def test_three_processes_on_one_folder(tiny_cohort: Path, checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "pipelines.predict_slides",
        "--checkpoint",
        str(checkpoint),
        "--slides",
        str(tiny_cohort),
        "--out",
        str(out),
        "--no-gallery",
        "--no-zarr",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    predicted = 0
    for p in procs:
        out_text, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
        predicted += json.loads(out_text.strip().splitlines()[-1])["predicted_here"]
    table = rows(out / "predictions.csv")
    ids = sorted(read_manifest(tiny_cohort).slide_id)
    assert sorted(r["slide_id"] for r in table) == ids  # exactly one row per slide
    assert predicted == len(ids)  # and no slide was predicted by two jobs
    assert all(r["error"] == "" for r in table)
    assert sorted(p.stem for p in (out / "heatmaps").glob("*.png")) == ids
    assert not list((out / "locks").glob("*.lock"))


@pytest.mark.slow
def test_dask_job_and_local_job_share_a_folder(
    tiny_cohort: Path, checkpoint: Path, tmp_path: Path
) -> None:
    records = records_from_frame(read_manifest(tiny_cohort))
    opts = PredictOptions(heatmaps=False, gallery=False, zarr=False)
    local = threading.Thread(target=predict_many, args=(records, checkpoint, tmp_path, opts))
    local.start()
    predict_many(records, checkpoint, tmp_path, opts, workers=2, processes=False)
    local.join()
    table = rows(tmp_path / "predictions.csv")
    assert sorted(r["slide_id"] for r in table) == sorted(r["slide_id"] for r in records)
