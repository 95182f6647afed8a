"""Convert a slide to an OME-Zarr pyramid.

    python -m pipelines.convert_slide SRC DST.zarr [--chunk 512] [--levels N] [--ngff 0.5|0.4]
        [--mpp UM_PER_PX | --objective-power X] [--backend openslide|zarr|tiatoolbox]
        [--overwrite]

Reads SRC with any registered backend and writes NGFF 0.5 (zarr v3) by default, or 0.4 (zarr
v2), chunk by chunk: level 0 is never held in memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ats_wsi.io import BACKENDS, SlideError, open_slide, write_ome_zarr


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.convert_slide", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help="slide readable by one of the backends")
    parser.add_argument("dst", help="output OME-Zarr directory (e.g. slide.zarr)")
    parser.add_argument("--chunk", type=int, default=512, help="chunk side in pixels")
    parser.add_argument(
        "--levels", type=int, default=None, help="pyramid levels (default: down to one chunk)"
    )
    parser.add_argument(
        "--ngff", choices=("0.5", "0.4"), default="0.5", help="0.5 = zarr v3, 0.4 = zarr v2"
    )
    parser.add_argument("--backend", choices=sorted(BACKENDS), default=None)
    resolution = parser.add_mutually_exclusive_group()
    resolution.add_argument("--mpp", type=float, default=None, help="level-0 microns per pixel")
    resolution.add_argument(
        "--objective-power", type=float, default=None, help="used as mpp = 10 / power"
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="threads reading and encoding chunks"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the conversion; returns the exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        with open_slide(args.src, args.backend, args.mpp, args.objective_power) as reader:
            dst = write_ome_zarr(
                reader,
                args.dst,
                chunk=args.chunk,
                levels=args.levels,
                version=args.ngff,
                max_workers=args.workers,
                overwrite=args.overwrite,
            )
            width, height = reader.dimensions
            mpp = reader.mpp
    except (SlideError, FileExistsError, ValueError) as e:
        print(f"convert_slide: {e}", file=sys.stderr)
        return 1
    print(
        f"{args.src} ({width}x{height}, {mpp[0]:.4g} um/px) -> {dst} "
        f"(NGFF {args.ngff}) in {time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
