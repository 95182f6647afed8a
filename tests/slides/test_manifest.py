"""Manifests (CLAM convention) and patient-stratified splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ats_wsi.io import ArrayReader
from ats_wsi.io.readers import register_backend, slide_key, slide_suffixes, unregister_backend
from ats_wsi.slides import manifest
from ats_wsi.slides.manifest import (
    ManifestError,
    find_slide,
    make_splits,
    mpp_spec,
    read_manifest,
    record_mpp,
    slides_from_dir,
)


def write(tmp_path: Path, text: str, name: str = "m.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("", None, "empty"),
        ("case_id,slide_id\nc1,s1\n", 1, "missing column(s) label"),
        ("case_id,slide_id,label\n", None, "no slides"),
        ("case_id,slide_id,label\nc1,s1,tumor\nc2,s1,normal\n", 3, "duplicate slide_id 's1'"),
        ("case_id,slide_id,label\nc1,s1,tumor\nc1,s2,weird\n", 3, "unknown label 'weird'"),
        ("case_id,slide_id,label\nc1,,tumor\n", 2, "empty slide_id"),
        ("case_id,slide_id,label\nc1,s1\n", 2, "2 fields"),
        ("case_id,slide_id,label,split\nc1,s1,tumor,dev\n", 2, "unknown split 'dev'"),
        ("case_id,slide_id,label,mpp\nc1,s1,tumor,0.25\nc2,s2,tumor,-1\n", 3, "mpp '-1'"),
        ("case_id,slide_id,label,mpp\nc1,s1,tumor,abc\n", 2, "not a positive number"),
        ("case_id,slide_id,label,magnification\nc1,s1,tumor,0\n", 2, "magnification '0'"),
        ("label,case_id\ntumor,c1\n", 1, "missing column(s) slide_id"),
    ],
)
def test_malformed_manifest_names_file_line_and_problem(
    tmp_path: Path, text: str, line: int | None, needle: str
) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ManifestError) as err:
        read_manifest(p, classes=["normal", "tumor"])
    assert err.value.line == line
    assert needle in str(err.value) and str(p) in str(err.value)
    if line is not None:
        assert f"line {line}" in str(err.value)


def test_missing_file_is_a_manifest_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        read_manifest(tmp_path / "nope.csv")


def test_slides_found_by_id_and_by_path(tmp_path: Path) -> None:
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").write_bytes(b"x")
    (tmp_path / "elsewhere.tif").write_bytes(b"x")
    p = write(
        tmp_path,
        "case_id,slide_id,label,path\nc1,a,tumor,\nc1,b,normal,elsewhere.tif\nc2,c,normal,\n",
    )
    df = read_manifest(p)
    assert df.attrs["classes"] == ["normal", "tumor"]
    assert list(df.y) == [1, 0, 0]
    assert df.path[0] == str(tmp_path / "slides" / "a.svs")
    assert df.path[1] == str(tmp_path / "elsewhere.tif")
    assert df.path[2] == ""  # not found: left to the caller (error row / training error)


def test_mpp_and_magnification_columns(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.svs").write_bytes(b"x")
    p = write(
        tmp_path,
        "case_id,slide_id,label,mpp,magnification\n"
        "c1,a,tumor,0.25,\nc1,b,normal,,20\nc2,c,normal,,\n",
    )
    df = read_manifest(p)
    assert df.mpp[0] == 0.25 and np.isnan(df.mpp[1]) and df.magnification[1] == 20
    got = [record_mpp(r) for r in df.to_dict("records")]
    assert got == [0.25, 0.5, None]  # magnification 20 -> 10 / 20 um/px
    spec = mpp_spec(df, default=1.0)
    assert spec.user_value(tmp_path / "a.svs") == (0.25, "manifest")
    assert spec.user_value(tmp_path / "b.svs") == (0.5, "manifest")
    assert spec.user_value(tmp_path / "c.svs") == (1.0, "cli")
    assert dict(spec.per_slide) == {
        slide_key(tmp_path / "a.svs"): 0.25,
        slide_key(tmp_path / "b.svs"): 0.5,
    }
    # Manifests without the columns still have them (NaN), so callers need not check.
    plain = read_manifest(write(tmp_path, "case_id,slide_id,label\nc1,a,tumor\n", "p.csv"))
    assert np.isnan(plain.mpp[0]) and record_mpp(plain.iloc[0].to_dict()) is None


def test_unlabelled_manifest_for_inference(tmp_path: Path) -> None:
    df = read_manifest(write(tmp_path, "case_id,slide_id\nc1,s1\n"), require_labels=False)
    assert list(df.y) == [-1]


def test_slides_from_dir(tmp_path: Path) -> None:
    for name in ("x.svs", "y.ome.tiff", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    df = slides_from_dir(tmp_path)
    assert sorted(df.slide_id) == ["x", "y"]


# What a folder scan accepted when the manifest kept its own list (before the registry).
FORMER_SLIDE_EXTENSIONS = {
    ".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
    ".dcm", ".zarr", ".ome.zarr", ".ome.tif", ".ome.tiff", ".png", ".jpg", ".jpeg",
}  # fmt: skip


def test_folder_scan_accepts_the_registered_suffixes() -> None:
    assert set(slide_suffixes()) == FORMER_SLIDE_EXTENSIONS
    assert manifest.SLIDE_EXTENSIONS == slide_suffixes()


def test_a_newly_registered_backend_is_scanned(tmp_path: Path) -> None:
    for name in ("a.svs", "b.newfmt", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert sorted(slides_from_dir(tmp_path).slide_id) == ["a"]
    blank = np.zeros((4, 4), np.uint8)
    register_backend("newfmt", lambda path, **_: ArrayReader(blank, path=path), [".NEWFMT"])
    try:
        assert ".newfmt" in slide_suffixes()
        assert sorted(slides_from_dir(tmp_path).slide_id) == ["a", "b"]
        assert find_slide(tmp_path, "b") == tmp_path / "b.newfmt"
    finally:
        unregister_backend("newfmt")
    assert ".newfmt" not in slide_suffixes()
    assert sorted(slides_from_dir(tmp_path).slide_id) == ["a"]


def _cohort(n_cases: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        y = int(c % 3 == 0)  # imbalanced: a third positive
        for s in range(int(rng.integers(1, 4))):
            rows.append({"case_id": f"c{c}", "slide_id": f"c{c}-{s}", "y": y})
    return pd.DataFrame(rows)


def test_splits_keep_cases_together_and_stratify() -> None:
    df = make_splits(_cohort(), val_fraction=0.2, test_fraction=0.25, seed=7)
    assert set(df.split) == {"train", "val", "test"}
    # No patient straddles two splits.
    assert (df.groupby("case_id").split.nunique() == 1).all()
    for split in ("train", "val", "test"):
        part = df[df.split == split]
        assert set(part.y) == {0, 1}, split
    test_cases = df[df.split == "test"].case_id.nunique()
    assert 5 <= test_cases <= 10  # about a quarter of 30 cases


def test_split_fractions_are_exact_per_label() -> None:
    df = _cohort(n_cases=50)  # 17 positive cases, 33 negative
    out = make_splits(df, val_fraction=0.0, test_fraction=0.4, seed=0)
    cases = out.groupby("case_id").agg(y=("y", "max"), split=("split", "first"))
    test = cases[cases.split == "test"]
    assert (test.y == 1).sum() == 7 and (test.y == 0).sum() == 13  # round(0.4 * n) of each


def test_splits_are_seeded() -> None:
    a = make_splits(_cohort(), seed=1).split.tolist()
    assert a == make_splits(_cohort(), seed=1).split.tolist()
    assert a != make_splits(_cohort(), seed=2).split.tolist()
