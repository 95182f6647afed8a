"""The per-process tasks of the ``cohort`` benchmark (:mod:`ats_wsi.benchmarks.cohort`).

Run by :func:`ats_wsi.benchmarks.workers.run_in_subprocess` as
``python -m ats_wsi.benchmarks.cohort_tasks '<config JSON>'`` (or called in process with
``--in-process``). One task per process, so that its peak RSS is its own:

* ``extract``: every tissue tile of every slide through the frozen encoder, once
  (``features/<encoder>/<slide>.npz``);
* ``ats`` / ``random``: :class:`~ats_wsi.model.ATSModel` with the tile-grid attention net (or
  a constant one), trained by :func:`~ats_wsi.slides.trainer.fit_slides` from the extracted
  features (:func:`feature_cache`), tested, then timed end to end with the encoder running;
* ``abmil`` / ``mean``: gated-attention MIL or mean pooling over all extracted tile features;
* ``lowres``: :class:`~ats_wsi.slides.engine.LowResBaseline` on the attention view.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.benchmarking import rss_peak_mb
from ats_wsi.benchmarks.workers import worker_main

__all__ = ["PATCH_MPP", "TILE_PX", "extract_slide", "feature_cache", "worker"]

TILE_PX = 256
PATCH_MPP = 0.5


# ----------------------------------------------------------------------------- settings


def _pool(attention_mpp: float) -> int:
    """View pixels per tile side: one attention cell is one 256 px tile."""
    pool = TILE_PX * PATCH_MPP / attention_mpp
    if pool < 1 or pool != int(pool):
        raise ValueError(
            f"attention mpp {attention_mpp} must divide the tile's {TILE_PX * PATCH_MPP} um"
        )
    return int(pool)


def _settings(cfg: dict[str, Any]) -> Any:
    from ats_wsi.slides.engine import SlideSettings

    return SlideSettings(
        attention_mpp=cfg["attention_mpp"],
        patch_mpp=PATCH_MPP,
        patch_size=TILE_PX,
        min_tissue=cfg["min_tissue"],
        read_workers=cfg["read_workers"],
    )


def _feature_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "timm", "preset": cfg["encoder"]}
    if cfg.get("encoder_size"):
        spec["input_size"] = int(cfg["encoder_size"])
    return spec


def _build_encoder(cfg: dict[str, Any]) -> Any:
    """The frozen pretrained encoder every method shares (built the same way in every
    process, so its ``encoder_id`` keys the same cached features)."""
    from ats_wsi.encoders import PatchEncoder
    from ats_wsi.nets import build_feature_net

    spec = dict(_feature_spec(cfg))
    net = build_feature_net(spec.pop("name"), **spec)
    if not (isinstance(net, PatchEncoder) and net.fully_frozen):
        raise ValueError(f"encoder {cfg['encoder']!r} is not frozen; the benchmark caches features")
    return net.eval()


def _encoder_key(cfg: dict[str, Any]) -> str:
    """Feature folder name: the encoder, its precision and the tile grid it was run on."""
    # The tissue mask, so the grid, is computed on the attention view.
    key = {k: cfg[k] for k in ("bf16", "min_tissue", "attention_mpp")}
    text = json.dumps({"spec": _feature_spec(cfg), **key}, sort_keys=True)
    name = cfg["encoder"] + (f"-{cfg['encoder_size']}" if cfg.get("encoder_size") else "")
    return f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _encode(encoder: Any, x: Any, bf16: bool) -> Any:
    import contextlib

    import torch

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return encoder(x).float()


# ----------------------------------------------------------------------------- extraction


def _tile_grid(item: Any, settings: Any) -> tuple[np.ndarray, tuple[int, int], Any]:
    """Tissue cells of the tile grid and their level-0 top-left (y, x), via the ATS mapping."""
    import torch

    from ats_wsi.mapping import GridMapping
    from ats_wsi.slides.engine import tissue_grid

    h, w = item.image.shape[:2]
    pool = _pool(settings.attention_mpp)
    grid = (h // pool, w // pool)
    cells = tissue_grid(item, grid, settings, 0)[0].numpy().ravel()
    idx = np.flatnonzero(cells)
    height, width = item.dimensions[1], item.dimensions[0]
    mapping = GridMapping(
        low_size=(h, w),
        high_size=(height, width),
        attention_size=grid,
        receptive_field=0,
        patch_size=TILE_PX,
    )
    top_left = mapping.top_left(torch.from_numpy(idx)[None])[0]
    return idx, grid, top_left


def extract_slide(
    encoder: Any, path: str, settings: Any, out: Path, batch: int, bf16: bool
) -> dict[str, Any]:
    """Every tissue tile of one slide through the encoder; features and boxes to ``out``
    (npz). Returns the slide's costs."""
    from ats_wsi.io import SlidePatchSource
    from ats_wsi.io.readers import open_slide

    t0 = time.perf_counter()
    item = settings.loader()(path)
    idx, grid, top_left = _tile_grid(item, settings)
    t_view = time.perf_counter() - t0
    feats = []
    t_read = t_enc = 0.0
    with (
        open_slide(path) as reader,
        SlidePatchSource(reader, TILE_PX, PATCH_MPP, settings.read_workers) as src,
    ):
        for s in range(0, len(idx), batch):
            t1 = time.perf_counter()
            patches = src.extract(top_left[None, s : s + batch])[0]
            t2 = time.perf_counter()
            feats.append(_encode(encoder, patches, bf16).numpy().astype(np.float16))
            t_read += t2 - t1
            t_enc += time.perf_counter() - t2
        box = src.patch_size  # level-0 side of a tile: what the model's cache key holds
    total = time.perf_counter() - t0
    tmp = out.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        features=np.concatenate(feats),
        top_left=top_left.numpy(),
        cells=idx,
        grid=np.array(grid),
        box=np.array(box),
    )
    tmp.replace(out)
    cost = {
        "tiles": len(idx),
        "cells": int(grid[0] * grid[1]),
        "view_s": t_view,
        "read_s": t_read,
        "encode_s": t_enc,
        "total_s": total,
    }
    out.with_suffix(".json").write_text(json.dumps(cost))
    return cost


