"""``python -m pipelines.benchmark mnist``: ATS vs CNNs on Megapixel MNIST, time and memory.

Three models from the Megapixel MNIST experiment (:mod:`ats_wsi.experiments.megapixel_mnist`,
settings from ``configs/megapixel_mnist.yaml``): ATS (the "mnist" attention and feature nets,
10 patches of 50 px), the full-resolution :class:`~ats_wsi.baselines.BaselineCNN` and the
low-res one, at several canvas sizes (the low-res view is always ``scale`` = 0.12 of the
canvas). Canvases come from :class:`~ats_wsi.datasets.megapixel_mnist.MegapixelMNIST`
(scikit-learn digits; timing does not depend on them) as uint8, as the pipeline ships them:
each model converts what it needs to float itself (the full-res CNN the whole canvas, ATS only
its patches).

Each (model, size) runs in a fresh subprocess and reports, per sample: forward time
(inference mode), training-step time (forward, loss with the entropy term, backward, Adam
step), and peak memory as (RSS high-water mark - RSS before the batch existed) / batch, plus
the tensor peak of one training step counted by :class:`ats_wsi.benchmarking.PeakMemory` (what
``pipelines.megapixel_mnist`` reports) and, on CUDA, ``max_memory_allocated`` / batch.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path
from typing import Any

from ats_wsi.benchmarking import rss_peak_mb
from ats_wsi.benchmarks.workers import run_in_subprocess, worker_main

__all__ = ["HELP", "MODELS", "add_arguments", "run", "worker"]

HELP = "Megapixel MNIST: ATS vs full-res and low-res CNNs"

MODELS = ("ats", "cnn_full", "cnn_low")
# The repository's configs/ (this file is ats_wsi/benchmarks/mnist.py).
CONFIG = Path(__file__).resolve().parents[2] / "configs" / "megapixel_mnist.yaml"


def _current_rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _build_model(conf: dict[str, Any], name: str) -> Any:
    """ATS or one of the two baseline CNNs, as the Megapixel MNIST config sets them up."""
    from ats_wsi.baselines import BaselineCNN
    from ats_wsi.experiments.runner import build_ats

    if name == "ats":
        return build_ats(conf, in_channels=1, num_classes=10)
    block = conf["baselines"]["full_res_cnn" if name == "cnn_full" else "low_res_cnn"]
    # Only the architecture keys (the block also holds training settings).
    accepted = inspect.signature(BaselineCNN).parameters
    kw = {k: v for k, v in block.items() if k in accepted}
    return BaselineCNN(in_channels=1, num_classes=10, **kw)


def _dataset(conf: dict[str, Any], cfg: dict[str, Any]) -> Any:
    """Uint8 canvases of ``cfg["size"]`` px holding only the views the model reads."""
    import numpy as np

    from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
    from ats_wsi.datasets.mnist import DigitPool

    # Timing does not depend on the digits: random strokes avoid loading a dataset.
    rng = np.random.default_rng(cfg["seed"])
    images = (rng.random((100, 28, 28)) < 0.2).astype(np.uint8) * 255
    pool = DigitPool(images, np.arange(100) % 10, "random-strokes")
    views = {"ats": "both", "cnn_full": "high", "cnn_low": "low"}[cfg["model"]]
    return MegapixelMNIST(
        pool,
        cfg["batch"],
        canvas_size=cfg["size"],
        scale=conf["data"]["scale"],
        high_dtype="uint8",
        views=views,
        seed=cfg["seed"],
    )


def _timed(fn: Any, repeats: int, device: Any) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call."""
    import torch

    fn()  # warm-up: kernel selection, allocator, Adam state
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """Measure one (model, size) in this process; called in a fresh subprocess."""
    import torch

    from ats_wsi.benchmarking import PeakMemory
    from ats_wsi.config import load_yaml_config
    from ats_wsi.experiments.megapixel_mnist import SCHEMA
    from ats_wsi.patches import TensorPatchSource
    from ats_wsi.training import StepOutput, compute_loss

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    conf = load_yaml_config(CONFIG, SCHEMA)  # the pipeline's own defaults fill the gaps
    torch.manual_seed(cfg["seed"])
    name, size, batch = cfg["model"], cfg["size"], cfg["batch"]
    model = _build_model(conf, name)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    entropy = float(conf["train"]["entropy_lambda"])
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    ds = _dataset(conf, cfg)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = _current_rss_mb()
    items = [ds[i] for i in range(batch)]
    x_low = torch.stack([it[0] for it in items]).to(device)
    x_high = torch.stack([it[1] for it in items]).to(device)
    y = torch.tensor([it[2] for it in items], device=device)
    del items
    input_mb = (x_low.numel() * x_low.element_size() + x_high.numel()) / 2**20

    def forward() -> StepOutput:
        if name == "ats":
            source = TensorPatchSource(x_high, model.patch_size)
            out = model(x_low, source, generator=gen)
            return StepOutput(out.logits, y, out.probs)
        x = x_high.float().div_(255) if name == "cnn_full" else x_low
        return StepOutput(model(x), y)

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            forward()

    def train_step() -> None:
        model.train()
        loss, _ = compute_loss(forward(), entropy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    res: dict[str, Any] = {
        "model": name,
        "size": size,
        "batch": batch,
        "low_size": list(ds.low_size),
        "input_mb_per_sample": input_mb / batch,
    }
    res["forward_ms_per_sample"] = _timed(infer, cfg["repeats"], device) * 1e3 / batch
    res["forward_rss_mb_per_sample"] = (rss_peak_mb() - rss_before) / batch
    cuda_fwd = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    res["train_ms_per_sample"] = _timed(train_step, cfg["repeats"], device) * 1e3 / batch
    res["train_rss_mb_per_sample"] = (rss_peak_mb() - rss_before) / batch
    if device.type == "cuda":
        res["forward_cuda_mb_per_sample"] = cuda_fwd / 2**20 / batch
        res["train_cuda_mb_per_sample"] = torch.cuda.max_memory_allocated(device) / 2**20 / batch
    with PeakMemory(device) as mem:
        train_step()
    # PeakMemory leaves out tensors that existed before (the batch): add the input back.
    res["train_tensor_mb_per_sample"] = mem.peak / 2**20 / batch + input_mb / batch
    res["params"] = int(sum(p.numel() for p in model.parameters()))
    res["rss_peak_mb"] = rss_peak_mb()
    return res


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of ``mnist``."""
    p.add_argument("--sizes", type=int, nargs="+", default=[750, 1500, 3000, 6000])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument(
        "--batch",
        type=int,
        default=4,
        help="samples per batch (halved above 3000 px so the full-res CNN fits)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed calls per phase (median)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="measure in this process instead of a fresh one per row (RSS peaks then "
        "carry over between rows; --quick sets it)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh subprocess per (model, size); ratios against ATS at each size."""
    if args.quick:
        args.sizes, args.batch, args.repeats = [750], 1, 1
        # A fresh interpreter costs seconds on a busy CI machine; quick numbers are not
        # reported anyway.
        args.in_process = True
        args.threads = args.threads or 1  # CI machines are shared: no thread spin-waits
    rows = []
    for size in args.sizes:
        batch = args.batch if size <= 3000 else max(1, args.batch // 2)
        for name in args.models:
            cfg = {
                "model": name,
                "size": size,
                "batch": batch,
                "repeats": args.repeats,
                "device": args.device,
                "seed": args.seed,
                "threads": args.threads,
            }
            if args.in_process:
                r = {**worker(cfg), "fresh_process": False}
            else:
                r = {**run_in_subprocess("ats_wsi.benchmarks.mnist", cfg), "fresh_process": True}
            rows.append(r)
            print(
                f"  {name:<8} {size:>5}: fwd {r['forward_ms_per_sample']:8.1f} ms, "
                f"train {r['train_ms_per_sample']:8.1f} ms, "
                f"{r['train_rss_mb_per_sample']:7.1f} MB/sample"
            )
    for r in rows:
        ats = next((a for a in rows if a["model"] == "ats" and a["size"] == r["size"]), None)
        if ats is not None:
            for key in (
                "forward_ms_per_sample",
                "train_ms_per_sample",
                "train_rss_mb_per_sample",
                "train_tensor_mb_per_sample",
            ):
                r[f"{key}_vs_ats"] = r[key] / max(ats[key], 1e-9)
    print(
        f"\nmnist: per sample, device {args.device}, median of {args.repeats}; memory = "
        f"(RSS high-water - RSS before the batch) / B, tensors = PeakMemory of a train step "
        f"+ input; "
        + ("all rows in one process" if args.in_process else "one fresh process per row")
    )
    print(
        f"{'size':>5} {'model':<9} {'B':>2} {'fwd ms':>9} {'train ms':>9} {'x ATS':>7} "
        f"{'RSS MB':>8} {'tensor MB':>10} {'x ATS':>7}"
    )
    for r in rows:
        tr = r.get("train_ms_per_sample_vs_ats")
        mem = r.get("train_tensor_mb_per_sample_vs_ats")
        print(
            f"{r['size']:>5} {r['model']:<9} {r['batch']:>2} {r['forward_ms_per_sample']:>9.1f} "
            f"{r['train_ms_per_sample']:>9.1f} {'-' if tr is None else f'{tr:.1f}x':>7} "
            f"{r['train_rss_mb_per_sample']:>8.1f} {r['train_tensor_mb_per_sample']:>10.1f} "
            f"{'-' if mem is None else f'{mem:.1f}x':>7}"
        )
    return {
        "config": {
            "sizes": args.sizes,
            "models": args.models,
            "batch": args.batch,
            "repeats": args.repeats,
            "device": args.device,
            "quick": args.quick,
            "seed": args.seed,
            "in_process": args.in_process,
            "model_config": str(CONFIG.name),
        },
        "results": rows,
    }


if __name__ == "__main__":
    raise SystemExit(worker_main(worker))
