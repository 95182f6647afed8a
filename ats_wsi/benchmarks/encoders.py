"""``encoders``: per slide, ATS against exhaustive tiling with the *same* pretrained encoder.

Runs the ``slide`` benchmark once per encoder (``--encoders``), every row in a fresh process:
wall time, encoder forwards (= tiles encoded), pixels decoded and peak RSS, with the ratios to
ATS side by side. Presets without bundled weights (``resnet50-trunc``) run with random weights:
the cost of a forward does not depend on the weights.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

from ats_wsi.benchmarks import slide

__all__ = ["HELP", "add_arguments", "run"]

HELP = "ATS vs exhaustive tiling with the same pretrained encoder"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``slide`` options plus ``--encoders``."""
    slide.add_arguments(p)
    p.add_argument(
        "--encoders",
        nargs="+",
        default=["efficientnet-lite0", "resnet50-trunc"],
        help="ats_wsi.encoders presets",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One ``slide`` run per encoder (methods default to ats and exhaustive)."""
    runs = {}
    for name in args.encoders:
        a = copy.copy(args)
        a.feature_net = name
        a.methods = args.methods or ["ats", "exhaustive"]
        print(f"\n=== encoder {name}")
        runs[name] = slide.run(a)
    print("\nencoders: encoder forwards = tiles encoded per slide; x ATS = time / ATS time")
    print(
        f"{'encoder':<20} {'size':>7} {'method':<11} {'forwards':>9} {'s/slide':>9} "
        f"{'x ATS':>7} {'Mpx read':>9} {'peak RSS MB':>11}"
    )
    for name, payload in runs.items():
        for r in payload["results"]:
            ratio = "-" if r["time_vs_ats"] is None else f"{r['time_vs_ats']:.1f}x"
            print(
                f"{name:<20} {r['size']:>7} {r['method']:<11} "
                f"{r.get('total_tiles', r['tiles']):>9} {r['seconds']:>9.2f} {ratio:>7} "
                f"{r['pixels_read'] / 1e6:>9.1f} {r['rss_peak_mb']:>11.0f}"
            )
    return {"encoders": runs}
