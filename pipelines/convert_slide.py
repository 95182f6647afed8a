"""Convert a slide or plain image to an OME-Zarr pyramid, chunk by chunk.

Reads SRC with any registered backend and writes NGFF 0.5 (zarr v3) by default, or 0.4 (zarr
v2): level 0 is never held in memory. The resolution comes from the file, else ``--mpp`` /
``--objective-power``; without any, the pyramid is written in pixel units (no ``unit`` on the
axes), which readers then ask an mpp for.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ats_wsi.cli import add_mpp_arguments, make_parser, run
from ats_wsi.io import BACKENDS, open_slide, write_ome_zarr
from ats_wsi.io.readers import MppSpec
from ats_wsi.slides.progress import progress_bar

EXAMPLES = (
    "python -m pipelines.convert_slide slide.svs slide.zarr",
    "ats-wsi convert image.tif image.zarr --mpp 0.5 --ngff 0.4 --chunk 1024",
)


def build_parser(prog: str = "python -m pipelines.convert_slide") -> argparse.ArgumentParser:
    p = make_parser(prog, __doc__, EXAMPLES)
    p.add_argument("src", help="slide or image readable by one of the backends")
    p.add_argument("dst", help="output OME-Zarr directory (e.g. slide.zarr)")
    p.add_argument("--chunk", type=int, default=512, help="chunk side in pixels")
    p.add_argument("--levels", type=int, default=None, help="levels (default: down to a chunk)")
    p.add_argument("--ngff", choices=("0.5", "0.4"), default="0.5", help="0.5: zarr v3, 0.4: v2")
    p.add_argument("--backend", choices=sorted(BACKENDS), default=None)
    add_mpp_arguments(p)
    p.add_argument("--objective-power", type=float, default=None, help="as --mpp 10/POWER")
    p.add_argument("--workers", type=int, default=4, help="threads reading and encoding chunks")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    mpp = args.mpp
    if mpp is None and args.objective_power:
        mpp = 10.0 / args.objective_power
    spec = MppSpec(default=mpp, override=args.mpp_override, allow_missing=True)
    with open_slide(args.src, args.backend, spec) as reader:
        width, height = reader.dimensions
        bar = progress_bar(0, "convert", False if args.no_progress else None, unit="chunk")
        try:
            dst = write_ome_zarr(
                reader,
                args.dst,
                chunk=args.chunk,
                levels=args.levels,
                version=args.ngff,
                max_workers=args.workers,
                overwrite=args.overwrite,
                progress=lambda level, done: bar.update(1),
            )
        finally:
            bar.close()
        source = reader.mpp_source
        scale = "pixel units" if source == "none" else f"{reader.mpp[0]:.4g} um/px ({source})"
    elapsed = time.perf_counter() - start
    print(f"{args.src} ({width}x{height}, {scale}) -> {dst} (NGFF {args.ngff}) in {elapsed:.1f} s")
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m pipelines.convert_slide") -> int:
    """Run the conversion; returns the exit status."""
    return run(_run, build_parser(prog), argv)


if __name__ == "__main__":
    sys.exit(main())
