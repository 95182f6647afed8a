"""Measurement helpers shared by every benchmark: machine description, interleaved timing,
process and tensor peak memory, per-sample step cost, JSON output. Kept free of benchmark logic
so every benchmark reports the same fields."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ats_wsi.training import ForwardFn, compute_loss

__all__ = [
    "PeakMemory",
    "cpu_model",
    "describe_machine",
    "measure_step_cost",
    "rss_peak_mb",
    "step_fn",
    "time_call",
    "time_interleaved",
    "write_json",
]


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


def rss_peak_mb() -> float:
    """This process's own resident-set high-water mark in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the peak of this process's address space.
    ``getrusage(...).ru_maxrss`` is kept across ``exec``, so a worker started by a parent that
    once held a few GB would report the parent's peak; it is the fallback where ``/proc`` is
    missing (macOS: bytes, elsewhere KiB).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


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
    """Write ``payload`` (plus a UTC timestamp) as indented JSON, atomically, creating parent
    folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"), **payload}
    # Written beside and renamed: an interrupted run never leaves half a result behind.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- costs


class PeakMemory:
    """Peak bytes of tensors allocated inside the ``with`` block.

    CUDA: from the allocator's peak statistics. CPU: a dispatch-mode hook that counts every
    new tensor storage and releases it when the storage is freed (torch has no CPU allocator
    statistics). Tensors that existed before the block (parameters, inputs) are not counted.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._live = 0
        self._seen: set[int] = set()
        self._mode: Any = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = _StorageCounter(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)

    def _track(self, t: Tensor, inputs: set[int]) -> None:
        if t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        # Views and in-place results share an input's storage: nothing new was allocated.
        if key in inputs or key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        self._live += st.nbytes()
        self.peak = max(self.peak, self._live)
        # torch keeps a storage's Python object alive as long as the storage, so this fires
        # when the memory is actually released.
        weakref.finalize(st, self._release, key, st.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self._live -= nbytes


class _StorageCounter(TorchDispatchMode):
    """Reports every tensor an op returns to a :class:`PeakMemory`."""

    def __init__(self, owner: PeakMemory) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and t.device.type == "cpu"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.owner._track(t, inputs)
        return out


def step_fn(
    model: nn.Module,
    batch: Any,
    *,
    forward: ForwardFn,
    device: torch.device | str = "cpu",
    train: bool = True,
    entropy_lambda: float = 0.0,
) -> Callable[[], None]:
    """One step to time: forward, plus loss and backward when ``train``; parameters are never
    updated (gradients are dropped). Sets the model's train / eval mode on every call, so
    training and inference steps of one model can be timed side by side."""
    device = torch.device(device)

    def step() -> None:
        model.train(train)
        with torch.set_grad_enabled(train):
            out = forward(model, batch, device)
            if train:
                loss, _ = compute_loss(out, entropy_lambda)
                loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def measure_step_cost(
    model: nn.Module,
    batch: Any,
    *,
    forward: ForwardFn,
    device: torch.device | str = "cpu",
    train: bool = True,
    repeats: int = 3,
    input_bytes: int | None = None,
) -> dict[str, float]:
    """Time and peak memory of one forward (+ backward when ``train``) pass, per sample.

    ``peak_memory_per_sample_mb`` counts tensors created during the step plus
    ``input_bytes`` (the batch's tensors unless given), divided by the batch size. Timing is
    the median over ``repeats`` after one warm-up call; parameters are not updated.
    """
    device = torch.device(device)
    n = len(batch[-1])
    if input_bytes is None:
        input_bytes = sum(t.numel() * t.element_size() for t in batch if isinstance(t, Tensor))
    step = step_fn(model, batch, forward=forward, device=device, train=train)
    # One warm-up call (allocator, cuDNN autotuning), then the median of ``repeats``.
    timing = time_call(step, repeats=repeats, warmup=1, device=device)
    with PeakMemory(device) as mem:
        step()
    return {
        "time_per_sample_ms": timing["median_ms"] / n,
        "peak_memory_per_sample_mb": (mem.peak + input_bytes) / n / 2**20,
        "batch_size": n,
        "mode": "train" if train else "inference",
    }
