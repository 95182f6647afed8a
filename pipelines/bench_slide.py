"""``python -m pipelines.benchmark slide``: slide-level inference, ATS against exhaustive tiling.

Three ways to turn one whole slide into a prediction with the same feature network:

* ``ats``: low-res view + tissue mask + attention, ``N`` patches sampled and read through
  :class:`~ats_wsi.io.SlidePatchSource`, feature net, expectation, head (:class:`ATSModel`).
* ``exhaustive``: what CLAM-style pipelines do: the same tissue mask, then *every* tissue tile
  at the patch resolution read through the same :class:`SlidePatchSource` and the same feature
  net in batches, mean-pooled, head.
* ``tiatoolbox``: tiatoolbox's own ``PatchPredictor`` engine in WSI mode running the same
  feature net + head wrapped as a tiatoolbox ``ModelABC`` (:class:`TiaFeatureClassifier`), on
  the same tissue tiles (our tile mask is handed to it, so all rows process the same tiles).

Slides are pyramids of real H&E tissue (tiatoolbox's 1000 x 1000 ``target_image.png``, read as
a file) scattered as islands on blank glass, written tile by tile with
:func:`ats_wsi.io.write_pyramidal_tiff` and cached under ``--cache-dir``. Every measured
configuration runs in a fresh subprocess (:func:`run_in_subprocess`) that
reports its RSS high-water mark (and CUDA peak allocation), so peak memory is not polluted by
earlier configurations. ``--max-tiles`` caps the tiles actually run by the two tiling methods:
beyond it a fixed random subset is timed and the time and pixels are extrapolated linearly to
the full tile count; such rows say ``extrapolated: yes``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.slides.cohort import tissue_image
from pipelines.benchmark import subcommand

__all__ = [
    "GLASS",
    "SLIDE_MPP",
    "island_tile_fn",
    "make_slide",
    "rss_peak_mb",
    "run_in_subprocess",
    "tiatoolbox_model_class",
    "tissue_image",
]

SLIDE_MPP = 0.5  # level-0 microns per pixel (a 20x scan)
GLASS = 242  # constant background: blank tiles compress to almost nothing
CELL = 2048  # each cell of this side holds at most one tissue island
_VERSION = 1  # bump when the generator changes, so cached slides are regenerated
RESULT_TAG = "BENCH_RESULT "


# ----------------------------------------------------------------------------- slides


def island_tile_fn(
    size: int, seed: int = 0, density: float = 0.25, source: np.ndarray | None = None
) -> tuple[Callable[[int, int, int, int], np.ndarray], dict[str, Any]]:
    """A level-0 tile function: tissue islands on glass, and a summary of the layout.

    The slide is cut into ``CELL`` x ``CELL`` cells; each holds, with probability ``density``,
    one island: a random crop (512 to 1000 px a side) of the H&E image under one of its 8
    rotations / flips, at a random place inside the cell. Islands are stored as parameters
    (views of the source), never as pixels, so a 100k slide's layout costs kilobytes.
    """
    src = tissue_image() if source is None else source
    variants = [np.rot90(v, k) for v in (src, src[:, ::-1]) for k in range(4)]
    rng = np.random.default_rng([seed, size, _VERSION])
    n_cells = -(-size // CELL)
    islands: dict[tuple[int, int], tuple[int, int, np.ndarray]] = {}
    area = 0
    for k in range(n_cells * n_cells):
        cy, cx = divmod(k, n_cells)
        # Cell 0 always holds an island so that even a tiny (CI) slide has tissue.
        if rng.random() >= density and k:
            continue
        h, w = (int(v) for v in rng.integers(512, 1001, 2))
        var = variants[int(rng.integers(8))]
        sy, sx = (
            int(rng.integers(0, var.shape[0] - h + 1)),
            int(rng.integers(0, var.shape[1] - w + 1)),
        )
        room_y = min(CELL, size - cy * CELL) - h
        room_x = min(CELL, size - cx * CELL) - w
        if room_y < 0 or room_x < 0:
            continue  # a partial cell at the slide's edge too small for this island
        y0 = cy * CELL + int(rng.integers(0, room_y + 1))
        x0 = cx * CELL + int(rng.integers(0, room_x + 1))
        islands[(cy, cx)] = (y0, x0, var[sy : sy + h, sx : sx + w])
        area += h * w

    def tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        out = np.full((h, w, 3), GLASS, dtype=np.uint8)
        for cy in range(y // CELL, (y + h - 1) // CELL + 1):
            for cx in range(x // CELL, (x + w - 1) // CELL + 1):
                isl = islands.get((cy, cx))
                if isl is None:
                    continue
                y0, x0, img = isl
                iy0, ix0 = max(y, y0), max(x, x0)
                iy1, ix1 = min(y + h, y0 + img.shape[0]), min(x + w, x0 + img.shape[1])
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y : iy1 - y, ix0 - x : ix1 - x] = img[
                        iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0
                    ]
        return out

    info = {"islands": len(islands), "island_fraction": area / size**2}
    return tile, info


def make_slide(cache_dir: str | Path, size: int, seed: int = 0) -> tuple[Path, dict[str, Any]]:
    """The cached ``size`` x ``size`` island pyramid (generated on first use) and its summary.

    Written to a temporary name and renamed, so an interrupted run never leaves a truncated
    slide in the cache.
    """
    from ats_wsi.io.synthetic import write_pyramidal_tiff

    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"islands_v{_VERSION}_{size}_s{seed}.tif"
    tile_fn, info = island_tile_fn(size, seed)
    info = {**info, "generate_s": 0.0, "cached": path.exists()}
    if not path.exists():
        t0 = time.perf_counter()
        tmp = cache / f".{path.name}.{os.getpid()}.tmp.tif"
        try:
            write_pyramidal_tiff(tmp, tile_fn, SLIDE_MPP, shape=(size, size), tile=256)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        info["generate_s"] = time.perf_counter() - t0
    info["file_mb"] = path.stat().st_size / 2**20
    return path, info


# ----------------------------------------------------------------------------- tiatoolbox


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


# ----------------------------------------------------------------------------- worker


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


def _nets(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """The ATS model (attention + feature nets + head) on the device, seeded, in eval mode."""
    import torch

    from ats_wsi.model import ATSModel

    torch.manual_seed(cfg["seed"])
    model = ATSModel.from_config(
        {
            "attention_net": "histology",
            "feature_net": "histology",
            "num_classes": 2,
            "n_patches": cfg["n_patches"],
            "patch_size": cfg["patch_px"],
            "sampler": "without_replacement",
        }
    )
    return model.to(cfg["device"]).eval(), torch.device(cfg["device"])


def _run_ats(path: str, cfg: dict[str, Any], model: Any, device: Any) -> dict[str, Any]:
    import torch

    from ats_wsi.io import SlidePatchSource, low_res_view, mask_to_grid, open_slide, tissue_mask

    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    with open_slide(path) as reader, torch.inference_mode():
        view, _ = low_res_view(reader, cfg["low_mpp"])
        image = (view[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        mask = tissue_mask(image, cfg["low_mpp"])
        # The histology attention net has 'same' padding: one cell per view pixel.
        grid = mask_to_grid(mask, image.shape[:2], cfg["min_fraction"])
        with SlidePatchSource(reader, cfg["patch_px"], cfg["patch_mpp"]) as source:
            out = model(
                view.to(device),
                source,
                torch.from_numpy(grid)[None].to(device),
                generator=gen,
            )
        logits = out.logits.cpu()
    return {"tiles": int(out.indices.shape[1]), "logits": logits[0].tolist()}


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
    wsi = OpenSlideWSIReader(path, mpp=(SLIDE_MPP, SLIDE_MPP))
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


def rss_peak_mb() -> float:
    """This process's resident-set high-water mark in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, else KiB


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


