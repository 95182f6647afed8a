"""What slide inference leaves on disk: a crash-safe predictions CSV, heatmaps, zarr, GeoJSON.

:class:`PredictionsCSV` appends one row per slide with flush + fsync, writes the header once,
and on reopening repairs a torn last line (the process was killed mid-write) and reports the
slides already done, so a rerun neither loses nor duplicates rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.checkpoint import atomic_write_text

__all__ = [
    "COST_COLUMNS",
    "PredictionsCSV",
    "prediction_columns",
    "save_attention_zarr",
    "save_geojson",
    "save_heatmap",
    "summarise_predictions",
    "zoom_arrays",
]


COST_COLUMNS = (
    "tiles_read",
    "regions_read",
    "view_px",
    "region_px",
    "tile_px",
    "level1_attention_s",
)
"""What a prediction read (:class:`~ats_wsi.slides.engine.SlideCost`): the CSV's last columns."""


def prediction_columns(classes: Sequence[str]) -> list[str]:
    """CLAM's ``slide_id, Y, Y_hat, p_0..p_{C-1}`` followed by our extra columns, the
    :data:`COST_COLUMNS` last (files written before them are upgraded on reopening)."""
    return [
        "slide_id",
        "Y",
        "Y_hat",
        *(f"p_{i}" for i in range(len(classes))),
        "case_id",
        "label",
        "pred_label",
        "n_patches",
        "sampler",
        "attention_mpp",
        "patch_mpp",
        "mpp",
        "mpp_source",
        "runtime_s",
        "error",
        *COST_COLUMNS,
    ]


