"""Benchmarks: ``python -m pipelines.benchmark <subcommand> [options]``.

Subcommands are the benchmarks of :data:`ats_wsi.benchmarks.BENCHMARKS` (see
:mod:`ats_wsi.benchmarks` to add one). Every subcommand gets ``--quick`` (tiny CI-sized
setting), ``--out`` (JSON path, default ``benchmarks/results/<name>.json``) and ``--threads``
(torch CPU threads); the machine description is added to every payload.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from ats_wsi.benchmarking import describe_machine, write_json
from ats_wsi.benchmarks import BENCHMARKS, load


def build_parser() -> argparse.ArgumentParser:
    """One sub-parser per registered benchmark, each with ``--quick``, ``--out``, ``--threads``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        module = load(name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.add_argument("--quick", action="store_true", help="tiny setting for CI")
        p.add_argument("--out", default=f"benchmarks/results/{name}.json", help="JSON path")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark, print its table, write its JSON."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = load(args.benchmark).run(args)
    path = write_json(
        args.out, {"benchmark": args.benchmark, "machine": describe_machine(), **payload}
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
