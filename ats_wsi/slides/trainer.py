"""Training ATS on a slide cohort: config schema, splits, DDP, checkpoints, the demo run.

:func:`train` is what ``python -m pipelines.train_slides`` runs. With no manifest in the config
it first builds the demo cohort (:mod:`ats_wsi.slides.cohort`). It trains the ATS model and the
low-res-only baseline, keeps ``{ats,baseline}_{best,last}.pt`` and ``{ats,baseline}_metrics.jsonl``
in the output folder, and finally predicts the test split (predictions CSV, heatmaps, metrics)
and writes ``results.json``. Under ``torchrun`` every rank trains on its shard of the slides
(DDP, gloo on CPU); rank 0 writes the files. A file that other ranks read (the demo cohort,
``splits.csv``) is written atomically (temp file + ``os.replace``) before a barrier and read
only after it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ats_wsi.checkpoint import atomic_write_text, library_versions
from ats_wsi.settings import load_yaml, parse, to_dict
from ats_wsi.slides.cohort import DEMO_CLASSES, DemoCohortConfig, make_demo_cohort
from ats_wsi.slides.engine import (
    LowResBaseline,
    SlideRecord,
    ViewStore,
    build_model,
    classification_metrics,
    run_slides,
)
from ats_wsi.slides.manifest import ManifestError, make_splits, mpp_spec, read_manifest
from ats_wsi.slides.progress import slide_progress
from ats_wsi.slides.settings import SlideSettings, TrainConfig, TrainSettings
from ats_wsi.training import (
    FitSettings,
    class_balanced_weights,
    dist_info,
    fit,
    param_groups,
    pick_device,
    seed_everything,
)

__all__ = ["default_config", "fit_slides", "load_config", "train"]

def default_config() -> TrainConfig:
    """The defaults (what an empty YAML file gives)."""
    return parse(TrainConfig, {}, "<defaults>")


def load_config(path: str | os.PathLike[str] | None) -> TrainConfig:
    """Validated config from YAML (``yaml.safe_load``), or the defaults when ``path`` is None."""
    return default_config() if path is None else load_yaml(TrainConfig, path)


# ----------------------------------------------------------------------------- distributed


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns (rank, world)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Other ranks wait at a barrier while rank 0 builds the demo cohort or predicts the
        # test split, which can outlast the 30 min default on a large split.
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    return dist_info()


def shard(
    n: int, rank: int, world: int, seed: int, epoch: int, shuffle: bool, pad: bool
) -> list[int]:
    """DistributedSampler's split: a seeded permutation (same on every rank), padded by wrapping
    to a multiple of ``world`` when ``pad`` (training: equal step counts on every rank)."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    order = order.tolist()
    if pad and world > 1 and n % world:
        order += order[: world - n % world]
    return order[rank::world]


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- training


def _records(df: Any) -> list[SlideRecord]:
    return [SlideRecord(r.slide_id, r.path, int(r.y), r.case_id) for r in df.itertuples()]


def _epoch_metrics(parts: list[Any], prefix: str) -> dict[str, Any]:
    seen: dict[str, tuple[int, np.ndarray, float]] = {}
    for ys, probs, losses, ids in parts:
        for y, p, loss, sid in zip(ys, probs, losses, ids, strict=True):
            seen.setdefault(sid, (y, p, loss))  # padding duplicates count once
    if not seen:
        return {}
    ys, ps, ls = zip(*seen.values(), strict=True)
    return classification_metrics(list(ys), np.stack(ps), list(ls), prefix)