def run_in_subprocess(module: str, cfg: dict[str, Any], timeout: float | None = None) -> dict:
    """Run ``module.main()`` with ``cfg`` in a fresh interpreter; its tagged JSON result."""
    # ``-c`` rather than ``-m``: running the module as __main__ would import it twice (once
    # more through pipelines.benchmark) and register its subcommand twice.
    code = f"import sys; from {module} import main; sys.exit(main())"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).resolve().parents[1],
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"{module} worker failed (rc {proc.returncode}) for {cfg}:\n{proc.stderr[-4000:]}"
    )


# ----------------------------------------------------------------------------- subcommand


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10240, 30720, 102400],
        help="slide sides in level-0 pixels (multiples of the tile side)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=["ats", "exhaustive", "tiatoolbox"],
        help="default: all three (--quick: ats and exhaustive; tiatoolbox takes ~10 s to import)",
    )
    p.add_argument("--patches", type=int, default=64, help="ATS patches per slide N")
    p.add_argument("--patch-px", type=int, default=256, help="patch side in pixels")
    p.add_argument("--patch-mpp", type=float, default=0.5, help="patch resolution (um/px)")
    p.add_argument("--low-mpp", type=float, default=32.0, help="low-res view resolution")
    p.add_argument(
        "--max-tiles",
        type=int,
        default=2000,
        help="tiles actually run by the tiling methods (0: all); more are "
        "extrapolated from a fixed random subset",
    )
    p.add_argument("--batch", type=int, default=64, help="tiles per feature-net batch")
    p.add_argument("--repeats", type=int, default=3, help="ATS runs per slide (median)")
    p.add_argument("--cache-dir", default="benchmarks/cache", help="generated slides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def _fmt_mpx(px: float) -> str:
    return f"{px / 1e6:,.1f}"


@subcommand(
    "slide", help="slide inference: ATS vs exhaustive tiling vs tiatoolbox", arguments=_args
)
def run_slide(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the slides, measure each (method, size) in a fresh subprocess."""
    if args.quick:
        args.sizes, args.patches, args.patch_px = [2048], 4, 64
        args.max_tiles, args.repeats, args.batch = 16, 1, 8
        args.threads = args.threads or 1
        args.methods = args.methods or ["ats", "exhaustive"]
    args.methods = args.methods or ["ats", "exhaustive", "tiatoolbox"]
    base = {
        "n_patches": args.patches,
        "patch_px": args.patch_px,
        "patch_mpp": args.patch_mpp,
        "low_mpp": args.low_mpp,
        "min_fraction": 0.1,
        "max_tiles": args.max_tiles,
        "batch": args.batch,
        "repeats": args.repeats,
        "device": args.device,
        "seed": args.seed,
        "threads": args.threads,
    }
    slides = {}
    for size in args.sizes:
        path, info = make_slide(args.cache_dir, size, args.seed)
        slides[size] = {"path": str(path), **info}
        print(
            f"slide {size}x{size}: {info['islands']} islands, "
            f"{info['island_fraction']:.1%} tissue, {info['file_mb']:.0f} MB"
            + ("" if info["cached"] else f", generated in {info['generate_s']:.0f} s")
        )
    baseline = run_in_subprocess(
        "pipelines.bench_slide", {**base, "method": "baseline", "size": 0, "path": ""}
    )
    rows = []
    for size in args.sizes:
        for method in args.methods:
            cfg = {**base, "method": method, "size": size, "path": slides[size]["path"]}
            r = run_in_subprocess("pipelines.bench_slide", cfg)
            total = r.get("total_tiles", r["tiles"])
            r["extrapolated"] = method != "ats" and total > r["tiles"] > 0
            if r["extrapolated"]:
                # Tile reading and the net scale with the tile count; mask time does not.
                factor = total / r["tiles"]
                r["seconds"] = r["measured_s"] - r["tiles_s"] + r["tiles_s"] * factor
                thumb_px = r["pixels_read"] - r["tiles"] * args.patch_px**2
                r["pixels_read"] = int(thumb_px + total * args.patch_px**2)
            else:
                r["seconds"] = r["measured_s"]
            rows.append(r)
            print(
                f"  {method:<10} {size:>7}: {r['seconds']:8.2f} s, "
                f"{r['rss_peak_mb']:7.0f} MB" + ("  (extrapolated)" if r["extrapolated"] else "")
            )
    for r in rows:
        ats = next((a for a in rows if a["method"] == "ats" and a["size"] == r["size"]), None)
        r["time_vs_ats"] = r["seconds"] / ats["seconds"] if ats else None
    _print_table(rows, baseline, args)
    return {
        "config": {
            **base,
            "sizes": args.sizes,
            "methods": args.methods,
            "quick": args.quick,
            "slide_mpp": SLIDE_MPP,
            "cache_dir": args.cache_dir,
        },
        "slides": slides,
        "baseline": baseline,
        "results": rows,
    }


def _print_table(rows: list[dict[str, Any]], baseline: dict[str, Any], args: Any) -> None:
    print(
        f"\nslide: N={args.patches} patches of {args.patch_px} px at {args.patch_mpp} um/px, "
        f"view at {args.low_mpp} um/px, device {args.device}; one fresh process per row "
        f"(imports + nets alone: {baseline['rss_peak_mb']:.0f} MB RSS)"
    )
    head = (
        f"{'size':>7} {'method':<11} {'tiles':>7} {'s/slide':>9} {'x ATS':>7} "
        f"{'Mpx read':>9} {'peak RSS MB':>11} {'CUDA MB':>8} {'extrapolated':>12}"
    )
    print(head)
    for r in rows:
        cuda = "-" if r["cuda_peak_mb"] is None else f"{r['cuda_peak_mb']:.0f}"
        tiles = r.get("total_tiles", r["tiles"])
        ratio = "-" if r["time_vs_ats"] is None else f"{r['time_vs_ats']:.1f}x"
        print(
            f"{r['size']:>7} {r['method']:<11} {tiles:>7} {r['seconds']:>9.2f} "
            f"{ratio:>7}  {_fmt_mpx(r['pixels_read']):>9} "
            f"{r['rss_peak_mb']:>11.0f} {cuda:>8} {'yes' if r['extrapolated'] else 'no':>12}"
        )


def main() -> int:
    """Worker entry point (see :func:`run_in_subprocess`): config JSON in ``sys.argv[1]``."""
    cfg = json.loads(sys.argv[1])
    print(RESULT_TAG + json.dumps(worker(cfg)), flush=True)
    return 0
