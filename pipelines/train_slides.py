"""Train attention sampling on whole slides; with no arguments, the demo cohort end to end.

Without a ``data.manifest`` in the config (the default), a small cohort of pyramidal TIFFs is
built from real H&E tissue under ``<out>/cohort``: a slide is "tumor" when it holds a small
lesion that is invisible at the attention resolution. The run trains ATS and a low-res-only
baseline, predicts the test split and writes, in ``--out`` (default ``runs/demo``):
``{ats,baseline}_metrics.jsonl``, ``{ats,baseline}_{best,last}.pt``, ``splits.csv``,
``predictions/`` (CSV, metrics.json, heatmaps, galleries, zarr, GeoJSON) and ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ats_wsi.cli import add_mpp_arguments, make_parser, run
from ats_wsi.slides.trainer import load_config, train

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "slides_demo.yaml"
EXAMPLES = (
    "python -m pipelines.train_slides                 # the demo cohort, runs/demo",
    "ats-wsi train --config my.yaml --out runs/mine [--resume]",
    "ats-wsi train --config my.yaml --mpp 0.25        # for slides without mpp metadata",
    "torchrun --nproc_per_node 2 -m pipelines.train_slides --config my.yaml   # DDP",
)


def build_parser(prog: str = "python -m pipelines.train_slides") -> argparse.ArgumentParser:
    p = make_parser(prog, __doc__, EXAMPLES)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML config (default: {DEFAULT_CONFIG.name} when present)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from <out>/*_last.pt")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--device", default=None, help="override train.device (auto, cpu, cuda)")
    add_mpp_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars or epoch lines")
    return p


def _run(args: argparse.Namespace) -> int:
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path)
    if args.epochs is not None:
        cfg.train.epochs = args.epochs
    if args.device is not None:
        cfg.train.device = args.device
    if args.mpp is not None:
        cfg.data.mpp = args.mpp
    if args.mpp_override:
        cfg.data.mpp_override = True
    if args.no_progress:
        cfg.train.progress = False
    results = train(cfg, args.out, resume_run=args.resume)
    if results.get("test_ats"):
        keys = ("test_ats", "test_baseline", "wall_time_s")
        print(json.dumps({k: results[k] for k in keys if k in results}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m pipelines.train_slides") -> int:
    """Run the command line; returns the exit status."""
    return run(_run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
