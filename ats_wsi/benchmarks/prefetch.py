"""``python -m pipelines.benchmark prefetch``: slides per second with and without the Prefetcher.

Two loops over the same slides, each run with the low-res loads (view + tissue mask, a
:class:`~ats_wsi.io.LowResLoader`) done inline and with them prefetched by
:class:`~ats_wsi.io.Prefetcher` on a thread cluster while the main thread computes:

* ``inference``: ATS on the view, ``N`` patches read through :class:`SlidePatchSource`, head;
* ``training``: the same forward with gradients, a loss, backward and an Adam step.

Honest I/O: before every pass each slide's pages are dropped from the OS page cache
(``posix_fadvise(DONTNEED)``), so every pass reads from storage; ``--latency-ms`` adds a
per-slide delay to the load (a sleep, which like real network I/O holds no CPU and no GIL) to
model remote storage, reported as its own rows. The main loop runs torch on ``--threads``
threads (default 1) so that a core is left for the loader, as a data-loading setup would.
Sequential and prefetched passes alternate, so load from other processes hits both alike;
the speed-up is the ratio of their median pass times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ats_wsi.benchmarks.island_slides import make_slide

__all__ = ["HELP", "DelayedLoader", "add_arguments", "drop_page_cache", "run"]

HELP = "slide loops with vs without the dask Prefetcher"


def drop_page_cache(path: str | Path) -> None:
    """Ask the kernel to forget ``path``'s cached pages, so the next read hits storage."""
    if not hasattr(os, "posix_fadvise"):
        return  # not on macOS / Windows: reads stay cached, the setting is then less I/O-bound
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class DelayedLoader:
    """A picklable load function: ``latency_s`` of waiting (remote storage), then ``loader``."""

    loader: Callable[[str], Any]
    latency_s: float = 0.0

    def __call__(self, path: str) -> Any:
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        return self.loader(path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``prefetch``."""
    p.add_argument("--slides", type=int, default=8, help="distinct slides per pass")
    p.add_argument("--size", type=int, default=10240, help="slide side in level-0 pixels")
    p.add_argument("--low-mpp", type=float, default=4.0, help="low-res view resolution")
    p.add_argument("--patches", type=int, default=16, help="ATS patches per slide N")
    p.add_argument("--patch-px", type=int, default=128)
    p.add_argument("--depth", type=int, default=2, help="prefetch depth (loads in flight)")
    p.add_argument(
        "--latency-ms",
        type=float,
        nargs="+",
        default=[0.0, 500.0],
        help="simulated per-slide storage latency; one set of rows per value",
    )
    p.add_argument("--repeats", type=int, default=3, help="passes per mode (median)")
    p.add_argument(
        "--loops", nargs="+", default=["inference", "training"], choices=["inference", "training"]
    )
    p.add_argument("--cache-dir", default="benchmarks/cache")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)


def _step_fn(loop: str, args: argparse.Namespace) -> Callable[[Any], None]:
    """What the main thread does with one loaded slide (ATS inference or a training step)."""
    import torch

    from ats_wsi.io import SlidePatchSource, mask_to_grid, open_slide
    from ats_wsi.model import ATSModel

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = ATSModel.from_config(
        {
            "attention_net": "histology",
            "feature_net": "histology",
            "num_classes": 2,
            "n_patches": args.patches,
            "patch_size": args.patch_px,
            "sampler": "without_replacement",
        }
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    target = torch.zeros(1, dtype=torch.long, device=device)

    def step(item: Any) -> None:
        grid = torch.from_numpy(mask_to_grid(item.mask, item.image.shape[:2]))[None].to(device)
        with open_slide(item.path) as reader, SlidePatchSource(reader, args.patch_px, 0.5) as src:
            if loop == "inference":
                model.eval()
                with torch.inference_mode():
                    model(item.view().to(device), src, grid, generator=gen)
            else:
                model.train()
                out = model(item.view().to(device), src, grid, generator=gen)
                loss = torch.nn.functional.cross_entropy(out.logits, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def _sequential(paths: list[str], load: Callable[[str], Any]) -> Iterator[tuple[str, Any]]:
    for p in paths:
        yield p, load(p)


def _timed_passes(
    paths: list[str],
    load: Callable[[str], Any],
    step: Callable[[Any], None],
    client: Any,
    depth: int,
    repeats: int,
) -> dict[str, list[float]]:
    """Seconds of each pass over ``paths``, sequential and prefetched alternating, with the
    page cache dropped before every pass."""
    from ats_wsi.io import Prefetcher

    times: dict[str, list[float]] = {"sequential": [], "prefetch": []}
    for _ in range(repeats):
        for mode in times:
            for p in paths:
                drop_page_cache(p)
            t = time.perf_counter()
            if mode == "sequential":
                items = _sequential(paths, load)
            else:
                items = iter(Prefetcher(paths, load, depth, client=client))
            for _path, item in items:
                if isinstance(item, Exception):
                    raise item
                step(item)
            times[mode].append(time.perf_counter() - t)
    return times


def _print_table(
    rows: list[dict[str, Any]], n_slides: int, threads: int, args: argparse.Namespace
) -> None:
    """The summary line and one row per (loop, latency)."""
    print(
        f"\nprefetch: {n_slides} slides of {args.size}^2 px, view at {args.low_mpp} um/px "
        f"+ tissue mask, N={args.patches} patches of {args.patch_px} px, depth {args.depth}, "
        f"torch threads {threads}, device {args.device}; page cache dropped before every "
        f"pass; median of {args.repeats} alternating passes"
    )
    print(
        f"{'loop':<10} {'latency ms':>10} {'seq slides/s':>13} {'prefetch slides/s':>18} "
        f"{'speed-up':>9}"
    )
    for r in rows:
        print(
            f"{r['loop']:<10} {r['latency_ms']:>10.0f} {r['sequential_slides_per_s']:>13.2f} "
            f"{r['prefetch_slides_per_s']:>18.2f} {r['speedup']:>8.2f}x"
        )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Alternate sequential and prefetched passes over the slides; report slides per second."""
    import torch
    from distributed import Client

    from ats_wsi.io import LowResLoader

    if args.quick:
        args.slides, args.size, args.low_mpp, args.patches = 2, 2048, 8.0, 2
        args.patch_px, args.repeats, args.latency_ms = 64, 1, [50.0]
    threads = args.threads or 1
    torch.set_num_threads(threads)
    paths = [
        str(make_slide(args.cache_dir, args.size, seed=1000 + i)[0]) for i in range(args.slides)
    ]
    base_loader = LowResLoader(mpp=args.low_mpp)
    t0 = time.perf_counter()
    client = Client(
        processes=False, n_workers=args.depth, threads_per_worker=1, dashboard_address=None
    )
    startup_s = time.perf_counter() - t0
    rows = []
    try:
        for loop in args.loops:
            step = _step_fn(loop, args)
            step(base_loader(paths[0]))  # warm-up: kernels, thread pools, lazy imports
            for latency in args.latency_ms:
                load = DelayedLoader(base_loader, latency / 1e3)
                times = _timed_passes(paths, load, step, client, args.depth, args.repeats)
                seq, pre = (statistics.median(times[m]) for m in ("sequential", "prefetch"))
                rows.append(
                    {
                        "loop": loop,
                        "latency_ms": latency,
                        "slides": len(paths),
                        "sequential_s": seq,
                        "prefetch_s": pre,
                        "sequential_slides_per_s": len(paths) / seq,
                        "prefetch_slides_per_s": len(paths) / pre,
                        "speedup": seq / pre,
                        "passes": times,
                    }
                )
                print(
                    f"  {loop:<9} latency {latency:5.0f} ms: {len(paths) / seq:6.2f} -> "
                    f"{len(paths) / pre:6.2f} slides/s ({seq / pre:.2f}x)"
                )
    finally:
        client.close()
    _print_table(rows, len(paths), threads, args)
    return {
        "config": {
            "slides": len(paths),
            "size": args.size,
            "low_mpp": args.low_mpp,
            "patches": args.patches,
            "patch_px": args.patch_px,
            "depth": args.depth,
            "latency_ms": args.latency_ms,
            "repeats": args.repeats,
            "loops": args.loops,
            "torch_threads": threads,
            "device": args.device,
            "quick": args.quick,
            "seed": args.seed,
        },
        "client_startup_s": startup_s,
        "results": rows,
    }
