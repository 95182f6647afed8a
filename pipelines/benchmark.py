"""Benchmarks: ``python -m pipelines.benchmark <subcommand> [options]``.

Subcommands live in :data:`SUBCOMMANDS`; add one with :func:`subcommand`::

    def _my_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--size", type=int, default=10)

    @subcommand("mine", help="what it measures", arguments=_my_args)
    def run_mine(args: argparse.Namespace) -> dict: ...  # returns the JSON payload

Every subcommand gets ``--quick`` (tiny CI-sized setting) and ``--out`` (JSON path, default
``benchmarks/results/<name>.json``); the machine description is added to every payload.

``core``: patch-extraction throughput of :func:`ats_wsi.patches.extract_patches` (one batched
gather) against the per-patch Python loop of the earlier PyTorch port (pad the whole image
by P/2, slice every patch, stack), measured side by side in one process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ats_wsi.benchmarking import describe_machine, time_interleaved, write_json
from ats_wsi.mapping import GridMapping
from ats_wsi.patches import extract_patches

Runner = Callable[[argparse.Namespace], dict[str, Any]]


@dataclass(frozen=True)
class Subcommand:
    """A registered benchmark: its CLI arguments and the function that runs it."""

    run: Runner
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None


SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Runner], Runner]:
    """Register ``fn(args) -> payload`` as ``python -m pipelines.benchmark name``."""

    def wrap(fn: Runner) -> Runner:
        if name in SUBCOMMANDS:
            raise ValueError(f"benchmark {name!r} is already registered")
        SUBCOMMANDS[name] = Subcommand(fn, help, arguments)
        return fn

    return wrap


# ----------------------------------------------------------------------------- core


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


def _core_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=8, help="images per batch B")
    p.add_argument("--patches", type=int, nargs="+", default=[10, 50, 200], help="N values")
    p.add_argument("--patch-size", type=int, nargs="+", default=[50, 100], help="P values")
    p.add_argument("--image-size", type=int, default=1500, help="H = W of the image")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--low-size", type=int, default=180, help="attention map side (cells)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=0)


@subcommand("core", help="batched gather vs per-patch loop patch extraction", arguments=_core_args)
def run_core(args: argparse.Namespace) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per registered benchmark, each with ``--quick`` and ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        p.add_argument("--quick", action="store_true", help="tiny setting for CI")
        p.add_argument("--out", default=f"benchmarks/results/{name}.json", help="JSON path")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        if cmd.arguments is not None:
            cmd.arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark, print its table, write its JSON."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = SUBCOMMANDS[args.benchmark].run(args)
    path = write_json(
        args.out, {"benchmark": args.benchmark, "machine": describe_machine(), **payload}
    )
    print(f"wrote {path}")
    return 0


# Subcommands implemented in their own modules register themselves on import (below the
# definitions above, which they import back).
from pipelines import bench_mnist, bench_prefetch, bench_slide  # noqa: E402, F401

if __name__ == "__main__":
    # Run through the imported module: the bench_* modules registered their subcommands in
    # ``pipelines.benchmark``'s registry, not in this ``__main__`` copy's.
    from pipelines.benchmark import main as _main

    raise SystemExit(_main())