def _extract_task(cfg: dict[str, Any]) -> dict[str, Any]:
    settings = _settings(cfg)
    encoder = _build_encoder(cfg)
    fdir = Path(cfg["feature_dir"])
    fdir.mkdir(parents=True, exist_ok=True)
    costs, fresh = {}, 0
    for rec in cfg["records"]:
        out = fdir / f"{rec['slide_id']}.npz"
        if out.exists() and out.with_suffix(".json").exists():
            costs[rec["slide_id"]] = json.loads(out.with_suffix(".json").read_text())
            continue
        costs[rec["slide_id"]] = extract_slide(
            encoder, rec["path"], settings, out, cfg["batch"], cfg["bf16"]
        )
        fresh += 1
        if cfg.get("progress"):
            c = costs[rec["slide_id"]]
            print(f"extract {rec['slide_id']}: {c['tiles']} tiles {c['total_s']:.1f} s", flush=True)
    return {"costs": costs, "fresh": fresh, "rss_mb": rss_peak_mb()}


# ----------------------------------------------------------------------------- ATS / random-N


def feature_cache(cfg: dict[str, Any], encoder: Any) -> Any:
    """A :class:`~ats_wsi.encoders.FeatureCache` holding every extracted tile feature under
    the key :class:`~ats_wsi.model.ATSModel` looks it up by (slide path, level-0 box, patch
    mpp, ``encoder.encoder_id``): ATS and random-N then train and test without reading or
    encoding the tiles they sample (the attention cells are the tile grid)."""
    import torch

    from ats_wsi.encoders import FeatureCache, FeatureKey

    cache = FeatureCache(max_bytes=1 << 40)  # the cohort's features fit in memory (float32)
    for rec in cfg["records"]:
        with np.load(Path(cfg["feature_dir"]) / f"{rec['slide_id']}.npz") as z:
            box = int(z["box"])
            keys = [
                FeatureKey.of(rec["path"], x, y, box, PATCH_MPP, encoder.encoder_id)
                for y, x in z["top_left"].tolist()
            ]
            cache.put_many(keys, torch.from_numpy(z["features"].astype(np.float32)))
    return cache


