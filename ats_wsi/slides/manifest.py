"""Slide manifests in the CLAM convention, and patient-stratified train/val/test splits.

A manifest is a CSV with columns ``case_id, slide_id, label`` and optionally ``path`` (absolute
or relative to the CSV), ``split`` (``train`` / ``val`` / ``test``), ``mpp`` (level-0 microns
per pixel) and ``magnification`` (objective power, mpp = 10 / magnification) for slides whose
files lack a resolution. Without ``path`` a slide is looked up as ``<slide_dir>/<slide_id><ext>``
for the suffixes the registered slide backends read (:func:`ats_wsi.io.slide_suffixes`).
Every problem is reported as :class:`ManifestError` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ats_wsi.io.mpp import MppSpec, slide_key
from ats_wsi.io.registry import slide_suffixes

__all__ = [
    "REQUIRED_COLUMNS",
    "SLIDE_EXTENSIONS",  # noqa: F822 - module __getattr__: the registry's current suffixes
    "SPLITS",
    "ManifestError",
    "find_slide",
    "make_splits",
    "mpp_spec",
    "read_manifest",
    "record_mpp",
    "slides_from_dir",
]

REQUIRED_COLUMNS = ("case_id", "slide_id", "label")
SPLITS = ("train", "val", "test")
COLUMNS = ["case_id", "slide_id", "label", "y", "path", "split", "mpp", "magnification", "line"]


class ManifestError(ValueError):
    """A malformed manifest; ``line`` is the 1-based CSV line (the header is line 1)."""

    def __init__(self, path: str | PathLike[str], problem: str, line: int | None = None) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {problem}")


def __getattr__(name: str) -> Any:
    # SLIDE_EXTENSIONS is the registry's current list, so a backend registered later counts.
    if name == "SLIDE_EXTENSIONS":
        return slide_suffixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def find_slide(
    slide_dir: str | PathLike[str], slide_id: str, extensions: Sequence[str] | None = None
) -> Path | None:
    """``slide_dir/slide_id<ext>`` for the first extension that exists, else None.

    ``extensions`` defaults to :func:`~ats_wsi.io.registry.slide_suffixes`."""
    base = Path(slide_dir)
    for ext in slide_suffixes() if extensions is None else extensions:
        candidate = base / f"{slide_id}{ext}"
        if candidate.exists():
            return candidate
    return None


def read_manifest(
    path: str | PathLike[str],
    *,
    slide_dir: str | PathLike[str] | None = None,
    classes: Sequence[str] | None = None,
    require_labels: bool = True,
    extensions: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Read and validate a manifest.

    Args:
        path: the CSV.
        slide_dir: where ``slide_id<ext>`` files live when a row has no ``path``; default the
            CSV's directory, then its ``slides/`` subdirectory.
        classes: allowed labels in class-index order; None: the sorted distinct labels.
        require_labels: False accepts a missing ``label`` column or empty labels (inference).
        extensions: file extensions tried, in order; default the registered backends'
            :func:`~ats_wsi.io.registry.slide_suffixes`.

    Returns:
        Columns ``case_id, slide_id, label, y, path, split, mpp, magnification`` (strings; ``y``
        the int class index or -1 without a label; ``path`` "" when the slide was not found;
        ``split`` "" when the manifest has none; ``mpp`` / ``magnification`` floats, NaN when
        empty). ``attrs["classes"]`` holds the class names.

    Raises:
        ManifestError: missing file or columns, empty file, empty or duplicate ``slide_id``,
            unknown label or split, an ``mpp`` or ``magnification`` that is not a positive
            number.
    """
    path = Path(path)
    numbered = _read_rows(path)
    header = _read_header(path, numbered, require_labels)
    col = {name: i for i, name in enumerate(header)}
    records: list[dict[str, str | int]] = []
    seen: dict[str, int] = {}
    for line, row in numbered[1:]:
        records.append(_parse_row(path, line, row, col, seen, require_labels))
    names = _assign_classes(path, records, classes)
    search = [Path(slide_dir)] if slide_dir is not None else [path.parent, path.parent / "slides"]
    _resolve_paths(path, records, search, extensions)
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df["y"] = df["y"].astype(int)
    df.attrs["classes"] = names
    df.attrs["source"] = str(path)
    return df


