"""Train attention sampling on whole slides; with no arguments, the demo cohort end to end.

    python -m pipelines.train_slides [--config configs/slides_demo.yaml] [--out DIR] [--resume]
    torchrun --nproc_per_node 2 -m pipelines.train_slides --config ...   # DDP (gloo on CPU)

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

from ats_wsi.slides.trainer import load_config, train

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "slides_demo.yaml"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.train_slides", description=__doc__.split("\n")[0]
    )
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
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path)
    if args.epochs is not None:
        cfg["train"]["epochs"] = args.epochs
    if args.device is not None:
        cfg["train"]["device"] = args.device
    results = train(cfg, args.out, resume_run=args.resume)
    if results.get("test_ats"):
        print(
            json.dumps(
                {
                    k: results[k]
                    for k in ("test_ats", "test_baseline", "wall_time_s")
                    if k in results
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
