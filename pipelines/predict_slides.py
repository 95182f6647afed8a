"""Predict slides with a trained ATS checkpoint: one CLAM-compatible CSV row per slide.

    python -m pipelines.predict_slides --checkpoint runs/demo/ats_best.pt \
        --slides DIR|manifest.csv --out DIR [--topk | --sample] [--n-patches N] \
        [--workers N | --scheduler-address tcp://HOST:8786] [--no-heatmaps] [--geojson]

Writes ``<out>/predictions.csv`` (``slide_id, Y, Y_hat, p_0..p_{C-1}, case_id, label,
pred_label, n_patches, sampler, attention_mpp, patch_mpp, runtime_s, error``), appended and
fsynced slide by slide: rerunning after a kill skips the slides already there. A slide that
cannot be read gets a row with ``error`` set. With labels, ``<out>/metrics.json`` summarises
accuracy, balanced accuracy and ROC AUC. Per slide: ``heatmaps/``, ``gallery/`` (PNG),
``zarr/`` (attention map + sampled level-0 coordinates), ``geojson/`` (QuPath boxes).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ats_wsi.slides.inference import PredictOptions, Predictor, predict_many, records_from_frame
from ats_wsi.slides.manifest import read_manifest, slides_from_dir


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.predict_slides", description=__doc__.split("\n")[0]
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="ats_*.pt from train_slides")
    p.add_argument("--slides", required=True, type=Path, help="folder of slides or manifest CSV")
    p.add_argument("--slide-dir", type=Path, default=None, help="where manifest slides live")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--topk",
        dest="sampler",
        action="store_const",
        const="topk",
        help="deterministic: the N most attended cells (default)",
    )
    mode.add_argument(
        "--sample",
        dest="sampler",
        action="store_const",
        const="without_replacement",
        help="sample N cells (seeded per slide)",
    )
    p.set_defaults(sampler="topk")
    p.add_argument("--n-patches", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=0, help="dask LocalCluster workers (0: local)")
    p.add_argument("--threads", action="store_true", help="LocalCluster workers as threads")
    p.add_argument("--scheduler-address", default=None, help="existing dask scheduler")
    p.add_argument("--retry-errors", action="store_true", help="redo slides with an error row")
    p.add_argument("--no-heatmaps", action="store_true")
    p.add_argument("--no-gallery", action="store_true")
    p.add_argument("--no-zarr", action="store_true")
    p.add_argument("--geojson", action="store_true", help="also write QuPath GeoJSON boxes")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    classes = Predictor.load(args.checkpoint).classes
    if args.slides.is_dir():
        df = slides_from_dir(args.slides)
    else:
        df = read_manifest(
            args.slides, slide_dir=args.slide_dir, classes=classes, require_labels=False
        )
    options = PredictOptions(
        sampler=args.sampler,
        n_patches=args.n_patches,
        seed=args.seed,
        heatmaps=not args.no_heatmaps,
        gallery=not args.no_gallery,
        zarr=not args.no_zarr,
        geojson=args.geojson,
        device=args.device,
    )
    summary = predict_many(
        records_from_frame(df),
        args.checkpoint,
        args.out,
        options,
        classes=classes,
        retry_errors=args.retry_errors,
        workers=args.workers,
        scheduler_address=args.scheduler_address,
        processes=not args.threads,
        on_row=lambda r: print(
            f"{r['slide_id']}: {r.get('pred_label') or r.get('error')}", flush=True
        ),
    )
    print(json.dumps({k: summary.get(k) for k in ("n", "n_errors", "accuracy", "auc")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
