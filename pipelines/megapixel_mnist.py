"""Megapixel MNIST benchmark (ATS_SPEC 2.1): ATS and two CNN baselines in one run.

    python -m pipelines.megapixel_mnist --config configs/megapixel_mnist.yaml \
        [--mnist-dir DIR] [--out DIR] [--resume] [--device cpu|cuda] [--no-progress] \
        [--threads N] [--costs-only [--sizes PX ...] [--batch B ...] [--repeats R]]

Writes to ``--out`` (default ``runs/<config name>``): ``{model}_metrics.jsonl`` and
``{model}_checkpoint.pt`` per model, ``figures/*.png`` (attention on a few test images) and
``results.json`` (test error, time and peak memory per sample for every model, data source,
noise order, machine). ``--resume`` continues every model from its checkpoint.

A config with ``accel.device_data: true`` (``configs/megapixel_mnist_gpu.yaml``) runs the GPU
protocol: batches rendered on the device, the ``accel`` speed settings, the side-by-side step
costs. ``--costs-only`` measures only those step costs (ATS, the feature net over the whole
image, the CNNs) and writes ``OUT/step_costs.json`` (default ``runs/step_costs``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ats_wsi.benchmarking import write_json
from ats_wsi.experiments import device_protocol, megapixel_mnist
from ats_wsi.experiments.cli import base_parser, load_or_report, run_and_report
from ats_wsi.training import pick_device


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment of ``--config`` (or only its step costs); 2 on a config error."""
    p = base_parser("python -m pipelines.megapixel_mnist", __doc__)
    p.add_argument("--mnist-dir", help="folder with MNIST IDX files (overrides data.mnist_dir)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument(
        "--costs-only",
        action="store_true",
        help="measure the side-by-side step costs only; writes OUT/step_costs.json",
    )
    p.add_argument("--sizes", type=int, nargs="+", help="--costs-only canvas sizes")
    p.add_argument("--batch", type=int, nargs="+", help="--costs-only batch sizes")
    p.add_argument("--repeats", type=int, default=None, help="--costs-only timed calls")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_or_report(megapixel_mnist.load_config, args.config)
    if cfg is None:
        return 2
    if args.mnist_dir:
        cfg["data"]["mnist_dir"] = args.mnist_dir
    if not args.costs_only:
        return run_and_report(megapixel_mnist.run, cfg, args)
    report = device_protocol.step_cost_report(
        cfg,
        pick_device(args.device or cfg["device"]),
        sizes=args.sizes,
        batch_sizes=args.batch,
        repeats=args.repeats,
        config_path=str(args.config),
    )
    print(device_protocol.format_costs(report["rows"]))
    out = Path(args.out or "runs/step_costs") / "step_costs.json"
    write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
