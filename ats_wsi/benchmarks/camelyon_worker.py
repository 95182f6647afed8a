"""What one fresh process of the ``camelyon`` benchmark measures.

Run by :func:`ats_wsi.benchmarks.workers.run_in_subprocess` as
``python -m ats_wsi.benchmarks.camelyon_worker '<config JSON>'``. Methods (``cfg["method"]``):

* ``generate``: build (or reuse) one CAMELYON-sized realistic slide with
  :func:`~ats_wsi.slides.realistic_cohort.make_cohort` (a one-slide positive cohort), so the
  generator's own peak memory is measured too.
* ``ats``: the library's slide forward (:func:`~ats_wsi.slides.engine.predict_slide`) with a
  ``tile_pool`` attention net (one cell per tile) and ``N`` tiles, optionally zoom-in
  (``cfg["zoom"]``); each stage is timed by wrapping the library calls it makes (open, view
  read, tissue mask, attention, region reads, level-1 attention, tile reads, encode, head).
* ``io_floor``: the same slide's reads alone: open, the view, the ATS row's regions and tiles.
* ``baseline``: imports, the model and a warm-up only (the memory floor of an ``ats`` row).

Exhaustive tiling and tiatoolbox rows run in :mod:`ats_wsi.benchmarks.slide_worker`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ats_wsi.benchmarking import rss_peak_mb
from ats_wsi.benchmarks.slide_worker import _count_reads, feature_net_spec
from ats_wsi.benchmarks.workers import worker_main

__all__ = ["ATS_STAGES", "FLOOR_STAGES", "StageTimer", "build_ats_model", "worker"]

ATS_STAGES = (
    "open",
    "view_read",
    "tissue_mask",
    "attention",
    "region_reads",
    "level1_attention",
    "tile_reads",
    "encode",
    "head",
)
FLOOR_STAGES = ("open", "view_read", "region_reads", "tile_reads")


class StageTimer:
    """Seconds per stage, accumulated by wrapping callables (functions, methods, modules)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def wrap(self, owner: Any, name: str, stage: str) -> Iterator[None]:
        """Time every call of ``owner.name`` as ``stage`` inside the block (then restore it)."""
        original = getattr(owner, name)
        had_own = name in vars(owner)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)

        setattr(owner, name, timed)
        try:
            yield
        finally:
            if had_own:
                setattr(owner, name, original)
            else:  # an instance's bound method: drop the override, the class's shows again
                delattr(owner, name)

    @contextlib.contextmanager
    def module(self, net: Any, stage: str) -> Iterator[None]:
        """Time every forward of the ``nn.Module`` ``net`` (None: nothing) as ``stage``."""
        if net is None:
            yield
            return
        start: list[float] = []
        hooks = [
            net.register_forward_pre_hook(lambda *_: start.append(time.perf_counter())),
            net.register_forward_hook(
                lambda *_: self.add(stage, time.perf_counter() - start.pop())
            ),
        ]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage``."""
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


# ----------------------------------------------------------------------------- model


def tile_pool(patch_px: int, patch_mpp: float, view_mpp: float) -> int:
    """View pixels per tile side at ``view_mpp`` (one attention cell per tile)."""
    pool = patch_px * patch_mpp / view_mpp
    if pool < 1 or abs(pool - round(pool)) > 1e-9:
        raise ValueError(
            f"view at {view_mpp} um/px must divide the tile's {patch_px * patch_mpp} um "
            f"into a whole number of pixels"
        )
    return int(round(pool))


def build_ats_model(cfg: dict[str, Any]) -> Any:
    """The slide ATS model: ``tile_pool`` attention at ``attention_mpp``, the encoder preset,
    ``n_patches`` tiles (per region with ``zoom`` = [regions, tiles per region])."""
    import torch

    from ats_wsi.slides.engine import build_model
    from ats_wsi.slides.settings import ModelSettings, ZoomSettings

    torch.manual_seed(cfg["seed"])
    pool = tile_pool(cfg["patch_px"], cfg["patch_mpp"], cfg["attention_mpp"])
    zoom, n = ZoomSettings(), cfg["n_patches"]
    if cfg.get("zoom"):
        n0, n = cfg["zoom"]
        zoom = ZoomSettings(
            n_regions=n0,
            region_cells=cfg["region_cells"],
            region_mpp=cfg["region_mpp"],
            attention_net={
                "name": "tile_pool",
                "width": 16,
                "pool": tile_pool(cfg["patch_px"], cfg["patch_mpp"], cfg["region_mpp"]),
            },
        )
    settings = ModelSettings(
        attention_net={"name": "tile_pool", "width": 16, "pool": pool},
        feature_net=feature_net_spec(cfg["encoder"]),
        n_patches=n,
        sampler="without_replacement",
        zoom=zoom,
    )
    return build_model(settings, 2, cfg["patch_px"]).to(cfg["device"]).eval()


def _slide_settings(cfg: dict[str, Any]) -> Any:
    from ats_wsi.slides.engine import SlideSettings

    return SlideSettings(
        attention_mpp=cfg["attention_mpp"],
        patch_mpp=cfg["patch_mpp"],
        patch_size=cfg["patch_px"],
        min_tissue=cfg["min_fraction"],
    )


# ----------------------------------------------------------------------------- runs


def _run_ats(cfg: dict[str, Any], model: Any, seed: int) -> dict[str, Any]:
    """One timed slide: the library forward with every stage wrapped."""
    import ats_wsi.io.tissue as tissue
    from ats_wsi.io import SlidePatchSource, open_slide
    from ats_wsi.slides.engine import predict_slide

    settings = _slide_settings(cfg)
    timer = StageTimer()
    t0 = time.perf_counter()
    reader = open_slide(cfg["path"])
    timer.add("open", time.perf_counter() - t0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(timer.wrap(reader, "thumbnail", "view_read"))
        stack.enter_context(timer.wrap(tissue, "tissue_mask", "tissue_mask"))
        stack.enter_context(timer.wrap(SlidePatchSource, "extract", "tile_reads"))
        stack.enter_context(timer.wrap(SlidePatchSource, "read_regions", "region_reads"))
        stack.enter_context(timer.module(model.attention_net, "attention"))
        stack.enter_context(timer.module(getattr(model, "zoom_net", None), "level1_attention"))
        stack.enter_context(timer.module(model.feature_net, "encode"))
        stack.enter_context(timer.module(model.head, "head"))
        res = predict_slide(
            model,
            reader,
            settings,
            device=cfg["device"],
            sampler="without_replacement",
            seed=seed,
            slide_id=cfg["path"],
        )
    t1 = time.perf_counter()
    reader.close()
    timer.add("open", time.perf_counter() - t1)
    seconds = time.perf_counter() - t0
    stages = {s: timer.seconds.get(s, 0.0) for s in ATS_STAGES}
    stages["other"] = max(0.0, seconds - sum(stages.values()))
    zoom = res.zoom
    return {
        "seconds": seconds,
        "stages_s": stages,
        "tiles": int(res.cost.tiles_read),
        "tissue_cells": None if res.mask is None else int(res.mask.sum()),
        "locations_yx": res.locations_xy[:, ::-1].tolist(),
        "regions_xywh": [] if zoom is None else zoom.regions_xywh.tolist(),
        "region_mpp": None if zoom is None else zoom.region_mpp,
        "probs": res.probs.tolist(),
    }


def _run_floor(cfg: dict[str, Any]) -> dict[str, Any]:
    """The reads of an ATS row alone: open, view, its regions, its tiles (same library calls)."""
    import torch

    from ats_wsi.io import SlidePatchSource, open_slide

    settings = _slide_settings(cfg)
    timer = StageTimer()
    t0 = time.perf_counter()
    reader = open_slide(cfg["path"])
    timer.add("open", time.perf_counter() - t0)
    t = time.perf_counter()
    reader.thumbnail(cfg["attention_mpp"])
    timer.add("view_read", time.perf_counter() - t)
    with SlidePatchSource(
        reader, cfg["patch_px"], cfg["patch_mpp"], settings.read_workers
    ) as source:
        if cfg["regions_xywh"]:
            boxes = np.asarray(cfg["regions_xywh"], dtype=np.int64)
            _, _, w, h = (int(v) for v in boxes[0])
            out = (
                round(h * source.mpp / cfg["region_mpp"]),
                round(w * source.mpp / cfg["region_mpp"]),
            )
            t = time.perf_counter()
            source.read_regions(torch.from_numpy(boxes[:, [1, 0]])[None], (h, w), out)
            timer.add("region_reads", time.perf_counter() - t)
        t = time.perf_counter()
        source.extract(torch.tensor(cfg["locations_yx"], dtype=torch.long)[None])
        timer.add("tile_reads", time.perf_counter() - t)
    t = time.perf_counter()
    reader.close()
    timer.add("open", time.perf_counter() - t)
    seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "stages_s": {s: timer.seconds.get(s, 0.0) for s in FLOOR_STAGES},
        "tiles": len(cfg["locations_yx"]),
    }


def _generate(cfg: dict[str, Any]) -> dict[str, Any]:
    """One cached realistic slide (a positive one-slide cohort) and its facts."""
    from ats_wsi.slides.realistic_cohort import CohortConfig, make_cohort

    cohort_cfg = CohortConfig(
        n_cases=1,
        slides_per_case=(1, 1),
        positive_fraction=1.0,
        size=(cfg["size"], cfg["size"]),
        mpp=cfg["mpp"],
        tissue_fraction=tuple(cfg["tissue_fraction"]),
        seed=cfg["seed"],
    )
    t0 = time.perf_counter()
    cohort = make_cohort(cfg["cache_dir"], cohort_cfg)
    (info,) = cohort.slides
    return {
        **info,
        "path": str(cohort.slide_path(info["slide_id"])),
        "generate_s": time.perf_counter() - t0,
        "file_mb": info["bytes"] / 2**20,
    }


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median total time, with every stage's median across the runs."""
    runs = sorted(runs, key=lambda r: r["seconds"])
    mid = dict(runs[len(runs) // 2])
    mid["stages_s"] = {
        k: float(np.median([r["stages_s"][k] for r in runs])) for k in mid["stages_s"]
    }
    mid["repeat_seconds"] = [r["seconds"] for r in runs]
    return mid


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one method on one slide in this (fresh) process."""
    method = cfg["method"]
    if method == "generate":
        out = _generate(cfg)
        return {**out, "rss_peak_mb": rss_peak_mb()}
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    counter = [0]
    _count_reads(counter)
    run: Callable[[int], dict[str, Any]]
    if method == "io_floor":
        run = lambda seed: _run_floor(cfg)  # noqa: E731
    elif method in ("ats", "baseline"):
        model = build_ats_model(cfg)
        # Warm up kernels (oneDNN initialises on the first conv call) outside any timing.
        with torch.inference_mode():
            p = cfg["patch_px"]
            model.feature_net(torch.rand(2, 3, p, p, device=cfg["device"]))
            model.attention_net(torch.rand(1, 3, 64, 64, device=cfg["device"]))
        if method == "baseline":
            return {"method": method, "rss_peak_mb": rss_peak_mb()}
        run = lambda seed: _run_ats(cfg, model, seed)  # noqa: E731
    else:
        raise ValueError(f"camelyon_worker: unknown method {method!r}")
    # One untimed run first: thread pools, allocator and the OS page cache warm up.
    run(cfg["seed"])
    runs = []
    for r in range(cfg["repeats"]):
        counter[0] = 0
        runs.append(run(cfg["seed"] + r))
        runs[-1]["pixels_read"] = counter[0]
    result = {"method": method, **_median(runs)}
    result["rss_peak_mb"] = rss_peak_mb()
    return result


if __name__ == "__main__":
    raise SystemExit(worker_main(worker))