def _records(cfg: dict[str, Any], split: str) -> list[Any]:
    from ats_wsi.slides.engine import SlideRecord

    return [
        SlideRecord(r["slide_id"], r["path"], int(r["y"]), r["case_id"])
        for r in cfg["records"]
        if r["split"] == split
    ]


def _ats_model(cfg: dict[str, Any], kind: str, n: int) -> Any:
    """The ATS model of ``kind`` (``ats``: tile-grid attention net; ``random``: a constant
    one) over the shared frozen encoder, sampling ``n`` tiles without replacement."""
    from ats_wsi.slides.engine import build_model
    from ats_wsi.slides.settings import ModelSettings, ZoomSettings

    pool = _pool(cfg["attention_mpp"])
    attention = (
        {"name": "uniform_tiles", "pool": pool}
        if kind == "random"
        else {"name": "tile_pool", "width": 16, "pool": pool}
    )
    zoom = ZoomSettings()
    if kind == "zoom":
        # Level 1 on the same tile grid inside each region, at region_mpp: one logit per tile.
        zoom = ZoomSettings(
            n_regions=int(cfg["n0"]),
            region_cells=int(cfg["region_cells"]),
            region_mpp=float(cfg["region_mpp"]),
            attention_net={"name": "tile_pool", "width": 16, "pool": _pool(cfg["region_mpp"])},
        )
    return build_model(
        ModelSettings(
            attention_net=attention,
            feature_net=_feature_spec(cfg),
            n_patches=n,
            sampler="without_replacement",
            smoothing=1e-4,
            zoom=zoom,
        ),
        2,
        TILE_PX,
    )


def _fit_ats(
    cfg: dict[str, Any],
    kind: str,
    n: int,
    model: Any,
    train: list[Any],
    views: Any,
    settings: Any,
    cache: Any,
) -> tuple[list[float], float]:
    """Train in memory with the library's slide fit; the loss history and the seconds."""
    import torch

    from ats_wsi.slides.realistic_cohort import CLASSES
    from ats_wsi.slides.settings import TrainSettings
    from ats_wsi.slides.trainer import fit_slides
    from ats_wsi.training import param_groups

    # Only trainable parameters (the attention net, the head); random-N has no attention ones.
    groups = param_groups(model, cfg["lr"], cfg["head_lr_multiplier"])
    optim = torch.optim.Adam([g for g in groups if g["params"]], lr=cfg["lr"])
    learnt = kind != "random"
    epochs = cfg["epochs_ats"] if learnt else cfg["epochs_random"]
    step = TrainSettings(
        entropy_lambda=cfg["entropy_lambda"] if learnt else 0.0,
        distill_lambda=cfg["distill_lambda"] if learnt else 0.0,
        accumulate=cfg["accumulate"],
        clip_norm=1.0,
        progress=False,
    )
    t0 = time.perf_counter()
    # The library's slide fit, the one train_slides uses, in memory (no checkpoints).
    records = fit_slides(
        f"{kind} N={n}",
        model,
        optim,
        train,
        [],
        views,
        settings,
        step,
        None,
        kind="ats",
        epochs=epochs,
        seed=cfg["seed"],
        device=torch.device("cpu"),
        extra={"classes": CLASSES},
        feature_cache=cache,
    )
    history = [r["train_loss"] for r in records]
    return history, time.perf_counter() - t0


