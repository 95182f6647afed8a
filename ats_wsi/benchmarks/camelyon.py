"""``python -m pipelines.benchmark camelyon``: per-slide cost of ATS on CAMELYON-sized slides.

Slides come from the realistic generator (:mod:`ats_wsi.slides.realistic_cohort`: real H&E
stamps, 1-3 tumour lesions, tissue outline of ``--tissue`` of the slide), ``--sizes`` pixels a
side at each ``--mpp`` level-0 resolution (0.5: a 20x scan; 0.25: as 40x scanners write, the
same generator with level 0 tagged 0.25 um/px, so textures keep their pixel scale), written
block by block and cached under ``--cache-dir``. Every row runs in a fresh process
(:mod:`ats_wsi.benchmarks.camelyon_worker`, :mod:`ats_wsi.benchmarks.slide_worker`) and
reports its own peak RSS. Per slide and encoder (``--encoders``; presets without bundled
weights run with random weights, cost only):

* ``ats``: N tiles (``--patches``) of ``--patch-px`` px at ``--patch-mpp`` sampled from a
  ``tile_pool`` attention map at ``--attention-mpp``, with its per-stage breakdown;
* ``zoom`` (``--zoom N0xN1``): zoom-in ATS, N0 regions then N1 tiles in each;
* ``io_floor``: the ATS row's reads alone (open, view, regions, the same tiles);
* ``exhaustive``: every tissue tile through the same encoder; ``tiatoolbox``: its
  ``PatchPredictor`` on the same tiles. Beyond ``--max-tiles`` both time a fixed random subset
  and extrapolate linearly (``extrapolated: yes``); ``--max-tiles 0`` runs every tile.

:func:`goal_verdict` checks issue 23's goal on the slides that qualify (>= 65,536 px a side,
>= 15 % tissue) and says which checks it could not evaluate.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from ats_wsi.benchmarks.slide import extrapolate
from ats_wsi.benchmarks.workers import run_in_subprocess

__all__ = ["GOAL", "HELP", "add_arguments", "goal_verdict", "run"]

HELP = "CAMELYON-sized slides: ATS stages vs its I/O floor vs exhaustive tiling vs tiatoolbox"
WORKER = "ats_wsi.benchmarks.camelyon_worker"
SLIDE_WORKER = "ats_wsi.benchmarks.slide_worker"

# Issue 23's goal. Memory: 1.5 GB = 1.5e9 bytes, in the MiB that rss_peak_mb reports.
GOAL: dict[str, float] = {
    "min_side": 65536,
    "min_tissue": 0.15,
    "forwards_x": 500.0,
    "time_x": 200.0,
    "peak_mb": 1.5e9 / 2**20,
    "flat_from": 10240,
    "flat_to": 65536,
    "flat_tolerance": 0.10,
    "overhead_x": 2.0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``camelyon``."""
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[10240, 65536, 98304],
        help="slide sides in level-0 pixels (multiples of a level-0 tile)",
    )
    p.add_argument(
        "--mpp",
        type=float,
        nargs="+",
        default=[0.5],
        help="level-0 um/px of the slides (0.25: the 40x variant)",
    )
    p.add_argument(
        "--tissue",
        type=float,
        nargs=2,
        default=[0.2, 0.35],
        help="(min, max) tissue fraction of the generated slides",
    )
    p.add_argument(
        "--encoders",
        nargs="+",
        default=["efficientnet-lite0", "resnet50-trunc"],
        help="ats_wsi.encoders presets",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=["ats", "zoom", "exhaustive", "tiatoolbox"],
        help="default: all (zoom only with --zoom; --quick: no tiatoolbox)",
    )
    p.add_argument("--patches", type=int, default=16, help="ATS tiles per slide N")
    p.add_argument("--zoom", default="4x4", help="zoom row N0xN1 (regions x tiles); none: off")
    p.add_argument("--region-cells", type=int, default=4, help="zoom region side in tiles")
    p.add_argument("--region-mpp", type=float, default=4.0, help="zoom region view um/px")
    p.add_argument("--patch-px", type=int, default=256, help="tile side in pixels")
    p.add_argument("--patch-mpp", type=float, default=0.5, help="tile resolution (um/px)")
    p.add_argument("--attention-mpp", type=float, default=16.0, help="ATS view (um/px)")
    p.add_argument(
        "--max-tiles",
        type=int,
        default=200,
        help="tiles the tiling methods actually run (0: all); more are "
        "extrapolated from a fixed random subset",
    )
    p.add_argument(
        "--full-sizes",
        type=int,
        nargs="*",
        default=[],
        help="sizes whose exhaustive row runs every tile (no subset; tiatoolbox keeps it)",
    )
    p.add_argument("--batch", type=int, default=32, help="tiles per encoder batch (tiling)")
    p.add_argument("--repeats", type=int, default=3, help="ATS / floor runs per slide (median)")
    p.add_argument("--cache-dir", default="benchmarks/cache", help="generated slides")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def _zoom_spec(spec: str | None) -> list[int] | None:
    if not spec or spec == "none":
        return None
    try:
        n0, n1 = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--zoom {spec!r}: expected N0xN1, e.g. 4x4, or none") from None
    return [n0, n1]


