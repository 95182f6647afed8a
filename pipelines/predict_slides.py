"""Predict slides with a trained ATS checkpoint: one CLAM-compatible CSV row per slide.

Writes ``<out>/predictions.csv`` (``slide_id, Y, Y_hat, p_0..p_{C-1}, case_id, label,
pred_label, n_patches, sampler, attention_mpp, patch_mpp, mpp, mpp_source, runtime_s, error``),
appended and fsynced slide by slide: rerunning after a kill skips the slides already there, and
several runs on one ``--out`` share the work (per-slide claims in ``<out>/locks``). A slide
that cannot be read gets a row with ``error`` set. Per slide: ``heatmaps/``, ``gallery/``,
``zarr/``, ``geojson/``; per run ``metrics.json`` (with labels) and ``summary.html``. The last
line printed is a JSON summary: ``n`` slides predicted, ``n_labelled`` of them with a label,
``n_errors``, and ``accuracy`` / ``auc`` over the labelled ones (null without labels).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ats_wsi.cli import (
    add_job_arguments,
    add_mpp_arguments,
    add_output_arguments,
    checkpoint_classes,
    make_parser,
    output_options,
    run,
)
from ats_wsi.slides.inference import PredictOptions, predict_many, records_from_frame
from ats_wsi.slides.manifest import read_manifest, slides_from_dir

EXAMPLES = (
    "python -m pipelines.predict_slides --checkpoint runs/demo/ats_best.pt --slides D --out P",
    "ats-wsi predict --checkpoint ats_best.pt --slides manifest.csv --out preds --mpp 0.25",
    "ats-wsi predict ... --workers 4          # dask LocalCluster, 4 processes",
    "ats-wsi predict ... &  ats-wsi predict ...   # two jobs, one folder: each slide once",
)


def build_parser(prog: str = "python -m pipelines.predict_slides") -> argparse.ArgumentParser:
    p = make_parser(prog, __doc__, EXAMPLES)
    p.add_argument("--checkpoint", required=True, type=Path, help="ats_*.pt from train_slides")
    p.add_argument("--slides", required=True, type=Path, help="folder of slides or manifest CSV")
    p.add_argument("--slide-dir", type=Path, default=None, help="where manifest slides live")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    mode = p.add_mutually_exclusive_group()
    for flag, const, help_ in (
        ("--topk", "topk", "deterministic: the N most attended cells (default)"),
        ("--sample", "without_replacement", "sample N cells (seeded per slide)"),
    ):
        mode.add_argument(flag, dest="sampler", action="store_const", const=const, help=help_)
    p.set_defaults(sampler="topk")
    p.add_argument("--n-patches", type=int, default=None, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_mpp_arguments(p)
    add_job_arguments(p)
    add_output_arguments(p)
    p.add_argument("--tiles", type=Path, help="TRIDENT/CLAM coords h5 folder: their tissue tiles")
    return p


def _run(args: argparse.Namespace) -> int:
    classes = checkpoint_classes(args.checkpoint)
    if args.slides.is_dir():
        df = slides_from_dir(args.slides)
    else:
        df = read_manifest(
            args.slides, slide_dir=args.slide_dir, classes=classes, require_labels=False
        )
    options = PredictOptions(
        sampler=args.sampler,
        mpp=args.mpp,
        mpp_override=args.mpp_override,
        n_patches=args.n_patches,
        seed=args.seed,
        tiles_dir=str(args.tiles) if args.tiles else None,
        device=args.device,
        **output_options(args),
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
        progress=False if args.no_progress else None,
        lock_timeout_s=args.lock_timeout,
        clear_stale_locks=args.clear_stale_locks,
    )
    # n: slides with a prediction; accuracy / auc over the n_labelled of them (None: no labels).
    keys = ("n", "n_labelled", "n_errors", "accuracy", "auc", "predicted_here")
    print(json.dumps({k: summary.get(k) for k in keys}))
    return 0


def main(
    argv: Sequence[str] | None = None, prog: str = "python -m pipelines.predict_slides"
) -> int:
    """Run the command line; returns the exit status."""
    return run(_run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
