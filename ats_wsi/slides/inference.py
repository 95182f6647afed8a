"""Slide inference from a checkpoint: one CSV row per slide, locally or on dask.distributed.

:func:`predict_record` never raises: a slide that cannot be read becomes a row whose ``error``
column says why. :func:`predict_many` streams rows into a :class:`PredictionsCSV` as they
arrive (``as_completed`` on dask), skipping slides the CSV already holds.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ats_wsi.checkpoint import atomic_write_text, load_checkpoint, load_model_state
from ats_wsi.io.readers import MppSpec, SlideReader, open_slide
from ats_wsi.model import ATSModel
from ats_wsi.settings import parse
from ats_wsi.slides.engine import SlideResult, build_model, predict_slide
from ats_wsi.slides.export import (
    PredictionsCSV,
    prediction_columns,
    save_attention_zarr,
    save_geojson,
    summarise_predictions,
    zoom_arrays,
)
from ats_wsi.slides.locks import DEFAULT_STALE_AFTER_S, SlideClaims
from ats_wsi.slides.manifest import record_mpp
from ats_wsi.slides.progress import progress_bar
from ats_wsi.slides.report import (
    HEATMAP_LONGEST_SIDE,
    cell_edges,
    display_mpp,
    save_attention_heatmap,
    save_attention_overlay,
    save_attention_tiles_geojson,
    write_summary_html,
)
from ats_wsi.slides.settings import SlideSettings, TrainConfig

__all__ = [
    "PredictOptions",
    "Predictor",
    "get_predictor",
    "predict_many",
    "predict_record",
    "write_prediction",
]


@dataclass(frozen=True)
class PredictOptions:
    """How to run inference and what to write besides the CSV row.

    ``sampler`` is ``topk`` (deterministic) or a training sampler (seeded per slide);
    ``n_patches`` None uses the checkpoint's. Artefacts go to ``out_dir``/{heatmaps, gallery,
    zarr, geojson}/<slide_id>.*. ``mpp`` is the level-0 resolution of slides whose file and
    manifest row give none; with ``mpp_override`` the user's value (manifest, then ``mpp``)
    replaces the file's.
    """

    sampler: str = "topk"
    mpp: float | None = None
    mpp_override: bool = False
    overlay: bool = False
    h5: str | None = None
    tiles_dir: str | None = None
    n_patches: int | None = None
    seed: int = 0
    heatmaps: bool = True
    gallery: bool = True
    zarr: bool = True
    geojson: bool = False
    device: str = "cpu"
    torch_threads: int | None = None


@dataclass
class Predictor:
    """A model restored from a checkpoint with the settings it was trained with."""

    model: ATSModel
    settings: SlideSettings
    classes: list[str]
    config: TrainConfig

    @classmethod
    def load(cls, checkpoint: str | os.PathLike[str], device: str = "cpu") -> Predictor:
        """Restore with ``torch.load(weights_only=True)`` (via :func:`load_checkpoint`)."""
        ckpt = load_checkpoint(checkpoint, map_location=device)
        cfg = parse(TrainConfig, ckpt["config"], f"{checkpoint} (its config)")
        classes = list(ckpt["extra"].get("classes") or cfg.classes)
        settings = cfg.slides
        model = build_model(cfg.model, len(classes), settings.patch_size)
        load_model_state(model, ckpt)
        model.to(device).eval()
        return cls(model, settings, classes, cfg)


_PREDICTORS: dict[tuple[str, float, str], Predictor] = {}
_LOCK = threading.Lock()


def get_predictor(checkpoint: str | os.PathLike[str], device: str = "cpu") -> Predictor:
    """The :class:`Predictor` for ``checkpoint``, loaded once per process (keyed by path and
    modification time, so a retrained checkpoint is picked up)."""
    path = str(Path(checkpoint).resolve())
    key = (path, os.path.getmtime(path), device)
    with _LOCK:
        if key not in _PREDICTORS:
            _PREDICTORS[key] = Predictor.load(path, device)
        return _PREDICTORS[key]


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def predict_record(
    record: Mapping[str, Any],
    checkpoint: str,
    out_dir: str,
    options: PredictOptions = PredictOptions(),  # noqa: B008 - frozen dataclass
) -> dict[str, Any]:
    """Predict one slide (``record``: ``slide_id``, ``path``, optional ``case_id``, ``label``,
    ``y``) and write its artefacts; returns the CSV row. Never raises for slide problems."""
    if options.torch_threads and _in_dask_worker():
        # Several workers share the machine's cores: one thread each avoids oversubscription.
        torch.set_num_threads(options.torch_threads)
    t0 = time.perf_counter()
    row = _row_start(record, options)
    try:
        pred = get_predictor(checkpoint, options.device)
        if not record.get("path"):
            raise FileNotFoundError(f"slide {row['slide_id']!r} not found (no file for it)")
        spec = record_mpp_spec(record, options, pred.settings)
        settings, item = pred.settings, None
        with open_slide(str(record["path"]), pred.settings.backend, spec) as reader:
            if options.tiles_dir:
                settings, item = _tiles_item(reader, row["slide_id"], options.tiles_dir, settings)
            res = predict_slide(
                pred.model,
                reader,
                settings,
                item=item,
                device=options.device,
                sampler=options.sampler,
                n_patches=options.n_patches,
                seed=options.seed,
                slide_id=row["slide_id"],
            )
            row = write_prediction(Path(out_dir), res, pred, options, row, reader=reader)
    except Exception as e:  # any failure of one slide is that slide's row, not the run's end
        row["error"] = f"{type(e).__name__}: {e}".replace("\n", " ")
    row["runtime_s"] = round(time.perf_counter() - t0, 4)
    return row


def _tiles_item(
    reader: SlideReader, slide_id: str, tiles_dir: str, settings: SlideSettings
) -> tuple[SlideSettings, Any]:
    """The slide's view with the tiles of its TRIDENT / CLAM coords h5 as the tissue mask."""
    from ats_wsi.slides.interop import find_patch_h5, read_patch_coords, tiles_to_view_mask

    path = find_patch_h5(tiles_dir, slide_id)
    if path is None:
        raise FileNotFoundError(
            f"{tiles_dir}: no {slide_id}.h5 or {slide_id}_patches.h5 for slide {slide_id!r}"
        )
    tiles = read_patch_coords(path)
    item = replace(settings.loader(), tissue=False).read(reader)
    mask = tiles_to_view_mask(
        tiles.coords_xy, tiles.patch_size_level0, item.image.shape[:2], item.dimensions
    )
    if settings.min_tissue <= 0:
        settings = replace(settings, min_tissue=1e-9)  # any tile in a cell counts
    return settings, replace(item, mask=mask)