def _test_ats(
    cfg: dict[str, Any],
    kind: str,
    n: int,
    model: Any,
    test: list[Any],
    views: Any,
    settings: Any,
    cache: Any,
) -> list[dict[str, Any]]:
    """One row per test slide: label, probability, the tiles read (and, for ATS on positive
    slides, the attention map)."""
    import torch

    from ats_wsi.slides.costs import SlideCost
    from ats_wsi.slides.engine import slide_forward, slide_generator

    sampler = _test_sampler(kind)
    model.eval()
    rows = []
    with torch.no_grad():
        for (_, item), rec in zip(views.iterate([r.path for r in test]), test, strict=True):
            out, mask = slide_forward(
                model,
                item,
                rec.path,
                settings,
                torch.device("cpu"),
                n_patches=n,
                sampler=sampler,
                generator=slide_generator(cfg["seed"], rec.slide_id, 0),
                feature_cache=cache,
            )
            # Pixels read per level: the view, the zoom regions, the tiles (predict's record).
            cost = SlideCost.of(out, item.image.shape, TILE_PX)
            row = {
                "slide_id": rec.slide_id,
                "y": rec.y,
                "p": float(torch.softmax(out.logits, 1)[0, 1]),
                "top_left": out.locations[0].tolist(),
                "view_px": cost.view_px,
                "region_px": cost.region_px,
                "tile_px": cost.tile_px,
                "tiles": cost.tiles_read,
            }
            if out.zoom is not None:
                row["region_tissue_fraction"] = _region_coverage(out.zoom.members, mask)
                row["region_top_left"] = out.zoom.region_top_left.tolist()
            if kind != "random" and rec.y == 1:
                row["attention"] = out.attention[0].numpy().round(5).tolist()
            rows.append(row)
    return rows


def _region_coverage(members: Any, mask: Any) -> float:
    """Fraction of the slide's tissue cells inside the union of the sampled regions."""
    cells = members[members >= 0].unique()
    tissue = mask.reshape(-1)
    return float(tissue[cells].sum() / tissue.sum().clamp_min(1))


def _test_sampler(kind: str) -> str:
    """Test: ATS / zoom read their top cells (deterministic), random-N a seeded uniform draw."""
    return "without_replacement" if kind == "random" else "topk"


def _deployment_timings(
    cfg: dict[str, Any], kind: str, n: int, model: Any, test: list[Any], settings: Any
) -> tuple[list[float], list[float]]:
    """Seconds per slide of :func:`~ats_wsi.slides.engine.predict_slide` on the first
    ``timing_slides`` test slides, and (zoom) the seconds of the level-1 attention in them."""
    import contextlib

    import torch

    from ats_wsi.slides.engine import predict_slide

    # Deployment cost: the same weights, no cache, the encoder running on the N tiles read,
    # at the precision the features were extracted in.
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16) if cfg["bf16"] else contextlib.nullcontext()
    timings: list[float] = []
    level1: list[float] = []  # zoom: seconds of those in the level-1 attention net
    with bf16:
        for rec in test[: cfg["timing_slides"]]:
            res = predict_slide(
                model,
                rec.path,
                settings,
                sampler=_test_sampler(kind),
                n_patches=n,
                seed=cfg["seed"],
                slide_id=rec.slide_id,
            )
            timings.append(res.runtime_s)
            if res.cost is not None and res.cost.level1_attention_s is not None:
                level1.append(res.cost.level1_attention_s)
    return timings, level1


def _ats_task(cfg: dict[str, Any]) -> dict[str, Any]:
    from ats_wsi.slides.engine import ViewStore
    from ats_wsi.training import seed_everything

    settings = _settings(cfg)
    kind, n = cfg["task"], int(cfg["n"])
    seed_everything(cfg["seed"])
    model = _ats_model(cfg, kind, n)
    cache = feature_cache(cfg, model.feature_net)
    train, test = _records(cfg, "train"), _records(cfg, "test")
    views = ViewStore(settings.loader(), depth=0, cache=True)
    history, train_s = _fit_ats(cfg, kind, n, model, train, views, settings, cache)
    train_misses = cache.misses
    rows = _test_ats(cfg, kind, n, model, test, views, settings, cache)
    test_misses = cache.misses - train_misses
    views.close()
    timings, level1 = _deployment_timings(cfg, kind, n, model, test, settings)
    return {
        "rows": rows,
        "train_s": train_s,
        "history": history,
        "cache_misses": {"train": train_misses, "test": test_misses},
        "infer_s": timings,
        "level1_attention_s": level1,
        "rss_mb": rss_peak_mb(),
    }


# ----------------------------------------------------------------------------- MIL / low-res