def fit_slides(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_recs: Sequence[SlideRecord],
    val_recs: Sequence[SlideRecord],
    views: ViewStore,
    settings: SlideSettings,
    tcfg: TrainSettings,
    out: Path | None,
    *,
    kind: str,
    epochs: int,
    seed: int,
    device: torch.device,
    extra: dict[str, Any],
    resume_run: bool = False,
    config: dict[str, Any] | None = None,
    feature_cache: Any = None,
) -> list[dict[str, Any]]:
    """Train one model through :func:`ats_wsi.training.fit` with slide epoch steps (``tcfg``:
    the optimisation; ``config``: the plain config its checkpoints store; ``extra["classes"]``
    the class names): each rank runs its shard of the slides, metrics are gathered over
    ranks; ``{name}_last.pt`` and ``{name}_best.pt`` (by ``tcfg.select_metric``) in ``out``,
    or nothing written when ``out`` is None (in memory: the benchmarks). ``feature_cache``
    replaces the cache built from ``tcfg`` (a benchmark's pre-filled one)."""
    rank, world = dist_info()
    weights = None
    if tcfg.class_balanced:
        weights = class_balanced_weights([r.y for r in train_recs], len(extra["classes"]))
    use_amp = bool(tcfg.amp) and device.type == "cuda"
    scaler = None
    if use_amp and not torch.cuda.is_bf16_supported():
        scaler = torch.amp.GradScaler("cuda")
    cache = feature_cache
    if cache is None:
        cache = _feature_cache(model, _rank_cache_dir(tcfg, rank, world))

    def train_step(epoch: int) -> dict[str, Any]:
        idx = shard(len(train_recs), rank, world, seed, epoch, shuffle=True, pad=True)
        part = run_slides(
            model,
            [train_recs[i] for i in idx],
            views,
            settings,
            kind=kind,
            optimizer=optimizer,
            device=device,
            step=tcfg,
            class_weights=weights,
            amp=use_amp,
            scaler=scaler,
            seed=seed,
            epoch=epoch,
            where=f"{name} epoch {epoch}",
            progress=slide_progress(f"{name} {epoch}/{epochs}", len(idx), _bar(tcfg, rank)),
            feature_cache=cache,
        )
        metrics = _epoch_metrics(_gather(part, world), "train_")
        if cache is not None:
            metrics["feature_cache_hit_rate"] = cache.hit_rate
            metrics["feature_cache_mb"] = cache.nbytes / 2**20
            # Run totals (training and validation): boxes read and encoded, boxes from h5s.
            metrics["feature_cache_misses"] = cache.misses
            if hasattr(cache, "h5_hits"):
                metrics["feature_h5_hits"] = cache.h5_hits
        return metrics

    def eval_step(epoch: int) -> dict[str, Any]:
        vidx = shard(len(val_recs), rank, world, seed, 0, shuffle=False, pad=False)
        vpart = run_slides(
            model,
            [val_recs[i] for i in vidx],
            views,
            settings,
            kind=kind,
            device=device,
            amp=use_amp,
            sampler=tcfg.eval_sampler,
            seed=seed,
            progress=slide_progress(f"{name} val", len(vidx), _bar(tcfg, rank)),
            feature_cache=cache,
        )
        return _epoch_metrics(_gather(vpart, world), "val_")

    loop = FitSettings(
        epochs=epochs,
        eval_every=tcfg.eval_every,
        checkpoint_name="{name}_last.pt",
        select_metric=tcfg.select_metric,
        time_budget_s=tcfg.time_budget_s,
    )
    return fit(
        model,
        optimizer,
        train_step,
        loop,
        out_dir=out,
        name=name,
        eval_step=eval_step if val_recs else None,
        device=device,
        config=config,
        extra=extra,
        resume_run=resume_run,
        on_epoch_end=lambda epoch, r: _log(tcfg, f"[{name}] epoch {epoch}/{epochs} " + _fmt(r)),
    )


def _feature_cache(model: nn.Module, tcfg: TrainSettings) -> Any:
    """A :class:`~ats_wsi.encoders.FeatureCache` when the model's feature net is a fully frozen
    pretrained encoder (a trained one's features change with every step), else None."""
    from ats_wsi.encoders import FeatureCache, PatchEncoder

    net = getattr(getattr(model, "module", model), "feature_net", None)
    if not (isinstance(net, PatchEncoder) and net.fully_frozen) or tcfg.feature_cache_mb <= 0:
        return None

    max_bytes = int(tcfg.feature_cache_mb * 2**20)
    return FeatureCache(max_bytes=max_bytes, path=tcfg.feature_cache_dir)