def _read_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The CSV's non-blank rows with their 1-based line numbers."""
    if not path.is_file():
        raise ManifestError(path, "no such file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(path, f"not a readable CSV: {e}") from e
    # Blank lines are tolerated (editors add them); keep the real line numbers.
    numbered = [(i + 1, r) for i, r in enumerate(rows) if any(c.strip() for c in r)]
    if not numbered:
        raise ManifestError(path, "the file is empty (expected a header: case_id,slide_id,label)")
    return numbered


def _read_header(
    path: Path, numbered: list[tuple[int, list[str]]], require_labels: bool
) -> list[str]:
    """The validated header (required columns present, no duplicates, some slides after it)."""
    header = [c.strip() for c in numbered[0][1]]
    required = [c for c in REQUIRED_COLUMNS if require_labels or c != "label"]
    missing = [c for c in required if c not in header]
    if missing:
        raise ManifestError(
            path, f"missing column(s) {', '.join(missing)}; found: {', '.join(header)}", 1
        )
    if len(set(header)) != len(header):
        raise ManifestError(path, f"duplicate column names in header: {header}", 1)
    if len(numbered) == 1:
        raise ManifestError(path, "the manifest has a header but no slides")
    return header


def _parse_row(
    path: Path,
    line: int,
    row: list[str],
    col: dict[str, int],
    seen: dict[str, int],
    require_labels: bool,
) -> dict[str, str | int]:
    """One validated slide record (``seen``: slide_id -> first line, updated here)."""
    if len(row) != len(col):
        raise ManifestError(path, f"{len(row)} fields, the header has {len(col)}", line)

    def get(name: str) -> str:
        return row[col[name]].strip() if name in col else ""

    slide_id, case_id = get("slide_id"), get("case_id")
    if not slide_id:
        raise ManifestError(path, "empty slide_id", line)
    if not case_id:
        raise ManifestError(path, f"empty case_id for slide {slide_id!r}", line)
    if slide_id in seen:
        raise ManifestError(
            path, f"duplicate slide_id {slide_id!r} (first on line {seen[slide_id]})", line
        )
    seen[slide_id] = line
    label = get("label")
    if require_labels and not label:
        raise ManifestError(path, f"empty label for slide {slide_id!r}", line)
    split = get("split").lower()
    if split and split not in SPLITS:
        raise ManifestError(
            path,
            f"unknown split {split!r} for slide {slide_id!r}; expected one of "
            f"{', '.join(SPLITS)}",
            line,
        )
    resolution = {
        name: _positive_number(path, line, name, get(name), slide_id)
        for name in ("mpp", "magnification")
    }
    return {
        "line": line,
        "case_id": case_id,
        "slide_id": slide_id,
        "label": label,
        "path": get("path"),
        "split": split,
        **resolution,
    }


def _positive_number(path: Path, line: int, name: str, text: str, slide_id: str) -> float:
    """``text`` as a positive finite float; NaN when empty."""
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ManifestError(
            path, f"{name} {text!r} for slide {slide_id!r} is not a positive number", line
        )
    return value


def _assign_classes(
    path: Path, records: list[dict[str, str | int]], classes: Sequence[str] | None
) -> list[str]:
    """Set each record's ``y`` (class index, -1 unlabelled); returns the class names."""
    labels = sorted({str(r["label"]) for r in records if r["label"]})
    names = list(classes) if classes is not None else labels
    index = {name: i for i, name in enumerate(names)}
    for r in records:
        if r["label"] and r["label"] not in index:
            raise ManifestError(
                path,
                f"unknown label {r['label']!r} for slide {r['slide_id']!r}; expected one "
                f"of {', '.join(names)}",
                int(r["line"]),
            )
        r["y"] = index[str(r["label"])] if r["label"] else -1
    return names


def _resolve_paths(
    path: Path,
    records: list[dict[str, str | int]],
    search: list[Path],
    extensions: Sequence[str] | None,
) -> None:
    """Make each record's ``path`` absolute (relative to the CSV), or find the slide file in
    ``search`` ("" when there is none)."""
    for r in records:
        p = str(r["path"])
        if p:
            resolved = Path(p) if Path(p).is_absolute() else path.parent / p
            r["path"] = str(resolved)
        else:
            found = next(
                (f for d in search if (f := find_slide(d, str(r["slide_id"]), extensions))), None
            )
            r["path"] = str(found) if found is not None else ""


def slides_from_dir(
    slide_dir: str | PathLike[str], extensions: Sequence[str] | None = None
) -> pd.DataFrame:
    """An unlabelled manifest of every slide file in ``slide_dir`` (case_id = slide_id).

    A file is a slide when its name ends with one of ``extensions`` (default the suffixes the
    registered backends read, :func:`~ats_wsi.io.registry.slide_suffixes`)."""
    if extensions is None:
        extensions = slide_suffixes()
    base = Path(slide_dir)
    if not base.is_dir():
        raise ManifestError(base, "no such directory")
    records = []
    for p in sorted(base.iterdir()):
        name = p.name.lower()
        ext = next((e for e in sorted(extensions, key=len, reverse=True) if name.endswith(e)), None)
        if ext is None:
            continue
        slide_id = p.name[: -len(ext)]
        records.append(
            {
                "case_id": slide_id,
                "slide_id": slide_id,
                "label": "",
                "y": -1,
                "path": str(p),
                "split": "",
                "mpp": math.nan,
                "magnification": math.nan,
                "line": 0,
            }
        )
    if not records:
        raise ManifestError(base, f"no slide files ({', '.join(extensions)})")
    df = pd.DataFrame.from_records(records, columns=COLUMNS)
    df.attrs["classes"] = []
    df.attrs["source"] = str(base)
    return df


def record_mpp(record: Mapping[str, object]) -> float | None:
    """A manifest row's level-0 mpp: its ``mpp``, else 10 / ``magnification``, else None."""
    for name, convert in (("mpp", lambda v: v), ("magnification", lambda v: 10.0 / v)):
        value = record.get(name)
        if value is None or value == "":
            continue
        value = float(value)  # type: ignore[arg-type]
        if math.isfinite(value) and value > 0:
            return float(convert(value))
    return None


def mpp_spec(
    records: pd.DataFrame | Sequence[Mapping[str, object]],
    default: float | None = None,
    override: bool = False,
    default_source: str = "cli",
) -> MppSpec:
    """The :class:`MppSpec` of a cohort: each slide's manifest mpp (or magnification), then
    ``default``; with ``override`` they replace the files' metadata."""
    rows = records.to_dict("records") if isinstance(records, pd.DataFrame) else records
    table = tuple(
        (slide_key(str(r["path"])), mpp)
        for r in rows
        if r.get("path") and (mpp := record_mpp(r)) is not None
    )
    return MppSpec(
        default=default, override=override, per_slide=table, default_source=default_source
    )


def _stratified_group_split(
    y: np.ndarray, groups: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of whole groups: ``round(fraction * cases)`` of the cases of each label
    (a case's label is its slides' highest), drawn from ``seed``."""
    if fraction <= 0:
        return np.zeros(len(y), dtype=bool)
    labels = pd.Series(y).groupby(groups, sort=True).max()
    rng = np.random.default_rng(seed)
    held: list[Any] = []
    for label in sorted(labels.unique()):
        cases = labels.index[labels == label].to_numpy()
        held.extend(rng.permutation(cases)[: int(np.floor(fraction * len(cases) + 0.5))])
    return np.isin(groups, np.asarray(held, dtype=groups.dtype))


def make_splits(
    df: pd.DataFrame, val_fraction: float = 0.2, test_fraction: float = 0.25, seed: int = 0
) -> pd.DataFrame:
    """Assign ``split`` patient-wise: every slide of a case lands in the same split.

    Test is drawn first (StratifiedGroupKFold over cases, stratified by label), then val from
    the rest. Deterministic for a given seed. Returns a copy with the ``split`` column set.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    out = df.copy()
    y = out["y"].to_numpy()
    groups = out["case_id"].to_numpy()
    test = _stratified_group_split(y, groups, test_fraction, seed)
    rest = np.flatnonzero(~test)
    val = np.zeros(len(out), dtype=bool)
    if val_fraction > 0:
        sub = _stratified_group_split(
            y[rest], groups[rest], val_fraction / (1 - test_fraction), seed + 1
        )
        val[rest[sub]] = True
    out["split"] = np.where(test, "test", np.where(val, "val", "train"))
    return out