def _quick(args: argparse.Namespace) -> None:
    args.sizes, args.mpp, args.encoders = [2048], [0.5], args.encoders[:1]
    args.patches, args.patch_px, args.zoom, args.region_cells = 4, 64, "2x2", 2
    args.max_tiles, args.repeats, args.batch = 8, 1, 8
    args.threads = args.threads or 1
    args.methods = args.methods or ["ats", "zoom", "exhaustive"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate (or reuse) the slides, measure every row in a fresh process, check the goal."""
    if args.quick:
        _quick(args)
    zoom = _zoom_spec(args.zoom)
    methods = args.methods or ["ats", "zoom", "exhaustive", "tiatoolbox"]
    if zoom is None:
        methods = [m for m in methods if m != "zoom"]
    for mpp in args.mpp:
        side = round(args.patch_px * args.patch_mpp / mpp)
        bad = [s for s in args.sizes if s % side or s % 256]
        if bad:
            raise ValueError(f"--sizes {bad}: not multiples of the {side}-px tile at {mpp} um/px")
    base = {
        "n_patches": args.patches,
        "patch_px": args.patch_px,
        "patch_mpp": args.patch_mpp,
        "attention_mpp": args.attention_mpp,
        "min_fraction": 0.1,
        "region_cells": args.region_cells,
        "region_mpp": args.region_mpp,
        "repeats": args.repeats,
        "device": args.device,
        "seed": args.seed,
        "threads": args.threads,
    }
    slides, rows = [], []
    for mpp in args.mpp:
        for size in args.sizes:
            s = run_in_subprocess(
                WORKER,
                {
                    "method": "generate",
                    "size": size,
                    "mpp": mpp,
                    "seed": args.seed,
                    "tissue_fraction": args.tissue,
                    "cache_dir": args.cache_dir,
                },
            )
            s.update(size=size, mpp=mpp)
            slides.append(s)
            print(
                f"slide {size} px at {mpp} um/px: {s['tissue_fraction']:.1%} tissue, "
                f"{s['n_lesions']} lesions, {s['file_mb']:.0f} MB, generator "
                f"{s['generate_s']:.0f} s, {s['rss_peak_mb']:.0f} MB peak",
                flush=True,
            )
            for enc in args.encoders:
                rows += _slide_rows(args, base, s, enc, methods, zoom)
    _ratios(rows)
    verdict = goal_verdict(rows, slides)
    _print(rows, verdict, args)
    return {
        "config": {
            **base,
            "sizes": args.sizes,
            "mpp": args.mpp,
            "tissue": args.tissue,
            "encoders": args.encoders,
            "methods": methods,
            "zoom": zoom,
            "max_tiles": args.max_tiles,
            "full_sizes": args.full_sizes,
            "batch": args.batch,
            "quick": args.quick,
            "cache_dir": args.cache_dir,
            "goal": GOAL,
        },
        "slides": slides,
        "results": rows,
        "verdict": verdict,
    }


def _weights(enc: str) -> str:
    from ats_wsi.encoders.presets import PRESETS

    return "pretrained" if PRESETS[enc].default_weights else "random init, cost only"


def _slide_rows(
    args: argparse.Namespace,
    base: dict[str, Any],
    s: dict[str, Any],
    enc: str,
    methods: Sequence[str],
    zoom: list[int] | None,
) -> list[dict[str, Any]]:
    """Every row of one (slide, encoder): ATS (+ its floor), zoom (+ floor), tiling rows."""
    key = {"size": s["size"], "mpp": s["mpp"], "encoder": enc, "weights": _weights(enc)}
    cfg = {**base, "path": s["path"], "encoder": enc}
    rows = [{**key, **run_in_subprocess(WORKER, {**cfg, "method": "baseline"})}]
    for method in [m for m in ("ats", "zoom") if m in methods]:
        r = run_in_subprocess(
            WORKER, {**cfg, "method": "ats", "zoom": zoom if method == "zoom" else None}
        )
        r.update(key, method=method, extrapolated=False)
        floor = run_in_subprocess(
            WORKER,
            {
                **cfg,
                "method": "io_floor",
                "locations_yx": r["locations_yx"],
                "regions_xywh": r["regions_xywh"],
                "region_mpp": r["region_mpp"],
            },
        )
        floor.update(key, method=f"io_floor ({method})", extrapolated=False)
        rows += [r, floor]
        _line(r)
        _line(floor)
    tiling = {
        **base,
        "method": "",
        "size": s["size"],
        "path": s["path"],
        "feature_net": enc,
        "low_mpp": args.attention_mpp,
        "max_tiles": args.max_tiles,
        "batch": args.batch,
        "slide_mpp": s["mpp"],
        "repeats": 1,
    }
    for method in [m for m in ("exhaustive", "tiatoolbox") if m in methods]:
        full = method == "exhaustive" and s["size"] in args.full_sizes
        r = run_in_subprocess(
            SLIDE_WORKER, {**tiling, "method": method, **({"max_tiles": 0} if full else {})}
        )
        r = extrapolate(r, args.patch_px)
        r.update(key)
        rows.append(r)
        _line(r)
    return rows


def _line(r: dict[str, Any]) -> None:
    print(
        f"  {r['encoder']:<19} {r['method']:<16} {r['seconds']:9.2f} s, "
        f"{r['rss_peak_mb']:6.0f} MB" + ("  (extrapolated)" if r["extrapolated"] else ""),
        flush=True,
    )


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``forwards`` and, beside each ATS row, the tiling rows' ratios to it."""
    for r in rows:
        if r["method"] == "baseline":
            continue
        r["forwards"] = (
            0 if r["method"].startswith("io_floor") else r.get("total_tiles", r["tiles"])
        )
    for r in rows:
        group = [a for a in rows if all(a[k] == r[k] for k in ("size", "mpp", "encoder"))]
        ats = next((a for a in group if a["method"] == "ats"), None)
        if ats is None or r["method"] in ("baseline", "ats") or r["method"].startswith("io"):
            continue
        r["time_vs_ats"] = r["seconds"] / ats["seconds"]
        r["forwards_vs_ats"] = r["forwards"] / max(ats["forwards"], 1)


def goal_verdict(
    rows: Sequence[dict[str, Any]], slides: Sequence[dict[str, Any]], goal: dict | None = None
) -> dict[str, Any]:
    """Issue 23's goal, checked per (mpp, encoder) on the slides that qualify.

    Checks: exhaustive / ATS encoder forwards and wall time on a qualifying slide (side >=
    ``min_side``, generator tissue fraction >= ``min_tissue``); ATS peak RSS <= ``peak_mb`` on
    every size and flat (largest / smallest peak - 1 <= ``flat_tolerance``) when the sizes span
    ``flat_from`` .. ``flat_to``; ATS seconds <= ``overhead_x`` * (its I/O floor + its encode
    stage). ``met`` is True / False over the evaluated checks, None when none could be.
    """
    g = {**GOAL, **(goal or {})}
    tissue = {(s["size"], s["mpp"]): s["tissue_fraction"] for s in slides}
    checks: list[dict[str, Any]] = []

    def add(name: str, r: dict[str, Any], value: float, target: float, ok: bool, **kw: Any) -> None:
        checks.append(
            {
                "check": name,
                "size": r["size"],
                "mpp": r["mpp"],
                "encoder": r["encoder"],
                "value": value,
                "target": target,
                "pass": bool(ok),
                **kw,
            }
        )

    ats_rows = [r for r in rows if r["method"] == "ats"]
    for a in ats_rows:
        same = [r for r in rows if all(r[k] == a[k] for k in ("size", "mpp", "encoder"))]
        big = a["size"] >= g["min_side"] and tissue.get((a["size"], a["mpp"]), 0) >= g["min_tissue"]
        ex = next((r for r in same if r["method"] == "exhaustive"), None)
        if big and ex is not None:
            fx = ex["forwards"] / max(a["forwards"], 1)
            tx = ex["seconds"] / a["seconds"]
            add("forwards_x", a, fx, g["forwards_x"], fx >= g["forwards_x"])
            add("time_x", a, tx, g["time_x"], tx >= g["time_x"], extrapolated=ex["extrapolated"])
        add("peak_mb", a, a["rss_peak_mb"], g["peak_mb"], a["rss_peak_mb"] <= g["peak_mb"])
        floor = next((r for r in same if r["method"] == "io_floor (ats)"), None)
        if floor is not None:
            bound = g["overhead_x"] * (floor["seconds"] + a["stages_s"]["encode"])
            add("overhead_x", a, a["seconds"], bound, a["seconds"] <= bound)
    for mpp, enc in sorted({(a["mpp"], a["encoder"]) for a in ats_rows}):
        series = sorted(
            (a for a in ats_rows if (a["mpp"], a["encoder"]) == (mpp, enc)), key=lambda a: a["size"]
        )
        if (
            len(series) < 2
            or series[0]["size"] > g["flat_from"]
            or series[-1]["size"] < g["flat_to"]
        ):
            continue
        peaks = [a["rss_peak_mb"] for a in series]
        growth = max(peaks) / min(peaks) - 1
        add(
            "flat_peak",
            series[-1],
            growth,
            g["flat_tolerance"],
            growth <= g["flat_tolerance"],
            sizes=[a["size"] for a in series],
        )
    evaluated = {c["check"] for c in checks}
    missing = [
        c
        for c in ("forwards_x", "time_x", "peak_mb", "flat_peak", "overhead_x")
        if c not in evaluated
    ]
    return {
        "checks": checks,
        "not_evaluated": missing,
        "met": all(c["pass"] for c in checks)
        if checks and not missing
        else (False if any(not c["pass"] for c in checks) else None),
    }


def _print(rows: list[dict[str, Any]], verdict: dict[str, Any], args: Any) -> None:
    print(
        f"\ncamelyon: N={args.patches} tiles of {args.patch_px} px at {args.patch_mpp} um/px, "
        f"tile_pool attention at {args.attention_mpp} um/px, device {args.device}; one fresh "
        f"process per row, own peak RSS; x ATS = seconds / ATS seconds"
    )
    print(
        f"{'mpp':>5} {'size':>6} {'encoder':<19} {'method':<16} {'forwards':>8} "
        f"{'s/slide':>9} {'x ATS':>8} {'Mpx':>8} {'peak MB':>8} {'extrap.':>7}"
    )
    for r in rows:
        if r["method"] == "baseline":
            continue
        t = r.get("time_vs_ats")
        x = "-" if t is None else f"{t:.1f}x" if t < 10 else f"{t:,.0f}x"
        print(
            f"{r['mpp']:>5} {r['size']:>6} {r['encoder']:<19} {r['method']:<16} "
            f"{r['forwards']:>8} {r['seconds']:>9.2f} {x:>8} {r['pixels_read'] / 1e6:>8.1f} "
            f"{r['rss_peak_mb']:>8.0f} {'yes' if r['extrapolated'] else 'no':>7}"
        )
    print("\nstages (s, median of the repeats):")
    for r in rows:
        if "stages_s" in r:
            st = " ".join(f"{k}={v:.3f}" for k, v in r["stages_s"].items() if v or k == "encode")
            print(f"{r['mpp']:>5} {r['size']:>6} {r['encoder']:<19} {r['method']:<16} {st}")
    print("\ngoal (issue 23):")
    for c in verdict["checks"]:
        print(
            f"  {c['check']:<11} {c['mpp']:>5} {c['size']:>6} {c['encoder']:<19} "
            f"{c['value']:>10.2f} vs {c['target']:>9.2f}  {'PASS' if c['pass'] else 'FAIL'}"
            + ("  (extrapolated)" if c.get("extrapolated") else "")
        )
    if verdict["not_evaluated"]:
        print(f"  not evaluated: {', '.join(verdict['not_evaluated'])}")
    print(f"  met: {verdict['met']}")