def _rank_cache_dir(tcfg: TrainSettings, rank: int, world: int) -> TrainSettings:
    """Under DDP each rank gets its own disk feature cache, ``<feature_cache_dir>/rank<r>``:
    the zarr store takes one writer at a time, and every rank writes the slides it reads."""
    if world == 1 or not tcfg.feature_cache_dir:
        return tcfg
    return replace(tcfg, feature_cache_dir=str(Path(tcfg.feature_cache_dir) / f"rank{rank}"))


def _fmt(record: dict[str, Any]) -> str:
    keys = (
        "train_loss",
        "train_accuracy",
        "val_loss",
        "val_accuracy",
        "val_auc",
        "feature_cache_hit_rate",
        "epoch_time_s",
    )
    return " ".join(f"{k}={record[k]:.3f}" for k in keys if isinstance(record.get(k), float))


def _bar(tcfg: TrainSettings, rank: int) -> bool | None:
    """Progress bars: rank 0 only; ``train.progress`` None shows them on a terminal."""
    return False if rank else tcfg.progress


def _log(tcfg: TrainSettings, msg: str) -> None:
    if tcfg.progress is not False:
        print(msg, flush=True)


def _load_data(
    cfg: TrainConfig, out: Path, rank: int, world: int
) -> tuple[Any, list[str], Path | None]:
    """Manifest (built for the demo when none is configured) with a ``split`` column."""
    dcfg = cfg.data
    lesions = None
    if dcfg.manifest is None:
        cohort_dir = out / "cohort"
        if rank == 0:
            make_demo_cohort(cohort_dir, DemoCohortConfig.from_dict(cfg.demo))
        if world > 1:
            dist.barrier()
        manifest = cohort_dir / "manifest.csv"
        classes = list(cfg.classes or DEMO_CLASSES)
        lesions = cohort_dir / "lesions.csv"
    else:
        manifest = Path(dcfg.manifest)
        classes = cfg.classes
    df = read_manifest(manifest, slide_dir=dcfg.slide_dir, classes=classes)
    missing = df[df.path == ""]
    if len(missing):
        lines = ", ".join(
            f"{s} (line {n})" for s, n in zip(missing.slide_id, missing.line, strict=True)
        )
        raise ManifestError(manifest, f"slide file not found for: {lines}")
    classes = list(df.attrs["classes"])
    df = _shared_splits(df, out / "splits.csv", cfg, classes, rank, world)
    df.attrs["classes"] = classes
    return df, classes, lesions


def _saved_splits(df: Any, splits_csv: Path, classes: list[str]) -> Any:
    """``df`` with the ``split`` column of ``splits_csv`` ("" for slides it lacks)."""
    saved = read_manifest(splits_csv, classes=classes)
    df = df.drop(columns="split").merge(saved[["slide_id", "split"]], on="slide_id", how="left")
    df["split"] = df["split"].fillna("")
    return df


def _shared_splits(
    df: Any, splits_csv: Path, cfg: TrainConfig, classes: list[str], rank: int, world: int
) -> Any:
    """The manifest with its ``split`` column, identical on every rank.

    Rank 0 keeps the split of an existing ``splits.csv`` (a resumed or repeated run), makes one
    when any slide lacks it, and writes the file atomically when its content changes, all
    before the barrier; only then do the other ranks read it. Nobody writes it afterwards, so
    no rank reads a partial or changing file, and every rank trains on rank 0's split.
    """
    if rank == 0:
        old = splits_csv.read_text(encoding="utf-8") if splits_csv.exists() else None
        if old is not None:
            df = _saved_splits(df, splits_csv, classes)
        if (df.split == "").any():
            dcfg = cfg.data
            df = make_splits(df, dcfg.val_fraction, dcfg.test_fraction, cfg.seed)
        text = df[["case_id", "slide_id", "label", "split"]].to_csv(index=False)
        if text != old:
            atomic_write_text(splits_csv, text)
    if world > 1:
        dist.barrier()
    if rank > 0:
        df = _saved_splits(df, splits_csv, classes)
        if (df.split == "").any():
            raise RuntimeError(f"{splits_csv}: rank {rank} found slides without a split")
    return df


