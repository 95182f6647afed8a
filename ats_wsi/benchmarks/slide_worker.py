"""What one fresh process of the ``slide`` benchmark measures: one method on one slide.

Run by :func:`ats_wsi.benchmarks.workers.run_in_subprocess` as
``python -m ats_wsi.benchmarks.slide_worker '<config JSON>'``. The methods, all with the same
feature network:

* ``ats``: low-res view + tissue mask + attention, ``N`` patches sampled and read through
  :class:`~ats_wsi.io.SlidePatchSource`, feature net, expectation, head (:class:`ATSModel`).
* ``exhaustive``: what CLAM-style pipelines do: the same tissue mask, then *every* tissue tile
  at the patch resolution read through the same :class:`SlidePatchSource` and the same feature
  net in batches, mean-pooled, head.
* ``tiatoolbox``: tiatoolbox's own ``PatchPredictor`` engine in WSI mode running the same
  feature net + head wrapped as a tiatoolbox ``ModelABC`` (:func:`tiatoolbox_model_class`), on
  the same tissue tiles (our tile mask is handed to it, so all rows process the same tiles).
* ``baseline``: imports and nets only (the memory floor of a worker).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.benchmarking import rss_peak_mb
from ats_wsi.benchmarks.island_slides import SLIDE_MPP
from ats_wsi.benchmarks.workers import worker_main

__all__ = ["feature_net_spec", "tiatoolbox_model_class", "worker"]


# ----------------------------------------------------------------------------- reads, tiles


def _count_reads(counter: list[int]) -> None:
    """Count pixels returned by OpenSlide (every method reads through it) in ``counter[0]``."""
    import openslide

    original = openslide.OpenSlide.read_region

    def read_region(self: Any, location: Any, level: int, size: tuple[int, int]) -> Any:
        counter[0] += int(size[0]) * int(size[1])
        return original(self, location, level, size)

    openslide.OpenSlide.read_region = read_region  # type: ignore[method-assign]


def _tile_selection(reader: Any, cfg: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, float]:
    """Tissue tiles of the slide: (all (y, x) top-lefts, the selected subset, mask seconds)."""
    from ats_wsi.io.tissue import mask_to_grid, tissue_mask

    t0 = time.perf_counter()
    thumb = reader.thumbnail(cfg["low_mpp"])
    mask = tissue_mask(thumb, cfg["low_mpp"])
    width, height = reader.dimensions
    side = round(cfg["patch_px"] * cfg["patch_mpp"] / reader.mpp[0])
    gh, gw = height // side, width // side
    if gh * side != height or gw * side != width:
        raise ValueError(f"slide {width}x{height} is not a whole number of {side}-px tiles")
    grid = mask_to_grid(mask, (gh, gw), cfg["min_fraction"])
    ij = np.argwhere(grid)
    tiles = ij * side
    seconds = time.perf_counter() - t0
    subset = tiles
    if cfg["max_tiles"] and len(tiles) > cfg["max_tiles"]:
        rng = np.random.default_rng(cfg["seed"])
        subset = tiles[np.sort(rng.choice(len(tiles), cfg["max_tiles"], replace=False))]
    return tiles, subset, seconds


# ----------------------------------------------------------------------------- ATS


def _nets(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """The ATS model (attention + feature nets + head) on the device, seeded, in eval mode.

    No input normalisation, so the exhaustive and tiatoolbox rows, which run the same feature
    net on [0, 1] patches, compute exactly what ATS computes per patch.
    """
    import torch

    from ats_wsi.model import ATSModel

    torch.manual_seed(cfg["seed"])
    model = ATSModel.from_config(
        {
            "attention_net": "histology",
            "feature_net": feature_net_spec(cfg.get("feature_net", "histology")),
            "num_classes": 2,
            "n_patches": cfg["n_patches"],
            "patch_size": cfg["patch_px"],
            "sampler": "without_replacement",
        }
    )
    return model.to(cfg["device"]).eval(), torch.device(cfg["device"])


def feature_net_spec(name: str) -> Any:
    """``histology`` (from scratch) or a frozen pretrained encoder preset of
    :mod:`ats_wsi.encoders`; presets without bundled weights are built with random weights,
    which cost the same to run."""
    if name == "histology":
        return name
    from ats_wsi.encoders.presets import PRESETS

    spec: dict[str, Any] = {"name": "timm", "preset": name, "freeze": True}
    if PRESETS[name].default_weights is None:
        spec["weights"] = "random"
    return spec


def _run_ats(path: str, cfg: dict[str, Any], model: Any, device: Any) -> dict[str, Any]:
    """The project's one slide forward (:func:`ats_wsi.slides.engine.predict_slide`)."""
    from ats_wsi.slides.engine import SlideSettings, predict_slide

    settings = SlideSettings(
        attention_mpp=cfg["low_mpp"],
        patch_mpp=cfg["patch_mpp"],
        patch_size=cfg["patch_px"],
        min_tissue=cfg["min_fraction"],
    )
    res = predict_slide(
        model, path, settings, device=device, sampler="without_replacement", seed=cfg["seed"]
    )
    return {"tiles": len(res.locations_xy), "probs": res.probs.tolist()}