class PredictionsCSV:
    """Append-only predictions file that survives being killed at any moment, shared safely
    by several processes.

    Args:
        path: the CSV.
        columns: header; an existing file must have the same header, or the same less
            (some of) the :data:`COST_COLUMNS` at its end (written before they existed: it
            is rewritten with them, empty, so runs resume across the upgrade).
        retry_errors: treat rows with a non-empty ``error`` as not done (they are dropped from
            the file, so the retried slide does not appear twice).
    """

    def __init__(
        self, path: str | PathLike[str], columns: Sequence[str], retry_errors: bool = False
    ) -> None:
        self.path = Path(path)
        self.columns = list(columns)
        self.done: dict[str, dict[str, str]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A side file: the CSV itself is replaced by a repair, and a lock on a replaced inode
        # would exclude nobody.
        self.lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._seen: tuple[int, int] = (-1, 0)  # (inode, bytes parsed) of the file
        with self._locked():
            if self.path.exists() and self.path.stat().st_size > 0:
                self._repair(retry_errors)
            else:
                self._write_text(self._format(self.columns))
            self._mark()

    def _locked(self) -> Any:
        from ats_wsi.slides.locks import exclusive

        return exclusive(self.lock_path)

    def _mark(self) -> None:
        st = self.path.stat()
        self._seen = (st.st_ino, st.st_size)

    def refresh(self) -> None:
        """Read rows other processes appended since the last look (call under the lock)."""
        st = self.path.stat()
        inode, offset = self._seen
        if st.st_ino != inode or st.st_size < offset:
            # Replaced by another job's repair: start over.
            self.done.clear()
            offset = 0
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read()
        cut = raw.rfind(b"\n") + 1
        if cut < len(raw):
            # Writers append whole lines under the lock we hold: a tail without its newline
            # is what a killed writer left, and the next row must not be glued to it.
            os.truncate(self.path, offset + cut)
            st = self.path.stat()
        text = raw[:cut].decode("utf-8", errors="replace")
        rows = list(csv.reader(io.StringIO(text)))
        if offset == 0 and rows:
            rows = rows[1:]  # the header
        for row in rows:
            if len(row) == len(self.columns):
                record = dict(zip(self.columns, row, strict=True))
                self.done[record["slide_id"]] = record
        self._seen = (st.st_ino, offset + cut)

    @staticmethod
    def _format(values: Sequence[Any]) -> str:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(values)
        return buf.getvalue()

    def _write_text(self, text: str, mode: str = "w") -> None:
        with open(self.path, mode, encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    def _repair(self, retry_errors: bool) -> None:
        raw = self.path.read_bytes()
        # A row is written with one write() ending in "\n": anything after the last newline is
        # the remains of a killed write.
        cut = raw.rfind(b"\n") + 1
        text = raw[:cut].decode("utf-8", errors="replace")
        rows = list(csv.reader(io.StringIO(text)))
        if not rows:
            self._write_text(self._format(self.columns))
            return
        header = rows[0]
        added = self.columns[len(header) :]
        old = bool(added) and header == self.columns[: len(header)]
        old = old and set(added) <= set(COST_COLUMNS)
        if old:
            # Written before the cost columns existed: their cells are empty, and the file
            # is rewritten below with the full header so every row has every column.
            pad = [""] * (len(self.columns) - len(header))
            rows = [self.columns] + [r + pad if len(r) == len(header) else r for r in rows[1:]]
        elif header != self.columns:
            raise ValueError(
                f"{self.path}: existing header {rows[0]} differs from {self.columns}; "
                "write to a new file or delete this one"
            )
        kept = []
        for row in rows[1:]:
            if len(row) != len(self.columns):
                continue  # a damaged row: its slide is simply redone
            record = dict(zip(self.columns, row, strict=True))
            if retry_errors and record.get("error"):
                continue
            self.done[record["slide_id"]] = record
            kept.append(row)
        if old or cut != len(raw) or len(kept) != len(rows) - 1:
            body = "".join(self._format(r) for r in [self.columns, *kept])
            atomic_write_text(self.path, body)

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row (missing columns empty) and make it durable before returning."""
        with self._locked():
            self.refresh()
            self._append(row)

    def write_new(self, row: Mapping[str, Any]) -> bool:
        """Append ``row`` unless some process already wrote its slide; True if written."""
        with self._locked():
            self.refresh()
            if str(row["slide_id"]) in self.done:
                return False
            self._append(row)
            return True

    def has(self, slide_id: str) -> bool:
        """Whether any process has written ``slide_id`` (re-reads the file under the lock)."""
        with self._locked():
            self.refresh()
        return slide_id in self.done

    def _append(self, row: Mapping[str, Any]) -> None:
        values = ["" if row.get(c) is None else _cell(row.get(c)) for c in self.columns]
        self._write_text(self._format(values), mode="a")
        self.done[str(row["slide_id"])] = dict(zip(self.columns, values, strict=True))
        self._mark()

    def __contains__(self, slide_id: object) -> bool:
        return slide_id in self.done


def _cell(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def summarise_predictions(rows: Iterable[Mapping[str, Any]], classes: Sequence[str]) -> dict:
    """Counts over all rows, slide-level metrics over the labelled ones.

    Returns ``n`` (rows with a prediction, i.e. no error), ``n_labelled`` (those of them with a
    label), ``n_errors`` (rows with ``error`` set; ``n + n_errors`` is the number of rows) and,
    when ``n_labelled > 0``, over the labelled rows only: ``accuracy``, ``balanced_accuracy``,
    ``auc`` (binary: of ``p_1``; multi-class: one-vs-rest macro; None when only one class is
    present) and the confusion matrix. Without labelled rows the metric keys are absent.
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    rows = list(rows)
    predicted = [r for r in rows if not r.get("error")]
    ok = [r for r in predicted if str(r.get("Y", "")) not in ("", "-1")]
    out: dict[str, Any] = {
        "n": len(predicted),
        "n_labelled": len(ok),
        "n_errors": len(rows) - len(predicted),
    }
    if not ok:
        return out
    y = np.array([int(r["Y"]) for r in ok])
    pred = np.array([int(r["Y_hat"]) for r in ok])
    probs = np.array([[float(r[f"p_{i}"]) for i in range(len(classes))] for r in ok])
    out["accuracy"] = float((y == pred).mean())
    with warnings.catch_warnings():
        # sklearn warns when only one class is present; the metric is still defined.
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
    out["auc"] = roc_auc(y, probs)
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=range(len(classes))).tolist()
    return out


def roc_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of class-1 scores (binary) or one-vs-rest macro; None if undefined."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    if len(np.unique(y)) < probs.shape[1]:
        return None
    return float(roc_auc_score(y, probs, multi_class="ovr"))


def save_heatmap(
    path: str | PathLike[str],
    thumbnail: np.ndarray,
    attention: np.ndarray,
    mask: np.ndarray | None = None,
    alpha: float = 0.5,
    cmap: str = "inferno",
) -> Path:
    """Attention (a_h, a_w) stretched over the thumbnail (h, w, 3) uint8 and blended, as PNG.

    Colours are scaled to the map's maximum (absolute probabilities are tiny on big maps);
    cells outside ``mask`` are left uncoloured.
    """
    import matplotlib
    from PIL import Image

    att = np.asarray(attention, dtype=np.float64)
    top = att.max() if att.size and att.max() > 0 else 1.0
    colours = matplotlib.colormaps[cmap](att / top)[..., :3]
    weight = np.full(att.shape, alpha)
    if mask is not None:
        weight = np.where(np.asarray(mask, dtype=bool), alpha, 0.0)
    h, w = thumbnail.shape[:2]
    # Nearest keeps cell boundaries honest: one attention cell is one block of colour.
    colour_img = np.asarray(
        Image.fromarray((colours * 255).astype(np.uint8)).resize((w, h), Image.Resampling.NEAREST)
    ).astype(np.float64)
    weight_img = (
        np.asarray(
            Image.fromarray((weight * 255).astype(np.uint8)).resize(
                (w, h), Image.Resampling.NEAREST
            )
        )[..., None].astype(np.float64)
        / 255
    )
    blend = (1 - weight_img) * thumbnail[..., :3] + weight_img * colour_img
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(np.rint(blend), 0, 255).astype(np.uint8)).save(path)
    return path


