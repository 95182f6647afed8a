"""Pieces shared by the paper-benchmark pipelines (Megapixel MNIST, speed limits)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["RESUMABLE", "baseline_schema", "run_and_report"]

# Keys that may change between a run and its --resume (everything else must match).
RESUMABLE = frozenset(
    {
        ("train", "epochs"),
        ("train", "time_budget_minutes"),
        ("device",),
        ("data", "num_workers"),
        ("report",),  # what is measured after training, not how the model was trained
        ("baselines",),  # each model resumes from its own checkpoint
    }
)


def baseline_schema() -> dict[str, Any]:
    """Schema of one CNN baseline block (:class:`ats_wsi.baselines.BaselineCNN`)."""
    return {
        "enabled": ((bool,), True),
        "epochs": ((int, type(None)), None),  # None: same as ATS
        "batch_size": ((int, type(None)), None),
        "lr": ((int, float), 1e-3),
        "width": ((int,), 32),
        "depth": ((int,), 4),
        "stem_kernel": ((int,), 7),
        "stem_stride": ((int,), 1),
        "pool": ((str,), "avg"),
        "time_budget_minutes": ((int, float, type(None)), None),
    }


def run_and_report(
    run_fn: Callable[..., dict[str, Any]], cfg: dict[str, Any], args: argparse.Namespace
) -> int:
    """CLI tail of the benchmark pipelines: apply ``--device``/``--out``, run, print a summary."""
    if args.device:
        cfg["device"] = args.device
    out = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    res = run_fn(
        cfg,
        out,
        config_path=str(args.config),
        resume_run=args.resume,
        progress=False if args.no_progress else None,
    )
    summary = {
        k: {kk: v.get(kk) for kk in ("test_error", "epochs_completed")}
        for k, v in res["models"].items()
    }
    print(json.dumps({"out": str(out), "models": summary}, indent=2))
    return 0