def record_mpp_spec(
    record: Mapping[str, Any], options: PredictOptions, settings: SlideSettings
) -> MppSpec | float | None:
    """How to get a record's level-0 mpp: its manifest value, else ``options.mpp``, as the
    fallback for missing metadata (or, with ``mpp_override``, instead of it). Without either,
    the training config's ``slide_mpp`` override, if any, as before."""
    manifest = record_mpp(record)
    if manifest is not None:
        return MppSpec(default=manifest, override=options.mpp_override, default_source="manifest")
    if options.mpp is not None:
        return MppSpec(default=options.mpp, override=options.mpp_override)
    if settings.slide_mpp is not None:
        return settings.slide_mpp
    return MppSpec()


def _row_start(record: Mapping[str, Any], options: PredictOptions) -> dict[str, Any]:
    y = int(record.get("y", -1) if record.get("y", "") != "" else -1)
    return {
        "slide_id": str(record["slide_id"]),
        "case_id": record.get("case_id", ""),
        "label": record.get("label", ""),
        "Y": y,
        "sampler": options.sampler,
    }


def write_prediction(
    out: Path,
    res: SlideResult,
    pred: Predictor,
    options: PredictOptions,
    row: dict[str, Any],
    *,
    reader: SlideReader | None = None,
) -> dict[str, Any]:
    """Complete a slide's CSV ``row`` from its result and write the artefacts ``options`` ask
    for under ``out``/{heatmaps, gallery, zarr, geojson}/<slide_id>.*: what every front end
    (``predict_slides``, the trainer's test split, :class:`~ats_wsi.tiatoolbox_model.ATSEngine`)
    writes for a prediction. ``reader``, the open slide, gives ``mpp_source``. A zoom
    model's regions go into every artefact (:func:`~ats_wsi.slides.export.zoom_arrays`)."""
    slide_id = row["slide_id"]
    settings = pred.settings
    y_hat = int(res.probs.argmax())
    source = getattr(reader, "mpp_source", None) if reader is not None else None
    row.update(
        attention_mpp=settings.attention_mpp,
        patch_mpp=settings.patch_mpp,
        mpp=float(res.mpp[0]),
        mpp_source=source or row.get("mpp_source", ""),
        Y_hat=y_hat,
        pred_label=pred.classes[y_hat],
        n_patches=len(res.locations_xy),
        **{f"p_{i}": float(p) for i, p in enumerate(res.probs)},
        **_cost_cells(res),
    )
    rf = int(getattr(pred.model, "receptive_field", 0))
    edges = cell_edges(res.attention.shape, res.thumbnail.shape[:2], res.dimensions, rf)
    if options.heatmaps:
        _save_heatmap(out / "heatmaps" / f"{slide_id}.png", res, pred, edges, slide_id, reader)
    if options.gallery:
        _save_gallery(out / "gallery" / f"{slide_id}.png", res, pred, slide_id)
    if options.zarr:
        _save_zarr(out / "zarr" / f"{slide_id}.zarr", res, pred, slide_id)
    if options.geojson:
        save_geojson(
            out / "geojson" / f"{slide_id}.geojson",
            res.locations_xy,
            res.scores,
            res.patch_size_level0,
            zoom=res.zoom,
        )
        save_attention_tiles_geojson(
            out / "geojson" / f"{slide_id}.attention.geojson", res.attention, res.mask, edges
        )
    if options.h5:
        _save_h5(out / "h5" / f"{slide_id}.h5", res, settings, slide_id, options.h5)
    if options.overlay:
        save_attention_overlay(
            out / "overlay" / f"{slide_id}.ome.zarr",
            res.attention,
            res.mask,
            edges,
            res.dimensions,
            res.mpp,
        )
    return row


