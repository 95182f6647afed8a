"""``python -m pipelines.benchmark slide``: slide-level inference, ATS against exhaustive tiling.

Three ways to turn one whole slide into a prediction with the same feature network (see
:mod:`ats_wsi.benchmarks.slide_worker`): ``ats`` (attention, ``N`` sampled patches),
``exhaustive`` (every tissue tile through the feature net, CLAM-style) and ``tiatoolbox``
(tiatoolbox's ``PatchPredictor`` engine in WSI mode on the same tiles).

Slides are pyramids of real H&E tissue islands on blank glass
(:mod:`ats_wsi.benchmarks.island_slides`), cached under ``--cache-dir``. Every measured
configuration runs in a fresh subprocess (:func:`~ats_wsi.benchmarks.workers.run_in_subprocess`)
that reports its RSS high-water mark (and CUDA peak allocation), so peak memory is not polluted
by earlier configurations. ``--max-tiles`` caps the tiles actually run by the two tiling
methods: beyond it a fixed random subset is timed and the time and pixels are extrapolated
linearly to the full tile count; such rows say ``extrapolated: yes``.
"""

from __future__ import annotations

import argparse
from typing import Any

from ats_wsi.benchmarks.island_slides import SLIDE_MPP, make_slide
from ats_wsi.benchmarks.workers import run_in_subprocess

__all__ = ["HELP", "add_arguments", "extrapolate", "run"]

HELP = "slide inference: ATS vs exhaustive tiling vs tiatoolbox"
WORKER = "ats_wsi.benchmarks.slide_worker"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``slide``."""
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
    p.add_argument(
        "--feature-net",
        default="histology",
        help="histology (from scratch) or an ats_wsi.encoders preset, e.g. efficientnet-lite0",
    )
    p.add_argument("--batch", type=int, default=64, help="tiles per feature-net batch")
    p.add_argument("--repeats", type=int, default=3, help="ATS runs per slide (median)")
    p.add_argument("--cache-dir", default="benchmarks/cache", help="generated slides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def extrapolate(r: dict[str, Any], patch_px: int) -> dict[str, Any]:
    """Set a worker row's ``seconds``, ``pixels_read`` and ``extrapolated`` (in place).

    A tiling row that ran a subset of its ``total_tiles`` is scaled up linearly: tile reading
    and the net scale with the tile count (``tiles_s``), the mask (the rest) does not. An
    ``ats`` row, or one that ran every tile, keeps its measured seconds.
    """
    total = r.get("total_tiles", r["tiles"])
    r["extrapolated"] = r["method"] != "ats" and total > r["tiles"] > 0
    if r["extrapolated"]:
        factor = total / r["tiles"]
        r["seconds"] = r["measured_s"] - r["tiles_s"] + r["tiles_s"] * factor
        thumb_px = r["pixels_read"] - r["tiles"] * patch_px**2
        r["pixels_read"] = int(thumb_px + total * patch_px**2)
    else:
        r["seconds"] = r["measured_s"]
    return r


def _fmt_mpx(px: float) -> str:
    return f"{px / 1e6:,.1f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
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
        "feature_net": args.feature_net,
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
    baseline = run_in_subprocess(WORKER, {**base, "method": "baseline", "size": 0, "path": ""})
    rows = []
    for size in args.sizes:
        for method in args.methods:
            cfg = {**base, "method": method, "size": size, "path": slides[size]["path"]}
            r = run_in_subprocess(WORKER, cfg)
            rows.append(extrapolate(r, args.patch_px))
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