def _bags(cfg: dict[str, Any], split: str) -> tuple[list[Any], list[dict[str, Any]]]:
    import torch

    bags, recs = [], []
    for r in cfg["records"]:
        if r["split"] != split:
            continue
        with np.load(Path(cfg["feature_dir"]) / f"{r['slide_id']}.npz") as z:
            bags.append(torch.from_numpy(z["features"].astype(np.float32)))
            recs.append({**r, "top_left": z["top_left"].tolist()})
    return bags, recs


def _mil_task(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ats_wsi.mil import GatedAttentionMIL, MeanPoolMIL, fit_mil, predict_mil
    from ats_wsi.training import class_balanced_weights

    torch.manual_seed(cfg["seed"])
    train, train_recs = _bags(cfg, "train")
    test, test_recs = _bags(cfg, "test")
    dim = int(train[0].shape[1])
    model = GatedAttentionMIL(dim) if cfg["task"] == "abmil" else MeanPoolMIL(dim)
    labels = [int(r["y"]) for r in train_recs]
    t0 = time.perf_counter()
    history = fit_mil(
        model,
        train,
        labels,
        epochs=cfg["epochs_mil"],
        lr=cfg["mil_lr"] if cfg["task"] == "abmil" else cfg["mean_lr"],
        class_weights=class_balanced_weights(labels, 2),
        seed=cfg["seed"],
    )
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs, att = predict_mil(model, test)
    head_s = (time.perf_counter() - t1) / max(1, len(test))
    rows = []
    for r, p, a in zip(test_recs, probs, att, strict=True):
        k = min(cfg["top_k"], len(a))
        top = np.argsort(-a)[:k]
        rows.append(
            {
                "slide_id": r["slide_id"],
                "y": int(r["y"]),
                "p": float(p[1]),
                "top_left": [r["top_left"][i] for i in top],
            }
        )
    return {
        "rows": rows,
        "train_s": train_s,
        "history": history,
        "head_s": head_s,
        "rss_mb": rss_peak_mb(),
    }


def _lowres_task(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ats_wsi.slides.engine import LowResBaseline, ViewStore, run_slides
    from ats_wsi.slides.realistic_cohort import CLASSES
    from ats_wsi.slides.settings import TrainSettings
    from ats_wsi.slides.trainer import fit_slides
    from ats_wsi.training import seed_everything

    settings = _settings(cfg)
    seed_everything(cfg["seed"] + 1)
    model = LowResBaseline(3, 16, 2)
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    train, test = _records(cfg, "train"), _records(cfg, "test")
    views = ViewStore(settings.loader(), depth=0, cache=True)
    t0 = time.perf_counter()
    fit_slides(
        "lowres",
        model,
        optim,
        train,
        [],
        views,
        settings,
        TrainSettings(entropy_lambda=0.0, accumulate=1, clip_norm=1.0, progress=False),
        None,
        kind="baseline",
        epochs=cfg["epochs_lowres"],
        seed=cfg["seed"],
        device=torch.device("cpu"),
        extra={"classes": CLASSES},
    )
    train_s = time.perf_counter() - t0
    # Inference from a cold start: view read + tissue mask + net, per slide.
    cold = ViewStore(settings.loader(), depth=0, cache=False)
    t1 = time.perf_counter()
    ys, probs, _, ids = run_slides(model, test, cold, settings, kind="baseline", amp=False)
    infer_s = (time.perf_counter() - t1) / max(1, len(test))
    views.close()
    rows = [
        {"slide_id": s, "y": int(y), "p": float(p[1])}
        for s, y, p in zip(ids, ys, probs, strict=True)
    ]
    return {"rows": rows, "train_s": train_s, "infer_s": [infer_s], "rss_mb": rss_peak_mb()}


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One task in a fresh process: ``extract``, ``ats``, ``random``, ``abmil``, ``mean`` or
    ``lowres``."""
    import torch

    torch.set_num_threads(int(cfg["threads"]))
    task = cfg["task"]
    if task == "extract":
        return _extract_task(cfg)
    if task in ("ats", "random", "zoom"):
        return _ats_task(cfg)
    if task in ("abmil", "mean"):
        return _mil_task(cfg)
    if task == "lowres":
        return _lowres_task(cfg)
    raise ValueError(f"unknown task {task!r}")


if __name__ == "__main__":
    raise SystemExit(worker_main(worker))