def _save_heatmap(
    path: Path,
    res: SlideResult,
    pred: Predictor,
    edges: Any,
    slide_id: str,
    reader: SlideReader | None,
) -> None:
    """The attention heatmap over the slide's thumbnail (read from ``reader`` when open)."""
    y_hat = int(res.probs.argmax())
    if reader is not None:
        image = reader.thumbnail(display_mpp(res.dimensions, res.mpp))
    else:  # no slide to read from: the attention view, enlarged
        image = _enlarged(res.thumbnail)
    p = res.probs
    regions = "" if res.zoom is None else f" in {len(res.zoom.regions_xywh)} regions"
    save_attention_heatmap(
        path,
        image,
        res.attention,
        res.mask,
        edges,
        res.dimensions,
        locations_xy=res.locations_xy,
        patch_size=res.patch_size_level0,
        title=f"{slide_id}: {pred.classes[y_hat]} (p={float(p.max()):.2f}), "
        f"{len(res.locations_xy)} patches{regions}",
        regions_xywh=None if res.zoom is None else res.zoom.regions_xywh,
    )


def _save_gallery(path: Path, res: SlideResult, pred: Predictor, slide_id: str) -> None:
    """The attention figure with the sampled patches."""
    from ats_wsi.viz import save_attention_figure

    y_hat = int(res.probs.argmax())
    p = res.probs
    save_attention_figure(
        path,
        res.thumbnail.transpose(2, 0, 1),
        res.attention,
        res.locations_xy[:, ::-1],
        res.patch_size_level0,
        (res.dimensions[1], res.dimensions[0]),
        patches=res.patches,
        title=f"{slide_id}: {pred.classes[y_hat]} (p={float(p.max()):.2f})",
        regions=None if res.zoom is None else res.zoom.regions_xywh[:, [1, 0, 3, 2]],
    )


def _save_zarr(path: Path, res: SlideResult, pred: Predictor, slide_id: str) -> None:
    """Attention map, sampled locations, scores and probabilities, with the slide's facts."""
    settings = pred.settings
    save_attention_zarr(
        path,
        res.attention,
        res.locations_xy,
        res.scores,
        res.probs,
        patch_size=res.patch_size_level0,
        attrs={
            "slide_id": slide_id,
            "attention_mpp": settings.attention_mpp,
            "patch_mpp": settings.patch_mpp,
            "level0_mpp": list(res.mpp),
            "dimensions_wh": list(res.dimensions),
            "classes": list(pred.classes),
            "predictions": int(res.probs.argmax()),
            **_zoom_attrs(res),
        },
        arrays=None if res.zoom is None else zoom_arrays(res.zoom),
    )


