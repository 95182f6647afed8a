"""``python -m pipelines.benchmark core``: patch-extraction throughput, batched gather vs loop.

:func:`ats_wsi.patches.extract_patches` (one batched gather) against the per-patch Python loop
of the earlier PyTorch port (pad the whole image by P/2, slice every patch, stack), measured
side by side in one process.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from ats_wsi.benchmarking import time_interleaved
from ats_wsi.mapping import GridMapping
from ats_wsi.patches import extract_patches

__all__ = ["HELP", "add_arguments", "extract_patches_loop", "run"]

HELP = "batched gather vs per-patch loop patch extraction"


def extract_patches_loop(x: torch.Tensor, top_left: torch.Tensor, size: int) -> torch.Tensor:
    """The earlier PyTorch port's way, for comparison: pad the whole batch by ``size // 2``,
    then one Python-level slice per patch. Only boxes at most ``size // 2`` outside the image
    are supported (true for boxes centred on attention cells)."""
    pad = size // 2
    xp = F.pad(x, (pad, pad, pad, pad))
    corners = (top_left + pad).tolist()
    out = []
    for b, row in enumerate(corners):
        out.append(torch.stack([xp[b, :, y : y + size, x_ : x_ + size] for y, x_ in row]))
    return torch.stack(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``core``."""
    p.add_argument("--batch", type=int, default=8, help="images per batch B")
    p.add_argument("--patches", type=int, nargs="+", default=[10, 50, 200], help="N values")
    p.add_argument("--patch-size", type=int, nargs="+", default=[50, 100], help="P values")
    p.add_argument("--image-size", type=int, default=1500, help="H = W of the image")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--low-size", type=int, default=180, help="attention map side (cells)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time both extractors for every (N, P); check they agree before timing."""
    if args.quick:
        args.batch, args.patches, args.patch_size = 2, [4, 16], [8]
        args.image_size, args.low_size, args.repeats = 64, 16, 2
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    size = args.image_size
    x = torch.rand(args.batch, args.channels, size, size, generator=gen).to(device)
    rows = []
    for p in args.patch_size:
        # Boxes centred on random cells of a low-res attention map, as ATSModel produces them
        # (so some reach outside the image).
        mapping = GridMapping(
            low_size=(args.low_size, args.low_size),
            high_size=(size, size),
            attention_size=(args.low_size, args.low_size),
            patch_size=p,
        )
        for n in args.patches:
            cells = torch.randint(0, mapping.num_cells, (args.batch, n), generator=gen)
            top_left = mapping.top_left(cells).to(device)
            gather = extract_patches(x, top_left, p)
            loop = extract_patches_loop(x, top_left, p)
            if not torch.equal(gather, loop):
                raise RuntimeError(f"extractors disagree at N={n}, P={p}")
            times = time_interleaved(
                {
                    "gather": lambda t=top_left, p=p: extract_patches(x, t, p),
                    "loop": lambda t=top_left, p=p: extract_patches_loop(x, t, p),
                },
                repeats=args.repeats,
                device=device,
            )
            n_total = args.batch * n
            g_ms, l_ms = times["gather"]["median_ms"], times["loop"]["median_ms"]
            rows.append(
                {
                    "B": args.batch,
                    "N": n,
                    "P": p,
                    "gather_ms": g_ms,
                    "loop_ms": l_ms,
                    "gather_patches_per_s": n_total / g_ms * 1e3,
                    "loop_patches_per_s": n_total / l_ms * 1e3,
                    "speedup": l_ms / g_ms,
                    "timings": times,
                }
            )
    header = f"{'B':>3} {'N':>5} {'P':>5} {'gather ms':>10} {'loop ms':>10} {'speedup':>8}"
    print(f"core: image {args.channels}x{size}x{size}, device {device}, median of {args.repeats}")
    print(header)
    for r in rows:
        print(
            f"{r['B']:>3} {r['N']:>5} {r['P']:>5} {r['gather_ms']:>10.2f} {r['loop_ms']:>10.2f} "
            f"{r['speedup']:>7.1f}x"
        )
    return {
        "config": {
            "batch": args.batch,
            "patches": args.patches,
            "patch_size": args.patch_size,
            "image_size": size,
            "channels": args.channels,
            "low_size": args.low_size,
            "repeats": args.repeats,
            "device": str(device),
            "quick": args.quick,
            "seed": args.seed,
        },
        "results": rows,
    }
