"""Benchmarks: ``python -m pipelines.benchmark <subcommand> [options]``.

Subcommands are the benchmarks of :data:`ats_wsi.benchmarks.BENCHMARKS` (see
:mod:`ats_wsi.benchmarks` to add one). Every subcommand gets ``--quick`` (tiny CI-sized
setting), ``--out`` (JSON path, default ``benchmarks/results/<name>.json``, with ``--quick``
``benchmarks/results/quick/<name>.json``, an ignored folder) and ``--threads`` (torch CPU
threads); the machine description is added to every payload. A ``--quick`` run never writes
over a full result.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

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
        p.add_argument(
            "--out",
            type=Path,
            default=None,
            help=f"JSON path (default benchmarks/results/{name}.json; --quick: results/quick/)",
        )
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
        module.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one benchmark, print its table, write its JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        folder = Path("benchmarks/results") / ("quick" if args.quick else "")
        args.out = folder / f"{args.benchmark}.json"
    if args.quick and _is_full_result(args.out):
        parser.error(f"{args.out}: holds a full (not --quick) result; give another --out")
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = load(args.benchmark).run(args)
    path = write_json(
        args.out,
        {
            "benchmark": args.benchmark,
            "quick": args.quick,
            "machine": describe_machine(),
            **payload,
        },
    )
    print(f"wrote {path}")
    return 0


def _is_full_result(path: Path) -> bool:
    """Whether ``path`` holds the JSON of a full run (files from before the top-level
    ``quick`` key say it in ``config``; an unreadable file is not a result)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    return not (data.get("quick") or (data.get("config") or {}).get("quick"))


if __name__ == "__main__":
    raise SystemExit(main())