def _zoom_attrs(res: SlideResult) -> dict[str, Any]:
    """The zoom level's settings as attributes (nothing for one level)."""
    if res.zoom is None:
        return {}
    return {
        "region_mpp": res.zoom.region_mpp,
        "region_grid": list(res.zoom.region_grid),
        "regions_order": "x,y,w,h",
    }


def _cost_cells(res: SlideResult) -> dict[str, Any]:
    """The CSV's cost columns (:data:`~ats_wsi.slides.export.COST_COLUMNS`)."""
    c = res.cost
    if c is None:
        return {}
    level1 = None if c.level1_attention_s is None else round(c.level1_attention_s, 4)
    return {
        "tiles_read": c.tiles_read,
        "regions_read": c.regions_read,
        "view_px": c.view_px,
        "region_px": c.region_px,
        "tile_px": c.tile_px,
        "level1_attention_s": level1,
    }


def _save_h5(
    path: Path, res: SlideResult, settings: SlideSettings, slide_id: str, layout: str
) -> None:
    """The sampled patches as a TRIDENT / CLAM patch h5 (``layout``: see write_patch_h5);
    with zoom also the :func:`~ats_wsi.slides.export.zoom_arrays` datasets (both tools read
    only ``coords`` / ``features`` and ignore them)."""
    from ats_wsi.slides.interop import write_patch_h5

    # Written whole under a temporary name, then renamed: readers never see half a file.
    tmp = path.with_name(f".{path.name}.zoom") if res.zoom is not None else path
    write_patch_h5(
        tmp,
        res.locations_xy,
        patch_size=settings.patch_size,
        patch_size_level0=res.patch_size_level0,
        level0_mpp=float(res.mpp[0]),
        patch_mpp=settings.patch_mpp,
        name=slide_id,
        dimensions=res.dimensions,
        features=res.features,
        attention=res.scores,
        layout=layout,  # type: ignore[arg-type] - checked by write_patch_h5
    )
    if res.zoom is None:
        return
    import h5py

    with h5py.File(tmp, "a") as f:
        for key, data in zoom_arrays(res.zoom).items():
            f.create_dataset(key, data=data)
        f["regions"].attrs.update(_zoom_attrs(res))
        f["regions"].attrs["region_cells"] = int(res.zoom.region_attention.shape[-1])
    os.replace(tmp, path)


