"""Measurements in a fresh interpreter, so that peak memory is not polluted by earlier ones.

A worker module ends with::

    if __name__ == "__main__":
        raise SystemExit(worker_main(worker))

and :func:`run_in_subprocess` runs it as ``python -m <module> '<config JSON>'``; the worker
prints its result as one tagged JSON line, which is what comes back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ats_wsi

__all__ = ["RESULT_TAG", "run_in_subprocess", "worker_main"]

RESULT_TAG = "BENCH_RESULT "
Worker = Callable[[dict[str, Any]], dict[str, Any]]


def worker_main(worker: Worker) -> int:
    """Worker entry point: config JSON in ``sys.argv[1]``, tagged result JSON on stdout."""
    cfg = json.loads(sys.argv[1])
    print(RESULT_TAG + json.dumps(worker(cfg)), flush=True)
    return 0


def run_in_subprocess(module: str, cfg: dict[str, Any], timeout: float | None = None) -> dict:
    """Run ``python -m module`` with ``cfg`` in a fresh interpreter; its tagged JSON result."""
    # The child must import this same ats_wsi, wherever the parent found it.
    paths = [str(Path(ats_wsi.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(cfg)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    raise RuntimeError(
        f"{module} worker failed (rc {proc.returncode}) for {cfg}:\n{proc.stderr[-4000:]}"
    )
