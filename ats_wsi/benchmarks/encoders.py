"""``encoders``: per slide, ATS against exhaustive tiling with the *same* pretrained encoder.

Runs the ``slide`` benchmark once per encoder (``--encoders``), every row in a fresh process:
wall time, encoder forwards (= tiles encoded), pixels decoded and peak RSS, with the ratios to
ATS side by side. Presets without bundled weights (``resnet50-trunc``) run with random weights:
the cost of a forward does not depend on the weights.

Also here: the CPU ms-per-patch table of docs/encoders.md,
``python -m ats_wsi.benchmarks.encoders bench [presets...]`` (:func:`benchmark_ms_per_patch`).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ats_wsi.benchmarks import slide

__all__ = ["HELP", "add_arguments", "benchmark_ms_per_patch", "main", "run"]

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


# ----------------------------------------------------------------------------- ms per patch


def benchmark_ms_per_patch(
    net: nn.Module,
    patch_size: int = 224,
    batch: int = 8,
    repeats: int = 3,
    threads: int | None = 2,
) -> float:
    """Best-of-``repeats`` CPU milliseconds per patch of ``net`` on random [0, 1] patches."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.rand(batch, 3, patch_size, patch_size)
        net.eval()
        with torch.no_grad():
            net(x[:1])
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                net(x)
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 1000.0 * best / batch


def _iter_bench(names: Sequence[str], batch: int, repeats: int, threads: int) -> Iterator[str]:
    yield "| preset | timm architecture | parameters | out_dim | ms / patch |"
    yield "|---|---|---|---|---|"
    from ats_wsi.encoders import PRESETS, build_timm_encoder

    for name in names:
        p = PRESETS[name]
        net = build_timm_encoder(preset=name, weights=None if p.default_weights else "random")
        n = sum(t.numel() for t in net.model.parameters())
        ms = benchmark_ms_per_patch(net, p.input_size, batch, repeats, threads)
        yield f"| {name} | {p.arch} | {n / 1e6:.1f}M | {net.out_dim} | {ms:.0f} |"
        del net


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ats_wsi.benchmarks.encoders bench [presets...]``: the CPU ms-per-patch table
    of docs/encoders.md."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ats_wsi.benchmarks.encoders")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="CPU ms per patch (random weights unless bundled)")
    b.add_argument("presets", nargs="*", default=["efficientnet-lite0", "resnet50-trunc"])
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for line in _iter_bench(args.presets, args.batch, args.repeats, args.threads):
        print(line, flush=True)


if __name__ == "__main__":
    main()