def save_attention_zarr(
    path: str | PathLike[str],
    attention: np.ndarray,
    locations_xy: np.ndarray,
    scores: np.ndarray,
    probabilities: np.ndarray | None = None,
    *,
    patch_size: int,
    attrs: Mapping[str, Any] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """A zarr v3 group: ``attention`` (a_h, a_w) float32, ``coords`` (N, 2) int64 level-0
    top-left (x, y) of the sampled patches in draw order, ``scores`` (N,) their attention,
    the class ``probabilities`` (C,) float32 when given, and any further ``arrays`` (e.g.
    the zoom-in regions, :func:`zoom_arrays`) as they are."""
    import zarr

    group = zarr.open_group(Path(path), mode="w", zarr_format=3)
    group.create_array("attention", data=np.asarray(attention, dtype=np.float32))
    group.create_array("coords", data=np.asarray(locations_xy, dtype=np.int64).reshape(-1, 2))
    group.create_array("scores", data=np.asarray(scores, dtype=np.float32).reshape(-1))
    if probabilities is not None:
        group.create_array("probabilities", data=np.asarray(probabilities, dtype=np.float32))
    for key, data in (arrays or {}).items():
        group.create_array(key, data=np.asarray(data))
    group.attrs.update(
        {"patch_size_level0": int(patch_size), "coords_order": "x,y", **dict(attrs or {})}
    )
    return Path(path)


def save_geojson(
    path: str | PathLike[str],
    locations_xy: np.ndarray,
    scores: np.ndarray,
    patch_size: int,
    name: str = "ATS patch",
    zoom: Any = None,
) -> Path:
    """Sampled patch boxes as a GeoJSON FeatureCollection QuPath imports (level-0 pixels).

    Each box is a closed Polygon with properties ``objectType: annotation``, a
    ``classification``, its ``attention`` and draw ``rank``, and the same two in QuPath's
    ``measurements`` map (which QuPath 0.4+ reads into the object's measurement list).

    With ``zoom`` (a :class:`~ats_wsi.slides.engine.SlideZoom`) the sampled regions come
    first, classified ``"ATS region"`` with ``level`` 0, their level-0 ``probability``,
    ``rank`` and grid ``index``; each patch then also has ``level`` 1 and the ``region``
    (rank) it was drawn in, and its ``attention`` is its nested probability.
    """
    feats = [] if zoom is None else _region_features(zoom)
    tile_region = None if zoom is None else np.asarray(zoom.tile_region).reshape(-1)
    for rank, ((x, y), s) in enumerate(
        zip(np.asarray(locations_xy).reshape(-1, 2), np.asarray(scores).reshape(-1), strict=True)
    ):
        x, y, p = int(x), int(y), int(patch_size)
        ring = [[x, y], [x + p, y], [x + p, y + p], [x, y + p], [x, y]]
        props: dict[str, Any] = {
            "objectType": "annotation",
            "name": f"{name} {rank}",
            "classification": {"name": name, "color": [255, 64, 0]},
            "attention": float(s),
            "rank": rank,
            "measurements": {"attention": float(s), "rank": rank},
        }
        if tile_region is not None:
            region = int(tile_region[rank])
            props.update(level=1, region=region)
            props["measurements"].update(level=1, region=region)
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": props,
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


REGION_NAME = "ATS region"


def _region_features(zoom: Any, name: str = REGION_NAME) -> list[dict[str, Any]]:
    """The zoom-in regions' level-0 boxes as QuPath annotations (see :func:`save_geojson`)."""
    feats = []
    boxes = np.asarray(zoom.regions_xywh).reshape(-1, 4)
    for rank, ((x, y, w, h), p, index) in enumerate(
        zip(boxes.tolist(), zoom.region_scores.tolist(), zoom.region_index.tolist(), strict=True)
    ):
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        measurements = {"probability": float(p), "rank": rank, "level": 0, "index": int(index)}
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{name} {rank}",
                    "classification": {"name": name, "color": [0, 160, 255]},
                    "level": 0,
                    "probability": float(p),
                    "rank": rank,
                    "index": int(index),
                    "measurements": measurements,
                },
            }
        )
    return feats


def zoom_arrays(zoom: Any) -> dict[str, np.ndarray]:
    """A :class:`~ats_wsi.slides.engine.SlideZoom` as named arrays (zarr / h5 datasets):
    ``regions`` (R, 4) int64 level-0 (x, y, w, h), ``region_scores`` (R,) float32 level-0
    probabilities, ``region_index`` (R,) int64, ``region_attention`` (R, side, side) float32
    level-1 attention, ``tile_region`` and ``tile_cell`` (T,) int64."""
    return {
        "regions": np.asarray(zoom.regions_xywh, dtype=np.int64).reshape(-1, 4),
        "region_scores": np.asarray(zoom.region_scores, dtype=np.float32),
        "region_index": np.asarray(zoom.region_index, dtype=np.int64),
        "region_attention": np.asarray(zoom.region_attention, dtype=np.float32),
        "tile_region": np.asarray(zoom.tile_region, dtype=np.int64),
        "tile_cell": np.asarray(zoom.tile_cell, dtype=np.int64),
    }