def tiatoolbox_model_class() -> type:
    """The tiatoolbox ``ModelABC`` wrapper class, built on first call (imports tiatoolbox).

    Instances take ``(feature_net, head)``; ``infer_batch`` turns tiatoolbox's uint8 NHWC
    batches into our float NCHW [0, 1] input and returns per-patch class probabilities.
    """
    import torch
    from tiatoolbox.models.models_abc import ModelABC

    class _TiaFeatureClassifier(ModelABC):
        """Our feature net + linear head as a tiatoolbox model: uint8 NHWC -> class probs."""

        def __init__(self, feature_net: torch.nn.Module, head: torch.nn.Module) -> None:
            super().__init__()
            self.feature_net = feature_net
            self.head = head

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return torch.softmax(self.head(self.feature_net(x)), dim=-1)

        @staticmethod
        def infer_batch(model: torch.nn.Module, batch_data: Any, *, device: str) -> np.ndarray:
            # tiatoolbox hands uint8 (B, H, W, C) patches; our nets take float NCHW in [0, 1].
            x = torch.as_tensor(batch_data).to(device).permute(0, 3, 1, 2).float().div_(255)
            model.eval()
            with torch.inference_mode():
                return model(x).cpu().numpy()

    return _TiaFeatureClassifier


# ----------------------------------------------------------------------------- tiling methods


