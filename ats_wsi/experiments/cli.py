"""The command-line part the experiment scripts share (``pipelines/megapixel_mnist.py``,
``pipelines/speed_limits.py``): common options, config errors as messages, the summary."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ats_wsi.config import ConfigError

__all__ = ["base_parser", "load_or_report", "run_and_report"]


def base_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """Options of every experiment script; each adds its data-path option."""
    p = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--out", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def load_or_report(load: Callable[[str], dict[str, Any]], path: str) -> dict[str, Any] | None:
    """``load(path)``; on a config or file error print it to stderr and return None."""
    try:
        return load(path)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def run_and_report(
    run_fn: Callable[..., dict[str, Any]], cfg: dict[str, Any], args: argparse.Namespace
) -> int:
    """Apply ``--device``/``--out``, run the experiment, print a summary; the exit code."""
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