def train(
    cfg: TrainConfig | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    resume_run: bool = False,
) -> dict[str, Any]:
    """Train ATS (and the low-res baseline), then predict the test split; returns the results.
    ``cfg`` is a :class:`TrainConfig` or plain data, validated into one here."""
    t_start = time.perf_counter()
    if not isinstance(cfg, TrainConfig):
        cfg = parse(TrainConfig, cfg, "<config>")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = cfg.train
    plain = to_dict(cfg)  # what checkpoints store and a resume compares
    device = pick_device(tcfg.device)
    rank, world = init_distributed(device)
    if tcfg.torch_threads:
        torch.set_num_threads(tcfg.torch_threads)
    df, classes, lesions = _load_data(cfg, out, rank, world)
    settings = cfg.slides
    if settings.slide_mpp is None:
        # Each slide's manifest mpp, then data.mpp, for files without (or, with
        # data.mpp_override, instead of) their own: reaches every open_slide of the run.
        spec = mpp_spec(df, cfg.data.mpp, cfg.data.mpp_override, "cli")
        settings = replace(settings, slide_mpp=spec)
    train_recs = _records(df[df.split == "train"])
    val_recs = _records(df[df.split == "val"])
    test_df = df[df.split == "test"]
    extra = {"classes": classes, "versions": library_versions()}
    views = ViewStore(settings.loader(), tcfg.prefetch_depth, cache=tcfg.cache_views)
    results: dict[str, Any] = {
        "classes": classes,
        "n_slides": {s: int((df.split == s).sum()) for s in ("train", "val", "test")},
        "world_size": world,
    }
    try:
        seed_everything(cfg.seed)
        model = build_model(cfg.model, len(classes), settings.patch_size).to(device)
        # The head reads a mean of unit-norm features in which a lesion patch weighs ~1/N:
        # its weights must grow large, hence a larger learning rate for it alone.
        optim = torch.optim.Adam(
            param_groups(model, tcfg.lr, tcfg.head_lr_multiplier, tcfg.encoder_lr),
            lr=tcfg.lr,
            weight_decay=tcfg.weight_decay,
        )
        wrapped = _ddp(model, device, world)
        cache = None
        if cfg.data.features_dir:
            cache = _h5_cache(cfg, model, [*train_recs, *val_recs], settings, rank, world)
            results["features_h5"] = cache.summary
        history = fit_slides(
            "ats",
            wrapped,
            optim,
            train_recs,
            val_recs,
            views,
            settings,
            tcfg,
            out,
            kind="ats",
            epochs=tcfg.epochs,
            seed=cfg.seed,
            device=device,
            resume_run=resume_run,
            extra=extra,
            config=plain,
            feature_cache=cache,
        )
        results["ats_history_epochs"] = len(history)
        if cfg.baseline.enabled:
            run = (train_recs, val_recs, views, settings, out)
            _train_baseline(cfg, run, device, world, resume_run, extra, plain)
        if rank == 0 and len(test_df) and cfg.predict.enabled:
            results.update(_evaluate_test(cfg, out, test_df, classes, settings, views, device))
    finally:
        views.close()
    results["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    if rank == 0:
        if lesions is not None:
            results["cohort"] = str(out / "cohort")
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    if world > 1:
        dist.barrier()
    return results


def _h5_cache(
    cfg: TrainConfig,
    model: nn.Module,
    records: Sequence[SlideRecord],
    settings: SlideSettings,
    rank: int,
    world: int,
) -> Any:
    """The model's feature cache over the slides' TRIDENT / CLAM feature h5s
    (``data.features_dir``); its ``summary`` goes to results.json."""
    from ats_wsi.slides.features_h5 import h5_feature_cache

    tcfg = _rank_cache_dir(cfg.train, rank, world)
    cache = h5_feature_cache(
        cfg.data.features_dir,
        records,
        settings,
        model,
        spec=cfg.model.feature_net,
        max_bytes=int(max(tcfg.feature_cache_mb, 0) * 2**20),
        path=tcfg.feature_cache_dir,
    )
    s = cache.summary
    _log(tcfg, f"[ats] features from {s['dir']}: {s['slides']} slides, {s['tiles']} tiles, "
         f"{len(s['skipped'])} without a usable h5")
    return cache


def _train_baseline(
    cfg: TrainConfig,
    run: tuple[Sequence[SlideRecord], Sequence[SlideRecord], ViewStore, SlideSettings, Path],
    device: torch.device,
    world: int,
    resume_run: bool,
    extra: dict[str, Any],
    plain: dict[str, Any],
) -> None:
    """The low-res-only baseline through the same slide fit (``run``: train and val records,
    views, slide settings, output folder)."""
    train_recs, val_recs, views, settings, out = run
    bcfg = cfg.baseline
    seed_everything(cfg.seed + 1)
    base = LowResBaseline(cfg.model.in_channels, bcfg.width, len(extra["classes"])).to(device)
    fit_slides(
        "baseline",
        _ddp(base, device, world),
        torch.optim.Adam(base.parameters(), lr=bcfg.lr),
        train_recs,
        val_recs,
        views,
        settings,
        cfg.train,
        out,
        kind="baseline",
        epochs=bcfg.epochs or cfg.train.epochs,
        seed=cfg.seed,
        device=device,
        resume_run=resume_run,
        extra={**extra, "baseline_width": bcfg.width},
        config=plain,
    )


def _ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index or 0] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _evaluate_test(
    cfg: TrainConfig,
    out: Path,
    test_df: Any,
    classes: list[str],
    settings: SlideSettings,
    views: ViewStore,
    device: torch.device,
) -> dict[str, Any]:
    """Best ATS checkpoint through the prediction pipeline; baseline on the same slides."""
    from ats_wsi.checkpoint import load_checkpoint
    from ats_wsi.slides.inference import PredictOptions, predict_many, records_from_frame

    pcfg = cfg.predict
    options = PredictOptions(
        sampler=pcfg.sampler,
        n_patches=pcfg.n_patches,
        seed=cfg.seed,
        heatmaps=pcfg.heatmaps,
        gallery=pcfg.gallery,
        zarr=pcfg.zarr,
        geojson=pcfg.geojson,
        device=str(device),
        mpp=cfg.data.mpp,
        mpp_override=cfg.data.mpp_override,
    )
    pred_dir = out / "predictions"
    # A fresh run over the same folder must not skip slides because of a stale CSV.
    stale = pred_dir / "predictions.csv"
    if stale.exists():
        stale.unlink()
    summary = predict_many(
        records_from_frame(test_df),
        out / "ats_best.pt",
        pred_dir,
        options,
        classes=classes,
        workers=pcfg.workers,
        scheduler_address=pcfg.scheduler_address,
    )
    keys = (
        *("n", "n_labelled", "n_errors"),  # predicted, labelled of them, error rows
        *("accuracy", "balanced_accuracy", "auc", "confusion_matrix"),  # over the labelled
    )
    res: dict[str, Any] = {"test_ats": {k: summary.get(k) for k in keys}}
    if cfg.baseline.enabled and (out / "baseline_best.pt").exists():
        ckpt = load_checkpoint(out / "baseline_best.pt", map_location=device)
        base = LowResBaseline(
            cfg.model.in_channels, int(ckpt["extra"]["baseline_width"]), len(classes)
        ).to(device)
        base.load_state_dict(ckpt["model"])
        ys, probs, losses, _ = run_slides(
            base, _records(test_df), views, settings, kind="baseline", device=device, amp=False
        )
        res["test_baseline"] = classification_metrics(ys, probs, losses)
    return res
