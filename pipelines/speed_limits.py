"""Speed limits benchmark (ATS_SPEC 2.2): ATS and a CNN on the low-res view in one run.

    python -m pipelines.speed_limits --config configs/speed_limits.yaml \
        [--data-root STS_DIR] [--out DIR] [--resume] [--device cpu|cuda] [--no-progress]

With ``--data-root`` (or ``data.root``) the real Swedish Traffic Signs ``Set1`` / ``Set2`` are
used; otherwise the deterministic offline stand-in. Images travel as uint8; on the device
each training batch gets brightness/contrast and +-100 px pan augmentation, then the low-res
view is made from the (augmented) full image with an anti-aliased resize, as in the authors'
model. Outputs as in :mod:`pipelines.megapixel_mnist`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ats_wsi.experiments import speed_limits
from ats_wsi.experiments.cli import base_parser, load_or_report, run_and_report


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment of ``--config``; 2 on a config error, else 0."""
    p = base_parser("python -m pipelines.speed_limits", __doc__)
    p.add_argument("--data-root", help="STS folder with Set1/ and Set2/ (overrides data.root)")
    args = p.parse_args(argv)
    cfg = load_or_report(speed_limits.load_config, args.config)
    if cfg is None:
        return 2
    if args.data_root:
        cfg["data"]["root"] = args.data_root
    return run_and_report(speed_limits.run, cfg, args)


if __name__ == "__main__":
    sys.exit(main())
