"""Megapixel MNIST benchmark (ATS_SPEC 2.1): ATS and two CNN baselines in one run.

    python -m pipelines.megapixel_mnist --config configs/megapixel_mnist.yaml \
        [--mnist-dir DIR] [--out DIR] [--resume] [--device cpu|cuda] [--no-progress]

Writes to ``--out`` (default ``runs/<config name>``): ``{model}_metrics.jsonl`` and
``{model}_checkpoint.pt`` per model, ``figures/*.png`` (attention on a few test images) and
``results.json`` (test error, time and peak memory per sample for every model, data source,
noise order, machine). ``--resume`` continues every model from its checkpoint.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ats_wsi.experiments import megapixel_mnist
from ats_wsi.experiments.cli import base_parser, load_or_report, run_and_report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment of ``--config``; 2 on a config error, else 0."""
    p = base_parser("python -m pipelines.megapixel_mnist", __doc__)
    p.add_argument("--mnist-dir", help="folder with MNIST IDX files (overrides data.mnist_dir)")
    args = p.parse_args(argv)
    cfg = load_or_report(megapixel_mnist.load_config, args.config)
    if cfg is None:
        return 2
    if args.mnist_dir:
        cfg["data"]["mnist_dir"] = args.mnist_dir
    return run_and_report(megapixel_mnist.run, cfg, args)


if __name__ == "__main__":
    sys.exit(main())