def _enlarged(image: np.ndarray, longest: int = HEATMAP_LONGEST_SIDE) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    factor = max(1, longest // max(h, w))
    return np.asarray(Image.fromarray(image).resize((w * factor, h * factor), Image.NEAREST))


def predict_many(
    records: Sequence[Mapping[str, Any]],
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: PredictOptions = PredictOptions(),  # noqa: B008 - frozen dataclass
    *,
    classes: Sequence[str] | None = None,
    csv_name: str = "predictions.csv",
    retry_errors: bool = False,
    client: Any = None,
    scheduler_address: str | None = None,
    workers: int = 0,
    processes: bool = True,
    retries: int = 2,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    progress: bool | None = None,
    lock_timeout_s: float = DEFAULT_STALE_AFTER_S,
    clear_stale_locks: bool = False,
) -> dict[str, Any]:
    """Predict every record not yet in ``out_dir/csv_name``; returns the metrics summary.

    Runs locally unless ``client``, ``scheduler_address`` or ``workers > 0`` (a LocalCluster of
    that many workers, processes by default) is given. On dask, each slide is one task
    (``retries`` re-runs for lost workers), the model is loaded once per worker process by
    :func:`get_predictor`, and rows are written as tasks complete. The summary counts every
    row (``n`` predicted, ``n_labelled``, ``n_errors``: :func:`summarise_predictions`); its
    metrics are over the labelled rows, and ``metrics.json`` is written when there are any.

    Other jobs may work on the same folder: a slide is predicted only by the job that claims
    it (claims older than ``lock_timeout_s`` without a heartbeat are taken over;
    ``clear_stale_locks`` first removes claims whose heartbeat stopped), and a row is written
    only if no job wrote that slide. ``progress`` shows a tqdm bar (None: when stderr is a
    terminal).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = str(Path(checkpoint).resolve())
    if classes is None:
        # Cached: the local path below predicts with this same loaded model.
        classes = get_predictor(checkpoint, options.device).classes
    table = PredictionsCSV(out / csv_name, prediction_columns(classes), retry_errors)
    todo = [dict(r) for r in records if str(r["slide_id"]) not in table]
    claims = SlideClaims(out, lock_timeout_s)
    if clear_stale_locks:
        claims.clear_stale()
    bar = progress_bar(len(todo), "predict", progress)

    def claim(rec: Mapping[str, Any]) -> bool:
        sid = str(rec["slide_id"])
        if claims.claim(sid):
            if not table.has(sid):
                return True
            claims.release(sid)
        # Another job holds it or has finished it: not ours to count.
        bar.total = max(bar.n, (bar.total or 0) - 1)
        bar.refresh()
        return False

    predicted = 0

    def emit(row: dict[str, Any]) -> None:
        nonlocal predicted
        predicted += 1
        written = table.write_new(row)
        claims.release(str(row["slide_id"]))
        bar.update(1)
        if written and on_row is not None:
            on_row(row)

    try:
        if todo and (client is not None or scheduler_address or workers > 0):
            _predict_dask(
                [r for r in todo if claim(r)],
                checkpoint,
                str(out),
                options,
                emit,
                client,
                scheduler_address,
                workers,
                processes,
                retries,
            )
        else:
            for rec in todo:
                if claim(rec):
                    emit(predict_record(rec, checkpoint, str(out), options))
    finally:
        claims.release_all()
        bar.close()
    return _write_summary(out, table, records, classes, options, checkpoint, predicted)


def _write_summary(
    out: Path,
    table: PredictionsCSV,
    records: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    options: PredictOptions,
    checkpoint: str,
    predicted: int,
) -> dict[str, Any]:
    """The run's summary over every row of ``records`` in the CSV (``predicted`` of them by
    this job); writes ``metrics.json`` (when any row is labelled) and ``summary.html``."""
    table.has("")  # re-read: rows other jobs wrote count in the summary
    wanted = {str(r["slide_id"]) for r in records}
    rows = [r for sid, r in table.done.items() if sid in wanted]
    summary = summarise_predictions(rows, classes)
    summary.update(options=asdict(options), checkpoint=checkpoint, classes=list(classes))
    summary["predicted_here"] = predicted  # by this job; other jobs may have done the rest
    if summary["n_labelled"]:
        # Atomic: other jobs on this folder write it too, and readers never see half of it.
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=1))
    order = {sid: i for i, sid in enumerate(str(r["slide_id"]) for r in records)}
    write_summary_html(
        out / "summary.html", sorted(rows, key=lambda r: order[r["slide_id"]]), classes
    )
    return summary


def _predict_dask(
    todo: list[dict[str, Any]],
    checkpoint: str,
    out: str,
    options: PredictOptions,
    emit: Callable[[dict[str, Any]], None],
    client: Any,
    scheduler_address: str | None,
    workers: int,
    processes: bool,
    retries: int,
) -> None:
    from distributed import Client, LocalCluster, as_completed

    owned: list[Any] = []
    if client is None:
        if scheduler_address:
            client = Client(scheduler_address)
        else:
            cluster = LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=processes,
                dashboard_address=":0",
            )
            owned.append(cluster)
            client = Client(cluster)
        owned.insert(0, client)
    if options.torch_threads is None:
        options = replace(options, torch_threads=1)
    if not todo:
        return
    try:
        futures = [
            client.submit(
                predict_record,
                rec,
                checkpoint,
                out,
                options,
                retries=retries,
                pure=False,
                key=f"predict-{rec['slide_id']}-{time.time_ns()}",
            )
            for rec in todo
        ]
        by_key = {f.key: rec for f, rec in zip(futures, todo, strict=True)}
        for future in as_completed(futures):
            try:
                row = future.result()
            except Exception as e:  # the task itself died (worker lost after all retries)
                rec = by_key[future.key]
                row = {
                    "slide_id": rec["slide_id"],
                    "case_id": rec.get("case_id", ""),
                    "label": rec.get("label", ""),
                    "Y": rec.get("y", -1),
                    "error": f"{type(e).__name__}: {e}",
                }
            emit(row)
            future.release()
    finally:
        for obj in owned:
            obj.close()


def records_from_frame(df: Any) -> list[dict[str, Any]]:
    """Manifest DataFrame -> records for :func:`predict_many` (with the slide's ``mpp`` and
    ``magnification`` when the manifest has them)."""
    cols = [
        c
        for c in ("case_id", "slide_id", "label", "y", "path", "mpp", "magnification")
        if c in df.columns
    ]
    return [{c: r[c] for c in cols} for r in df.to_dict("records")]