def _run_exhaustive(
    path: str, cfg: dict[str, Any], model: Any, device: Any, timing: dict[str, float]
) -> dict[str, Any]:
    import torch

    from ats_wsi.io import SlidePatchSource, open_slide

    with open_slide(path) as reader, torch.inference_mode():
        tiles, subset, timing["mask_s"] = _tile_selection(reader, cfg)
        total = torch.zeros(model.feature_net.out_dim, device=device)
        t0 = time.perf_counter()
        with SlidePatchSource(reader, cfg["patch_px"], cfg["patch_mpp"]) as source:
            for start in range(0, len(subset), cfg["batch"]):
                boxes = torch.from_numpy(subset[start : start + cfg["batch"]])[None].to(device)
                patches = source.extract(boxes)[0]
                total += model.feature_net(patches).sum(0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing["tiles_s"] = time.perf_counter() - t0
        logits = model.head(total / max(len(subset), 1)).cpu()
    return {"tiles": len(subset), "total_tiles": len(tiles), "logits": logits.tolist()}


def _run_tiatoolbox(
    path: str,
    cfg: dict[str, Any],
    model: Any,
    device: Any,
    timing: dict[str, float],
    counter: list[int],
) -> dict[str, Any]:
    from tiatoolbox.models.dataset.dataset_abc import WSIPatchDataset
    from tiatoolbox.models.engine.patch_predictor import PatchPredictor
    from tiatoolbox.wsicore.wsireader import OpenSlideWSIReader

    from ats_wsi.io import open_slide

    # tiatoolbox reopens the file with its own reader (tifffile for a .tif), not through
    # OpenSlide: count the pixels of the patches its dataset hands out instead.
    getitem = WSIPatchDataset.__getitem__

    def counting_getitem(self: Any, idx: int) -> dict:
        item = getitem(self, idx)
        counter[0] += int(item["image"].shape[0]) * int(item["image"].shape[1])
        return item

    WSIPatchDataset.__getitem__ = counting_getitem  # type: ignore[method-assign]
    with open_slide(path) as reader:
        tiles, subset, timing["mask_s"] = _tile_selection(reader, cfg)
        width, height = reader.dimensions
        side = round(cfg["patch_px"] * cfg["patch_mpp"] / reader.mpp[0])
    # Hand tiatoolbox exactly the selected tiles as a mask at tile resolution (one pixel per
    # tile): it keeps patches with any mask inside, so it runs the same tiles as `exhaustive`.
    tile_mask = np.zeros((height // side, width // side), dtype=np.uint8)
    tile_mask[subset[:, 0] // side, subset[:, 1] // side] = 1
    wrapper = tiatoolbox_model_class()(model.feature_net, model.head)
    t0 = time.perf_counter()
    mpp0 = cfg.get("slide_mpp", SLIDE_MPP)  # level-0 mpp (the island slides: SLIDE_MPP)
    wsi = OpenSlideWSIReader(path, mpp=(mpp0, mpp0))
    engine = PatchPredictor(
        model=wrapper, batch_size=cfg["batch"], num_workers=0, device=str(device), verbose=False
    )
    with tempfile.TemporaryDirectory(prefix="tia-bench-") as tmp:
        out = engine.run(
            [wsi],
            masks=[tile_mask],
            patch_mode=False,
            patch_input_shape=(cfg["patch_px"], cfg["patch_px"]),
            input_resolutions=[{"units": "mpp", "resolution": cfg["patch_mpp"]}],
            save_dir=Path(tmp) / "out",
            output_type="zarr",
            return_probabilities=True,
            overwrite=True,
        )
        done = _count_tia_patches(out)
    timing["tiles_s"] = time.perf_counter() - t0
    # The output's patch count checks that tiatoolbox ran exactly the tiles it was given.
    return {"tiles": len(subset), "tia_patches": done, "total_tiles": len(tiles), "logits": None}


def _count_tia_patches(out: Any) -> int:
    """Number of patches tiatoolbox predicted (from its zarr output), -1 if unknown."""
    import zarr

    paths = list(out.values()) if isinstance(out, dict) else [out]
    try:
        group = zarr.open(str(paths[0]), mode="r")
        return int(group["probabilities"].shape[0])
    except Exception:  # the output layout is tiatoolbox's business; the count is a check
        return -1


# ----------------------------------------------------------------------------- worker


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one (method, slide) in this process; called in a fresh subprocess."""
    import torch

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    counter = [0]
    _count_reads(counter)
    model, device = _nets(cfg)
    # Imports are not what is measured: load everything the methods import lazily first.
    import scipy.ndimage  # noqa: F401
    import skimage.filters  # noqa: F401

    if cfg["method"] == "tiatoolbox":
        import tiatoolbox.models.engine.patch_predictor  # noqa: F401
    # Warm up kernels (first conv calls initialise oneDNN / cuDNN) outside the timing.
    with torch.inference_mode():
        model.feature_net(torch.rand(2, 3, cfg["patch_px"], cfg["patch_px"], device=device))
        model.attention_net(torch.rand(1, 3, 64, 64, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    result: dict[str, Any] = {"method": cfg["method"], "size": cfg["size"]}
    timing: dict[str, float] = {}
    if cfg["method"] != "baseline":
        if cfg["method"] == "ats":
            # One untimed slide first: thread pools and allocator warm up on the first call.
            _run_ats(cfg["path"], cfg, model, device)
        times = []
        for r in range(cfg["repeats"] if cfg["method"] == "ats" else 1):
            counter[0] = 0
            t0 = time.perf_counter()
            if cfg["method"] == "ats":
                res = _run_ats(cfg["path"], {**cfg, "seed": cfg["seed"] + r}, model, device)
            elif cfg["method"] == "exhaustive":
                res = _run_exhaustive(cfg["path"], cfg, model, device, timing)
            elif cfg["method"] == "tiatoolbox":
                res = _run_tiatoolbox(cfg["path"], cfg, model, device, timing, counter)
            else:
                raise ValueError(f"unknown method {cfg['method']!r}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
        result.update(res)
        result["measured_s"] = float(np.median(times))
        result["pixels_read"] = counter[0]
        result.update(timing)
    result["rss_peak_mb"] = rss_peak_mb()
    result["cuda_peak_mb"] = (
        torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    )
    return result


if __name__ == "__main__":
    raise SystemExit(worker_main(worker))
