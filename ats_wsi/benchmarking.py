"""Helpers shared by the benchmarks in ``pipelines.benchmark``: machine description, timing,
JSON output. Kept free of benchmark logic so every subcommand reports the same fields."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

__all__ = ["cpu_model", "describe_machine", "time_call", "time_interleaved", "write_json"]


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else whatever :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine() -> dict[str, Any]:
    """What a result was measured on: CPU, usable cores, library versions, GPUs."""
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not available on macOS / Windows
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(
                {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
            )
    return info


def _sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _stats(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "mean_ms": statistics.fmean(times),
        "repeats": len(times),
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, dict[str, float]]:
    """Time several callables side by side; milliseconds per name.

    Calls alternate (a, b, a, b, ...) so that load from other processes on a shared machine
    hits every contender alike and their ratio stays meaningful. CUDA is synchronised around
    each call when ``device`` is a CUDA device, so asynchronous kernels are counted.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _stats(t) for name, t in times.items()}


def time_call(
    fn: Callable[[], Any],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Time one callable (see :func:`time_interleaved`); milliseconds."""
    return time_interleaved({"fn": fn}, repeats, warmup, device)["fn"]


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (plus a UTC timestamp) as indented JSON, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return path
